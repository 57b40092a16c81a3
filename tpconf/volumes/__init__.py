"""tpconf.volumes."""
