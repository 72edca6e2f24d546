"""Devoid Generator: a durable websocket balancer for image-generation backends."""

from importlib import metadata

DISTRIBUTION = "devoid-generator"

try:
    # One version, the package's (setup.cfg); a checkout that was never installed says so.
    __version__ = metadata.version(DISTRIBUTION)
except metadata.PackageNotFoundError:
    __version__ = "0+not-installed"
