"""A bot that sets `moderate` gets moderation: a blocked prompt is refused with its code before
any GPU sees it; without the flag nothing is checked; ordinary prompts pass."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from app.config import ConfigError
from app.domain.jobs import GenType
from app.moderation import Moderator
from bench.bots import request_message
from tests.conftest import SERVICE_KEYS

TELEGRAM = {"authorization": SERVICE_KEYS["telegram"], "service": "telegram"}


def moderated(payload: dict, *, moderate: int = 1, executor: str = "automatic1111", gen_type: str = "text2img"):
    message = request_message(executor, gen_type, payload)
    message["settings"]["moderate"] = moderate
    return message


async def test_a_blocked_prompt_is_refused_before_any_backend_call(start_backend, start_balancer):
    gpu = await start_backend("automatic1111")
    balancer = await start_balancer([gpu])
    bot = await balancer.connect("telegram")

    refused = await bot.submit(moderated({"prompt": "nude 12 year old girl"}))
    assert refused["gen_status"] == "error" and refused["code"] == "moderated"
    assert "minors_sexual" in refused["result"]["content"]
    response = await balancer.client.post(
        "/api/v1/requests", headers=TELEGRAM, json=moderated({"prompt": "Lewd-Schoolgirl, 4k"})
    )
    assert response.status == 403 and (await response.json())["error"]["code"] == "moderated"

    fine = await bot.submit(moderated({"prompt": "a lighthouse at dusk"}))
    assert (await bot.final(fine["object_id"]))["gen_status"] == "ok"
    assert [call.body["prompt"] for call in gpu.state.received] == ["a lighthouse at dusk"]
    metrics = await (await balancer.client.get("/metrics")).text()
    assert 'devoid_moderation_checks_total{outcome="blocked",stage="prompt"} 2.0' in metrics
    assert 'devoid_moderation_checks_total{outcome="passed",stage="prompt"} 1.0' in metrics


async def test_without_the_moderate_flag_nothing_is_checked(start_backend, start_balancer):
    gpu = await start_backend("automatic1111")
    balancer = await start_balancer([gpu], MODERATION_RULES_FILE="")
    bot = await balancer.connect("telegram")
    queued = await bot.submit(moderated({"prompt": "nude 12 year old girl"}, moderate=0))
    assert queued["gen_status"] == "queued"
    assert (await bot.final(queued["object_id"]))["gen_status"] == "ok"
    metrics = await (await balancer.client.get("/metrics")).text()
    assert "devoid_moderation_checks_total{" not in metrics


@pytest.mark.parametrize(
    "gen_type, payload",
    [
        ("text2img", {"prompt": "a child flying a kite in a park"}),
        ("text2img", {"prompt": "a nude marble statue, renaissance"}),
        ("text2img", {"prompt": "portrait of a woman", "negative_prompt": "child, nude, blurry"}),
        ("text2img", {"prompt": "a 30 year old man in a sexy suit"}),
    ],
)
def test_ordinary_prompts_pass_the_built_in_rules(gen_type, payload):
    assert Moderator.load("").blocking_rule(GenType(gen_type), payload) is None


@pytest.mark.parametrize(
    "gen_type, payload, rule",
    [
        ("text2img", {"prompt": "NUDE!!young_girl"}, "minors_sexual"),
        ("text2img", {"prompt": "x", "hr_prompt": "a pre-teen in lingerie"}, "minors_sexual"),
        (
            "text2img",
            {"prompt": "little boy on a bed", "negative_prompt": "clothes"},
            "minors_unclothed_by_negative_prompt",
        ),
        (
            "text2img",
            {"prompt": "naked girl", "negative_prompt": "adult, mature"},
            "sexual_not_adult_by_negative_prompt",
        ),
        ("mix2img", {"images_texts": ["toddler", "aGk=", "aGk=", "erotic"], "weights": [1, 1, 1, 1]}, "minors_sexual"),
    ],
)
def test_the_built_in_rules_block_sexual_content_involving_minors(gen_type, payload, rule):
    assert Moderator.load("").blocking_rule(GenType(gen_type), payload) == rule


async def test_an_operator_rules_file_replaces_the_built_in_rules(tmp_path, start_backend, start_balancer):
    rules = tmp_path / "rules.json"
    rules.write_text(
        json.dumps({"rules": [{"name": "no_clowns", "all_of": [{"where": "any", "pattern": r"\bclowns?\b"}]}]})
    )
    balancer = await start_balancer([await start_backend("kandinsky")], MODERATION_RULES_FILE=str(rules))
    bot = await balancer.connect("telegram")
    refused = await bot.submit(moderated({"prompt": "two Clowns"}, executor="kandinsky"))
    assert refused["code"] == "moderated" and "no_clowns" in refused["result"]["content"]


@pytest.mark.parametrize(
    "content, complaint",
    [
        ("{", "is not a valid rules file"),
        ('{"rules": [{"name": "x", "all_of": [{"where": "title", "pattern": "a"}]}]}', "Must be one of"),
        (
            '{"rules": [{"name": "x", "all_of": [{"where": "any", "pattern": "(unclosed"}]}]}',
            "not a regular expression",
        ),
    ],
)
async def test_a_broken_rules_file_stops_start_up_with_one_line(tmp_path, start_balancer, content, complaint):
    rules = tmp_path / "rules.json"
    rules.write_text(content)
    with pytest.raises(ConfigError, match="MODERATION_RULES_FILE") as raised:
        await start_balancer([], MODERATION_RULES_FILE=str(rules))
    assert complaint in str(raised.value) and "\n" not in str(raised.value)


class Classifier:
    """The operator's image classifier on a real port: blocks images while `blocking`."""

    def __init__(self) -> None:
        self.blocking = False
        self.seen: list[tuple[str, str, bytes]] = []  # object_id, content type, first bytes

    def app(self) -> web.Application:
        async def judge(request: web.Request) -> web.Response:
            body = await request.read()
            self.seen.append((request.headers["X-Devoid-Object-Id"], request.content_type, body[:2]))
            if self.blocking:
                return web.json_response({"allowed": False, "reason": "explicit content (score 0.97)"})
            return web.json_response({"allowed": True})

        app = web.Application()
        app.router.add_post("/check", judge)
        return app


async def test_the_image_hook_judges_finished_images_of_moderated_requests(
    aiohttp_server, start_backend, start_balancer
):
    classifier = Classifier()
    hook = await aiohttp_server(classifier.app(), host="127.0.0.1")
    balancer = await start_balancer([await start_backend("kandinsky")], IMAGE_CHECK_URL=str(hook.make_url("/check")))
    bot = await balancer.connect("telegram")

    allowed = await bot.submit(moderated({"prompt": "a harbour"}, executor="kandinsky"))
    assert (await bot.final(allowed["object_id"]))["result"]["content_type"] == "image_url"
    unmoderated = await bot.submit(moderated({"prompt": "a barn"}, moderate=0, executor="kandinsky"))
    await bot.final(unmoderated["object_id"])
    classifier.blocking = True
    blocked = await bot.submit(moderated({"prompt": "a tower"}, executor="kandinsky"))
    refused = await bot.final(blocked["object_id"])

    assert refused["gen_status"] == "error"
    assert refused["result"]["content"] == "Refused by image moderation: explicit content (score 0.97)"
    assert not (balancer.config.images_path / f"{blocked['object_id']}.jpg").exists()
    jpeg = ("image/jpeg", b"\xff\xd8")
    assert classifier.seen == [(allowed["object_id"], *jpeg), (blocked["object_id"], *jpeg)]


async def test_an_image_that_cannot_be_checked_is_not_delivered(start_backend, start_balancer, unused_tcp_port):
    balancer = await start_balancer(
        [await start_backend("kandinsky")], IMAGE_CHECK_URL=f"http://127.0.0.1:{unused_tcp_port}/check"
    )
    bot = await balancer.connect("telegram")
    queued = await bot.submit(moderated({"prompt": "a harbour"}, executor="kandinsky"))
    final = await bot.final(queued["object_id"])
    assert (
        final["gen_status"] == "error"
        and "the image check could not be made after 3 tries" in final["result"]["content"]
    )
