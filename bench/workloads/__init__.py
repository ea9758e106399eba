"""What the benchmarks open, publish and check: the restaurant-shaped population, the backend's
event mix with its expected audiences, the routed workload run (``bench.routed``, ``bench.soak``)
and its analysis, the fan-out event, the storm's per-socket timings."""
