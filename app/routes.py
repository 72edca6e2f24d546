"""Every route of the server, listed in one place."""

from __future__ import annotations

from aiohttp import web

from app import keys
from app.gateway import websocket_handler

SERVER_NAME = "Devoid Generator"
VERSION = "0.2.0"


async def identity(request: web.Request) -> web.Response:
    """A small identity document; monitoring tools probe it."""
    return web.json_response({"name": SERVER_NAME, "version": VERSION, "websocket": "/ws/{service}"})


async def image(request: web.Request) -> web.FileResponse:
    """Serve a result image written under IMAGES_PATH, and nothing else."""
    path = request.app[keys.RESULTS].local_file(request.match_info["file_name"])
    if path is None:
        raise web.HTTPNotFound(text="No such image.")
    return web.FileResponse(path, headers={"Content-Type": "image/jpeg",
                                           "Cache-Control": "public, max-age=86400, immutable"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", identity, name="identity")
    app.router.add_get("/ws", websocket_handler, name="websocket")
    app.router.add_get("/ws/{service}", websocket_handler, name="websocket_for_service")
    app.router.add_get("/img/{file_name}", image, name="image")
