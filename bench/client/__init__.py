"""One benchmark client process: opens many WebSockets and timestamps every frame it receives.

Started by the benchmarks as ``python -m bench.client`` (``bench.lib.clients``), never by hand.
Protocol, one JSON object per line:

- stdin, first line: the configuration ``{"client": k, "url": "ws://127.0.0.1:P/ws/waiter",
  "tokens": [...], "indices": [...], "events": E, "connect_timeout": s, "deadline": s,
  "impl": "raw" | "trio-websocket"}``; later lines: ``stop`` (or EOF) ends the run;
- stdout: ``{"type": "connected", ...}`` once every socket is open or failed, ``{"type":
  "progress", "frames": n}`` about every 0.25 s while frames arrive, ``{"type": "done"}`` when
  every open socket has received ``events`` event frames, and finally ``{"type": "result", ...}``
  with, per socket, the sequence numbers received and their receive times (``time.monotonic()``:
  CLOCK_MONOTONIC is one clock for every process of the machine and, unlike ``time.time()``,
  never steps, so a publish→receive difference cannot go negative).

Optional configuration keys (``raw`` only; used by ``bench.routed``, ``bench.storm``,
``bench.memory`` and ``bench.soak``; without them the client behaves as ``bench.fanout`` expects):

- ``targets``: per socket, the request target (``/ws/diner?table_token=…``) instead of
  ``<url path>?token=<token>``, so one process can hold sockets of every endpoint;
- ``expected``: per socket, how many event frames make it complete (instead of ``events`` for
  all); a socket expecting 0 is complete once open;
- ``max_connecting``: handshakes in flight at once (default 64; 0 = all at once, a storm);
- ``wait_go``: build every request, print ``{"type": "ready"}`` and wait (at most ``go_timeout``
  s) for ``go`` on stdin before the first ``connect``, so several processes start together;
- ``ping_on_open``: send ``ping`` right after the 101; a socket counts as connected when its
  ``{"type":"pong"}`` arrives (the gateway reads messages only once the socket is authenticated
  and registered, so the pong marks the end of admission);
- ``ping_interval``: every open socket sends ``ping`` this often (seconds; spread over sockets),
  as the TS clients do every 30 s;
- ``protocol``: 2 to offer the subprotocol ``integrador.v2`` (D20): the 101 must select it, each
  socket sends ``{"type":"resume","positions":{}}`` first, its first frame must be the welcome
  (``welcome`` per socket in the result) and every event's ``_pos`` is reported (``v2``).

Per socket the result also carries ``t_start`` (before ``connect``), ``t_open`` (101 received),
``t_pong`` (first pong received), all ``time.monotonic()``, and ``pongs``.

Two implementations (``bench.client.raw`` and ``bench.client.trio_ws``):

- ``raw`` (default): one thread, epoll over non-blocking sockets, a minimal RFC 6455 client
  (server frames are never masked, so reading them is a few lines). It is the cheapest client
  per frame, which matters on a 2-core machine where clients and gateway share the CPU.
- ``trio-websocket``: one Trio task per socket on trio-websocket/wsproto, as a real Python client
  would be written; several times more CPU per frame.

A frame's sequence number and publish time are in its envelope's ``entity``; the payload bytes of
one event are identical on every socket, so each distinct payload is parsed once per process.
Every wait is bounded by ``connect_timeout`` and ``deadline``; the process exits by itself.
"""
