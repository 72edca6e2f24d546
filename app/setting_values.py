"""How the text of one setting becomes its value: each function takes the raw text (from the
environment or .env) and returns the value, or raises ValueError with what was expected;
app/config.py names the setting in the error. Used by the settings table (config.SETTINGS)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass


def flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 0 or 1, got {raw!r}")


def logging_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {raw!r}")
    return level


def port(raw: str) -> int:
    port = int(raw) if raw.strip().isdigit() else -1
    if not 0 <= port <= 65535:
        raise ValueError(f"expected a port number 0-65535, got {raw!r}")
    return port


def positive_int(raw: str) -> int:
    value = int(raw) if raw.strip().isdigit() else 0
    if value <= 0:
        raise ValueError(f"expected a whole number above 0, got {raw!r}")
    return value


def non_negative_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"expected a number of seconds >= 0, got {raw!r}")
    return value


def positive_float(raw: str) -> float:
    value = non_negative_float(raw)
    if value == 0:
        raise ValueError(f"expected a number of seconds above 0, got {raw!r}")
    return value


def services(raw: str) -> dict[str, str]:
    """`telegram:k1 discord:k2` -> {"telegram": "k1", "discord": "k2"}."""
    services: dict[str, str] = {}
    for pair in raw.split():
        name, sep, key = pair.partition(":")
        if not sep or not name or not key:
            # Never echo the pair itself: it holds a key.
            raise ValueError("expected space-separated name:key pairs")
        if name in services:
            raise ValueError(f"service {name!r} is listed twice")
        services[name] = key
    return services


def ratio(raw: str) -> tuple[int, int]:
    parts = raw.split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"expected two whole numbers 'general premium', got {raw!r}")
    general, premium = int(parts[0]), int(parts[1])
    if general == 0 and premium == 0:
        raise ValueError("at least one of the two weights must be above 0")
    return general, premium


def url(raw: str) -> str:
    url = raw.strip().rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {raw!r}")
    return url


def text(raw: str) -> str:
    return raw.strip()


@dataclass(frozen=True)
class PerService:
    """A limit that may differ per service: `named` ones, and `default` for the rest. 0 = no limit."""

    default: float
    named: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __call__(self, service: str) -> float:
        return self.named.get(service, self.default)


def per_service(built_in: str) -> Callable[[str], PerService]:
    """`20` (every service), `telegram:50 discord:10` (the rest keep `built_in`), or both
    (`telegram:50 20`: 50 for telegram, 20 for the rest). 0 turns the limit off."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"expected a number >= 0, got {text!r}")
        return value

    def parse(raw: str) -> PerService:
        default, named = None, {}
        for part in raw.split():
            name, sep, value = part.rpartition(":")
            if not sep:
                if default is not None:
                    raise ValueError(f"two values for every service: {raw!r}")
                default = number(value)
            elif not name or name in named:
                raise ValueError(f"expected name:number pairs and at most one bare number, got {raw!r}")
            else:
                named[name] = number(value)
        return PerService(number(built_in) if default is None else default, named)

    return parse


def service_names(raw: str) -> frozenset[str] | None:
    """`*` = every service (None); else space-separated service names (empty = none)."""
    names = raw.split()
    if names == ["*"]:
        return None
    if "*" in names:
        raise ValueError("'*' stands alone: it already means every service")
    return frozenset(names)
