"""create_app(settings) -> the ASGI application; its lifespan builds and closes everything.

Long-lived parts (upstream pool, rate limiter, breakers, retry budgets, metrics) live in
`Services` and survive a reload; everything derived from one configuration lives in a
`Runtime`, which a reload replaces in one assignment. A request reads the current Runtime once
at its start, so it finishes on the configuration it started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from gateway.admin import admin_routes, ops_exception_handlers, ops_routes
from gateway.breakers import BreakerKey, BreakerPolicy, BreakerRegistry, BreakerReplicator
from gateway.dedupe import DedupeGate, Deduper, build_deduper
from gateway.observability import AccessLog, AccessRecord, CountingStore, Metrics
from gateway.envelope import render_unrouted
from gateway.http_protocol import ConnectionSettings
from gateway.outcomes import ErrorClass, Outcome
from gateway.pipeline import Pipeline, UpstreamPlan, request_id_of
from gateway.ratelimit import BucketPolicy, MemoryRateLimiter, RedisRateLimiter
from gateway.retry import RetryBudget
from gateway.settings import Settings, load_settings
from gateway.sigv4 import RequestSigner, signer_if_needed
from gateway.store import RedisStore
from gateway.tracing import Tracing, tracing_from_environment
from gateway.upstream import UpstreamClient, split_credentials
from gateway.yamlsource import ConfigError

log = logging.getLogger("gateway.app")

OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def connection_settings(settings: Settings, on_refusal: Callable[[Outcome, str, str, float], None]) -> ConnectionSettings:
    server = settings.config.server
    # The raw head holds the request line too; the headers alone are held to max_header_bytes
    # (431) by the pipeline, which sees them parsed.
    return ConnectionSettings(2 * server.max_header_bytes, server.client_header_timeout_s, server.client_body_timeout_s, server.error_type_base, on_refusal)


@dataclass(slots=True)
class Services:
    """The parts that outlive a configuration: built once in the lifespan, closed there."""

    upstream: UpstreamClient
    limiter: Any
    breakers: BreakerRegistry
    metrics: Metrics
    access_log: AccessLog
    clock: Callable[[], float]
    wall_clock: Callable[[], float]
    random: Callable[[], float]
    store: RedisStore | None = None
    replicator: BreakerReplicator | None = None
    signer: RequestSigner | None = None
    budgets: dict[str, RetryBudget] = field(default_factory=dict)
    tracing: Tracing | None = None
    deduper: Deduper | None = None


class Runtime:
    """One loaded configuration bound to the services: what the pipeline reads per request."""

    def __init__(self, settings: Settings, services: Services) -> None:
        config = settings.config
        self.settings = settings
        self.services = services
        self.router = settings.router
        self.plans = {name: _plan(name, settings) for name in config.upstreams}
        self.limiter = services.limiter
        self.breakers = services.breakers
        self.upstream = services.upstream
        self.metrics = services.metrics
        self.access_log = services.access_log
        self.signer = services.signer
        self.clock = services.clock
        self.wall_clock = services.wall_clock
        self.random = services.random
        self.max_body_bytes = config.server.max_body_bytes
        self.max_header_bytes = config.server.max_header_bytes
        self.replay_max_bytes = min(config.server.replay_max_bytes, config.server.max_body_bytes)
        self.type_base = config.server.error_type_base
        limits = config.rate_limits
        self._default_bucket = BucketPolicy("default", limits.default.rate, limits.default.per_s, limits.default.burst)
        self._account_buckets = {a: BucketPolicy(a, b.rate, b.per_s, b.burst) for a, b in limits.accounts.items()}
        for plan in self.plans.values():
            self.budget(plan)
        self.dedupe = DedupeGate(services.deduper, config)
        self.pipeline = Pipeline(self)

    def bucket_policy(self, account: str | None) -> BucketPolicy:
        if account is None:
            return self._default_bucket
        return self._account_buckets.get(account, self._default_bucket)

    def budget(self, plan: UpstreamPlan) -> RetryBudget:
        """Budgets are kept per upstream name across reloads; a reload only retunes them."""
        budget = self.services.budgets.get(plan.name)
        if budget is None:
            budget = RetryBudget(plan.retry.budget_ratio, plan.retry.budget_min_per_s, self.clock)
            self.services.budgets[plan.name] = budget
        elif (budget.ratio, budget.min_per_s) != (plan.retry.budget_ratio, plan.retry.budget_min_per_s):
            budget.reconfigure(plan.retry.budget_ratio, plan.retry.budget_min_per_s)
        return budget


def _plan(name: str, settings: Settings) -> UpstreamPlan:
    upstream = settings.config.upstreams[name]
    breaker = settings.breaker_policies[upstream.breaker]
    base_url, authorization = split_credentials(upstream.url)
    return UpstreamPlan(
        name=name,
        config=upstream,
        pack=settings.packs[upstream.dialect],
        retry=settings.retry_policies[upstream.retry],
        breaker=BreakerPolicy(breaker.fail_max, breaker.reset_timeout_s, breaker.scope),
        account_header=upstream.account_header.lower().encode() if upstream.account_header else None,
        base_url=base_url,
        authorization=authorization,
    )


class Gateway:
    """The ASGI entry point: the proxy pipeline for upstream routes, Starlette for the rest."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        reload_on_sighup: bool = False,
        announce_reload: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._wall_clock = wall_clock
        self.runtime: Runtime | None = None
        self.services: Services | None = None
        self.replica_id = uuid.uuid4().hex[:12]
        self._reload_lock = asyncio.Lock()
        self._reload_on_sighup = reload_on_sighup
        if reload_on_sighup:
            # Until the lifespan installs the reload handler, a SIGHUP (a supervisor passing a
            # reload on while this worker still starts) is held by the kernel: neither lost nor,
            # as its default action would, ending the process. A worker starts with it blocked
            # already (gateway.server); blocking, unlike ignoring, keeps one already pending.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        self._announce_reload = announce_reload
        self._signal_reloads: set[asyncio.Task[None]] = set()
        self.ops = Starlette(
            routes=[*ops_routes(self), *admin_routes(self)],
            exception_handlers=ops_exception_handlers(self),
            lifespan=self._lifespan,
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPS_PATHS and not scope["path"].startswith("/admin"):
            runtime = self.runtime
            if runtime is None:
                raise RuntimeError("the gateway's lifespan has not started")
            tracing = runtime.services.tracing
            if tracing is None:
                await runtime.pipeline(scope, receive, send)
            else:
                await tracing.traced(runtime.pipeline, scope, receive, send)
            return
        if scope["type"] == "websocket":
            await self._refuse_websocket(scope, send)
            return
        await self.ops(scope, receive, send)

    async def _refuse_websocket(self, scope: dict[str, Any], send: Any) -> None:
        """WebSocket upgrades are not proxied: say so with a problem object, not a bare 403."""
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})  # the server answers 403 itself
            return
        outcome = Outcome(ErrorClass.CLIENT_ERROR, 400, "gateway.bad_request", "WebSocket upgrades are not proxied by this gateway", made_by_gateway=True)
        request_id = request_id_of(scope)
        rendered = render_unrouted(outcome, request_id, self.settings.config.server.error_type_base)
        await send({"type": "websocket.http.response.start", "status": rendered.status, "headers": rendered.headers})
        await send({"type": "websocket.http.response.body", "body": rendered.body})
        self._record_refusal(outcome, request_id, "GET", 0.0)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        self.services = await build_services(self.settings, self._clock, self._wall_clock, self.replica_id)
        self.runtime = Runtime(self.settings, self.services)
        if self._reload_on_sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
            # one held while this process started arrives now, through the loop's handler
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        log.info("gateway started with %s", self.settings.source)

    async def stop(self) -> None:
        services = self.services
        if services is None:
            return
        if self._reload_on_sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # SIGHUP's default would kill a draining process
        if services.replicator is not None:
            await services.replicator.stop()
        if services.deduper is not None:
            await services.deduper.aclose()
        await services.upstream.aclose()
        if services.store is not None:
            await services.store.aclose()
        self.services = None
        log.info("gateway stopped: requests finished, pools closed")

    def swap(self, settings: Settings) -> None:
        """Install a new, already validated configuration in one assignment."""
        assert self.services is not None
        self.runtime = Runtime(settings, self.services)
        self.settings = settings

    def connection_settings(self) -> ConnectionSettings:
        """Read by the server protocol for each new connection, so a reload applies to new ones."""
        return connection_settings(self.settings, self._record_refusal)

    def _record_refusal(self, outcome: Outcome, request_id: str, method: str, duration_s: float) -> None:
        """Count and log a request the server protocol answered itself, as the pipeline does its own."""
        services = self.services
        if services is None:
            return
        error_class = outcome.error_class.value if outcome.error_class else None
        services.metrics.count_request("-", error_class or "success", outcome.status, duration_s)
        record = AccessRecord(request_id, method, None, None, None, None, outcome.status, error_class, 0, duration_s)
        services.access_log.write(record)

    async def reload_from(self, path: Path) -> Settings:
        """Load, validate and swap; raises ConfigError and keeps the running configuration."""
        async with self._reload_lock:
            try:
                settings = await asyncio.to_thread(load_settings, path)
            except ConfigError as exc:
                self._note_reload(False, f"configuration {path} rejected: " + "; ".join(map(str, exc.problems)))
                raise
            if settings.config.state != self.settings.config.state:
                log.warning("state settings changed: they take effect at the next restart")
            self.swap(settings)
            self._note_reload(True, f"configuration reloaded from {path}")
            return settings

    async def reload_everywhere(self) -> Settings:
        """The admin API's reload: this process now, then its sibling workers (via the supervisor)."""
        settings = await self.reload_from(Path(self.settings.source))
        if self._announce_reload is not None:
            self._announce_reload()
        return settings

    def _note_reload(self, accepted: bool, message: str) -> None:
        if self.services is not None:
            self.services.metrics.record_reload(accepted)
        log.log(logging.INFO if accepted else logging.ERROR, message)

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_quietly())
        self._signal_reloads.add(task)
        task.add_done_callback(self._signal_reloads.discard)

    async def _reload_quietly(self) -> None:
        with contextlib.suppress(ConfigError):  # already logged and counted; the old configuration stays
            await self.reload_from(Path(self.settings.source))

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        services = self.services
        if services is None or self.runtime is None:
            return False, {"config": "not loaded"}
        detail: dict[str, Any] = {"config": self.settings.source}
        if services.store is None:
            detail["state"] = "memory"
            return True, detail
        reachable = await services.store.ping()
        detail["state"] = "redis"
        detail["redis"] = "reachable" if reachable else "unreachable"
        return reachable, detail


async def build_services(settings: Settings, clock: Callable[[], float], wall_clock: Callable[[], float], replica_id: str) -> Services:
    config = settings.config
    metrics = Metrics()
    breakers = BreakerRegistry(wall_clock, _transition_logger(metrics))
    upstream = UpstreamClient(max_connections=sum(u.max_connections for u in config.upstreams.values()))
    store: RedisStore | None = None
    replicator: BreakerReplicator | None = None
    if config.state.redis_url:
        store = RedisStore.from_url(config.state.redis_url, timeout_s=config.state.redis_timeout_s, max_connections=config.state.redis_max_connections, clock=clock)
        counted: Any = CountingStore(store, lambda operation: metrics.redis_errors.labels(operation).inc())
        limiter: Any = RedisRateLimiter(counted, config.state.on_redis_error, clock)
        await store.prepare()  # first: a cluster's slot map and the script, before any request
        replicator = BreakerReplicator(breakers, counted, replica_id=replica_id)
        replicator.start()
        await replicator.load_opens()  # before the first request: breakers open on other replicas start open here
        deduper = build_deduper(config, counted, metrics, clock)
    else:
        limiter = MemoryRateLimiter(clock)
        deduper = build_deduper(config, None, metrics, clock)
    metrics.watch_state(breakers, store, config.state.on_redis_error)
    signer = signer_if_needed(config)
    await upstream.start()  # last: nothing above may leave an open session behind when it fails
    tracing = tracing_from_environment()
    client: Any = upstream if tracing is None else tracing.wrap_upstream(upstream)
    access_log = AccessLog(wall_clock=wall_clock, annotate=None if tracing is None else tracing.annotate)
    return Services(client, limiter, breakers, metrics, access_log, clock, wall_clock, random.random, store, replicator, signer, deduper=deduper, tracing=tracing)


def _transition_logger(metrics: Metrics) -> Callable[[BreakerKey, str, str], None]:
    events = logging.getLogger("gateway.breakers")

    def on_transition(key: BreakerKey, old: str, new: str) -> None:
        metrics.record_breaker_transition(key.upstream, key.function, old, new)
        events.warning("breaker %s/%s: %s -> %s", key.upstream, key.function, old, new)

    return on_transition


def create_app(settings: Settings, **kwargs: Any) -> Gateway:
    return Gateway(settings, **kwargs)
