"""Clients for the GPU servers requests are balanced across (../shared/BACKENDS.md)."""
