"""Copy-on-write storage drivers."""
