"""tpconf.methods."""
