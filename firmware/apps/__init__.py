"""Device applications: the on-bus validator and the bayi top-up terminal."""
