"""Who may queue what: the limits a request passes before it is committed, and the count of
requests held (queued or running) per service and per user that two of them rest on.

Checked in this order, cheapest and most general first, each refusal with its stable code
(app/domain/errors.py Refusal): premium permission, job size, the service's rate (a token
bucket), the service's held requests, the user's held requests, then moderation.

The counts are kept in memory: a request is counted from the moment it is admitted (before
its commit, so concurrent requests cannot all slip under a cap) until its final answer is
committed. At start-up the stored backlog is counted from a summary before it is read back
(expect_backlog), so the caps hold from the first request after a restart.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from app.config import Config
from app.domain.errors import InvalidRequest, Refusal
from app.domain.jobs import Job
from app.metrics import Metrics
from app.moderation import Moderator

log = logging.getLogger(__name__)


class TokenBucket:
    """`rate_per_s` tokens a second, at most `burst` saved up; each request takes one."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(burst, 1.0)
        self._tokens = self.burst
        self._at = time.monotonic()

    def take(self) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there is one."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s


class Admission:
    def __init__(self, config: Config, moderator: Moderator, metrics: Metrics) -> None:
        self._config = config
        self._moderator = moderator
        self._metrics = metrics
        self._held: dict[str, tuple[str, Any]] = {}  # object_id -> (service, user_id)
        # Plain dicts, not Counters: hold() runs for every request at a queue rebuild (100,000s),
        # and a Counter's missing-key path is a Python call.
        self._by_user: dict[tuple[str, Any], int] = {}
        self._by_service: dict[str, int] = {}
        # Stored requests counted by expect_backlog and not read back yet, per (service, user).
        self._expected: dict[tuple[str, Any], int] = {}
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, job: Job) -> None:
        """Count `job` as held, or raise InvalidRequest with the refusal that stops it."""
        try:
            self._check(job)
        except InvalidRequest as refused:
            log.info("%s refused (%s) from %s: %s", job.object_id, refused.code, job.service, refused.reason)
            raise
        self.hold(job)

    def expect_backlog(self, by_user: dict[tuple[str, Any], int]) -> None:
        """Count the stored requests about to be read back, per (service, user_id), before
        they are: each then joins as hold(job, read_back=True)."""
        for who, count in by_user.items():
            self._expected[who] = self._expected.get(who, 0) + count
            self._by_user[who] = self._by_user.get(who, 0) + count
            self._by_service[who[0]] = self._by_service.get(who[0], 0) + count

    def backlog_read(self) -> None:
        """The backlog is all read back: what expect_backlog counted and no request took up
        (rows set aside as unreadable) stops counting."""
        for who, count in self._expected.items():
            _count_down(self._by_user, who, count)
            _count_down(self._by_service, who[0], count)
        self._expected.clear()

    def hold(self, job: Job, *, read_back: bool = False) -> None:
        """Count a request as queued or running (once, however often it is called).
        `read_back`: a stored request that expect_backlog has counted already."""
        held = self._held
        if job.object_id in held:
            return
        who = (job.service, job.service_info.get("user_id"))
        held[job.object_id] = who
        expected = self._expected
        if read_back and expected.get(who):
            if expected[who] == 1:
                del expected[who]
            else:
                expected[who] -= 1
            return
        by_user, by_service = self._by_user, self._by_service
        by_user[who] = by_user.get(who, 0) + 1
        by_service[job.service] = by_service.get(job.service, 0) + 1

    def release(self, object_id: str) -> None:
        """The request is final (or was never committed): it no longer counts."""
        who = self._held.pop(object_id, None)
        if who is None:
            return
        _count_down(self._by_user, who)
        _count_down(self._by_service, who[0])

    def _check(self, job: Job) -> None:
        config, service = self._config, job.service

        def refuse(refusal: Refusal, reason: str, retry_after_s: float | None = None) -> InvalidRequest:
            return InvalidRequest(reason, envelope=job.envelope(), refusal=refusal, retry_after_s=retry_after_s)

        if job.premium and config.premium_services is not None and service not in config.premium_services:
            raise refuse(
                Refusal.PREMIUM_NOT_ALLOWED,
                f"Service {service!r} may not send premium requests on this server (PREMIUM_SERVICES); "
                "send it without the premium flag.",
            )
        ceiling = config.max_job_units(service)
        if ceiling and job.cost_units > ceiling:
            raise refuse(
                Refusal.JOB_TOO_LARGE,
                f"This job is {job.cost_units:.3g} cost units (steps x width x height x images), over this "
                f"server's ceiling of {ceiling:.3g} (MAX_JOB_UNITS): ask for fewer steps, a smaller size or "
                "fewer images.",
            )
        rate = config.service_rate_per_s(service)
        if rate:
            bucket = self._buckets.get(service)
            if bucket is None or bucket.rate_per_s != rate:
                bucket = self._buckets[service] = TokenBucket(rate, config.service_burst(service))
            wait_s = bucket.take()
            if wait_s:
                wait_s = math.ceil(wait_s * 1000) / 1000
                raise refuse(
                    Refusal.RATE_LIMITED,
                    f"Service {service!r} sends faster than the {rate:g} requests/s this server takes from it "
                    f"(SERVICE_RATE_PER_S); send again in {wait_s:g} s.",
                    retry_after_s=wait_s,
                )
        service_cap = config.max_service_requests(service)
        if service_cap:
            held_by_service = self._by_service.get(service, 0)
            if held_by_service >= service_cap:
                raise refuse(
                    Refusal.SERVICE_QUEUE_FULL,
                    f"Service {service!r} already has {held_by_service} requests queued or running, "
                    f"this server's cap (MAX_SERVICE_REQUESTS); send again when some have finished.",
                )
        user_cap = _user_cap(config.max_user_requests(service), job.service_info.get("max_user_queue_size"))
        if user_cap:
            held = self._by_user.get((service, job.user_id), 0)
            if held >= user_cap:
                raise refuse(
                    Refusal.USER_QUEUE_FULL,
                    f"User {job.user_id} already has {held} requests queued or running, the most one user may "
                    f"have (cap {user_cap:g}); send again when one has finished.",
                )
        if job.flag("moderate"):
            rule = self._moderator.blocking_rule(job.gen_type, job.payload or {})
            self._metrics.moderated.labels("prompt", "blocked" if rule else "passed").inc()
            if rule:
                raise refuse(
                    Refusal.MODERATED,
                    f"Refused by moderation: the request's text matches the rule {rule!r}. It was not generated.",
                )


def _count_down(counts: dict[Any, int], key: Any, by: int = 1) -> None:
    left = counts.get(key, 0) - by
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)  # users come and go: no key is kept at zero


def _user_cap(server_cap: float, asked: Any) -> float:
    """The server's cap for one user, lowered (never raised) by a request's own
    service_info.max_user_queue_size."""
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
        return min(server_cap, asked) if server_cap else asked
    return server_cap
