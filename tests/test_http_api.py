"""Every HTTP route through the real server: submit, fetch, cancel, the operator's views,
health, metrics and the home page; auth failures and bad input in the one error shape."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time

import pytest
from yarl import URL

from app import keys
from bench.bots import request_message, wait_until
from bench.images import noisy_png_base64
from bench.processes import REPO_ROOT
from tests.conftest import SERVICE_KEYS

TELEGRAM = {"authorization": SERVICE_KEYS["telegram"], "service": "telegram"}
DISCORD = {"authorization": SERVICE_KEYS["discord"], "service": "discord"}
KEYED_ROUTES = [
    ("POST", "/api/v1/requests"),
    ("GET", "/api/v1/requests/" + "0" * 24),
    ("POST", "/api/v1/requests/" + "0" * 24 + "/cancel"),
    ("GET", "/api/v1/queues"),
    ("GET", "/api/v1/backends"),
    ("GET", "/api/v1/mirrors"),
]


def assert_error_shape(body: dict, status: int) -> None:
    assert set(body) == {"error"} and {"status", "message", "fields"} <= set(body["error"])
    assert set(body["error"]) <= {"status", "message", "fields", "code", "retry_after_s"}
    assert body["error"]["status"] == status and body["error"]["message"]


@pytest.fixture
async def balancer(start_backend, start_balancer):
    gpu = await start_backend("kandinsky", name="kd-1")
    balancer = await start_balancer([gpu])
    balancer.gpu = gpu
    return balancer


async def fetch_until_final(client, object_id: str, headers: dict) -> dict:
    async with asyncio.timeout(15):
        while True:
            response = await client.get(f"/api/v1/requests/{object_id}", headers=headers)
            body = await response.json()
            if body["gen_status"] in ("ok", "error"):
                return body
            await asyncio.sleep(0.02)


async def test_an_unknown_payload_key_is_accepted_and_reported_in_the_notices(balancer):
    response = await balancer.client.post(
        "/api/v1/requests",
        headers=TELEGRAM,
        json=request_message("kandinsky", "text2img", {"prompt": "via http", "guidance_scael": 5}),
    )
    queued = await response.json()
    assert response.status == 202 and queued["gen_status"] == "queued"
    [notice] = queued["notices"]
    assert (notice["info_type"], notice["unknown_fields"]) == ("unknown_field", {"guidance_scael": "guidance_scale"})
    done = await fetch_until_final(balancer.client, queued["object_id"], TELEGRAM)
    assert done["payload"] == {"prompt": "via http", "guidance_scael": 5}


async def test_submit_then_fetch_the_result_over_http(balancer):
    client = balancer.client
    bot = await balancer.connect("telegram")  # a websocket of the same service hears nothing of it
    response = await client.post(
        "/api/v1/requests", headers=TELEGRAM, json=request_message("kandinsky", "text2img", {"prompt": "via http"})
    )
    queued = await response.json()
    assert response.status == 202
    assert (queued["gen_status"], queued["service"], queued["notices"]) == ("queued", "telegram", [])
    done = await fetch_until_final(client, queued["object_id"], TELEGRAM)

    assert done["gen_status"] == "ok" and done["payload"] == {"prompt": "via http"}
    image = await client.get(URL(done["result"]["content"]).path_qs)
    assert image.status == 200 and image.content_type == "image/jpeg"
    assert (await balancer.app[keys.STORE].reads.get(queued["object_id"])).delivered_at is not None
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(bot.ws.receive(), 0.2)


async def test_an_image_request_of_hundreds_of_kilobytes_is_checked_and_served_over_http(start_backend, start_balancer):
    gpu = await start_backend("automatic1111")
    balancer = await start_balancer([gpu])
    image = noisy_png_base64(side=320)  # ~400 KB of base64: checked in a worker thread

    async def submit(prompt: str, init_image: str) -> tuple[int, dict]:
        message = request_message("automatic1111", "img2img", {"prompt": prompt, "init_images": [init_image]})
        response = await balancer.client.post("/api/v1/requests", headers=TELEGRAM, json=message)
        return response.status, await response.json()

    status, body = await submit("bad", image[:1000] + "!" + image[1001:])
    assert status == 400
    assert body["error"]["fields"]["payload"]["init_images"] == [
        "0: Not a base64 image (raw or data:image/...;base64, URI, of a PNG, JPEG, GIF, WebP, BMP or TIFF)."
    ]
    status, queued = await submit("good", image)
    assert status == 202
    done = await fetch_until_final(balancer.client, queued["object_id"], TELEGRAM)
    assert done["gen_status"] == "ok" and done["payload"] == {"prompt": "good", "init_images": [image]}
    assert [call.body["init_images"] for call in gpu.state.received] == [[image]]


async def test_only_the_submitting_service_may_fetch_or_cancel(balancer):
    client = balancer.client
    response = await client.post(
        "/api/v1/requests", headers=TELEGRAM, json=request_message("kandinsky", "text2img", {"prompt": "mine"})
    )
    object_id = (await response.json())["object_id"]
    for method, path in (("GET", f"/api/v1/requests/{object_id}"), ("POST", f"/api/v1/requests/{object_id}/cancel")):
        response = await client.request(method, path, headers=DISCORD)
        assert response.status == 404
        body = await response.json()
        assert_error_shape(body, 404)
        assert body["error"]["message"] == "No request of this service has that object_id."
    response = await client.get("/api/v1/requests/not-an-id", headers=TELEGRAM)
    assert response.status == 404


async def test_cancel_over_http(balancer):
    client = balancer.client
    balancer.gpu.state.gate.clear()
    ids = []
    for prompt in ("running", "waiting"):
        response = await client.post(
            "/api/v1/requests", headers=TELEGRAM, json=request_message("kandinsky", "text2img", {"prompt": prompt})
        )
        ids.append((await response.json())["object_id"])

    response = await client.post(f"/api/v1/requests/{ids[1]}/cancel", headers=TELEGRAM)
    assert response.status == 200
    assert await response.json() == {"object_id": ids[1], "outcome": "cancelled"}
    done = await fetch_until_final(client, ids[1], TELEGRAM)
    assert done["gen_status"] == "error" and done["result"]["content"] == "cancelled"
    again = await client.post(f"/api/v1/requests/{ids[1]}/cancel", headers=TELEGRAM)
    assert again.status == 409
    assert_error_shape(await again.json(), 409)
    balancer.gpu.state.gate.set()
    assert (await fetch_until_final(client, ids[0], TELEGRAM))["gen_status"] == "ok"


@pytest.mark.parametrize(("method", "path"), KEYED_ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"service": "telegram", "authorization": "wrong"},
        {"service": "nosuch", "authorization": SERVICE_KEYS["telegram"]},
        {"authorization": SERVICE_KEYS["telegram"]},
    ],
)
async def test_every_keyed_route_refuses_a_bad_key_in_the_error_shape(balancer, method, path, headers):
    response = await balancer.client.request(method, path, headers=headers, json={})
    assert response.status == 401
    assert_error_shape(await response.json(), 401)


@pytest.mark.parametrize(
    ("body", "message", "field"),
    [
        ("{not json", "Body is not valid JSON", None),
        (b"!Lij\xff\xfe", "Body is not UTF-8 text: invalid start byte at byte 4.", None),
        ("[1]", "Body must be a JSON object.", None),
        (
            '{"message_type": "request", "executor": "dalle", "gen_type": "text2img", "service_info": '
            '{"user_id": 1}, "payload": {}}',
            "executor: Must be one of",
            "executor",
        ),
        (
            '{"message_type": "request", "executor": "kandinsky", "gen_type": "text2img", "service_info": '
            '{"user_id": 1}, "payload": {"promt": "x"}}',
            "payload.prompt: text2img needs a prompt",
            "payload",
        ),
    ],
)
async def test_bad_bodies_are_refused_naming_the_fields(balancer, body, message, field):
    response = await balancer.client.post("/api/v1/requests", headers=TELEGRAM, data=body)
    assert response.status == 400
    answer = await response.json()
    assert_error_shape(answer, 400)
    assert message in answer["error"]["message"]
    if field:
        assert field in answer["error"]["fields"]


async def test_a_wrong_method_is_405_with_allow(balancer):
    response = await balancer.client.put("/api/v1/queues", headers=TELEGRAM)
    assert response.status == 405 and response.headers["Allow"] == "GET"
    assert_error_shape(await response.json(), 405)


async def test_operator_views(balancer):
    client = balancer.client
    balancer.gpu.state.gate.clear()
    for premium in (0, 0, 1):
        await client.post(
            "/api/v1/requests",
            headers=TELEGRAM,
            json=request_message("kandinsky", "text2img", {"prompt": "q"}, premium=premium),
        )
    await wait_until(lambda: balancer.gpu.state.received)

    queues = {q["executor"]: q for q in await (await client.get("/api/v1/queues", headers=TELEGRAM)).json()}
    assert (
        queues["kandinsky"]["general_waiting"],
        queues["kandinsky"]["premium_waiting"],
        queues["kandinsky"]["generating"],
    ) == (1, 1, 1)
    assert queues["kandinsky"]["eta_new_general_s"] > 0
    assert queues["automatic1111"]["backends"] == 0 and queues["automatic1111"]["eta_new_general_s"] is None

    [backend] = await (await client.get("/api/v1/backends", headers=TELEGRAM)).json()
    assert (backend["name"], backend["state"]) == ("kd-1", "busy") and len(backend["job"]) == 24
    assert await (await client.get("/api/v1/mirrors", headers=TELEGRAM)).json() == []
    balancer.gpu.state.gate.set()


async def test_health_says_ok_then_why_not(balancer):
    response = await balancer.client.get("/health")
    assert response.status == 200 and (await response.json())["status"] == "ok"

    await balancer.app[keys.SCHEDULER].stop(0)
    response = await balancer.client.get("/health")
    assert response.status == 503
    assert await response.json() == {"status": "unavailable", "reason": "the scheduler is not running"}


async def test_health_fails_when_the_database_takes_no_writes(balancer):
    await balancer.app[keys.STORE].close()
    response = await balancer.client.get("/health")
    assert response.status == 503
    assert (await response.json())["reason"].startswith("the database takes no writes")


async def test_health_answers_at_once_while_a_burst_waits_to_be_written(start_backend, start_balancer):
    # One commit per request: a burst of 600 keeps the writer busy for seconds.
    gpu = await start_backend("kandinsky", name="kd-1")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu], STORE_BATCH_ROWS=1, SERVICE_RATE_PER_S=0, MAX_SERVICE_REQUESTS=0)
    bot = await balancer.connect("telegram")
    for n in range(600):
        await bot.send(request_message("kandinsky", "text2img", {"prompt": f"burst {n}"}, user_id=n))

    response = await balancer.client.get("/health")

    # Asked after the burst, answered before most of it was committed: its write went first.
    with sqlite3.connect(f"file:{balancer.config.database_path}?mode=ro", uri=True) as db:
        committed = db.execute("SELECT count(*) FROM requests").fetchone()[0]
    assert response.status == 200 and (await response.json())["status"] == "ok"
    assert committed < 300, committed
    queued = [await bot.next_message(lambda m: m.get("gen_status") == "queued") for _ in range(600)]
    assert len({answer["object_id"] for answer in queued}) == 600
    gpu.state.gate.set()


async def test_metrics_count_requests_and_show_queues_and_backends(balancer):
    bot = await balancer.connect("telegram")
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "m"}))
    await bot.final(queued["object_id"])
    response = await balancer.client.get("/metrics")
    text = await response.text()
    assert response.status == 200 and response.content_type == "text/plain"
    assert 'devoid_requests_total{executor="kandinsky",service="telegram",status="ok"} 1.0' in text
    assert 'devoid_generation_seconds_count{backend="kd-1"} 1.0' in text
    assert 'devoid_queue_depth{class="general",executor="kandinsky"} 0.0' in text
    assert 'devoid_backend_up{backend="kd-1",executor="kandinsky",state="healthy"} 1.0' in text
    assert "devoid_eta_error_seconds_count 1.0" in text


def loop_lags(metrics_text: str) -> tuple[int, int]:
    """(lags probed, of which longer than half a second) from /metrics."""
    count = re.search(r"^devoid_event_loop_lag_seconds_count (\S+)$", metrics_text, re.MULTILINE)
    within = re.search(r'^devoid_event_loop_lag_seconds_bucket\{le="0.5"\} (\S+)$', metrics_text, re.MULTILINE)
    assert count and within, "the loop lag histogram is missing from /metrics"
    return int(float(count[1])), int(float(count[1])) - int(float(within[1]))


async def test_an_event_loop_held_for_a_second_shows_in_metrics_and_the_log(balancer, caplog):
    caplog.set_level(logging.WARNING, logger="app.loop_lag")
    probed, long_before = loop_lags(await (await balancer.client.get("/metrics")).text())

    # A callback holding the loop the server shares with this test: the probe asked for 0.25 s
    # at most that long before, so it fires at least 1.25 s late.
    time.sleep(1.5)

    async def long_lags() -> int:
        return loop_lags(await (await balancer.client.get("/metrics")).text())[1]

    async with asyncio.timeout(5):
        while await long_lags() == long_before:
            await asyncio.sleep(0.05)
    probed_after, _ = loop_lags(await (await balancer.client.get("/metrics")).text())
    assert probed_after > probed
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.loop_lag"]
    assert len(warnings) == 1, warnings
    late = re.search(r"ran (\d+\.\d) s late", warnings[0])
    assert late and float(late[1]) >= 1.2, warnings
    assert (await balancer.client.get("/health")).status == 200


async def test_home_answers_json_to_tools_and_html_to_browsers(balancer):
    tool = await balancer.client.get("/")
    assert tool.content_type == "application/json"
    assert (await tool.json())["name"] == "Devoid Generator"
    browser = await balancer.client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert browser.content_type == "text/html" and "/status.json" in await browser.text()
    status = await (await balancer.client.get("/status.json")).json()
    assert [b["name"] for b in status["backends"]] == ["kd-1"]


async def test_the_status_page_can_be_switched_off(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("kandinsky")], STATUS_PAGE=0)
    browser = await balancer.client.get("/", headers={"Accept": "text/html"})
    assert browser.content_type == "application/json"
    assert (await balancer.client.get("/status.json")).status == 404


async def test_swagger_ui_is_served_from_this_server(balancer):
    page = await (await balancer.client.get("/docs")).text()
    assert "/docs/static/swagger-ui-bundle.js" in page and "/openapi.json" in page
    script = await balancer.client.get("/docs/static/swagger-ui-bundle.js")
    assert script.status == 200 and len(await script.read()) > 100_000


async def test_the_keyless_status_view_shows_no_ids_thumbnails_or_error_texts(start_backend, start_balancer):
    gpu = await start_backend("kandinsky", name="kd-1")
    balancer = await start_balancer([gpu], STATUS_PAGE_KEY="operator-secret", HEALTH_INTERVAL_S=0.2)
    bot = await balancer.connect("telegram")
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "private"}))
    await bot.final(queued["object_id"])
    await gpu.stop()  # the backend's failure text names its address
    await wait_until(lambda: balancer.app[keys.SCHEDULER].fleet.backends_status()[0]["last_error"])

    public = await (await balancer.client.get("/status.json")).text()
    for secret in (queued["object_id"], "telegram", "?key=", "127.0.0.1"):
        assert secret not in public, secret
    assert '"detailed": false' in public

    operator = await balancer.client.get("/status.json", headers={"authorization": "operator-secret"})
    detailed = await operator.json()
    assert detailed["detailed"] and detailed["recent"][0]["object_id"] == queued["object_id"]
    assert "127.0.0.1" in detailed["backends"][0]["last_error"]
    wrong = await (await balancer.client.get("/status.json", headers={"authorization": "tg-key"})).json()
    assert not wrong["detailed"]


async def test_every_metric_the_grafana_dashboard_queries_is_served(balancer):
    dashboard = json.loads((REPO_ROOT / "docs" / "grafana-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bdevoid_[a-z_]+", target["expr"])
    }
    assert len(queried) >= 10
    bot = await balancer.connect("telegram")
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "for the charts"}))
    await bot.final(queued["object_id"])
    await bot.submit(request_message("kandinsky", "text2img", {"prompt": "x", "steps": 0}))  # refused
    text = await (await balancer.client.get("/metrics")).text()
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    # A family with no series yet (no mirror configured here) is still declared.
    declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert queried <= samples | declared, queried - samples - declared
