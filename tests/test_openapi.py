"""The OpenAPI document is valid, lists every route the server has, and schemathesis finds
nothing wrong when it throws generated requests at the real server."""

from __future__ import annotations

import asyncio
import os
import sys

from openapi_spec_validator import validate

from bench.processes import REPO_ROOT, ServerProcess
from tests.conftest import base_env

DEMO_HEADERS = ["-H", "authorization: demo-key", "-H", "service: test"]


async def test_the_document_is_valid_and_lists_every_route(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("kandinsky")])
    response = await balancer.client.get("/openapi.json")
    document = await response.json()
    validate(document)

    registered = {
        (route.method, route.resource.canonical)
        for route in balancer.app.router.routes()
        if route.method != "HEAD" and not route.resource.canonical.startswith("/docs/static")
    }
    documented = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    assert documented == registered
    schemas = document["components"]["schemas"]
    # The websocket's messages are described too.
    assert {"RequestMessage", "Response", "Info", "Action"} <= set(schemas)
    assert len(schemas["RequestMessage"]["oneOf"]) == 4


async def test_schemathesis_finds_no_failures(tmp_path, unused_tcp_port_factory):
    port = unused_tcp_port_factory()
    server = ServerProcess(
        base_env(
            tmp_path,
            port,
            TEST_MODE=1,
            SERVICES="",
            DEMO_DELAY_S=0,
            LOGGING_LEVEL="WARNING",
            # The limits refuse schema-valid requests on purpose (413 for a large job, 429 for a
            # fast sender), which schemathesis reports as failures; tests/test_limits.py covers them.
            MAX_JOB_UNITS=0,
            MAX_USER_REQUESTS=0,
            SERVICE_RATE_PER_S=0,
        ),
        tmp_path / "server.log",
    )
    await server.start()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{server.base_url}/openapi.json",
            *DEMO_HEADERS,
            "--max-examples",
            "40",
            "--exclude-path-regex",
            "^/ws",
            "--seed",
            "20261127",
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(240):
            output, _ = await process.communicate()
    finally:
        await server.stop()
    report = output.decode(errors="replace")
    assert process.returncode == 0, report[-4000:]
    assert " passed" in report and "failed" not in report.split("Test cases:")[-1]
