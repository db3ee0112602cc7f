"""Circuit breakers per upstream function, driven on the event loop, shared across replicas.

pybreaker keeps each breaker's state machine (closed, open, half-open), its failure counter
and its listeners. Its entry points do not fit asyncio: `call` records a coroutine object as
a success, `call_async` needs Tornado, half-open lets every caller through, a cancelled task
counts as a failure, and `CircuitRedisStorage` blocks the loop. So a request is driven in
two steps instead: `BreakerRegistry.admit` before the upstream call, and exactly one of
`record_success`, `record_failure` or `release` on the returned `Admission` after the await.
Every transition still goes through pybreaker's own `open`, `half_open` and `close`, so its
listeners see every change; `on_transition` is fed from such a listener.

Time. pybreaker stamps `opened_at` with `datetime.now()` and compares it only inside `call`.
`_ClockedStorage` subclasses its memory storage so that the stamp comes from the injected
clock instead, and the registry itself decides open -> half-open from that stamp (pybreaker
would only decide it inside `call`, which we never use). The clock is wall time in epoch
seconds (`time.time` in production), because opens are exchanged between replicas as epoch
instants. What a clock step or skew between hosts can do is bounded: an open period never
has more than its `reset_timeout_s` left, and a remote open stamped in the future counts
from now.

Generations. Each admission remembers the breaker's generation, which changes with every
transition, every probe and every reset; a result recorded under an older generation (a
request that started before the breaker opened, a probe outlived by an admin reset) is
ignored. In half-open exactly one probe is admitted at a time; its success closes the
breaker, its failure reopens it for another `reset_timeout_s`, its release lets the next
request probe.

Replication. `BreakerReplicator` observes the registry: a local open is queued and, in a
background task, written to `gw:breaker:{upstream}:{function}` (TTL `reset_timeout_s`) and
published on `gw:breakers`; a listener task applies other replicas' opens with
`force_open`. Each open is also kept in the sorted set `gw:breakers:open`, scored by when it
ends: a replica loads every open in progress from it before it serves its first request
(`load_opens`), and again once its own hello comes back on the channel (the subscription is
live), so an open published in between is not missed either. A breaker created on this
replica also queues a background read of its key. An admin reset travels the same way: the key is deleted and a reset is
published, which the other replicas apply without announcing it again. No request waits on
Redis; if Redis is down, each replica's breakers still protect it alone.

Use, once per upstream attempt::

    admission = registry.admit(upstream, function, policy)
    if isinstance(admission, Refusal):
        ...  # circuit_open, Retry-After: admission.retry_after_s
    try:
        outcome = await attempt()
    except asyncio.CancelledError:
        admission.release()
        raise
    ...  # then record_failure(), record_success() or release(), by outcome class
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, NamedTuple, Protocol

import orjson
from pybreaker import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    CircuitBreaker,
    CircuitBreakerListener,
    CircuitBreakerState,
    CircuitMemoryStorage,
)

from gateway.store import StoreUnavailable

logger = logging.getLogger(__name__)

UPSTREAM_WIDE = "*"
"""The `function` of the one breaker of an upstream whose policy has `scope: upstream`."""

PROBE_RETRY_AFTER_S = 1.0
"""`retry_after_s` while the half-open probe is in flight: its answer is usually near."""

PROBE_LEASE_S = 120.0
"""A probe whose admission is never settled (a bug) stops blocking other probes after this."""

DEFAULT_MAX_BREAKERS = 10_000
EVICTION_SCAN = 64
"""How many least recently used breakers are searched for an idle one to evict."""

CHANNEL = "gw:breakers"
MAX_LOADED_OPENS = 10_000
KEY_PREFIX = "gw:breaker:"
OPEN_INDEX = "gw:breakers:open"  # every open in progress, scored by when it ends: what a new replica loads


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    fail_max: int = 5
    reset_timeout_s: float = 30.0
    scope: Literal["function", "upstream"] = "function"

    def __post_init__(self) -> None:
        if self.fail_max < 1:
            raise ValueError("fail_max must be at least 1")
        if not self.reset_timeout_s > 0:
            raise ValueError("reset_timeout_s must be positive")
        if self.scope not in ("function", "upstream"):
            raise ValueError("scope must be 'function' or 'upstream'")


class BreakerKey(NamedTuple):  # a tuple: hashed and compared in C, as a dict key on every request
    upstream: str
    function: str


@dataclass(frozen=True, slots=True)
class Refusal:
    key: BreakerKey
    retry_after_s: float


def key_for(upstream: str, function: str, policy: BreakerPolicy) -> BreakerKey:
    """The breaker that guards `function` of `upstream` under `policy`."""
    if policy.scope == "upstream":
        return BreakerKey(upstream, UPSTREAM_WIDE)
    return BreakerKey(upstream, function)


class BreakerObserver(Protocol):
    """What a replication component hears from the registry (called on the request path)."""

    def breaker_created(self, key: BreakerKey) -> None: ...

    def breaker_opened(self, key: BreakerKey, opened_at: float, reset_timeout_s: float) -> None: ...

    def breaker_reset(self, key: BreakerKey) -> None: ...


class _ClockedStorage(CircuitMemoryStorage):
    """pybreaker's memory storage, with `opened_at` taken from the injected clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(STATE_CLOSED)
        self._clock = clock
        self.opened_at_s: float | None = None

    @property
    def opened_at(self) -> datetime | None:
        return None if self.opened_at_s is None else datetime.fromtimestamp(self.opened_at_s, UTC)

    @opened_at.setter
    def opened_at(self, _pybreaker_now: datetime) -> None:
        self.opened_at_s = self._clock()


class _TransitionRelay(CircuitBreakerListener):
    """Turns pybreaker's state_change into `on_transition(key, old, new)`."""

    def __init__(
        self, key: BreakerKey, on_transition: Callable[[BreakerKey, str, str], None]
    ) -> None:
        self._key = key
        self._on_transition = on_transition

    def state_change(
        self,
        cb: CircuitBreaker,
        old_state: CircuitBreakerState | None,
        new_state: CircuitBreakerState,
    ) -> None:
        if old_state is None or old_state.name == new_state.name:
            return
        try:
            self._on_transition(self._key, old_state.name, new_state.name)
        except Exception:
            # pybreaker calls listeners half-way through a transition; an exception from a
            # metrics or log hook would leave its storage and cached state disagreeing.
            logger.exception("on_transition hook failed for %s", self._key)


class _Breaker:
    """One pybreaker state machine plus what pybreaker cannot hold: open-until and the probe."""

    def __init__(
        self,
        key: BreakerKey,
        policy: BreakerPolicy,
        clock: Callable[[], float],
        listeners: list[CircuitBreakerListener],
        on_open: Callable[[BreakerKey, float, float], None],
    ) -> None:
        self.key = key
        self.policy = policy
        self.storage = _ClockedStorage(clock)
        self.cb = CircuitBreaker(
            fail_max=policy.fail_max,
            reset_timeout=policy.reset_timeout_s,
            state_storage=self.storage,
            listeners=listeners,
            name=f"{key.upstream}/{key.function}",
        )
        self._clock = clock
        self._on_open = on_open
        self.open_until = 0.0
        self.open_for_s = policy.reset_timeout_s
        self.generation = 0
        self.probe_until: float | None = None

    @property
    def state(self) -> str:
        # The storage holds the state every transition wrote; pybreaker's own `current_state`
        # reads the same name under a lock, on every request (2 % of the gateway's profile).
        return self.storage.state

    @property
    def failures(self) -> int:
        return self.storage.counter

    def apply_policy(self, policy: BreakerPolicy) -> None:
        """A reload changes thresholds from the next decision on; the state is kept."""
        self.policy = policy
        self.cb.fail_max = policy.fail_max
        self.cb.reset_timeout = policy.reset_timeout_s

    def is_idle(self) -> bool:
        return self.state == STATE_CLOSED and self.failures == 0

    def admit(self) -> Admission | Refusal:
        now = self._clock()
        if self.state == STATE_OPEN:
            remaining_s = self.open_remaining_s(now)
            if remaining_s > 0:
                self.open_until = now + remaining_s
                return Refusal(self.key, remaining_s)
            self._transition(self.cb.half_open)
        if self.state != STATE_HALF_OPEN:
            return Admission(self, self.generation, is_probe=False)
        if self.probe_until is not None and now < self.probe_until:
            return Refusal(self.key, PROBE_RETRY_AFTER_S)
        self.generation += 1
        self.probe_until = now + PROBE_LEASE_S
        return Admission(self, self.generation, is_probe=True)

    def succeed(self, generation: int) -> None:
        if generation != self.generation:
            return
        if self.state == STATE_HALF_OPEN:
            self._transition(self.cb.close)
        else:
            self.storage.reset_counter()

    def fail(self, generation: int) -> None:
        if generation != self.generation:
            return
        if self.state == STATE_CLOSED:
            self.storage.increment_counter()
            if self.failures < self.cb.fail_max:
                return
        self._trip()

    def release(self, generation: int) -> None:
        if generation == self.generation and self.state == STATE_HALF_OPEN:
            self.probe_until = None

    def force_open(self, opened_at: float, open_until: float) -> None:
        """Open until `open_until` (another replica's open); an open period is only extended."""
        if self.state == STATE_OPEN and self.open_until >= open_until:
            return
        if self.state != STATE_OPEN:
            self._transition(self.cb.open)
        self.storage.opened_at_s = opened_at
        self.open_until = open_until
        self.open_for_s = open_until - opened_at

    def reset(self) -> None:
        if self.state == STATE_CLOSED:
            self.generation += 1
            self.storage.reset_counter()
        else:
            self._transition(self.cb.close)

    def open_remaining_s(self, now: float) -> float:
        """Time left open; never more than the period itself, should the wall clock step back."""
        if self.state != STATE_OPEN:
            return 0.0
        return min(max(0.0, self.open_until - now), self.open_for_s)

    def _trip(self) -> None:
        self._transition(self.cb.open)
        opened_at = self.storage.opened_at_s
        assert opened_at is not None  # cb.open() stamps it through _ClockedStorage
        self.open_for_s = self.policy.reset_timeout_s
        self.open_until = opened_at + self.open_for_s
        self._on_open(self.key, opened_at, self.policy.reset_timeout_s)

    def _transition(self, move: Callable[[], object]) -> None:
        self.generation += 1
        self.probe_until = None
        move()


class Admission:
    """Permission for one upstream call; settle it exactly once (later calls are ignored)."""

    __slots__ = ("_breaker", "_generation", "_settled", "is_probe")

    def __init__(self, breaker: _Breaker, generation: int, is_probe: bool) -> None:
        self._breaker = breaker
        self._generation = generation
        self._settled = False
        self.is_probe = is_probe

    @property
    def key(self) -> BreakerKey:
        return self._breaker.key

    def record_success(self) -> None:
        if self._settle():
            self._breaker.succeed(self._generation)

    def record_failure(self) -> None:
        if self._settle():
            self._breaker.fail(self._generation)

    def release(self) -> None:
        """Neither success nor failure (throttled, cancelled): only gives back a probe slot."""
        if self._settle():
            self._breaker.release(self._generation)

    def _settle(self) -> bool:
        first = not self._settled
        self._settled = True
        return first


class BreakerRegistry:
    """Every breaker of this process, created on first use and bounded in number.

    `clock` returns wall time in epoch seconds (see the module docstring).
    `on_transition(key, old, new)` hears every state change, local or replicated.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        on_transition: Callable[[BreakerKey, str, str], None] | None = None,
        *,
        max_breakers: int = DEFAULT_MAX_BREAKERS,
    ) -> None:
        self._clock = clock
        self._on_transition = on_transition
        self._max_breakers = max_breakers
        self._breakers: OrderedDict[BreakerKey, _Breaker] = OrderedDict()
        self._observers: list[BreakerObserver] = []

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def add_observer(self, observer: BreakerObserver) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: BreakerObserver) -> None:
        self._observers.remove(observer)

    def admit(self, upstream: str, function: str, policy: BreakerPolicy) -> Admission | Refusal:
        return self._breaker_for(key_for(upstream, function, policy), policy).admit()

    def keys(self) -> list[BreakerKey]:
        return list(self._breakers)

    def snapshot(self) -> list[dict]:
        now = self._clock()
        return [self._describe(breaker, now) for breaker in self._breakers.values()]

    def reset(self, upstream: str, function: str) -> bool:
        """Close the breaker guarding `function` (its own, else its upstream's shared one)."""
        breaker = self._breakers.get(BreakerKey(upstream, function)) or self._breakers.get(
            BreakerKey(upstream, UPSTREAM_WIDE)
        )
        if breaker is None:
            return False
        breaker.reset()
        self.announce_reset(breaker.key)
        return True

    def announce_reset(self, key: BreakerKey) -> None:
        """Tell the other replicas to close `key` (also one this replica has never seen)."""
        for observer in self._observers:
            observer.breaker_reset(key)

    def apply_reset(self, key: BreakerKey) -> bool:
        """Close `key` as an operator did on another replica (not announced again)."""
        breaker = self._breakers.get(key)
        if breaker is None:
            return False
        breaker.reset()
        return True

    def force_open(self, key: BreakerKey, opened_at: float, reset_timeout_s: float) -> None:
        """Open `key` as another replica did at `opened_at` (epoch s); stale opens are ignored."""
        now = self._clock()
        opened_at = min(opened_at, now)
        open_until = opened_at + reset_timeout_s
        if open_until <= now:
            return
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._create(key, BreakerPolicy(reset_timeout_s=reset_timeout_s))
        breaker.force_open(opened_at, open_until)

    def _breaker_for(self, key: BreakerKey, policy: BreakerPolicy) -> _Breaker:
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._create(key, policy)
            for observer in self._observers:
                observer.breaker_created(key)
            return breaker
        self._breakers.move_to_end(key)
        if breaker.policy is not policy and breaker.policy != policy:
            breaker.apply_policy(policy)
        return breaker

    def _create(self, key: BreakerKey, policy: BreakerPolicy) -> _Breaker:
        if len(self._breakers) >= self._max_breakers:
            self._evict_one()
        hook = self._on_transition
        listeners = [] if hook is None else [_TransitionRelay(key, hook)]
        breaker = _Breaker(key, policy, self._clock, listeners, self._announce_open)
        self._breakers[key] = breaker
        return breaker

    def _evict_one(self) -> None:
        """Drop an idle breaker among the least recently used, else the least recently used."""
        for index, (key, breaker) in enumerate(self._breakers.items()):
            if index >= EVICTION_SCAN:
                break
            if breaker.is_idle():
                del self._breakers[key]
                return
        self._breakers.popitem(last=False)

    def _announce_open(self, key: BreakerKey, opened_at: float, reset_timeout_s: float) -> None:
        for observer in self._observers:
            observer.breaker_opened(key, opened_at, reset_timeout_s)

    @staticmethod
    def _describe(breaker: _Breaker, now: float) -> dict:
        return {
            "upstream": breaker.key.upstream,
            "function": breaker.key.function,
            "state": breaker.state,
            "failures": breaker.failures,
            "open_remaining_s": breaker.open_remaining_s(now),
            "fail_max": breaker.policy.fail_max,
            "reset_timeout_s": breaker.policy.reset_timeout_s,
            "probe_in_flight": breaker.probe_until is not None,
        }


# --- replication across replicas -------------------------------------------------------


class BreakerStore(Protocol):
    """The part of `gateway.store.RedisStore` that replication uses."""

    async def publish(self, channel: str, message: bytes) -> None: ...

    def subscribe(self, channel: str) -> AsyncIterator[bytes]: ...

    async def set_value(
        self, key: str, value: bytes, ttl_s: float, only_if_absent: bool = False
    ) -> bool: ...

    async def get_value(self, key: str) -> bytes | None: ...

    async def delete(self, key: str) -> None: ...

    async def add_until(self, key: str, member: bytes, until: float, now: float) -> None: ...

    async def members_after(self, key: str, now: float, limit: int) -> list[bytes]: ...

    async def remove_members(self, key: str, members: list[bytes]) -> None: ...


@dataclass(frozen=True, slots=True)
class RemoteOpen:
    key: BreakerKey
    opened_at: float
    reset_timeout_s: float
    replica_id: str


@dataclass(frozen=True, slots=True)
class RemoteReset:
    key: BreakerKey
    replica_id: str


def store_key(key: BreakerKey) -> str:
    return f"{KEY_PREFIX}{key.upstream}:{key.function}"


def encode_open(event: RemoteOpen) -> bytes:
    return orjson.dumps(
        {
            "upstream": event.key.upstream,
            "function": event.key.function,
            "opened_at": event.opened_at,
            "reset_timeout_s": event.reset_timeout_s,
            "replica_id": event.replica_id,
        }
    )


def decode_open(raw: bytes) -> RemoteOpen | None:
    """The open announced by `raw`, or None for anything that is not a well-formed open."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    upstream, function = data.get("upstream"), data.get("function")
    opened_at, reset_timeout_s = data.get("opened_at"), data.get("reset_timeout_s")
    replica_id = data.get("replica_id")
    if not all(isinstance(text, str) for text in (upstream, function, replica_id)):
        return None
    if not (_is_finite_number(opened_at) and _is_finite_number(reset_timeout_s)):
        return None
    if reset_timeout_s <= 0:
        return None
    key = BreakerKey(upstream, function)
    return RemoteOpen(key, float(opened_at), float(reset_timeout_s), replica_id)


def encode_reset(event: RemoteReset) -> bytes:
    return orjson.dumps(
        {
            "reset": True,
            "upstream": event.key.upstream,
            "function": event.key.function,
            "replica_id": event.replica_id,
        }
    )


def decode_reset(raw: bytes) -> RemoteReset | None:
    """The reset announced by `raw`, or None for anything that is not a well-formed reset."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("reset") is not True:
        return None
    upstream, function, replica_id = data.get("upstream"), data.get("function"), data.get("replica_id")
    if not all(isinstance(text, str) for text in (upstream, function, replica_id)):
        return None
    return RemoteReset(BreakerKey(upstream, function), replica_id)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class BreakerReplicator:
    """Shares breaker opens (and operators' resets) between replicas through the store, off
    the request path.

    `replica_id` must be unique per process: an event is not applied back to its sender.
    Until its own hello comes back on the channel, the replicator announces itself every
    `hello_interval_s`; once it does, the subscription is live, and every breaker already
    known is read from the store so that opens published before that moment are not missed.
    """

    def __init__(
        self,
        registry: BreakerRegistry,
        store: BreakerStore,
        *,
        replica_id: str,
        queue_max: int = 1024,
        hello_interval_s: float = 0.1,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._registry = registry
        self._store = store
        self._replica_id = replica_id
        self._hello = orjson.dumps({"hello": replica_id})
        self._hello_interval_s = hello_interval_s
        self._sleep = sleep
        self._opens: asyncio.Queue[RemoteOpen | RemoteReset] = asyncio.Queue(maxsize=queue_max)
        self._fetches: asyncio.Queue[BreakerKey] = asyncio.Queue(maxsize=queue_max)
        self._subscribed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def replica_id(self) -> str:
        return self._replica_id

    def start(self) -> None:
        """Observe the registry and start the background tasks (call from a running loop)."""
        self._registry.add_observer(self)
        self._tasks = [
            asyncio.create_task(self._publish_opens(), name="breakers-publish"),
            asyncio.create_task(self._fetch_keys(), name="breakers-fetch"),
            asyncio.create_task(self._listen(), name="breakers-listen"),
            asyncio.create_task(self._say_hello(), name="breakers-hello"),
        ]

    async def stop(self) -> None:
        self._registry.remove_observer(self)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def wait_subscribed(self) -> None:
        """Return once remote opens reach this replica (readiness, tests)."""
        await self._subscribed.wait()

    def breaker_created(self, key: BreakerKey) -> None:
        if not self._enqueue(self._fetches, key):
            logger.warning("breaker replication busy, not reading the state of %s", key)

    def breaker_opened(self, key: BreakerKey, opened_at: float, reset_timeout_s: float) -> None:
        event = RemoteOpen(key, opened_at, reset_timeout_s, self._replica_id)
        if not self._enqueue(self._opens, event):
            logger.warning("breaker replication busy, not publishing the open of %s", key)

    def breaker_reset(self, key: BreakerKey) -> None:
        if not self._enqueue(self._opens, RemoteReset(key, self._replica_id)):
            logger.warning("breaker replication busy, not publishing the reset of %s", key)

    def apply(self, raw: bytes) -> bool:
        """Apply one message from the channel; True when it opened, extended or reset a breaker."""
        event = decode_open(raw) or decode_reset(raw)
        if event is None or event.replica_id == self._replica_id:
            return False
        if isinstance(event, RemoteReset):
            return self._registry.apply_reset(event.key)
        self._registry.force_open(event.key, event.opened_at, event.reset_timeout_s)
        return True

    @staticmethod
    def _enqueue(queue: asyncio.Queue, item: object) -> bool:
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True

    async def _publish_opens(self) -> None:
        while True:
            event = await self._opens.get()
            try:
                await self._publish(event)
            except StoreUnavailable as error:
                # Best effort: each replica's own breakers still protect it.
                logger.warning("could not publish the breaker event of %s: %s", event.key, error)

    async def _publish(self, event: RemoteOpen | RemoteReset) -> None:
        now = self._registry.clock()
        if isinstance(event, RemoteReset):
            # The key and the index entries go first: a replica starting meanwhile must not
            # load the open again.
            await self._store.delete(store_key(event.key))
            opens = await self._store.members_after(OPEN_INDEX, now, MAX_LOADED_OPENS)
            await self._store.remove_members(OPEN_INDEX, [raw for raw in opens if (decoded := decode_open(raw)) is not None and decoded.key == event.key])
            await self._store.publish(CHANNEL, encode_reset(event))
            return
        message = encode_open(event)
        await self._store.set_value(store_key(event.key), message, event.reset_timeout_s)
        await self._store.add_until(OPEN_INDEX, message, event.opened_at + event.reset_timeout_s, now)
        await self._store.publish(CHANNEL, message)

    async def load_opens(self) -> int:
        """Apply every open in progress on other replicas (at start-up); returns how many."""
        try:
            opens = await self._store.members_after(OPEN_INDEX, self._registry.clock(), MAX_LOADED_OPENS)
        except StoreUnavailable as error:
            logger.warning("could not load the breakers open on other replicas: %s", error)
            return 0
        applied = 0
        for raw in opens:
            event = decode_open(raw)
            if event is not None and event.replica_id != self._replica_id:
                self._registry.force_open(event.key, event.opened_at, event.reset_timeout_s)
                applied += 1
        return applied

    async def _fetch_keys(self) -> None:
        while True:
            key = await self._fetches.get()
            try:
                raw = await self._store.get_value(store_key(key))
            except StoreUnavailable as error:
                logger.warning("could not read the breaker state of %s: %s", key, error)
                continue
            event = None if raw is None else decode_open(raw)
            if event is not None and event.key == key:
                self._registry.force_open(key, event.opened_at, event.reset_timeout_s)

    async def _listen(self) -> None:
        async for raw in self._store.subscribe(CHANNEL):
            if raw == self._hello:
                self._on_subscribed()
            else:
                self.apply(raw)

    async def _say_hello(self) -> None:
        while not self._subscribed.is_set():
            try:
                await self._store.publish(CHANNEL, self._hello)
            except StoreUnavailable:
                pass
            await self._sleep(self._hello_interval_s)

    def _on_subscribed(self) -> None:
        if self._subscribed.is_set():
            return
        self._subscribed.set()
        # Opens published from now on arrive on the channel; those before are in the store.
        self._tasks.append(asyncio.create_task(self.load_opens(), name="breakers-load"))
        for key in self._registry.keys():
            if not self._enqueue(self._fetches, key):
                break
