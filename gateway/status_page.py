"""The admin status page: a static HTML page and the JSON it polls (`/admin/stats`).

The page (gateway/static, no build step) fetches `/admin/stats` every two seconds and
derives rates from the difference between two fetches, so the server keeps no history:
`collect_stats` only reads counters, the breaker registry and the Redis store's health as
they are now. With several workers or replicas each answers for itself (its `pid` and
`replica` are in the JSON); Prometheus is the place for the sum.
"""

from __future__ import annotations

import os
from collections import defaultdict
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.observability import Metrics

STATIC_TYPES = {"status.html": "text/html; charset=utf-8", "login.html": "text/html; charset=utf-8", "status.js": "text/javascript; charset=utf-8", "status.css": "text/css; charset=utf-8"}
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def read_static(name: str) -> bytes:
    return resources.files("gateway").joinpath("static", name).read_bytes()


def static_asset(name: str) -> Response:
    if name not in STATIC_TYPES or name.endswith(".html"):
        return Response(b'{"detail":"not found"}', 404, media_type="application/json")
    return Response(read_static(name), headers={**PAGE_HEADERS, "Cache-Control": "max-age=300"}, media_type=STATIC_TYPES[name])


def status_page() -> Response:
    return Response(read_static("status.html"), headers=PAGE_HEADERS, media_type=STATIC_TYPES["status.html"])


def login_page(status: int, message: str = "") -> Response:
    html = read_static("login.html").replace(b"{{message}}", message.encode())
    return Response(html, status_code=status, headers=PAGE_HEADERS, media_type=STATIC_TYPES["login.html"])


def collect_stats(gateway: "Gateway") -> dict[str, Any]:
    """Everything the status page shows, as cumulative counts and current states."""
    services = gateway.services
    assert services is not None
    upstreams = upstream_stats(services.metrics, list(gateway.settings.config.upstreams))
    for breaker in services.breakers.snapshot():
        upstreams.setdefault(breaker["upstream"], empty_upstream())["breakers"].append(breaker)
    config = gateway.settings.config
    for name, upstream in upstreams.items():
        if name in config.upstreams:
            upstream["dialect"] = config.upstreams[name].dialect
    return {
        "now": services.wall_clock(),
        "replica": gateway.replica_id,
        "pid": os.getpid(),
        "config": gateway.settings.source,
        "upstreams": upstreams,
        "redis": redis_stats(gateway),
        "reloads": {labels["result"]: value for labels, value in services.metrics.counts("gateway_config_reloads")},
    }


def empty_upstream() -> dict[str, Any]:
    return {"dialect": None, "requests": defaultdict(float), "attempts": 0.0, "retries": 0.0, "ratelimit_refused": 0.0, "breakers": []}


def upstream_stats(metrics: "Metrics", names: list[str]) -> dict[str, dict[str, Any]]:
    """Per upstream: requests by class, attempts, retries and rate-limit refusals so far."""
    upstreams = {name: empty_upstream() for name in names}

    def entry(labels: dict[str, str]) -> dict[str, Any]:
        return upstreams.setdefault(labels["upstream"], empty_upstream())

    for labels, value in metrics.counts("gateway_requests"):
        entry(labels)["requests"][labels["class"]] += value
    for labels, value in metrics.counts("gateway_upstream_attempts"):
        entry(labels)["attempts"] += value
    for labels, value in metrics.counts("gateway_upstream_retries"):
        entry(labels)["retries"] += value
    for labels, value in metrics.counts("gateway_ratelimit_decisions"):
        if labels["decision"] == "refused":
            entry(labels)["ratelimit_refused"] += value
    return upstreams


def redis_stats(gateway: "Gateway") -> dict[str, Any]:
    services = gateway.services
    assert services is not None
    store = services.store
    errors = sum(value for _, value in services.metrics.counts("gateway_redis_errors"))
    if store is None:
        return {"configured": False, "healthy": None, "mode": None, "cooldown_left_s": 0.0, "errors": errors}
    return {
        "configured": True,
        "healthy": store.healthy,
        "mode": gateway.settings.config.state.on_redis_error,
        "cooldown_left_s": store.cooldown_left_s(),
        "errors": errors,
    }
