"""tpconf.config."""
