"""tpconf.proxy."""
