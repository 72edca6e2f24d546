"""Moderation of a request's texts, for requests that ask for it (settings.moderate=1).

A rule is a list of conditions, each a regular expression looked for in the request's
positive texts (`prompt`), its negative texts (`negative_prompt`) or both (`any`); a request
is refused when every condition of one rule matches. Combining conditions is what lets a
rule block a *pairing* (an age term with a sexual term) without blocking either word alone:
"a child flying a kite" and "a nude statue" both pass.

Texts are lowercased and every run of characters that are not letters or digits becomes one
space before matching, so "young_girl" and "pre-teen" meet "young girl" and "pre teen" (but
"n.u.d.e" becomes "n u d e" and slips past "nude": rules are a first line, not a classifier).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validate

from app.config import ConfigError
from app.domain.jobs import GenType

POSITIVE_FIELDS = ("prompt", "hr_prompt")
NEGATIVE_FIELDS = ("negative_prompt", "hr_negative_prompt", "negative_prior_prompt", "negative_decoder_prompt")
# mix2img's images_texts is (text, image, image, text): only the texts are read.
MIX_TEXT_POSITIONS = (0, 3)
BUILT_IN_RULES = "moderation_rules.json"
_NOT_WORD = re.compile(r"[\W_]+")


@dataclass(frozen=True)
class Condition:
    where: str  # "prompt", "negative_prompt" or "any"
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class Rule:
    name: str
    conditions: tuple[Condition, ...]

    def matches(self, positive: str, negative: str) -> bool:
        texts = {"prompt": positive, "negative_prompt": negative, "any": f"{positive} | {negative}"}
        return all(condition.pattern.search(texts[condition.where]) for condition in self.conditions)


def _compile(value: str) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValidationError(f"not a regular expression: {exc}") from None


class ConditionSchema(Schema):
    where = fields.String(required=True, validate=validate.OneOf(["prompt", "negative_prompt", "any"]))
    pattern = fields.String(required=True, validate=validate.Length(min=1))

    @post_load
    def build(self, data: dict[str, Any], **_: object) -> Condition:
        return Condition(data["where"], _compile(data["pattern"]))


class RuleSchema(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1))
    description = fields.String(load_default="")
    all_of = fields.List(fields.Nested(ConditionSchema), required=True, validate=validate.Length(min=1))

    @post_load
    def build(self, data: dict[str, Any], **_: object) -> Rule:
        return Rule(data["name"], tuple(data["all_of"]))


class RulesFileSchema(Schema):
    rules = fields.List(fields.Nested(RuleSchema), required=True)


@dataclass(frozen=True)
class Moderator:
    rules: tuple[Rule, ...]

    @classmethod
    def load(cls, path: str) -> Moderator:
        """The rules of MODERATION_RULES_FILE (`path`), or the built-in ones when it is empty.
        Raises ConfigError naming the file and what is wrong in it."""
        where = path or "the built-in moderation rules"
        try:
            text = (
                Path(path).read_text("utf-8") if path else resources.files("app").joinpath(BUILT_IN_RULES).read_text()
            )
            loaded = RulesFileSchema().load(json.loads(text))
        except OSError as exc:
            raise ConfigError(f"MODERATION_RULES_FILE: {where} cannot be read: {exc.strerror or exc}") from None
        except (ValueError, ValidationError) as exc:
            detail = exc.normalized_messages() if isinstance(exc, ValidationError) else exc
            raise ConfigError(f"MODERATION_RULES_FILE: {where} is not a valid rules file: {detail}") from None
        return cls(tuple(loaded["rules"]))

    def blocking_rule(self, gen_type: GenType, payload: dict[str, Any]) -> str | None:
        """The name of the first rule the payload's texts match, or None when it may run."""
        positive, negative = request_texts(gen_type, payload)
        for rule in self.rules:
            if rule.matches(positive, negative):
                return rule.name
        return None


def request_texts(gen_type: GenType, payload: dict[str, Any]) -> tuple[str, str]:
    """(positive, negative) texts of a payload, normalized for matching."""
    positive = [payload.get(name) for name in POSITIVE_FIELDS]
    texts = payload.get("images_texts")
    if isinstance(texts, list):
        if gen_type is GenType.MIX2IMG:
            texts = [texts[i] for i in MIX_TEXT_POSITIONS if i < len(texts)]
        positive.extend(texts)
    negative = [payload.get(name) for name in NEGATIVE_FIELDS]
    return _normalized(positive), _normalized(negative)


def _normalized(texts: list[Any]) -> str:
    return " | ".join(_NOT_WORD.sub(" ", text.lower()).strip() for text in texts if isinstance(text, str))
