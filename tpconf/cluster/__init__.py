"""tpconf.cluster."""
