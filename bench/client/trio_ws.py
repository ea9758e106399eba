"""The ``trio-websocket`` client: one Trio task per socket, as a real Python client would be
written; several times more CPU per frame than ``raw``."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from bench.client.protocol import (
    MAX_CONNECTING,
    ORIGIN,
    PROGRESS_INTERVAL,
    Decoder,
    Sock,
    cpu_seconds,
    emit,
    errors_of,
)


def run_trio(cfg: dict[str, Any]) -> dict[str, Any]:
    import trio
    from trio_websocket import ConnectionClosed, HandshakeError, connect_websocket_url

    tokens: list[str] = cfg["tokens"]
    indices: list[int] = cfg["indices"]
    expected = int(cfg["events"])
    conns = [Sock(i) for i in indices]
    decoder = Decoder()
    state: dict[str, Any] = {
        "opened": 0,
        "failed": 0,
        "frames": 0,
        "complete": 0,
        "cpu_at_connected": None,
    }

    async def main() -> None:
        limiter = trio.CapacityLimiter(MAX_CONNECTING)
        all_settled = trio.Event()
        settled = 0

        def settle() -> None:
            nonlocal settled
            settled += 1
            if settled == len(conns):
                all_settled.set()

        async def one(c: Sock, token: str, nursery: trio.Nursery) -> None:
            url = f"{cfg['url']}?token={token}"
            try:
                async with limiter:
                    with trio.fail_after(cfg["connect_timeout"]):
                        ws = await connect_websocket_url(
                            nursery,
                            url,
                            extra_headers=[(b"Origin", ORIGIN.encode())],
                            message_queue_size=100_000,
                        )
            except (OSError, HandshakeError, trio.TooSlowError, ConnectionClosed) as exc:
                c.state, c.error = "failed", f"{type(exc).__name__}: {exc}"[:120]
                state["failed"] += 1
                settle()
                return
            c.state = "open"
            state["opened"] += 1
            settle()
            seqs, times = c.seqs, c.times
            try:
                while True:
                    message = await ws.get_message()
                    now = time.monotonic()
                    payload = message.encode() if isinstance(message, str) else message
                    seq = decoder.seq(payload)
                    if seq is None:
                        c.other += 1
                        continue
                    seqs.append(seq)
                    times.append(now)
                    state["frames"] += 1
                    if len(seqs) == expected:
                        state["complete"] += 1
            except ConnectionClosed as exc:
                c.state = "closed"
                c.close_code = exc.reason.code if exc.reason else 1006
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await ws.aclose()

        async def control(cancel: trio.CancelScope) -> None:
            stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            buf = b""
            async with stream:
                while b"stop" not in buf:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    buf += chunk
            cancel.cancel()

        async def reporter() -> None:
            await all_settled.wait()
            emit(
                {
                    "type": "connected",
                    "client": cfg["client"],
                    "open": state["opened"],
                    "failed": state["failed"],
                    "errors": errors_of(conns),
                }
            )
            state["cpu_at_connected"] = cpu_seconds()
            last = -1
            done = False
            while True:
                await trio.sleep(PROGRESS_INTERVAL)
                if state["frames"] != last:
                    last = state["frames"]
                    emit(
                        {
                            "type": "progress",
                            "client": cfg["client"],
                            "frames": last,
                            "complete": state["complete"],
                        }
                    )
                if not done and state["opened"] and state["complete"] >= state["opened"]:
                    emit(
                        {"type": "done", "client": cfg["client"], "frames": last, "t": time.time()}
                    )
                    done = True

        with trio.move_on_after(cfg["deadline"]) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(control, scope)
                nursery.start_soon(reporter)
                for c, token in zip(conns, tokens, strict=True):
                    nursery.start_soon(one, c, token, nursery)

    trio.run(main)
    return {
        "open": state["opened"],
        "failed": state["failed"],
        "cpu_s_receive": round(cpu_seconds() - (state["cpu_at_connected"] or cpu_seconds()), 3),
        "sockets": [
            {
                "i": c.i,
                "seq": c.seqs,
                "t": c.times,
                "other": c.other,
                "close": c.close_code,
                "state": c.state,
                "error": c.error,
            }
            for c in conns
        ],
    }
