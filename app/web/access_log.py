"""The access log, without the status page's own polling and without image keys.

Every open status tab fetches /status.json every 2 s, which at INFO would bury every other
line: those requests (and the page's icon) are logged only at DEBUG. An image URL's `key` is
what lets anyone see the image: it is left out of the logged line (`/img/<id>.jpg?key=...`
is logged as `/img/<id>.jpg`)."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.web_log import AccessLogger

QUIET_PATHS = frozenset({"/status.json", "/favicon.ico"})


class QuietPollingAccessLogger(AccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path in QUIET_PATHS and response.status < 400 and not self.logger.isEnabledFor(logging.DEBUG):
            return
        if request.path.startswith("/img/") and request.query_string:
            request = request.clone(rel_url=request.rel_url.with_query(None))
        super().log(request, response, time)
