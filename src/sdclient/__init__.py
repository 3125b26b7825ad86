"""sdclient."""
