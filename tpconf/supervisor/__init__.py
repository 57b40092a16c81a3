"""tpconf.supervisor."""
