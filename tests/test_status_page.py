"""The status page, opened in headless Chromium, shows the backends and a finished request
with its thumbnail, and keeps itself up to date."""

from __future__ import annotations

import os
from pathlib import Path

from playwright.async_api import async_playwright

from bench.bots import request_message

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


async def test_the_status_page_shows_backends_and_a_finished_request(start_backend, start_balancer):
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: .ci/run installs Debian's chromium"
    balancer = await start_balancer(
        [await start_backend("kandinsky", name="kd-status")], STATUS_PAGE_KEY="operator-secret"
    )
    bot = await balancer.connect("telegram")
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "for the page"}))
    await bot.final(queued["object_id"])
    # The operator opens the detailed view with the key in the fragment (never sent in the URL).
    url = f"http://127.0.0.1:{balancer.config.api_port}/#key=operator-secret"

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(url)
            backends = page.locator("#backends tbody tr")
            await backends.filter(has_text="kd-status").filter(has_text="healthy").wait_for()
            row = page.locator("#recent tbody tr").filter(has_text=queued["object_id"])
            await row.filter(has_text="ok").wait_for()
            thumbnail = row.locator("img.thumb")
            await thumbnail.wait_for()
            assert await thumbnail.evaluate("img => img.complete && img.naturalWidth > 0")
            assert (await thumbnail.get_attribute("src")).startswith(f"/img/{queued['object_id']}.jpg?key=")

            # A new request shows up without a reload.
            second = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "later"}))
            await bot.final(second["object_id"])
            await page.locator("#recent tbody tr").filter(has_text=second["object_id"]).wait_for(timeout=10_000)
        finally:
            await browser.close()


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
