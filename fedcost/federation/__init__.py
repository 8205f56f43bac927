"""Real federations: provisioning, startup kits, the coordinator and node processes."""
