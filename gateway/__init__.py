"""Integrador real-time WebSocket gateway on Trio."""

__version__ = "1.0.0"
