"""``GET /metrics`` (docs/http-security.md, "Metrics"): the kernel's Prometheus registry in the text format, plus the
HTTP series: requests by route and status, guard denials by code, rate-limit rejections
by bucket. Other plugins register their own series in ``kernel.metrics_registry``.

The route label is the matched rule (``/api/v1/secrets/<key>``) or ``<unmatched>``: raw
paths would let any client create unbounded label values. ``/metrics`` is read-guarded
(docs/http-security.md) and rate-limited in the ``api`` bucket like ``/api/*``.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from quart import Blueprint, Response

from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.auth import RequestInfo
from risoluto.hookspecs.doctor import PASS, WARN, CheckResult
from risoluto.openapi import api


log = logging.getLogger("risoluto.metrics")
_STATE = "http.metrics"
UNMATCHED = "<unmatched>"


class HttpMetrics:
    def __init__(self, registry: Any):
        self.requests = Counter("risoluto_http_requests", "HTTP requests by route, method and status",
                                ("route", "method", "status"), registry=registry)
        self.denials = Counter("risoluto_guard_denials", "Requests refused by an authorization guard, by code",
                               ("code",), registry=registry)
        self.rate_limited = Counter("risoluto_ratelimit_rejections", "Requests refused by the rate limiter",
                                    ("bucket",), registry=registry)
        self._children: dict[tuple[str, str, int], Any] = {}  # label lookup is the costly part
        self._labelled: dict[tuple[int, str], Any] = {}

    def child(self, metric: Any, label: str) -> Any:
        """A labelled child, cached: ``labels()`` takes a lock and builds a tuple each call."""
        key = (id(metric), label)
        found = self._labelled.get(key)
        if found is None:
            found = self._labelled[key] = metric.labels(label)
        return found

    def count(self, route: str, method: str, status: int) -> None:
        child = self._children.get((route, method, status))
        if child is None:
            child = self._children[(route, method, status)] = self.requests.labels(route, method, str(status))
        child.inc()


def metrics_of(kernel: Any) -> HttpMetrics:
    m = kernel.state.get(_STATE)
    if m is None:
        m = kernel.state[_STATE] = HttpMetrics(kernel.metrics_registry)
    return m


@hookimpl
def risoluto_app_blueprints(kernel: Any) -> list[Any]:
    metrics_of(kernel)  # create the series now so a scrape shows them from the start
    bp = Blueprint("risoluto_metrics", __name__)

    @bp.get("/metrics")
    @api("Prometheus metrics (text format); read-guarded like /api/*", tags=("observability",))
    async def scrape() -> Response:
        return Response(generate_latest(kernel.metrics_registry), content_type=CONTENT_TYPE_LATEST)

    return [bp]


@hookimpl
def risoluto_request_completed(kernel: Any, info: RequestInfo, status: int) -> None:
    try:
        m = metrics_of(kernel)
        method = info.method if info.method in _METHODS else "OTHER"
        m.count(info.route or UNMATCHED, method, status)
        if info.rate_limited:
            m.child(m.rate_limited, info.rate_bucket).inc()
        elif code := info.refused:
            m.child(m.denials, code).inc()
    except Exception:  # observers never break a response
        log.exception("metrics update failed")


_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    s = kernel.settings.server
    guarded = "token-guarded for remote reads" if (s.read_token or s.write_token) else "loopback only"
    disabled = {"http.read_guard"} & set(kernel.settings.plugins.disable)
    if disabled:
        return [CheckResult(item="Metrics", status=WARN, reason="/metrics is served but the read guard is disabled",
                            fix="re-enable http.read_guard or disable http.metrics")]
    return [CheckResult(item="Metrics", status=PASS, reason=f"/metrics served, {guarded}, rate-limited (api bucket)")]
