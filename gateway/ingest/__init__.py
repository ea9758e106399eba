"""Redis -> jobs: the critical stream through this instance's consumer group, pub/sub, dead letters."""
