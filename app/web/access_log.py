"""The access log, without the status page's own polling: every open status tab fetches
/status.json every 2 s, which at INFO would bury every other line. Those requests (and the
page's icon) are logged at DEBUG; everything else as aiohttp logs it."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.web_log import AccessLogger

QUIET_PATHS = frozenset({"/status.json", "/favicon.ico"})


class QuietPollingAccessLogger(AccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path in QUIET_PATHS and response.status < 400 and not self.logger.isEnabledFor(logging.DEBUG):
            return
        super().log(request, response, time)
