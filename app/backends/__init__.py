"""Clients for the GPU servers requests are balanced across (docs/backends.md)."""
