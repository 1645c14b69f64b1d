"""Device programs: the validator core, the reader driver and the device applications."""
