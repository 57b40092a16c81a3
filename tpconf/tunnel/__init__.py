"""tpconf.tunnel."""
