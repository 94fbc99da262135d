"""Frys Edge: an embedded edge runtime."""

__version__ = "0.1.0"
