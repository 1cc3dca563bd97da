"""The job server: sessions and wire adapter, services, and the twistd tap."""
