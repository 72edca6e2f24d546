"""Comparing a secret a client sent (a service key, an image key, the status page key) with the
one expected: in constant time, and with header bytes that are not UTF-8 being just a
mismatch, never a crash."""

from __future__ import annotations

import hmac


def secret_matches(given: str, expected: str) -> bool:
    # surrogateescape: aiohttp hands undecodable header bytes over as surrogates.
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))
