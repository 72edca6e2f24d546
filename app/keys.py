"""Typed keys of the application's state: every long-lived part, declared in one place."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from app.config import Config
from app.engine.scheduler import Scheduler
from app.metrics import Metrics
from app.mirrors.outbox import OutboxWorker
from app.storage.results import ResultWriter
from app.storage.store import Store
from app.web.byte_budget import ByteBudget
from app.web.delivery import ConnectionHub
from app.web.intake import Intake
from app.web.status_history import StatusHistory

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
HTTP_SESSION = web.AppKey("http_session", aiohttp.ClientSession)
RESULTS = web.AppKey("results", ResultWriter)
HUB = web.AppKey("hub", ConnectionHub)
SCHEDULER = web.AppKey("scheduler", Scheduler)
INTAKE = web.AppKey("intake", Intake)
MIRRORS = web.AppKey("mirrors", list[OutboxWorker])
METRICS = web.AppKey("metrics", Metrics)
OPENAPI = web.AppKey("openapi", dict)
STATUS_HISTORY = web.AppKey("status_history", StatusHistory)
LARGE_MESSAGES = web.AppKey("large_messages", ByteBudget)
