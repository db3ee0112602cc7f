"""Coalescing duplicate invocations: a client's own retries never run a function twice.

A request is *coalescable* when its body was buffered (so it is known whole) and it carries a
caller id: the first present of `dedupe.id_headers`. Its key is a digest of (upstream,
account, function, method, raw path, query, caller id, caller credential, sha256 of the body):
no caller id means never coalesced; the same id with another body, path or credential is
another request.

- **In flight.** The first request with a key starts a *flight*: one task, not tied to any
  client connection, that runs the pipeline's `forward` and `respond` into a tee. The tee
  relays the response live to the first caller while it listens, and keeps up to
  `max_body_bytes` of it for everyone else. Later requests with the key wait for the flight and
  get the same status, headers and body. If the first caller goes away the flight goes on.
  A response whose body outgrows `max_body_bytes` is not shared: its waiters go upstream on
  their own (see docs/dedupe.md for why that double invocation is accepted).
- **Just finished.** A final outcome (success, function error, function timeout, client
  error: the function ran) is stored for `ttl_s`; a repeat gets it again with
  `X-Gateway-Replayed: true`. The stored body is byte-identical, so a replayed envelope
  reports the original's `attempts`. Retryable failures are never stored.
- **Across replicas.** With Redis, one key per request holds either an in-flight mark (set only
  if absent, with a short lease the owner renews) or the stored response (with `ttl_s`). A
  replica that finds the mark polls until the response appears, the lease lapses (the owner
  died: it claims the key and runs the request itself) or its own deadline passes (504: the
  owner is alive, so running the request again would be the double invocation we prevent).
  When Redis cannot be reached, requests are coalesced within the process only.
- **Bounds.** Stored responses in memory are bounded by entries and bytes (LRU); Redis
  entries expire by themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, Union

import orjson

from gateway.config import DedupeConfig, GatewayConfig
from gateway.observability import Metrics
from gateway.outcomes import ErrorClass, Outcome
from gateway.pipeline import Answer, ClientDisconnected, Exchange, Pipeline, RequestBody
from gateway.store import StoreUnavailable

log = logging.getLogger("gateway.dedupe")

Headers = list[tuple[bytes, bytes]]
Sleep = Callable[[float], Awaitable[None]]

REPLAY_HEADER = b"x-gateway-replayed"
KEY_PREFIX = "gateway:dedupe:"
IDENTITY_HEADERS = frozenset({b"cookie", b"x-api-key", b"x-amz-security-token"})  # stable across one caller's retries
MEMORY_MAX_BYTES = 64 * 1024 * 1024
LEASE_S = 3.0
POLL_FIRST_S = 0.025
POLL_MAX_S = 0.25
FINAL_CLASSES = frozenset({None, ErrorClass.FUNCTION_ERROR, ErrorClass.FUNCTION_TIMEOUT, ErrorClass.CLIENT_ERROR})
_ENTRY_OVERHEAD_BYTES = 256
_MARK = b"F"
_DONE = b"D"


# --- pure parts -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DedupeRule:
    """One upstream's effective dedupe settings, ready for per-request use."""

    ttl_s: float
    max_body_bytes: int
    id_headers: tuple[bytes, ...]

    @classmethod
    def of(cls, config: DedupeConfig) -> DedupeRule | None:
        if not config.enabled:
            return None
        return cls(config.ttl_s, config.max_body_bytes, tuple(name.lower().encode("latin-1") for name in config.id_headers))


def effective_config(default: DedupeConfig, override: DedupeConfig | None) -> DedupeConfig:
    """The global section with the keys an upstream's own `dedupe:` section sets laid over it."""
    if override is None:
        return default
    return default.model_copy(update={name: getattr(override, name) for name in override.model_fields_set})


def caller_id(headers: Headers, names: tuple[bytes, ...]) -> tuple[bytes, bytes] | None:
    """(header name, value) of the first configured id header present with a value."""
    for name in names:
        for key, value in headers:
            if key == name and value.strip():
                return name, value
    return None


def credential_of(authorization: bytes | None) -> bytes:
    """Who the caller claims to be, without the parts that change on every retry.

    A SigV4 signature and an OAuth 1.0a nonce/signature differ per attempt even for one
    caller, so only their credential scope / consumer and token count; anything else whole.
    """
    if not authorization:
        return b""
    if authorization.startswith(b"AWS4-HMAC-SHA256 "):
        return b"sigv4:" + _auth_param(authorization, b"Credential")
    if authorization[:6].lower() == b"oauth ":
        return b"oauth:" + _auth_param(authorization, b"oauth_consumer_key") + b"/" + _auth_param(authorization, b"oauth_token")
    return authorization


def identity_of(headers: Headers) -> tuple[bytes, ...]:
    """The caller's credentials besides Authorization (cookies, API keys): without them, a caller
    who sent another's id and body would be served the other caller's stored response."""
    return tuple(name + b"=" + value for name, value in headers if name in IDENTITY_HEADERS)


def _auth_param(authorization: bytes, name: bytes) -> bytes:
    for part in authorization.split(b" ", 1)[-1].split(b","):
        key, _, value = part.strip().partition(b"=")
        if key == name:
            return value.strip(b'"')
    return b""


def request_key(scope: dict[str, Any], upstream: str, account: str | None, function: str, body: bytes, id_headers: tuple[bytes, ...]) -> str | None:
    """The dedupe key of a request, or None when the caller sent no id (never coalesced)."""
    headers = scope["headers"]
    found = caller_id(headers, id_headers)
    if found is None:
        return None
    authorization = next((v for k, v in headers if k == b"authorization"), None)
    parts = (
        upstream.encode(),
        (account or "").encode(),
        function.encode(),
        scope.get("method", "").encode(),
        scope.get("raw_path") or scope["path"].encode(),
        scope.get("query_string", b""),
        *found,
        credential_of(authorization),
        *identity_of(headers),
        hashlib.sha256(body).digest(),
    )
    framed = b"".join(len(part).to_bytes(4, "big") + part for part in parts)  # the same digest as one update per part
    return KEY_PREFIX + hashlib.sha256(framed).hexdigest()


def is_final(error_class: ErrorClass | None) -> bool:
    """Whether an outcome means the function ran (so running it again would be a second run)."""
    return error_class in FINAL_CLASSES


def next_poll_delay(previous_s: float) -> float:
    return min(POLL_MAX_S, previous_s * 2)


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A complete response as the pipeline wrote it, minus the per-request headers."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    attempts: int
    error_class: str | None

    size: int = dataclasses.field(init=False, compare=False, repr=False)  # bytes it holds in memory, counted once

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", len(self.body) + sum(len(n) + len(v) for n, v in self.headers) + _ENTRY_OVERHEAD_BYTES)

    @property
    def final(self) -> bool:
        return is_final(ErrorClass(self.error_class) if self.error_class else None)


def encode_response(response: StoredResponse) -> bytes:
    """JSON head, a newline, then the raw body (orjson never emits a raw newline)."""
    head = {
        "status": response.status,
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in response.headers],
        "attempts": response.attempts,
        "class": response.error_class,
    }
    return orjson.dumps(head) + b"\n" + response.body


def decode_response(raw: bytes) -> StoredResponse | None:
    """The response `encode_response` wrote, or None for anything else."""
    head, _, body = raw.partition(b"\n")
    try:
        data = orjson.loads(head)
        headers = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in data["headers"])
        return StoredResponse(int(data["status"]), headers, body, int(data["attempts"]), data["class"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


# --- where stored responses and in-flight marks live -----------------------------------------


class Claim(enum.Enum):
    OWNED = "owned"  # this process runs the request
    ELSEWHERE = "elsewhere"  # another replica holds a live in-flight mark
    LOCAL = "local"  # the shared store is unreachable: run it, coalescing within this process only


ClaimResult = Union[Claim, StoredResponse]


class ResponseCache:
    """Stored responses in process memory: expire after their TTL, LRU beyond entries or bytes."""

    def __init__(self, max_entries: int, max_bytes: int, clock: Callable[[], float]) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, StoredResponse]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> StoredResponse | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, response: StoredResponse, ttl_s: float) -> None:
        if key in self._entries:
            self._drop(key)
        if ttl_s <= 0 or response.size > self.max_bytes:
            return
        self._entries[key] = (self._clock() + ttl_s, response)
        self.bytes += response.size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, response = self._entries.pop(key)
        self.bytes -= response.size


class MemoryBackend:
    """Single process: the flights table is the in-flight mark; responses in a ResponseCache."""

    shared = False

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    async def claim(self, key: str, lease_s: float) -> ClaimResult:
        return self.cache.get(key) or Claim.OWNED

    async def renew(self, key: str, lease_s: float) -> None:
        return None

    async def finish(self, key: str, response: StoredResponse | None, ttl_s: float) -> None:
        if response is not None:
            self.cache.put(key, response, ttl_s)


class ValueStore(Protocol):
    """The part of `gateway.store.RedisStore` used here (also met by observability.CountingStore)."""

    async def set_value(self, key: str, value: bytes, ttl_s: float, only_if_absent: bool = False) -> bool: ...

    async def get_value(self, key: str) -> bytes | None: ...

    async def delete(self, key: str) -> None: ...


class RedisBackend:
    """Across replicas: one Redis key per request, an in-flight mark or the stored response."""

    shared = True

    def __init__(self, store: ValueStore, owner: str | None = None) -> None:
        self._store = store
        self._mark = _MARK + (owner or uuid.uuid4().hex).encode()

    async def claim(self, key: str, lease_s: float) -> ClaimResult:
        try:
            for _ in range(3):  # the key can vanish between SET NX and GET; then try again
                if await self._store.set_value(key, self._mark, lease_s, only_if_absent=True):
                    return Claim.OWNED
                raw = await self._store.get_value(key)
                if raw is not None:
                    return _stored_or_elsewhere(raw)
        except StoreUnavailable:
            return Claim.LOCAL
        return Claim.ELSEWHERE

    async def renew(self, key: str, lease_s: float) -> None:
        try:
            await self._store.set_value(key, self._mark, lease_s)
        except StoreUnavailable:
            pass  # the mark may lapse: another replica may then run the request too

    async def finish(self, key: str, response: StoredResponse | None, ttl_s: float) -> None:
        try:
            if response is not None and ttl_s > 0:
                await self._store.set_value(key, _DONE + encode_response(response), ttl_s)
            else:
                await self._store.delete(key)
        except StoreUnavailable:
            log.warning("could not store or release dedupe key %s: Redis is unavailable", key)


def _stored_or_elsewhere(raw: bytes) -> ClaimResult:
    if raw.startswith(_DONE):
        stored = decode_response(raw[1:])
        if stored is not None:
            return stored
    return Claim.ELSEWHERE


Backend = Union[MemoryBackend, RedisBackend]


# --- one invocation and everyone waiting for it ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class Shared:
    response: StoredResponse
    kind: str  # "coalesced" (waited for an invocation) or "replayed" (a stored one)


class Mark(enum.Enum):
    END = "end"
    CUT = "cut"


class Abandoned(Exception):
    """Nobody can use the rest of the response: not kept (too large) and its first caller left."""


class Flight:
    """One invocation's response as the pipeline writes it (the tee) and the futures of its readers.

    `head` resolves with the live response start, or a Shared response (from the store, or
    None when the flight failed before answering); `done` with the Shared response for
    waiters, or None when there is nothing to share (too large, cut, failed).
    """

    def __init__(self, key: str, rule: DedupeRule, upstream: str) -> None:
        loop = asyncio.get_running_loop()
        self.key = key
        self.rule = rule
        self.upstream = upstream
        self.head: asyncio.Future[Head | Shared | None] = loop.create_future()
        self.done: asyncio.Future[Shared | None] = loop.create_future()
        self.live: asyncio.Queue[bytes | Mark] = asyncio.Queue()
        self.listening = True
        self.kept: list[bytes] = []
        self.kept_bytes = 0
        self.overflow = False
        self.ended = False
        self.detached: Exchange | None = None
        self.task: asyncio.Task[None] | None = None
        self.audience = 1  # the first caller
        self.deserted = asyncio.Event()

    def join(self) -> None:
        self.audience += 1
        self.deserted.clear()

    def leave(self) -> None:
        self.audience -= 1
        if self.audience <= 0:
            self.deserted.set()

    async def receive(self) -> dict[str, Any]:
        """The detached exchange's client "disconnects" once nobody waits: no retry is started then."""
        await self.deserted.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        """The ASGI `send` of the detached exchange: the pipeline writes the response here."""
        if message["type"] == "http.response.start":
            own_id = (b"x-request-id", self.detached.request_id.encode()) if self.detached else None
            headers = [h for h in message.get("headers", []) if tuple(h) != own_id]
            _resolve(self.head, Head(message["status"], headers))
            return
        chunk = message.get("body", b"")
        if chunk:
            await self._relay(chunk)

    async def _relay(self, chunk: bytes) -> None:
        self._keep(chunk)
        if not self.listening:
            if self.overflow:
                raise Abandoned()
            return
        self.live.put_nowait(chunk)
        if self.overflow:
            await self.live.join()  # past the kept part only the first caller sets the pace

    def _keep(self, chunk: bytes) -> None:
        if self.overflow:
            return
        self.kept_bytes += len(chunk)
        if self.kept_bytes <= self.rule.max_body_bytes:
            self.kept.append(chunk)
            return
        self.overflow = True
        self.kept = []
        _resolve(self.done, None)

    def stop_listening(self) -> None:
        """The first caller is gone (or finished): never wait for it again."""
        self.listening = False
        while not self.live.empty():
            self.live.get_nowait()
            self.live.task_done()

    def end(self, mark: Mark) -> None:
        if not self.ended:
            self.ended = True
            self.live.put_nowait(mark)

    def response(self) -> StoredResponse | None:
        """The complete response when it fitted within the limit."""
        head = self.head.result() if self.head.done() else None
        detached = self.detached
        if self.overflow or not isinstance(head, Head) or detached is None:
            return None
        error_class = detached.error_class.value if detached.error_class else None
        return StoredResponse(head.status, tuple(head.headers), b"".join(self.kept), detached.attempts, error_class)

    def share(self, shared: Shared | None) -> None:
        _resolve(self.done, shared)

    def replay(self, stored: StoredResponse, kind: str) -> None:
        shared = Shared(stored, kind)
        _resolve(self.head, shared)
        _resolve(self.done, shared)

    def close(self) -> None:
        _resolve(self.head, None)
        _resolve(self.done, None)
        self.end(Mark.CUT)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def detach(exchange: Exchange, flight: Flight) -> Exchange:
    """A copy of the exchange whose client is the flight, so the invocation outlives its first caller.

    `shared` keeps an attempt under way running when callers leave (its outcome may be the
    function's one run, and the client's retry will want it); the flight's `receive` stops
    the retries once nobody waits.
    """
    # Built field by field: dataclasses.replace() introspects the fields on every request.
    copy = Exchange(
        scope=exchange.scope, receive=flight.receive, send=flight.send, request_id=exchange.request_id, started=exchange.started,
        match=exchange.match, plan=exchange.plan, account=exchange.account, attempts=exchange.attempts, status=exchange.status,
        error_class=exchange.error_class, replayed=exchange.replayed, extra_headers=[], disconnect_watch=None,
        body_failure=exchange.body_failure, shared=True,
    )  # fmt: skip
    copy.headers = exchange.headers
    return copy


class Lease:
    """Renews a Redis in-flight mark every third of the lease while the invocation runs, so a
    dead owner is noticed soon. Most invocations end before the first renewal: until then
    the lease is one timer, no task."""

    def __init__(self, backend: Backend, key: str, lease_s: float) -> None:
        self._backend = backend
        self._key = key
        self._lease_s = lease_s
        self._loop = asyncio.get_running_loop()
        self._stopped = False
        self._renewal: asyncio.Task[None] | None = None
        self._timer = self._loop.call_later(lease_s / 3, self._renew)

    def _renew(self) -> None:
        self._renewal = self._loop.create_task(self._renew_once())

    async def _renew_once(self) -> None:
        await self._backend.renew(self._key, self._lease_s)
        if not self._stopped:
            self._timer = self._loop.call_later(self._lease_s / 3, self._renew)

    async def stop(self) -> None:
        """Stop renewing; a renewal in progress finishes first, so it never lands after `finish`."""
        self._stopped = True
        self._timer.cancel()
        if self._renewal is not None:
            await self._renewal


# --- the pipeline's entry point ---------------------------------------------------------------


class Deduper:
    """Long-lived (it survives reloads): the flights of this process and the backend."""

    def __init__(self, backend: Backend, metrics: Metrics, clock: Callable[[], float], *, sleep: Sleep = asyncio.sleep, lease_s: float = LEASE_S) -> None:
        self.backend = backend
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._lease_s = lease_s
        self._flights: dict[str, Flight] = {}

    async def serve(self, pipeline: Pipeline, exchange: Exchange, body: bytes, rule: DedupeRule) -> bool:
        """Answer the request from its flight; False when it is not coalesced (go upstream)."""
        assert exchange.plan is not None and exchange.match is not None
        key = request_key(exchange.scope, exchange.plan.name, exchange.account, exchange.match.function, body, rule.id_headers)
        if key is None:
            return False
        flight = self._flights.get(key)
        if flight is not None:
            return await self._follow(pipeline, exchange, flight)
        flight = self._launch(key, rule, pipeline, exchange, body)
        await self._lead(exchange, flight)
        return True

    async def aclose(self) -> None:
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _launch(self, key: str, rule: DedupeRule, pipeline: Pipeline, exchange: Exchange, body: bytes) -> Flight:
        assert exchange.plan is not None
        flight = Flight(key, rule, exchange.plan.name)
        flight.detached = detach(exchange, flight)
        self._flights[key] = flight
        flight.task = asyncio.create_task(self._fly(flight, pipeline, body))
        return flight

    # --- readers

    async def _lead(self, exchange: Exchange, flight: Flight) -> None:
        """The first caller: the response live while it lasts, or the stored one."""
        try:
            head = await self._until(exchange, flight.head, None)
            if isinstance(head, Shared):
                return await self._answer_shared(exchange, head)
            if head is None:
                raise RuntimeError(f"the invocation for request {exchange.request_id} failed")
            await self._stream_live(exchange, flight, head)
        finally:
            flight.stop_listening()
            flight.leave()
            assert flight.detached is not None
            exchange.attempts = flight.detached.attempts

    async def _stream_live(self, exchange: Exchange, flight: Flight, head: Head) -> None:
        exchange.status = head.status
        headers = [*head.headers, *exchange.extra_headers, (b"x-request-id", exchange.request_id.encode())]
        await exchange.send({"type": "http.response.start", "status": head.status, "headers": headers})
        while (item := await flight.live.get()) is not Mark.END:
            flight.live.task_done()
            if item is Mark.CUT:
                exchange.error_class = flight.detached.error_class if flight.detached else None  # the upstream broke off: say so in the log
                raise ClientDisconnected()
            await exchange.send({"type": "http.response.body", "body": item, "more_body": True})
            if exchange.client_gone():
                raise ClientDisconnected()
        flight.live.task_done()
        await exchange.send({"type": "http.response.body", "body": b"", "more_body": False})
        assert flight.detached is not None
        exchange.error_class = flight.detached.error_class

    async def _follow(self, pipeline: Pipeline, exchange: Exchange, flight: Flight) -> bool:
        """A duplicate: wait for the flight's response; False when it cannot be shared."""
        assert exchange.plan is not None
        deadline = exchange.started + exchange.plan.config.timeouts.total_s
        flight.join()
        try:
            shared = await self._until(exchange, flight.done, deadline)
        except TimeoutError:
            await pipeline.respond(exchange, Answer.of_gateway(_deadline_passed("the same request was still in flight")))
            return True
        finally:
            flight.leave()
        if shared is None:
            return False
        await self._answer_shared(exchange, shared)
        return True

    async def _until(self, exchange: Exchange, future: asyncio.Future[Any], deadline: float | None) -> Any:
        """The future's result; ClientDisconnected when the caller leaves first, TimeoutError at the deadline."""
        exchange.watch_disconnect()
        watch = exchange.disconnect_watch
        assert watch is not None
        timeout = None if deadline is None else max(0.0, deadline - self._clock())
        if not future.done() and not watch.done():
            await first_of(future, watch, timeout)
        if future.done():
            return future.result()
        if watch.done():
            raise ClientDisconnected()
        raise TimeoutError()

    async def _answer_shared(self, exchange: Exchange, shared: Shared) -> None:
        assert exchange.plan is not None
        response = shared.response
        exchange.status = response.status
        exchange.error_class = ErrorClass(response.error_class) if response.error_class else None
        exchange.replayed = True
        headers = [*response.headers, *exchange.extra_headers, (b"x-request-id", exchange.request_id.encode()), (REPLAY_HEADER, b"true")]
        await exchange.send({"type": "http.response.start", "status": response.status, "headers": headers})
        await exchange.send({"type": "http.response.body", "body": response.body, "more_body": False})
        self._metrics.coalesced.labels(exchange.plan.name, shared.kind).inc()

    # --- the flight task

    async def _fly(self, flight: Flight, pipeline: Pipeline, body: bytes) -> None:
        detached = flight.detached
        assert detached is not None and detached.plan is not None
        deadline = detached.started + detached.plan.config.timeouts.total_s
        owned = False
        try:
            claim, kind = await self._settle(flight.key, deadline, flight.deserted)
            if isinstance(claim, StoredResponse):
                return flight.replay(claim, kind)
            owned = claim is Claim.OWNED
            if flight.deserted.is_set():
                return  # everyone left before the first attempt: the client's retry starts afresh
            await self._invoke(flight, pipeline, body, claim)
            response = flight.response()
            flight.share(Shared(response, "coalesced") if response is not None else None)
            if owned:
                owned = False
                await self.backend.finish(flight.key, response if response is not None and response.final else None, flight.rule.ttl_s)
        except (Abandoned, ClientDisconnected):
            log.debug("request %s: the response was cut or abandoned", detached.request_id)
        except Exception:
            log.exception("the invocation for request %s failed", detached.request_id)
        finally:
            await self._land(flight, owned)

    async def _land(self, flight: Flight, still_owned: bool) -> None:
        flight.close()
        assert flight.detached is not None
        if flight.detached.disconnect_watch is not None:
            flight.detached.disconnect_watch.cancel()
        try:
            if still_owned:
                await self.backend.finish(flight.key, None, 0)
        finally:
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]

    async def _settle(self, key: str, deadline: float, deserted: asyncio.Event) -> tuple[ClaimResult, str]:
        """Claim the key, or wait while another replica holds it: (claim or stored response, kind).

        The wait ends at the deadline, or when nobody waits for the answer any more.
        """
        delay = POLL_FIRST_S
        kind = "replayed"
        while True:
            claim = await self.backend.claim(key, self._lease_s)
            remaining = deadline - self._clock()
            if claim is not Claim.ELSEWHERE or remaining <= 0 or deserted.is_set():
                return claim, kind
            kind = "coalesced"
            await self._sleep(min(delay, remaining))
            delay = next_poll_delay(delay)

    async def _invoke(self, flight: Flight, pipeline: Pipeline, body: bytes, claim: Claim) -> None:
        detached = flight.detached
        assert detached is not None
        if claim is Claim.ELSEWHERE:
            await pipeline.respond(detached, Answer.of_gateway(_deadline_passed("the same request was in flight on another replica")))
            return flight.end(Mark.END)
        lease = Lease(self.backend, flight.key, self._lease_s) if claim is Claim.OWNED and self.backend.shared else None
        try:
            answer = await pipeline.forward(detached, RequestBody(body))
            try:
                await pipeline.respond(detached, answer)
            except BaseException:
                answer.discard()
                raise
            flight.end(Mark.END)
        finally:
            if lease is not None:
                await lease.stop()


async def first_of(one: asyncio.Future[Any], other: asyncio.Future[Any], timeout: float | None) -> None:
    """Wait until either future is done or `timeout` passes (what `asyncio.wait(FIRST_COMPLETED)`
    does, without its task wrapping, sets and partials on every request)."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: Any = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    one.add_done_callback(wake)
    other.add_done_callback(wake)
    timer = loop.call_later(timeout, wake) if timeout is not None else None
    try:
        await waiter
    finally:
        one.remove_done_callback(wake)
        other.remove_done_callback(wake)
        if timer is not None:
            timer.cancel()


def _deadline_passed(why: str) -> Outcome:
    return Outcome(ErrorClass.UPSTREAM_TIMEOUT, 504, "gateway.upstream_timeout", f"the request's total deadline passed: {why}", made_by_gateway=True)


# --- wiring -----------------------------------------------------------------------------------


class DedupeGate:
    """The deduper bound to one configuration (per-upstream rules resolved once per load)."""

    def __init__(self, deduper: Deduper | None, config: GatewayConfig) -> None:
        self._deduper = deduper
        self._rules = {name: DedupeRule.of(effective_config(config.dedupe, upstream.dedupe)) for name, upstream in config.upstreams.items()}

    async def serve(self, pipeline: Pipeline, exchange: Exchange, body: RequestBody) -> bool:
        """True when the request was answered from another invocation (or its own flight)."""
        if self._deduper is None or exchange.plan is None or body.buffered is None:
            return False
        rule = self._rules.get(exchange.plan.name)
        if rule is None or not any(name in exchange.headers for name in rule.id_headers):
            return False  # no caller id: never coalesced (most requests, so decided here)
        return await self._deduper.serve(pipeline, exchange, body.buffered, rule)


def build_deduper(config: GatewayConfig, store: ValueStore | None, metrics: Metrics, clock: Callable[[], float]) -> Deduper:
    """Redis backed when the gateway has a store, else in process memory."""
    if store is None:
        backend: Backend = MemoryBackend(ResponseCache(config.dedupe.max_entries, MEMORY_MAX_BYTES, clock))
    else:
        backend = RedisBackend(store)
    return Deduper(backend, metrics, clock)
