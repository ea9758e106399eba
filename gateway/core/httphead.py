"""A quick parse of the one request head a WebSocket client sends, for the common case only.

h11 parses every request (a state machine, a regular expression per line, header validation):
in a reconnect storm that is a large share of admitting a socket. This parser accepts a strict
subset of what h11 accepts — ``GET <target> HTTP/1.1``, CRLF line ends, header names of token
characters, values of visible ASCII with inner spaces or tabs, exactly one ``Host``, no
``Content-Length`` or ``Transfer-Encoding``, no folded lines — and answers ``None`` for anything
else, which then goes through h11 as before. For a head it accepts, h11 gives the same method,
target, headers (names lower-cased, values without surrounding whitespace, in order) and leaves
the same bytes after the head; ``tests/test_handshake.py`` checks that on valid and broken heads.
"""

from __future__ import annotations

import re

import attrs

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
# Visible ASCII only (h11 also accepts bytes >= 0x80: those heads take the h11 path).
_VALUE = rb"[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*"
_HEADER = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")?[ \t]*")
_REQUEST_LINE = re.compile(rb"GET ([\x21-\x7e]+) HTTP/1\.1")
_END = b"\r\n\r\n"
_REFUSED_NAMES = frozenset({b"content-length", b"transfer-encoding"})


@attrs.frozen
class RequestHead:
    """What the listener reads of a request: h11.Request's fields of the same names."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]


def parse_get_head(data: bytes, max_size: int) -> tuple[RequestHead, bytes] | None:
    """The head at the start of ``data`` and the bytes after it, or None (use h11).

    None also for a head that is incomplete or longer than ``max_size`` bytes.
    """
    end = data.find(_END, 0, max_size)
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    first = _REQUEST_LINE.fullmatch(lines[0])
    if first is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    hosts = 0
    match = _HEADER.fullmatch
    for line in lines[1:]:
        m = match(line)
        if m is None:
            return None
        name = m.group(1).lower()
        if name in _REFUSED_NAMES:
            return None
        if name == b"host":
            hosts += 1
        headers.append((name, m.group(2) or b""))
    if hosts != 1:
        return None
    return RequestHead(b"GET", first.group(1), headers), data[end + 4:]
