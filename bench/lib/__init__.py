"""What the benchmarks share. Everything is bounded: every wait has a timeout, and every process
started is stopped by its owner in a ``finally``."""
