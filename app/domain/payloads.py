"""The backends' request bodies, checked against their HTTP contracts before a request is queued
(docs/protocol.md).

Lenient in what is accepted, exact in what is forwarded:

- Every key a backend's API knows for any of its gen types is accepted for every gen type of
  that executor (the official client sends its whole payload class whatever the gen type),
  and `null` means "not set".
- A key the backend does not know at all is not a reason to refuse: it is forwarded (bots
  use extension fields) and reported back as an `unknown_field` notice naming the nearest
  known key, so a typo such as `stpes` is still heard of.
- Values of known keys are checked (types, bounds, base64 images), and a request that cannot
  work (text2img without a prompt, img2img without an image, mix2img without its four
  images_texts) is refused.

Validation only reads the payload: the backend receives the fields and values the client sent.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, validate

from app.domain import fast_checks
from app.domain.jobs import ExecutorType, GenType

# Generous bounds: they exist to stop a request that would tie up a GPU for hours, not to
# second-guess the backend. Larger than any real use we know of.
MAX_SIDE_PX = 8192
MAX_STEPS = 1000
MAX_IMAGES_PER_JOB = 64
# Unknown keys named (with a nearest-name hint) in one notice; the rest are only counted, so a
# payload of a million junk keys costs a million set lookups, not a million fuzzy matches.
MAX_UNKNOWN_KEYS_REPORTED = 20
MAX_KEY_CHARS_REPORTED = 64
# Payload schemas narrowed to one set of keys, kept (see _narrowed).
NARROWED_SCHEMAS_CACHED = 256


# Raw base64 (whole 4-character groups, padded) or a data: URI of an image. Both backends take
# both forms. The first characters must be how the base64 of a PNG, JPEG, GIF, BMP, TIFF or
# WebP file begins (a backend answers anything else with a 500, blaming itself): each
# alternative below is that file signature in base64, a whole number of 4-character groups.
_IMAGE_START = (
    r"(iVBORw0KGgo[A-Za-z0-9+/]|/9j/|R0lGODdh|R0lGODlh|Qk[A-Za-z0-9+/]{2}"
    r"|SUkqA[A-Za-z0-9+/]{3}|TU0AK[A-Za-z0-9+/]{3}|UklGR[A-Za-z0-9+/]{6}XRUJQ)"
)
# The same rule is documented as this pattern in the OpenAPI document; it is checked in C
# (is_base64_image), not by the pattern, which backtracks over megabytes.
BASE64_IMAGE_PATTERN = (
    r"^(data:image/[a-z0-9.+-]+;base64,)?" + _IMAGE_START + r"([A-Za-z0-9+/]{4})*"
    r"([A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)$"
)
_DATA_URI_PREFIX = re.compile(r"data:image/[a-z0-9.+-]+;base64,")
_IMAGE_START_RE = re.compile(_IMAGE_START)


_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def is_base64_image(text: str) -> bool:
    """True if `text` matches BASE64_IMAGE_PATTERN: strict base64 whose bytes begin like an
    image file."""
    prefix = _DATA_URI_PREFIX.match(text) if text.startswith("data:") else None
    data = text[prefix.end() :] if prefix else text
    start = _IMAGE_START_RE.match(data, 0, 16)
    if start is None or len(data) <= start.end() or len(data) % 4 or not data.isascii():
        return False
    # Strict base64: the alphabet only, then at most two `=` ending the last 4-character group.
    # Deleting the alphabet leaves nothing else: a C pass at about 1 ns per character, a
    # third of what decoding with binascii costs (this runs on every image, megabytes each).
    rest = data.encode("ascii").translate(None, _BASE64_ALPHABET)
    return not rest or (rest in (b"=", b"==") and data.endswith(rest.decode()))


class Base64Image(fields.String):
    """A base64 image, raw or as a `data:image/...;base64,` URI."""

    default_error_messages = {  # noqa: RUF012 - marshmallow's own idiom, merged per class
        "invalid_image": "Not a base64 image (raw or data:image/...;base64, URI, of a PNG, JPEG, GIF, WebP, "
        "BMP or TIFF)."
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(metadata={"pattern": BASE64_IMAGE_PATTERN}, **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not is_base64_image(text):
            raise self.make_error("invalid_image")
        return text


class Flag(fields.Field):
    """A flag as true/false or 0/1, nothing else (settings flags per docs/protocol.md; the backends'
    booleans, which their servers also take as 0/1)."""

    def __init__(self, **kwargs: Any) -> None:
        choices: list[dict[str, Any]] = [{"type": "boolean"}, {"type": "integer", "enum": [0, 1]}]
        if kwargs.get("allow_none"):
            choices.append({"type": "null"})
        metadata = {"oneOf": choices, **kwargs.pop("metadata", {})}
        super().__init__(metadata=metadata, **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool:
        if isinstance(value, bool):
            return value
        if type(value) is int and value in (0, 1):
            return bool(value)
        raise ValidationError("Not a valid flag: use true/false or 0/1.")


class TextOrInteger(fields.Field):
    """Kandinsky's `prior_steps` is documented as a string ("5"); clients also send 5."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            metadata={
                "oneOf": [{"type": "string", "pattern": r"^\s*[0-9]+\s*$"}, {"type": "integer", "minimum": 0}],
                "description": "A whole number, as a string (or an integer).",
            },
            **kwargs,
        )

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            if not value.strip().isdigit():
                raise ValidationError("Not a whole number.")
            return value
        return WholeNumber(validate=validate.Range(min=0)).deserialize(value)


class WholeNumber(fields.Integer):
    """An integer as JSON Schema means it: 5 or 5.0, never 5.5, "5" or true."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _validated(self, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return super()._validated(value)


fast_checks.register(Base64Image, lambda value: type(value) is str and is_base64_image(value))
fast_checks.register(
    Flag, lambda value: type(value) is bool or (type(value) is int and (value == 0 or value == 1)), convert=bool
)
fast_checks.register(WholeNumber, lambda value: type(value) is int)  # 5.0 is left to the schema


def _int(**kwargs: Any) -> fields.Integer:
    return WholeNumber(**kwargs)


def _side() -> fields.Integer:
    return _int(validate=validate.Range(min=1, max=MAX_SIDE_PX))


def _count() -> fields.Integer:
    return _int(validate=validate.Range(min=1, max=MAX_IMAGES_PER_JOB))


class BackendPayload(Schema):
    """Base of the payload schemas: keys the schema does not declare are kept (they are
    forwarded), and every optional field also takes `null`, meaning "not set"."""

    class Meta:
        unknown = INCLUDE

    def on_bind_field(self, field_name: str, field_obj: fields.Field) -> None:
        if field_obj.required:
            return
        field_obj.allow_none = True
        # Typed fields are documented as nullable by apispec; fields described by a oneOf
        # (flags, prior_steps) say it themselves.
        choices = field_obj.metadata.get("oneOf")
        if choices is not None and {"type": "null"} not in choices:
            field_obj.metadata = {**field_obj.metadata, "oneOf": [*choices, {"type": "null"}]}


class Automatic1111Fields(BackendPayload):
    """Every field of /sdapi/v1/txt2img and /sdapi/v1/img2img, all optional: a key of either
    route is accepted on both (the other route ignores it)."""

    prompt = fields.String()
    negative_prompt = fields.String()
    styles = fields.List(fields.String())
    seed = _int()
    subseed = _int()
    subseed_strength = fields.Float()
    seed_resize_from_h = _int()
    seed_resize_from_w = _int()
    sampler_name = fields.String()
    sampler_index = fields.String()
    scheduler = fields.String()
    batch_size = _count()
    n_iter = _count()
    steps = _int(validate=validate.Range(min=1, max=MAX_STEPS))
    cfg_scale = fields.Float()
    width = _side()
    height = _side()
    restore_faces = Flag()
    tiling = Flag()
    do_not_save_samples = Flag()
    do_not_save_grid = Flag()
    eta = fields.Float()
    s_min_uncond = fields.Float()
    s_churn = fields.Float()
    s_tmax = fields.Float()
    s_tmin = fields.Float()
    s_noise = fields.Float()
    override_settings = fields.Dict()
    override_settings_restore_afterwards = Flag()
    refiner_checkpoint = fields.String()
    refiner_switch_at = fields.Float()
    disable_extra_networks = Flag()
    firstpass_image = fields.String()
    comments = fields.Dict()
    denoising_strength = fields.Float(validate=validate.Range(min=0, max=1))
    script_name = fields.String()
    script_args = fields.List(fields.Raw(allow_none=True))
    send_images = Flag()
    save_images = Flag()
    alwayson_scripts = fields.Dict()
    infotext = fields.String()
    # txt2img's own
    enable_hr = Flag()
    firstphase_width = _int(validate=validate.Range(min=0, max=MAX_SIDE_PX))
    firstphase_height = _int(validate=validate.Range(min=0, max=MAX_SIDE_PX))
    hr_scale = fields.Float(validate=validate.Range(min=0, max=8))
    hr_upscaler = fields.String()
    hr_second_pass_steps = _int(validate=validate.Range(min=0, max=MAX_STEPS))
    hr_resize_x = _int(validate=validate.Range(min=0, max=MAX_SIDE_PX))
    hr_resize_y = _int(validate=validate.Range(min=0, max=MAX_SIDE_PX))
    hr_checkpoint_name = fields.String()
    hr_sampler_name = fields.String()
    hr_scheduler = fields.String()
    hr_prompt = fields.String()
    hr_negative_prompt = fields.String()
    force_task_id = fields.String()
    # img2img's own
    init_images = fields.List(Base64Image(), validate=validate.Length(max=MAX_IMAGES_PER_JOB))
    resize_mode = _int(validate=validate.Range(min=0, max=3))
    image_cfg_scale = fields.Float()
    mask = Base64Image()
    mask_blur = WholeNumber()
    mask_blur_x = _int()
    mask_blur_y = _int()
    mask_round = Flag()
    inpainting_fill = _int(validate=validate.Range(min=0, max=3))
    inpaint_full_res = Flag()
    inpaint_full_res_padding = _int(validate=validate.Range(min=0))
    inpainting_mask_invert = _int(validate=validate.Range(min=0, max=1))
    initial_noise_multiplier = fields.Float()
    latent_mask = Base64Image()
    include_init_images = Flag()


def _needed(what: str) -> dict[str, Any]:
    """Error messages of a field a gen type cannot do without (missing or null alike)."""
    return {"required": what, "null": what}


_PROMPT_NEEDED = _needed("text2img needs a prompt: what to draw.")


class Automatic1111Txt2Img(Automatic1111Fields):
    prompt = fields.String(
        required=True,
        validate=validate.Length(min=1),
        error_messages=_PROMPT_NEEDED,
        metadata={"description": "Required for text2img: what to draw."},
    )


class Automatic1111Img2Img(Automatic1111Fields):
    init_images = fields.List(
        Base64Image(),
        required=True,
        validate=validate.Length(min=1, max=MAX_IMAGES_PER_JOB),
        error_messages=_needed(f"img2img needs init_images: a list of 1 to {MAX_IMAGES_PER_JOB} base64 images."),
        metadata={"description": "Required for img2img: the image(s) to start from."},
    )


class KandinskyFields(BackendPayload):
    """Every field of the Kandinsky API's /text2img and /mix2images, all optional."""

    prompt = fields.String()
    images_texts = fields.List(fields.String(), validate=validate.Length(max=4))
    weights = fields.List(fields.Float(), validate=validate.Length(max=4))
    steps = _int(validate=validate.Range(min=1, max=MAX_STEPS))
    guidance_scale = fields.Float()
    height = _side()
    width = _side()
    sampler = fields.String()
    prior_cf_scale = fields.Float()
    prior_steps = TextOrInteger()
    negative_prior_prompt = fields.String()
    negative_decoder_prompt = fields.String()


class KandinskyText2Img(KandinskyFields):
    prompt = fields.String(
        required=True,
        validate=validate.Length(min=1),
        error_messages=_PROMPT_NEEDED,
        metadata={"description": "Required for text2img: what to draw."},
    )


def _check_mix_items(items: list[Any]) -> None:
    if len(items) != 4:
        raise ValidationError(f"Must hold exactly 4 items (text, image, image, text), got {len(items)}.")
    text_field, image_field = fields.String(), Base64Image()
    errors: list[str] = []
    for index, (item, field) in enumerate(zip(items, (text_field, image_field, image_field, text_field), strict=True)):
        try:
            field.deserialize(item)
        except ValidationError as exc:
            kind = "a text" if field is text_field else "a base64 image"
            errors.append(f"Item {index} must be {kind}: {' '.join(map(str, exc.messages))}")
    if errors:
        raise ValidationError(errors)


class KandinskyMix2Images(KandinskyFields):
    images_texts = fields.List(
        fields.String(),
        required=True,
        validate=_check_mix_items,
        error_messages=_needed("mix2img needs images_texts: a text, a base64 image, a base64 image, a text."),
        metadata={
            "minItems": 4,
            "maxItems": 4,
            "description": "Required for mix2img: a text, a base64 image, a base64 image, a text.",
        },
    )
    weights = fields.List(
        fields.Float(),
        required=True,
        validate=validate.Length(equal=4),
        error_messages=_needed("mix2img needs weights: one number per images_texts item."),
        metadata={"description": "Required for mix2img: one weight per images_texts item."},
    )


PAYLOAD_SCHEMAS: dict[tuple[ExecutorType, GenType], Schema] = {
    (ExecutorType.AUTOMATIC1111, GenType.TEXT2IMG): Automatic1111Txt2Img(),
    (ExecutorType.AUTOMATIC1111, GenType.IMG2IMG): Automatic1111Img2Img(),
    (ExecutorType.KANDINSKY, GenType.TEXT2IMG): KandinskyText2Img(),
    (ExecutorType.KANDINSKY, GenType.MIX2IMG): KandinskyMix2Images(),
}


# Per schema: each declared field's quick check (None: the schema loads it), and the required ones.
_QUICK_CHECKS = {key: fast_checks.field_checks(schema) for key, schema in PAYLOAD_SCHEMAS.items()}
_REQUIRED = {
    key: [name for name, field in schema.fields.items() if field.required] for key, schema in PAYLOAD_SCHEMAS.items()
}


@dataclass(frozen=True)
class UnknownFields:
    """Payload keys the backend does not know: forwarded all the same, and reported."""

    executor: ExecutorType
    hints: dict[str, str | None]  # key (shortened) -> the nearest known key, if any
    unreported: int  # further unknown keys, counted but not named

    def sentence(self) -> str:
        parts = []
        for name, hint in self.hints.items():
            parts.append(
                f"payload.{name} is not an {self.executor.value} field" + (f"; did you mean {hint}?" if hint else ".")
            )
        if self.unreported:
            parts.append(f"{self.unreported} more unknown keys are not listed.")
        many = len(self.hints) + self.unreported > 1
        parts.append(
            f"{'They were' if many else 'It was'} forwarded and the backend will ignore {'them' if many else 'it'}."
        )
        return " ".join(parts)


def check_payload(executor: ExecutorType, gen_type: GenType, payload: dict[str, Any]) -> UnknownFields | None:
    """Check a payload against its backend contract without changing it.

    Returns the keys the backend does not know (None if there are none): they are not an
    error. Raises ValidationError mapping each bad known field to readable reasons.
    """
    schema = PAYLOAD_SCHEMAS[(executor, gen_type)]
    quick = _QUICK_CHECKS[(executor, gen_type)]
    # Keys the schema must load: those a quick check cannot vouch for, and missing required ones.
    to_load = {name for name in _REQUIRED[(executor, gen_type)] if name not in payload}
    unknown: list[str] = []
    for name, value in payload.items():  # one pass: a payload may carry half a million keys
        if name not in quick:
            unknown.append(name)
        else:
            check = quick[name]
            if check is None or not check(value):
                to_load.add(name)
    if to_load:
        try:
            _narrowed(executor, gen_type, frozenset(to_load)).load(payload)
        except ValidationError as exc:
            raise ValidationError(
                {name: _flatten(messages) for name, messages in exc.normalized_messages().items()}
            ) from None
    if not unknown:
        return None
    hints = {}
    for name in unknown[:MAX_UNKNOWN_KEYS_REPORTED]:
        close = difflib.get_close_matches(name[:MAX_KEY_CHARS_REPORTED], schema.fields, n=1, cutoff=0.6)
        hints[_printable(name)] = close[0] if close else None
    return UnknownFields(executor, hints, max(0, len(unknown) - MAX_UNKNOWN_KEYS_REPORTED))


@functools.lru_cache(maxsize=NARROWED_SCHEMAS_CACHED)
def _narrowed(executor: ExecutorType, gen_type: GenType, names: frozenset[str]) -> Schema:
    """The payload schema limited to the fields `names`. marshmallow visits every declared
    field on each load, about 80 for AUTOMATIC1111; bots send the same few keys every time,
    so the narrowed schema is built once per key set."""
    return type(PAYLOAD_SCHEMAS[(executor, gen_type)])(only=names)


def _printable(name: str) -> str:
    """A key as it may be quoted back: shortened, control characters escaped."""
    short = name[:MAX_KEY_CHARS_REPORTED] + ("..." if len(name) > MAX_KEY_CHARS_REPORTED else "")
    return short.encode("unicode_escape").decode("ascii") if not short.isprintable() else short


def _flatten(messages: Any) -> list[str]:
    if isinstance(messages, dict):
        return [f"{key}: {msg}" for key, value in messages.items() for msg in _flatten(value)]
    if isinstance(messages, list):
        return [msg for item in messages for msg in _flatten(item)]
    return [str(messages)]
