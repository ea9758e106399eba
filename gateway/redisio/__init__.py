"""The Redis client, the guards of its paths, and the embedded redis-server child (D18)."""
