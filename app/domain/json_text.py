"""JSON in and out of the server, through orjson (C, 3-10x the standard library) with the
standard library behind it for what orjson does not take.

orjson refuses a few documents the standard library reads (lone surrogate escapes such as
"\\ud800", NaN), reads integers past 64 bits as floats, and cannot write either back. Those
rare documents go through `json` (written ASCII-escaped, as they always were), so what the
server accepts, stores and answers is what it was with `json` alone; only the speed differs.
Output is compact (no spaces after separators).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# orjson reads an integer past 64 bits as a float; a float this large (or a big integer read
# that way) sends the document through `json`, which keeps integers exact. Every parsed
# document is walked for one (_scan): a regular expression over the text looking for 19
# digits in a row or an exponent, which this module used to try first on short documents,
# cost 14 us on a 250-character request against 2 us for the walk.
_BIG = 2.0**63


class TooDeep(ValueError):
    """The document nests objects and arrays deeper than the caller allows."""


def loads(text: str | bytes, *, max_depth: int | None = None, **stdlib_options: Any) -> Any:
    """Like json.loads(text, **stdlib_options); the options apply where `json` reads (the
    documents orjson does not read exactly). Raises TooDeep past `max_depth` levels."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = _stdlib_loads(text, stdlib_options)
        if max_depth is not None and _scan(value, max_depth)[0]:
            raise TooDeep(max_depth) from None
        return value
    too_deep, big_number = _scan(value, max_depth)
    if too_deep:
        raise TooDeep(max_depth)
    return _stdlib_loads(text, stdlib_options) if big_number else value


def _stdlib_loads(text: str | bytes, options: dict[str, Any]) -> Any:
    """json.loads, with bytes read as UTF-8 (json would also guess UTF-16 and UTF-32); bytes
    that are not UTF-8 raise UnicodeDecodeError, a ValueError."""
    return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text, **options)


def _scan(document: Any, max_depth: int | None) -> tuple[bool, bool]:
    """(nested deeper than max_depth, holds a float out of 64-bit integer range), in one
    iterative pass (a deep document must not use up the stack here either)."""
    limit = max_depth if max_depth is not None else float("inf")
    pending = [(document, 1)]
    big_number = False
    while pending:
        item, depth = pending.pop()
        if type(item) is dict:
            item = item.values()
        elif type(item) is not list:
            if type(item) is float and not -_BIG < item < _BIG:
                big_number = True
            continue
        if depth > limit:
            return True, big_number
        for inner in item:
            kind = type(inner)
            if kind is dict or kind is list:
                pending.append((inner, depth + 1))
            elif kind is float and not -_BIG < inner < _BIG:
                big_number = True
    return False, big_number


def dumps_bytes(value: Any) -> bytes:
    """`value` as UTF-8 JSON."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def dumps(value: Any) -> str:
    """`value` as JSON text."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"))
