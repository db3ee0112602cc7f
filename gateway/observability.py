"""Metrics (one prometheus registry per app, never the global one) and the JSON access log.

Counters and histograms are updated on the request path. What is a state rather than an
event (each breaker's state and time left open, whether Redis answers, whether rate limiting
runs in its fallback mode) is read from its owner when `/metrics` is scraped, so the
exposition can never disagree with `/admin/breakers` or miss a breaker that never changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.store import StoreUnavailable

if TYPE_CHECKING:
    from gateway.breakers import BreakerRegistry
    from gateway.store import RedisStore

ACCESS_LOGGER = "gateway.access"
# Set by `gateway serve --workers N` for its workers (prometheus_client's multiprocess mode):
# each worker writes its counters to files there, and a scrape of any worker sums them all.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BREAKER_STATES = ("closed", "open", "half-open")


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
        self.breaker_transitions = Counter("gateway_breaker_transitions_total", "Breaker state changes", ["upstream", "to"], registry=r)
        self.ratelimit = Counter("gateway_ratelimit_decisions_total", "Rate-limit decisions", ["upstream", "decision", "source"], registry=r)
        self.redis_errors = Counter("gateway_redis_errors_total", "Redis operations that failed or were skipped during an outage cool-down", ["operation"], registry=r)
        self.reloads = Counter("gateway_config_reloads_total", "Configuration reloads by result", ["result"], registry=r)
        self.config_loaded = Gauge("gateway_config_loaded_timestamp_seconds", "When the running configuration was loaded (epoch s)", registry=r, multiprocess_mode="max")
        self.coalesced = Counter("gateway_dedupe_total", "Requests answered from another request's invocation", ["upstream", "kind"], registry=r)
        self.config_loaded.set_to_current_time()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._state: list[Collector] = []

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, kept: prometheus validates and takes a lock on every `labels` call."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def count_request(self, upstream: str, class_label: str, status: int, duration_s: float) -> None:
        """One answered request: `gateway_requests_total` and its duration."""
        self.child(self.requests, upstream, class_label, str(status)).inc()
        self.child(self.request_latency, upstream).observe(duration_s)

    def exposition(self) -> bytes:
        return generate_latest(self._scraped())

    def _scraped(self) -> CollectorRegistry:
        """This process's registry, or with workers every worker's series summed plus this one's state."""
        directory = os.environ.get(MULTIPROCESS_ENV)
        if not directory:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, directory)
        for collector in self._state:
            registry.register(collector)
        return registry

    def record_breaker_transition(self, upstream: str, function: str, old: str, new: str) -> None:
        self.breaker_transitions.labels(upstream, new).inc()

    def record_reload(self, accepted: bool) -> None:
        self.reloads.labels("accepted" if accepted else "rejected").inc()
        if accepted:
            self.config_loaded.set_to_current_time()

    def watch_state(self, breakers: "BreakerRegistry", store: "RedisStore | None", on_redis_error: str) -> None:
        """Export breaker and Redis state, read from their owners at each scrape."""
        collector = StateCollector(breakers, store, on_redis_error)
        self._state.append(collector)
        self.registry.register(collector)

    def counts(self, name: str) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of every sample of the counter `name` (without `_total`)."""
        return [
            (sample.labels, sample.value)
            for family in self._scraped().collect()
            if family.name == name
            for sample in family.samples
            if sample.name == name + "_total"
        ]


class StateCollector(Collector):
    """Gauges computed at scrape time from the breaker registry and the Redis store."""

    def __init__(self, breakers: "BreakerRegistry", store: "RedisStore | None", on_redis_error: str) -> None:
        self._breakers = breakers
        self._store = store
        self._mode = on_redis_error

    def collect(self) -> Iterator[Metric]:
        yield from self._breaker_families()
        if self._store is not None:
            yield from self._redis_families(self._store)

    def _breaker_families(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("gateway_breaker_state", "1 for the state each breaker is in", labels=["upstream", "function", "state"])
        left = GaugeMetricFamily("gateway_breaker_open_remaining_seconds", "Seconds until an open breaker lets a probe through", labels=["upstream", "function"])
        for breaker in self._breakers.snapshot():
            key = [breaker["upstream"], breaker["function"]]
            for name in BREAKER_STATES:
                state.add_metric([*key, name], 1.0 if breaker["state"] == name else 0.0)
            left.add_metric(key, breaker["open_remaining_s"])
        yield state
        yield left

    def _redis_families(self, store: "RedisStore") -> Iterator[Metric]:
        healthy = store.healthy
        up = GaugeMetricFamily("gateway_redis_up", "1 while Redis answers, 0 during an outage cool-down")
        up.add_metric([], 1.0 if healthy else 0.0)
        fallback = GaugeMetricFamily("gateway_ratelimit_fallback", "1 while rate limiting runs without Redis (on_redis_error mode)", labels=["mode"])
        fallback.add_metric([self._mode], 0.0 if healthy else 1.0)
        yield up
        yield fallback


class CountingStore:
    """A RedisStore that counts the operations it could not do, per operation."""

    def __init__(self, store: "RedisStore", count_error: Callable[[str], None]) -> None:
        self._store = store
        self._count_error = count_error

    @property
    def healthy(self) -> bool:
        return self._store.healthy

    def cooldown_left_s(self) -> float:
        return self._store.cooldown_left_s()

    async def ping(self) -> bool:
        return await self._store.ping()

    async def take_token(self, key: str, rate: float, per_s: float, burst: int) -> tuple[bool, int, float, float]:
        return await self._counted("take_token", self._store.take_token(key, rate, per_s, burst))

    async def set_value(self, key: str, value: bytes, ttl_s: float, only_if_absent: bool = False) -> bool:
        return await self._counted("set", self._store.set_value(key, value, ttl_s, only_if_absent))

    async def get_value(self, key: str) -> bytes | None:
        return await self._counted("get", self._store.get_value(key))

    async def delete(self, key: str) -> None:
        return await self._counted("delete", self._store.delete(key))

    async def publish(self, channel: str, message: bytes) -> None:
        return await self._counted("publish", self._store.publish(channel, message))

    async def add_until(self, key: str, member: bytes, until: float, now: float) -> None:
        return await self._counted("zadd", self._store.add_until(key, member, until, now))

    async def members_after(self, key: str, now: float, limit: int) -> list[bytes]:
        return await self._counted("zrangebyscore", self._store.members_after(key, now, limit))

    async def remove_members(self, key: str, members: list[bytes]) -> None:
        return await self._counted("zrem", self._store.remove_members(key, members))

    def subscribe(self, channel: str) -> AsyncIterator[bytes]:
        return self._store.subscribe(channel)

    async def aclose(self) -> None:
        await self._store.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def _counted(self, operation: str, call: Any) -> Any:
        try:
            return await call
        except StoreUnavailable:
            self._count_error(operation)
            raise


class AccessLog:
    """One JSON line per request on the `gateway.access` logger. Never headers, never bodies."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        wall_clock: Callable[[], float] = time.time,
        annotate: Callable[[AccessRecord], None] | None = None,
    ) -> None:
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)
        self._wall_clock = wall_clock
        self._annotate = annotate
        self._pid = os.getpid()
        self._second: tuple[int, str] = (-1, "")

    def write(self, record: AccessRecord) -> None:
        if self._annotate is not None:
            self._annotate(record)  # the request's span gets the same fields (gateway.tracing)
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        line = orjson.dumps(self.line(record))
        handlers = logger.handlers
        if len(handlers) == 1 and type(handlers[0]) is LineHandler and not logger.propagate:
            # The logger's only output takes ready lines: skip building a LogRecord for each.
            handlers[0].write_line(line)
        else:
            logger.info(line.decode())

    def line(self, record: AccessRecord) -> dict[str, Any]:
        line: dict[str, Any] = {
            "time": self._time(self._wall_clock()),
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
            "pid": self._pid,
        }
        if record.replayed:
            line["replayed"] = True
        return line

    def _time(self, epoch_s: float) -> str:
        """`format_time`, with the part up to the seconds formatted once per second (strftime is most of its cost)."""
        whole = int(epoch_s)
        if self._second[0] != whole:
            self._second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
        return f"{self._second[1]}.{int(epoch_s * 1000) % 1000:03d}Z"


def format_time(epoch_s: float) -> str:
    """RFC 3339 UTC with milliseconds: 2026-01-31T12:00:00.123Z."""
    millis = int(epoch_s * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s)) + f".{millis:03d}Z"


def configure_logging(level: str = "INFO") -> None:
    """Plain lines on stderr: the access log is already JSON, other loggers get a JSON-ish prefix."""
    # No formatter here reads the caller's file/line or the thread: skip collecting them for every
    # record, the access log's included (the logging HOWTO's "Optimization" switches).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = LineHandler(sys.stderr)
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers[:] = [handler]
    access.propagate = False
    access.setLevel(level)
    events = logging.getLogger("gateway")
    if not events.handlers:
        other = logging.StreamHandler(sys.stderr)
        other.setFormatter(JsonEventFormatter())
        events.addHandler(other)
    events.setLevel(level)


class LineHandler(logging.Handler):
    """Writes each record's message as one line, batching the lines of one event-loop turn.

    A request's line is written at the end of the loop iteration that produced it: under load
    one `write` carries many lines instead of one system call per request, and a line is never
    held back longer than the iteration (nginx's `access_log ... buffer=` trades more, seconds).
    Outside an event loop every line is written at once. `flush()` (logging's shutdown hook
    calls it) writes what is pending.
    """

    MAX_PENDING_BYTES = 64 * 1024

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self._stream = stream
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    def setStream(self, stream: Any) -> Any:  # noqa: N802 - logging's name
        self.flush()
        old, self._stream = self._stream, stream
        return old

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(record.getMessage().encode())
        except Exception:
            self.handleError(record)

    def write_line(self, line: bytes) -> None:
        self._pending.append(line)
        self._pending_bytes += len(line) + 1
        if self._pending_bytes >= self.MAX_PENDING_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            loop = self._running_loop()
            if loop is None:
                self.flush()
                return
            self._flush_scheduled = True
            loop.call_soon(self.flush)

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop running in this thread, if any; remembered, because asking asyncio for it
        costs a getpid system call on Python 3.11 (once per loop turn with lines to write)."""
        loop, thread = self._loop, threading.get_ident()
        if loop is not None and self._loop_thread == thread and loop.is_running():
            return loop  # one loop runs per thread at a time: the remembered one, still running here
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        self._loop, self._loop_thread = loop, thread
        return loop

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        data = b"\n".join(lines) + b"\n"
        try:
            binary = getattr(self._stream, "buffer", None)
            if binary is not None:
                self._stream.flush()  # whatever was written to the text layer goes first
                binary.write(data)
                binary.flush()
            else:
                self._stream.write(data.decode())
                self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr must not fail requests; the lines are lost either way


class JsonEventFormatter(logging.Formatter):
    """Event logs (not the access log) as one JSON object per line, exceptions included."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": format_time(record.created), "level": record.levelname, "logger": record.name, "pid": record.process, "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()
