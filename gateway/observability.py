"""Metrics (one prometheus registry per app, never the global one) and the JSON access log."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ACCESS_LOGGER = "gateway.access"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(slots=True)
class AccessRecord:
    request_id: str
    method: str
    route: str | None
    account: str | None
    upstream: str | None
    function: str | None
    status: int
    error_class: str | None
    attempts: int
    duration_s: float
    replayed: bool = False


class Metrics:
    """Every series the gateway exports. Built per app so tests and reloads never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gateway_requests_total", "Requests answered", ["upstream", "class", "status"], registry=r)
        self.attempts = Counter("gateway_upstream_attempts_total", "Upstream calls made", ["upstream", "class"], registry=r)
        self.retries = Counter("gateway_upstream_retries_total", "Upstream calls that were retries", ["upstream"], registry=r)
        self.retry_stops = Counter("gateway_retry_stops_total", "Why retries stopped", ["upstream", "reason"], registry=r)
        self.upstream_latency = Histogram("gateway_upstream_latency_seconds", "Time to upstream response headers", ["upstream"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram("gateway_request_duration_seconds", "Whole request duration", ["upstream"], buckets=LATENCY_BUCKETS, registry=r)
        self.breaker_state = Gauge("gateway_breaker_state", "1 for the state each breaker is in", ["upstream", "function", "state"], registry=r)
        self.breaker_transitions = Counter("gateway_breaker_transitions_total", "Breaker state changes", ["upstream", "to"], registry=r)
        self.ratelimit = Counter("gateway_ratelimit_decisions_total", "Rate-limit decisions", ["upstream", "decision", "source"], registry=r)
        self.redis_errors = Counter("gateway_redis_errors_total", "Redis operations that failed", ["operation"], registry=r)
        self.redis_fallback = Gauge("gateway_ratelimit_fallback", "1 while rate limiting runs without Redis", registry=r)
        self.coalesced = Counter("gateway_dedupe_total", "Requests answered from another request's invocation", ["upstream", "kind"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def record_breaker_transition(self, upstream: str, function: str, old: str, new: str) -> None:
        self.breaker_transitions.labels(upstream, new).inc()
        self.breaker_state.labels(upstream, function, old).set(0)
        self.breaker_state.labels(upstream, function, new).set(1)


class AccessLog:
    """One JSON line per request on the `gateway.access` logger. Never headers, never bodies."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)

    def write(self, record: AccessRecord) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "request_id": record.request_id,
            "method": record.method,
            "route": record.route,
            "account": record.account,
            "upstream": record.upstream,
            "function": record.function,
            "status": record.status,
            "class": record.error_class,
            "attempts": record.attempts,
            "duration_ms": round(record.duration_s * 1000, 3),
        }
        if record.replayed:
            line["replayed"] = True
        self._logger.info(orjson.dumps(line).decode())


def configure_logging(level: str = "INFO") -> None:
    """Plain lines on stderr: the access log is already JSON, other loggers get a JSON-ish prefix."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers[:] = [handler]
    access.propagate = False
    access.setLevel(level)
    events = logging.getLogger("gateway")
    if not events.handlers:
        other = logging.StreamHandler(sys.stderr)
        other.setFormatter(logging.Formatter('{"time":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","message":%(message)r}'))
        events.addHandler(other)
    events.setLevel(level)
