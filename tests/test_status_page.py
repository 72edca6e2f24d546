"""The status page, opened in headless Chromium: backends in human units, recent requests with
their prompt and a clickable thumbnail, charts of the last hour, a clear "unreachable" state
when the server goes away, and no access-log line for its own polling."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import aiohttp
from playwright.async_api import async_playwright
from yarl import URL

from bench.bots import Bot, request_message
from bench.processes import ServerProcess
from tests.conftest import base_env

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
# Flags for a sandboxed, offline machine (no background network, no first-run work).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


async def test_the_status_page_shows_backends_requests_and_charts_of_the_last_hour(
    start_backend, start_balancer, tmp_path
):
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: .ci/run installs Debian's chromium"
    gpu = await start_backend("automatic1111", name="gpu-status", delay_s=0.05)
    balancer = await start_balancer([gpu], STATUS_PAGE_KEY="operator-secret")
    bot = await balancer.connect("telegram")
    ids = []
    for n in range(4):  # some load: a queue that builds and drains, finished requests
        message = request_message("automatic1111", "text2img", {"prompt": f"harbour at dawn {n}"}, premium=n % 2)
        ids.append((await bot.submit(message))["object_id"])
    for object_id in ids:
        await bot.final(object_id)
    # The operator opens the detailed view with the key in the fragment (never sent in the URL).
    url = f"http://127.0.0.1:{balancer.config.api_port}/#key=operator-secret"

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1600})
            icon = await page.request.get(f"http://127.0.0.1:{balancer.config.api_port}/favicon.ico")
            assert icon.ok and icon.headers["content-type"] == "image/svg+xml"
            await page.goto(url)
            backends = page.locator("#backends tbody tr").filter(has_text="gpu-status")
            await backends.filter(has_text="healthy").filter(has_text="images/min").wait_for()
            row = page.locator("#recent tbody tr").filter(has_text=ids[0])
            await row.filter(has_text="ok").filter(has_text="harbour at dawn 0").wait_for()
            assert await row.filter(has_text="gpu-status").count() == 1
            thumbnail = row.locator("a img.thumb")
            await thumbnail.wait_for()
            assert await thumbnail.evaluate("img => img.complete && img.naturalWidth > 0")
            link = await row.locator("a").get_attribute("href")
            assert link.startswith(f"/img/{ids[0]}.jpg?key=")
            assert await page.locator('nav a[href="/docs"]').count() == 1

            # Each chart has data: the told and actual wait of the 4 requests, the queue and busy lines.
            assert await page.locator("#chart-eta circle").count() == 8
            assert "told" in await page.locator("#legend-eta").inner_text()
            assert await page.locator("#chart-queue polyline, #chart-queue circle").count() > 0
            assert "automatic1111 premium" in await page.locator("#legend-queue").inner_text()
            assert "gpu-status" in await page.locator("#legend-busy").inner_text()
            assert await page.locator("#chart-finished circle, #chart-finished polyline").count() > 0
            await page.screenshot(path=str(tmp_path / "status-under-load.png"), full_page=True)

            # A new request shows up without a reload.
            second = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "later"}))
            await bot.final(second["object_id"])
            await page.locator("#recent tbody tr").filter(has_text=second["object_id"]).wait_for(timeout=10_000)

            # The server goes away: the page says so and greys out what it last saw.
            await balancer.client.close()
            banner = page.locator("#unreachable")
            await banner.wait_for(state="visible", timeout=10_000)
            assert (await banner.inner_text()).startswith("Server unreachable since")
            assert await page.evaluate("document.body.classList.contains('stale')")
            assert await page.locator("main").evaluate("m => getComputedStyle(m).opacity") == "0.35"
            await page.screenshot(path=str(tmp_path / "status-unreachable.png"), full_page=True)
            _keep_screenshots(tmp_path)
        finally:
            await browser.close()


def _keep_screenshots(folder: Path) -> None:
    """With SCREENSHOTS_DIR set, the screenshots are copied there to be looked at."""
    target = os.environ.get("SCREENSHOTS_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for shot in folder.glob("*.png"):
            shutil.copy(shot, Path(target) / shot.name)


async def test_the_access_log_has_no_polling_lines_and_no_image_keys(tmp_path, unused_tcp_port_factory):
    server = ServerProcess(
        base_env(tmp_path, unused_tcp_port_factory(), TEST_MODE=1, SERVICES="", DEMO_DELAY_S=0),
        tmp_path / "server.log",
    )
    await server.start()
    async with aiohttp.ClientSession() as session:
        for path in ("/status.json", "/status.json", "/favicon.ico", "/health"):
            async with session.get(server.base_url + path) as response:
                assert response.status == 200
        async with session.ws_connect(
            f"{server.base_url}/ws/test", headers={"authorization": "demo-key", "service": "test"}
        ) as ws:
            bot = Bot(ws)
            queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "logged?"}))
            image_url = URL((await bot.final(queued["object_id"]))["result"]["content"])
        async with session.get(image_url) as response:
            assert response.status == 200
    await server.stop()
    log = server.log()
    assert '"GET /health HTTP/1.1" 200' in log
    assert "GET /status.json" not in log and "GET /favicon.ico" not in log
    assert f'"GET {image_url.path} HTTP/1.1" 200' in log
    assert image_url.query["key"] not in log


async def test_swagger_ui_renders_every_operation_offline(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("kandinsky")])
    document = await (await balancer.client.get("/openapi.json")).json()
    operations = sum(len(methods) for methods in document["paths"].values())

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{balancer.config.api_port}/docs")
            blocks = page.locator(".opblock")
            await blocks.first.wait_for()
            assert await blocks.count() == operations
            assert await page.locator(".errors-wrapper").count() == 0
        finally:
            await browser.close()
