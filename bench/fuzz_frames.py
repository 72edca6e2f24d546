"""Seeded websocket frames for fuzzing: valid requests, mutations of them, deep nesting,
non-JSON, JSON that is not an object, and client actions. The same seed gives the same frames."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

from bench.bots import Bot
from bench.images import png_base64

BASE_REQUESTS = [
    {
        "message_type": "request",
        "executor": "automatic1111",
        "gen_type": "text2img",
        "settings": {"premium": 0, "moderate": 0, "sync_with_s3": 0},
        "service_info": {"user_id": 1, "chat_id": 2, "message_id": 3},
        "payload": {"prompt": "a", "steps": 5},
    },
    {
        "message_type": "request",
        "executor": "automatic1111",
        "gen_type": "img2img",
        "settings": {"premium": 1},
        "service_info": {"user_id": 1},
        "payload": {"prompt": "b", "init_images": [png_base64()], "denoising_strength": 0.5},
    },
    {
        "message_type": "request",
        "executor": "kandinsky",
        "gen_type": "text2img",
        "service_info": {"user_id": 2},
        "payload": {"prompt": "c", "width": 512, "prior_steps": "5"},
    },
    {
        "message_type": "request",
        "executor": "kandinsky",
        "gen_type": "mix2img",
        "service_info": {"user_id": 3},
        "payload": {"images_texts": ["x", png_base64(), png_base64((0, 0, 9)), "y"], "weights": [1, 1, 1, 1]},
    },
    {"message_type": "info", "action": "cancel", "object_id": "0" * 24},
    {"message_type": "info", "action": "ack", "object_id": "f" * 24},
]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 3 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.randint(-(2**63), 2**63)
    if kind == 3:
        return rng.choice([0, 1, -1, 10**30, 8193, 1001])
    if kind == 4:
        return rng.uniform(-1e6, 1e6)
    if kind == 5:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(0, 40)))
    if kind == 6:
        return rng.choice(["", "automatic1111", "kandinsky", "mix2img", "request", "info", "\n", "\u202e"])
    if kind == 7:
        return "A" * rng.randrange(0, 64)
    if kind == 8:
        return rng.choice(["NaN", "Infinity"])
    if kind == 9:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {f"k{rng.randrange(100)}": _random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


def _paths(document: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _paths(value, prefix + (index,))


def _mutate(rng: random.Random, document: Any) -> Any:
    document = json.loads(json.dumps(document))
    for _ in range(rng.randrange(1, 4)):
        paths = [path for path in _paths(document) if path]
        if not paths:
            break
        path = rng.choice(paths)
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        operation = rng.randrange(3)
        if operation == 0 and isinstance(parent, dict):
            del parent[path[-1]]
        elif operation == 1:
            parent[path[-1]] = _random_value(rng)
        elif isinstance(parent, dict):
            parent[f"extra_{rng.randrange(1000)}"] = _random_value(rng)
    return document


def fuzz_frames(seed: int, count: int) -> Iterator[str]:
    """`count` frames; a fixed `seed` gives the same ones."""
    rng = random.Random(seed)
    for _ in range(count):
        roll = rng.random()
        base = rng.choice(BASE_REQUESTS)
        if roll < 0.55:
            yield json.dumps(_mutate(rng, base))
        elif roll < 0.65:
            yield json.dumps(base)
        elif roll < 0.72:
            depth = rng.choice([33, 200, 976, 5000])
            yield json.dumps({**base, "service_info": {"user_id": 1}}).replace(
                '"user_id": 1', '"user_id": 1, "deep": ' + "[" * depth + "]" * depth
            )
        elif roll < 0.80:
            text = json.dumps(_mutate(rng, base))
            yield text[: rng.randrange(len(text))]  # truncated
        elif roll < 0.86:
            yield json.dumps(base).replace('"steps": 5', '"steps": NaN').replace('"user_id": 1', '"user_id": Infinity')
        elif roll < 0.92:
            yield json.dumps(_random_value(rng))  # any JSON, rarely an object
        else:
            yield "".join(chr(rng.randrange(1, 0xD7FF)) for _ in range(rng.randrange(1, 200)))


INTAKE_INFOS = {"error", "cancel", "ack"}


async def answer_to_frame(bot: Bot, queued: set[str]) -> dict:
    """The one answer intake gives a frame: `queued`, a refusal, or an action's or error's info
    (finals and notices of earlier requests are passed over)."""

    def is_intake_answer(message: dict) -> bool:
        if message.get("message_type") == "info":
            return message.get("info_type") in INTAKE_INFOS
        status = message.get("gen_status")
        return status == "queued" or (status == "error" and message["object_id"] not in queued)

    answer = await bot.next_message(is_intake_answer)
    if answer.get("gen_status") == "queued":
        queued.add(answer["object_id"])
    return answer
