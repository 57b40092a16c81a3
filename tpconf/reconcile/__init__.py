"""tpconf.reconcile."""
