"""What a person or a probe opens in a browser: the identity/status home page, local images,
the OpenAPI document and Swagger UI (served from the swagger-ui-bundle package, offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import swagger_ui_bundle
from aiohttp import web

from app import __version__, keys
from app.domain.jobs import Job
from app.domain.secrets_match import secret_matches
from app.storage.results import ResultWriter
from app.web.api_schemas import IdentitySchema, StatusSchema

SERVER_NAME = "Devoid Generator"
VERSION = __version__
RECENT_REQUESTS = 20
PROMPT_CHARS = 120
# A small mark for browser tabs (served as /favicon.ico too, which browsers ask for).
FAVICON_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" '
    b'fill="#1f3b57"/><circle cx="16" cy="16" r="8" fill="none" stroke="#f2b134" stroke-width="4"/></svg>'
)
STATUS_PAGE_HTML = Path(__file__).with_name("status_page.html")
SWAGGER_STATIC = "/docs/static"


async def home(request: web.Request) -> web.StreamResponse:
    """JSON identity for tools (as the original answered); HTML status page for browsers."""
    wants_html = "text/html" in request.headers.get("Accept", "")
    if wants_html and request.app[keys.CONFIG].status_page:
        return web.FileResponse(STATUS_PAGE_HTML, headers={"Content-Type": "text/html; charset=utf-8"})
    return web.json_response(
        IdentitySchema().dump({"name": SERVER_NAME, "version": VERSION, "websocket": "/ws/{service}"})
    )


def _detailed_view(request: web.Request) -> bool:
    """Whether the caller sent STATUS_PAGE_KEY (as the page does from its `#key=` fragment)."""
    key = request.app[keys.CONFIG].status_page_key
    given = request.headers.get("authorization", "")
    return bool(key) and secret_matches(given, key)


async def status(request: web.Request) -> web.Response:
    if not request.app[keys.CONFIG].status_page:
        raise web.HTTPNotFound(text="The status page is off (STATUS_PAGE=0).")
    scheduler, store = request.app[keys.SCHEDULER], request.app[keys.STORE]
    detailed = _detailed_view(request)
    jobs = await store.reads.recent_jobs(RECENT_REQUESTS)
    prompts = await store.reads.prompts_of([job.object_id for job in jobs], PROMPT_CHARS) if detailed else {}
    recent = [_recent_row(request.app[keys.RESULTS], job, prompts, detailed) for job in jobs]
    backends = scheduler.fleet.backends_status()
    mirrors = [mirror.health.as_dict() for mirror in request.app[keys.MIRRORS]]
    if not detailed:
        # Error texts may quote a backend's address or echo a request (a prompt).
        backends = [backend | {"last_error": "", "job": None} for backend in backends]
        mirrors = [mirror | {"last_error": ""} for mirror in mirrors]
    return web.json_response(
        StatusSchema().dump(
            {
                "detailed": detailed,
                "queues": scheduler.fleet.queues_status(),
                "backends": backends,
                "mirrors": mirrors,
                "recent": recent,
                "history": request.app[keys.STATUS_HISTORY].as_dict(),
            }
        )
    )


def _recent_row(results: ResultWriter, job: Job, prompts: dict[str, str], detailed: bool) -> dict[str, Any]:
    """One row of the recent requests: ids, prompt and image only in the detailed view."""
    thumbnail = None
    if detailed and job.result and job.result.get("content_type") == "image_url":
        # Locally saved images are shown from this server; others from their URL.
        local = results.local_file(job.result.get("file_name", ""))
        thumbnail = results.local_url_path(local.name) if local else job.result["content"]
    return {
        "object_id": job.object_id if detailed else None,
        "service": job.service if detailed else None,
        "executor": job.executor.value,
        "gen_type": job.gen_type.value,
        "status": job.status.value,
        "created_at": job.created_at,
        "thumbnail": thumbnail,
        "prompt": prompts.get(job.object_id),
        "premium": job.premium,
        "backend": job.backend,
        "wait_s": round(job.started_at - job.created_at, 2) if job.started_at else None,
        "generation_s": round(job.generation_s, 2) if job.generation_s is not None else None,
    }


async def favicon(request: web.Request) -> web.Response:
    return web.Response(body=FAVICON_SVG, content_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


async def image(request: web.Request) -> web.FileResponse:
    """Serve a result image written under IMAGES_PATH, and nothing else, to whoever has its key
    (the URL in the ok message carries it). A missing or wrong key is a 404, like a missing image."""
    path = request.app[keys.RESULTS].served_file(request.match_info["file_name"], request.query.get("key", ""))
    if path is None:
        raise web.HTTPNotFound(text="No such image.")
    return web.FileResponse(
        path, headers={"Content-Type": "image/jpeg", "Cache-Control": "public, max-age=86400, immutable"}
    )


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(request.app[keys.OPENAPI])


async def docs(request: web.Request) -> web.Response:
    return web.Response(
        content_type="text/html",
        text=f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{SERVER_NAME} API</title>
<link rel="stylesheet" href="{SWAGGER_STATIC}/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{SWAGGER_STATIC}/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui"}});</script>
</body></html>""",
    )


def add_static(app: web.Application) -> None:
    app.router.add_static(SWAGGER_STATIC, swagger_ui_bundle.swagger_ui_path, name="swagger_static")
