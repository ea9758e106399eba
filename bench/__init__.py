"""The gateway's benchmarks: ``python -m bench.<name>`` for fanout, routed, storm, memory, soak.

``bench.lib`` holds what they share (processes, the gateway and client processes, measurement,
results), ``bench.workloads`` what they publish, open and check, and ``bench.client`` the client
process they start. See ``bench/README.md``.
"""
