"""The backends' request bodies (../shared/BACKENDS.md), checked before a request is queued.

A payload that passes is forwarded byte-for-byte in meaning: the same fields and values the
client sent. Validation only reads it.

Unknown fields are refused. Both backends silently ignore keys they do not know, so a typo
such as `stpes` would quietly become the default of 50 steps; refusing it (with the nearest
known name as a hint) is the only way the client hears of it.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, validate

from app.jobs import ExecutorType, GenType

# Generous bounds: they exist to stop a request that would tie up a GPU for hours, not to
# second-guess the backend. Larger than any real use we know of.
MAX_SIDE_PX = 8192
MAX_STEPS = 1000
MAX_IMAGES_PER_JOB = 64


# Raw base64 (whole 4-character groups, padded) or a data: URI of an image. Both backends take
# both forms. The same pattern is documented in the OpenAPI document.
BASE64_IMAGE_PATTERN = (r"^(data:image/[a-z0-9.+-]+;base64,)?([A-Za-z0-9+/]{4})*"
                        r"([A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)$")
_BASE64_IMAGE = re.compile(BASE64_IMAGE_PATTERN)


class Base64Image(fields.String):
    """A base64 image, raw or as a `data:image/...;base64,` URI."""

    default_error_messages = {"invalid_image": "Not a base64 image (raw or data:image/...;base64, URI)."}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(metadata={"pattern": BASE64_IMAGE_PATTERN}, **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not _BASE64_IMAGE.match(text):
            raise self.make_error("invalid_image")
        return text


class Flag(fields.Field):
    """A flag as true/false or 0/1, nothing else (settings flags per PROTOCOL.md; the backends'
    booleans, which their servers also take as 0/1)."""

    def __init__(self, **kwargs: Any) -> None:
        choices: list[dict[str, Any]] = [{"type": "boolean"}, {"type": "integer", "enum": [0, 1]}]
        if kwargs.get("allow_none"):
            choices.append({"type": "null"})
        super().__init__(metadata={"oneOf": choices}, **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool:
        if isinstance(value, bool):
            return value
        if type(value) is int and value in (0, 1):
            return bool(value)
        raise ValidationError("Not a valid flag: use true/false or 0/1.")


class TextOrInteger(fields.Field):
    """Kandinsky's `prior_steps` is documented as a string ("5"); clients also send 5."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(metadata={
            "oneOf": [{"type": "string", "pattern": r"^\s*[0-9]+\s*$"}, {"type": "integer", "minimum": 0}],
            "description": "A whole number, as a string (or an integer)."}, **kwargs)

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


def _int(**kwargs: Any) -> fields.Integer:
    return WholeNumber(**kwargs)


def _side() -> fields.Integer:
    return _int(validate=validate.Range(min=1, max=MAX_SIDE_PX))


def _count() -> fields.Integer:
    return _int(validate=validate.Range(min=1, max=MAX_IMAGES_PER_JOB))


def _optional(field_cls: type[fields.Field], **kwargs: Any) -> fields.Field:
    return field_cls(allow_none=True, **kwargs)


class Automatic1111Common(Schema):
    """Fields both /sdapi/v1/txt2img and /sdapi/v1/img2img take; every one is optional."""

    class Meta:
        # Unknown keys are refused (and documented as refused: additionalProperties false);
        # check_payload reports them itself, with a hint.
        unknown = RAISE

    prompt = fields.String()
    negative_prompt = fields.String()
    styles = _optional(fields.List, cls_or_instance=fields.String())
    seed = _int()
    subseed = _int()
    subseed_strength = fields.Float()
    seed_resize_from_h = _int()
    seed_resize_from_w = _int()
    sampler_name = _optional(fields.String)
    sampler_index = _optional(fields.String)
    scheduler = _optional(fields.String)
    batch_size = _count()
    n_iter = _count()
    steps = _int(validate=validate.Range(min=1, max=MAX_STEPS))
    cfg_scale = fields.Float()
    width = _side()
    height = _side()
    restore_faces = _optional(Flag)
    tiling = _optional(Flag)
    do_not_save_samples = Flag()
    do_not_save_grid = Flag()
    eta = _optional(fields.Float)
    s_min_uncond = _optional(fields.Float)
    s_churn = _optional(fields.Float)
    s_tmax = _optional(fields.Float)
    s_tmin = _optional(fields.Float)
    s_noise = _optional(fields.Float)
    override_settings = _optional(fields.Dict)
    override_settings_restore_afterwards = Flag()
    refiner_checkpoint = _optional(fields.String)
    refiner_switch_at = _optional(fields.Float)
    disable_extra_networks = Flag()
    firstpass_image = _optional(fields.String)
    comments = _optional(fields.Dict)
    denoising_strength = _optional(fields.Float, validate=validate.Range(min=0, max=1))
    script_name = _optional(fields.String)
    script_args = fields.List(fields.Raw(allow_none=True))
    send_images = Flag()
    save_images = Flag()
    alwayson_scripts = fields.Dict()
    infotext = _optional(fields.String)


class Automatic1111Txt2Img(Automatic1111Common):
    enable_hr = Flag()
    firstphase_width = _int(validate=validate.Range(min=0, max=MAX_SIDE_PX))
    firstphase_height = _int(validate=validate.Range(min=0, max=MAX_SIDE_PX))
    hr_scale = fields.Float(validate=validate.Range(min=0, max=8))
    hr_upscaler = _optional(fields.String)
    hr_second_pass_steps = _int(validate=validate.Range(min=0, max=MAX_STEPS))
    hr_resize_x = _int(validate=validate.Range(min=0, max=MAX_SIDE_PX))
    hr_resize_y = _int(validate=validate.Range(min=0, max=MAX_SIDE_PX))
    hr_checkpoint_name = _optional(fields.String)
    hr_sampler_name = _optional(fields.String)
    hr_scheduler = _optional(fields.String)
    hr_prompt = fields.String()
    hr_negative_prompt = fields.String()
    force_task_id = _optional(fields.String)


class Automatic1111Img2Img(Automatic1111Common):
    init_images = fields.List(Base64Image(), required=True,
                              validate=validate.Length(min=1, max=MAX_IMAGES_PER_JOB))
    resize_mode = _int(validate=validate.Range(min=0, max=3))
    image_cfg_scale = _optional(fields.Float)
    mask = _optional(Base64Image)
    mask_blur = _optional(WholeNumber)
    mask_blur_x = _int()
    mask_blur_y = _int()
    mask_round = Flag()
    inpainting_fill = _int(validate=validate.Range(min=0, max=3))
    inpaint_full_res = Flag()
    inpaint_full_res_padding = _int(validate=validate.Range(min=0))
    inpainting_mask_invert = _int(validate=validate.Range(min=0, max=1))
    initial_noise_multiplier = _optional(fields.Float)
    latent_mask = _optional(Base64Image)
    include_init_images = Flag()


class KandinskyCommon(Schema):
    """Optional fields of the Kandinsky API's /text2img and /mix2images."""

    class Meta:
        unknown = RAISE  # see Automatic1111Common

    steps = _int(validate=validate.Range(min=1, max=MAX_STEPS))
    guidance_scale = fields.Float()
    height = _side()
    width = _side()
    sampler = fields.String()
    prior_cf_scale = fields.Float()
    prior_steps = TextOrInteger()
    negative_prior_prompt = fields.String()
    negative_decoder_prompt = fields.String()


class KandinskyText2Img(KandinskyCommon):
    prompt = fields.String(required=True, validate=validate.Length(min=1))


def _check_mix_items(items: list[Any]) -> None:
    if len(items) != 4:
        raise ValidationError(f"Must hold exactly 4 items (text, image, image, text), got {len(items)}.")
    text_field, image_field = fields.String(), Base64Image()
    errors: dict[int, list[str]] = {}
    for index, (item, field) in enumerate(zip(items, (text_field, image_field, image_field, text_field))):
        try:
            field.deserialize(item)
        except ValidationError as exc:
            kind = "a text" if field is text_field else "a base64 image"
            errors[index] = [f"Item {index} must be {kind}: {' '.join(map(str, exc.messages))}"]
    if errors:
        raise ValidationError([msg for msgs in errors.values() for msg in msgs])


class KandinskyMix2Images(KandinskyCommon):
    images_texts = fields.List(fields.String(), required=True, validate=_check_mix_items, metadata={
        "minItems": 4, "maxItems": 4,
        "description": "Exactly 4 items: a text, a base64 image, a base64 image, a text."})
    weights = fields.List(fields.Float(), required=True, validate=validate.Length(equal=4))


PAYLOAD_SCHEMAS: dict[tuple[ExecutorType, GenType], Schema] = {
    (ExecutorType.AUTOMATIC1111, GenType.TEXT2IMG): Automatic1111Txt2Img(),
    (ExecutorType.AUTOMATIC1111, GenType.IMG2IMG): Automatic1111Img2Img(),
    (ExecutorType.KANDINSKY, GenType.TEXT2IMG): KandinskyText2Img(),
    (ExecutorType.KANDINSKY, GenType.MIX2IMG): KandinskyMix2Images(),
}


def check_payload(executor: ExecutorType, gen_type: GenType, payload: dict[str, Any]) -> None:
    """Check a payload against its backend contract without changing it.

    Raises ValidationError whose messages map each bad field to readable reasons; an unknown
    field's reason names the closest known field when there is one.
    """
    schema = PAYLOAD_SCHEMAS[(executor, gen_type)]
    known = schema.fields.keys()
    errors: dict[str, list[str]] = {}
    for name in payload.keys() - known:
        hint = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        errors[name] = [f"Unknown field for {executor.value} {gen_type.value}{suggestion} "
                        "(the backend would ignore it and use its default)"]
    try:
        schema.load(payload, unknown=EXCLUDE)
    except ValidationError as exc:
        for name, messages in exc.normalized_messages().items():
            errors.setdefault(name, []).extend(_flatten(messages))
    if errors:
        raise ValidationError(errors)


def _flatten(messages: Any) -> list[str]:
    if isinstance(messages, dict):
        return [f"{key}: {msg}" for key, value in messages.items() for msg in _flatten(value)]
    if isinstance(messages, list):
        return [msg for item in messages for msg in _flatten(item)]
    return [str(messages)]
