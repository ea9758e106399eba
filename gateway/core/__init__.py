"""The pure core: decisions and protocol state, no I/O library (no trio, coredis, anyio, h11, wsproto)."""
