"""Quick acceptance checks compiled from the marshmallow schemas, for the intake's hot path.

marshmallow is the authority: it declares every field and words every error. But loading a
small request through it costs about 90 µs, most of a request's intake CPU. Bots send the
same plain shapes all day (a string, an integer in range, a flag), and for those a check
compiled from the field's declaration answers "marshmallow would accept this" in well under
a microsecond.

A check only ever says "accepted, as marshmallow would" or "ask marshmallow": it is
compiled for the field classes listed below and gives up on anything else, so a value it
is unsure of is always loaded by the schema, and every refusal comes from the schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, missing

Check = Callable[[Any], bool]
# A float() of an integer this large would overflow; such values are left to marshmallow.
_FLOAT_SAFE_INT = 1 << 1000


def _is_text(value: Any) -> bool:
    return type(value) is str


def _is_integer(value: Any) -> bool:
    return type(value) is int  # bool is not: type(True) is bool


def _is_number(value: Any) -> bool:
    kind = type(value)
    return kind is float or (kind is int and -_FLOAT_SAFE_INT < value < _FLOAT_SAFE_INT)


def _is_object(value: Any) -> bool:
    return type(value) is dict


# Exact classes only: a subclass may deserialize differently (it registers its own check).
# Integer counts only when strict.
_TYPE_CHECKS: dict[type, Check] = {
    fields.String: _is_text,
    fields.Float: _is_number,
    fields.Raw: lambda value: True,
    fields.Dict: _is_object,
}
# Field classes whose loaded value is not the value given (but converted by this function).
_CONVERSIONS: dict[type, Callable[[Any], Any]] = {}


def register(field_class: type, check: Check, convert: Callable[[Any], Any] | None = None) -> None:
    """Vouch for a field class of our own: `check(value)` is True only for values its
    _deserialize accepts, and it loads them as `convert(value)` (unchanged without it)."""
    _TYPE_CHECKS[field_class] = check
    if convert is not None:
        _CONVERSIONS[field_class] = convert


def field_check(field: fields.Field) -> Check | None:
    """A check for `field`, or None when this module cannot vouch for it."""
    if type(field) is fields.List:
        inner = field_check(field.inner)
        type_check: Check | None = (
            None if inner is None else (lambda value: type(value) is list and all(inner(item) for item in value))
        )
    elif type(field) is fields.Dict and (field.key_field is not None or field.value_field is not None):
        type_check = None
    elif type(field) is fields.Integer:
        type_check = _is_integer if field.strict else None
    else:
        type_check = _TYPE_CHECKS.get(type(field))
    if type_check is None:
        return None
    validators = tuple(field.validators)
    allow_none = field.allow_none

    def check(value: Any) -> bool:
        if value is None:
            return allow_none
        if not type_check(value):
            return False
        try:
            for validator in validators:
                if validator(value) is False:
                    return False
        except ValidationError:
            return False
        return True

    return check


def field_checks(schema: Schema) -> dict[str, Check | None]:
    return {name: field_check(field) for name, field in schema.fields.items()}


class QuickLoader:
    """`load(data)` returns what `schema.load(data)` returns when every field of `data` passes
    its quick check, and None otherwise (then load it with the schema, which says what is
    wrong). For schemas whose fields load to the value given (strings, whole numbers,
    objects, lists), registered classes and enums by value."""

    def __init__(self, schema: Schema) -> None:
        if any(schema._hooks.values()) or any(field.data_key or field.attribute for field in schema.fields.values()):
            raise ValueError(f"{type(schema).__name__} has hooks or renamed fields: a quick loader cannot vouch for it")
        self._include_unknown = schema.unknown == INCLUDE
        self._fields: list[tuple[str, Check | None, Callable[[Any], Any] | None, bool, Any]] = []
        for name, field in schema.fields.items():
            convert: Callable[[Any], Any] | None = None
            check = field_check(field)
            if isinstance(field, fields.Enum) and type(field) is fields.Enum and field.by_value:
                by_value = {member.value: member for member in field.enum}
                check, convert = (lambda value, choices=by_value: type(value) is str and value in choices), by_value.get
            elif type(field) in _CONVERSIONS:
                convert = _CONVERSIONS[type(field)]
            elif type(field) is fields.Float:
                check = None  # loads as float(value): left to the schema
            self._fields.append((name, check, convert, field.required, field.load_default))
        self._known = {key for key, *_ in self._fields}

    def load(self, data: Any) -> dict[str, Any] | None:
        if type(data) is not dict:
            return None
        if not self._include_unknown and not data.keys() <= self._known:
            return None
        loaded = dict(data) if self._include_unknown else {}
        for key, check, convert, required, default in self._fields:
            if key in data:
                value = data[key]
                if check is None or not check(value):
                    return None
                loaded[key] = convert(value) if convert is not None and value is not None else value
            elif required:
                return None
            elif default is not missing:
                loaded[key] = default() if callable(default) else default
        return loaded
