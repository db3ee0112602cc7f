"""Breakers: pybreaker's state machine driven by admit/record, with an injected clock."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import pytest

from gateway.breakers import (
    PROBE_RETRY_AFTER_S,
    UPSTREAM_WIDE,
    Admission,
    BreakerKey,
    BreakerPolicy,
    BreakerRegistry,
    BreakerReplicator,
    Refusal,
    RemoteOpen,
    decode_open,
    encode_open,
)
from gateway.store import RedisStore
from tests.redis_servers import RedisProcess, redis_server, send_command  # noqa: F401 (fixture)
from tests.clocks import ManualClock

START = 1_700_000_000.0
POLICY = BreakerPolicy(fail_max=3, reset_timeout_s=10.0)


class TransitionLog:
    def __init__(self) -> None:
        self.events: list[tuple[BreakerKey, str, str]] = []

    def __call__(self, key: BreakerKey, old: str, new: str) -> None:
        self.events.append((key, old, new))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def log() -> TransitionLog:
    return TransitionLog()


@pytest.fixture
def registry(clock: ManualClock, log: TransitionLog) -> BreakerRegistry:
    return BreakerRegistry(clock, log)


def admitted(
    registry: BreakerRegistry, function: str = "f", policy: BreakerPolicy = POLICY
) -> Admission:
    decision = registry.admit("lp", function, policy)
    assert isinstance(decision, Admission), decision
    return decision


def refused(
    registry: BreakerRegistry, function: str = "f", policy: BreakerPolicy = POLICY
) -> Refusal:
    decision = registry.admit("lp", function, policy)
    assert isinstance(decision, Refusal), decision
    return decision


def fail_times(
    registry: BreakerRegistry, times: int, function: str = "f", policy: BreakerPolicy = POLICY
) -> None:
    for _ in range(times):
        admitted(registry, function, policy).record_failure()


def state_of(registry: BreakerRegistry, function: str = "f") -> dict:
    (entry,) = [e for e in registry.snapshot() if e["function"] == function]
    return entry


def test_opens_after_fail_max_consecutive_failures(
    registry: BreakerRegistry, clock: ManualClock
) -> None:
    fail_times(registry, POLICY.fail_max - 1)
    assert state_of(registry)["state"] == "closed"
    fail_times(registry, 1)
    assert state_of(registry)["state"] == "open"
    assert refused(registry).retry_after_s == pytest.approx(POLICY.reset_timeout_s)
    clock.advance(4.0)
    refusal = refused(registry)
    assert refusal.key == BreakerKey("lp", "f")
    assert refusal.retry_after_s == pytest.approx(POLICY.reset_timeout_s - 4.0)


def test_half_open_admits_exactly_one_probe_and_its_success_closes(
    registry: BreakerRegistry, clock: ManualClock
) -> None:
    fail_times(registry, POLICY.fail_max)
    clock.advance(POLICY.reset_timeout_s)
    probe = admitted(registry)
    assert probe.is_probe
    for _ in range(5):
        assert refused(registry).retry_after_s >= PROBE_RETRY_AFTER_S
    assert state_of(registry)["state"] == "half-open"
    probe.record_success()
    assert state_of(registry)["state"] == "closed"
    assert state_of(registry)["failures"] == 0
    assert not admitted(registry).is_probe


def test_the_state_read_without_pybreaker_s_lock_is_pybreaker_s_state(registry: BreakerRegistry, clock: ManualClock) -> None:
    """`_Breaker.state` reads the storage; pybreaker's `current_state` must agree at every step."""
    seen = []

    def check() -> None:
        [breaker] = registry._breakers.values()
        assert breaker.state == breaker.cb.current_state
        seen.append(breaker.state)

    admitted(registry).record_success()
    check()
    fail_times(registry, POLICY.fail_max)
    check()
    clock.advance(POLICY.reset_timeout_s)
    probe = admitted(registry)
    check()
    probe.record_failure()
    check()
    clock.advance(POLICY.reset_timeout_s)
    admitted(registry).record_success()
    check()
    assert seen == ["closed", "open", "half-open", "open", "closed"]


def test_probe_failure_reopens_for_another_full_reset_timeout(
    registry: BreakerRegistry, clock: ManualClock
) -> None:
    fail_times(registry, POLICY.fail_max)
    clock.advance(POLICY.reset_timeout_s + 3.0)
    probe = admitted(registry)
    clock.advance(2.0)
    probe.record_failure()
    assert state_of(registry)["state"] == "open"
    assert refused(registry).retry_after_s == pytest.approx(POLICY.reset_timeout_s)
    clock.advance(POLICY.reset_timeout_s - 0.5)
    assert refused(registry).retry_after_s == pytest.approx(0.5)
    clock.advance(0.5)
    assert admitted(registry).is_probe


def test_released_probe_lets_the_next_request_probe(
    registry: BreakerRegistry, clock: ManualClock
) -> None:
    fail_times(registry, POLICY.fail_max)
    clock.advance(POLICY.reset_timeout_s)
    admitted(registry).release()
    assert state_of(registry)["state"] == "half-open"
    second = admitted(registry)
    assert second.is_probe
    refused(registry)


def test_success_resets_the_consecutive_count(registry: BreakerRegistry) -> None:
    fail_times(registry, POLICY.fail_max - 1)
    admitted(registry).record_success()
    assert state_of(registry)["failures"] == 0
    fail_times(registry, POLICY.fail_max - 1)
    assert state_of(registry)["state"] == "closed"


def test_release_changes_nothing(registry: BreakerRegistry) -> None:
    fail_times(registry, POLICY.fail_max - 1)
    for _ in range(10):
        admitted(registry).release()
    assert state_of(registry)["failures"] == POLICY.fail_max - 1
    fail_times(registry, 1)
    assert state_of(registry)["state"] == "open"


def test_only_the_first_record_of_an_admission_counts(registry: BreakerRegistry) -> None:
    fail_times(registry, POLICY.fail_max - 1)
    admission = admitted(registry)
    admission.release()
    admission.record_failure()
    admission.record_failure()
    assert state_of(registry)["failures"] == POLICY.fail_max - 1
    admission = admitted(registry)
    admission.record_failure()
    admission.record_success()
    assert state_of(registry)["state"] == "open"


async def test_cancelled_request_counts_as_neither(registry: BreakerRegistry) -> None:
    fail_times(registry, POLICY.fail_max - 1)
    started = asyncio.Event()

    async def call_upstream() -> None:
        admission = admitted(registry)
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            admission.release()
            raise
        admission.record_success()

    task = asyncio.create_task(call_upstream())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state_of(registry)["failures"] == POLICY.fail_max - 1
    assert state_of(registry)["state"] == "closed"


async def test_cancelled_probe_frees_the_probe_slot(
    registry: BreakerRegistry, clock: ManualClock
) -> None:
    fail_times(registry, POLICY.fail_max)
    clock.advance(POLICY.reset_timeout_s)
    started = asyncio.Event()

    async def probe_upstream() -> None:
        admission = admitted(registry)
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            admission.release()
            raise

    task = asyncio.create_task(probe_upstream())
    await started.wait()
    refused(registry)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state_of(registry)["state"] == "half-open"
    assert admitted(registry).is_probe


def test_results_of_calls_admitted_before_a_transition_are_ignored(
    registry: BreakerRegistry, clock: ManualClock
) -> None:
    in_flight = [admitted(registry) for _ in range(4)]
    fail_times(registry, POLICY.fail_max)
    in_flight[0].record_success()
    in_flight[1].record_failure()
    assert refused(registry).retry_after_s == pytest.approx(POLICY.reset_timeout_s)
    clock.advance(POLICY.reset_timeout_s)
    probe = admitted(registry)
    in_flight[2].record_success()
    assert state_of(registry)["state"] == "half-open"
    refused(registry)
    probe.record_success()
    in_flight[3].record_failure()
    assert state_of(registry)["failures"] == 0


def test_functions_have_separate_breakers(registry: BreakerRegistry) -> None:
    fail_times(registry, POLICY.fail_max, function="a")
    refused(registry, "a")
    admitted(registry, "b")
    assert state_of(registry, "b")["state"] == "closed"


def test_scope_upstream_shares_one_breaker(registry: BreakerRegistry) -> None:
    shared = BreakerPolicy(fail_max=2, reset_timeout_s=5.0, scope="upstream")
    admitted(registry, "a", shared).record_failure()
    admitted(registry, "b", shared).record_failure()
    assert refused(registry, "c", shared).key == BreakerKey("lp", UPSTREAM_WIDE)
    assert [e["function"] for e in registry.snapshot()] == [UPSTREAM_WIDE]


def test_on_transition_sees_every_change(
    registry: BreakerRegistry, clock: ManualClock, log: TransitionLog
) -> None:
    key = BreakerKey("lp", "f")
    fail_times(registry, POLICY.fail_max)
    clock.advance(POLICY.reset_timeout_s)
    admitted(registry).record_failure()
    clock.advance(POLICY.reset_timeout_s)
    admitted(registry).record_success()
    assert log.events == [
        (key, "closed", "open"),
        (key, "open", "half-open"),
        (key, "half-open", "open"),
        (key, "open", "half-open"),
        (key, "half-open", "closed"),
    ]


def test_a_failing_transition_hook_does_not_break_the_breaker(clock: ManualClock) -> None:
    def broken_hook(key: BreakerKey, old: str, new: str) -> None:
        raise RuntimeError("metrics are down")

    registry = BreakerRegistry(clock, broken_hook)
    fail_times(registry, POLICY.fail_max)
    refused(registry)
    clock.advance(POLICY.reset_timeout_s)
    admitted(registry).record_success()
    assert state_of(registry)["state"] == "closed"


def test_snapshot_lists_every_breaker(registry: BreakerRegistry, clock: ManualClock) -> None:
    fail_times(registry, POLICY.fail_max, function="a")
    fail_times(registry, 1, function="b")
    clock.advance(2.5)
    assert registry.snapshot() == [
        {
            "upstream": "lp",
            "function": "a",
            "state": "open",
            "failures": POLICY.fail_max,
            "open_remaining_s": pytest.approx(POLICY.reset_timeout_s - 2.5),
            "fail_max": POLICY.fail_max,
            "reset_timeout_s": POLICY.reset_timeout_s,
            "probe_in_flight": False,
        },
        {
            "upstream": "lp",
            "function": "b",
            "state": "closed",
            "failures": 1,
            "open_remaining_s": 0.0,
            "fail_max": POLICY.fail_max,
            "reset_timeout_s": POLICY.reset_timeout_s,
            "probe_in_flight": False,
        },
    ]


def test_reset_closes_an_open_breaker(registry: BreakerRegistry, log: TransitionLog) -> None:
    in_flight = admitted(registry)
    fail_times(registry, POLICY.fail_max)
    assert registry.reset("lp", "f") is True
    assert log.events[-1] == (BreakerKey("lp", "f"), "open", "closed")
    assert state_of(registry)["failures"] == 0
    in_flight.record_failure()
    assert state_of(registry)["failures"] == 0
    admitted(registry)
    assert registry.reset("lp", "unknown") is False
    assert registry.reset("nowhere", "f") is False


def test_reset_of_a_function_reaches_its_upstream_wide_breaker(registry: BreakerRegistry) -> None:
    shared = BreakerPolicy(fail_max=1, reset_timeout_s=5.0, scope="upstream")
    fail_times(registry, 1, "a", shared)
    assert registry.reset("lp", "a") is True
    admitted(registry, "a", shared)


def test_policy_change_keeps_state_and_applies_new_thresholds(
    registry: BreakerRegistry, clock: ManualClock
) -> None:
    fail_times(registry, 2)
    stricter = BreakerPolicy(fail_max=3, reset_timeout_s=20.0)
    fail_times(registry, 1, policy=stricter)
    assert state_of(registry)["state"] == "open"
    assert state_of(registry)["reset_timeout_s"] == 20.0
    assert refused(registry, policy=stricter).retry_after_s == pytest.approx(20.0)
    looser = BreakerPolicy(fail_max=10, reset_timeout_s=1.0)
    refused(registry, policy=looser)
    assert state_of(registry)["fail_max"] == 10


def test_breakers_are_bounded_and_idle_ones_evicted_first(clock: ManualClock) -> None:
    registry = BreakerRegistry(clock, max_breakers=3)
    fail_times(registry, POLICY.fail_max, function="open")
    for name in ("idle-1", "idle-2", "idle-3", "idle-4"):
        admitted(registry, name).record_success()
    functions = [e["function"] for e in registry.snapshot()]
    assert len(functions) == 3
    assert "open" in functions
    refused(registry, "open")


def test_force_open_applies_a_remote_open(
    registry: BreakerRegistry, clock: ManualClock, log: TransitionLog
) -> None:
    key = BreakerKey("lp", "f")
    admitted(registry)
    registry.force_open(key, clock.now - 4.0, 10.0)
    assert refused(registry).retry_after_s == pytest.approx(6.0)
    assert log.events == [(key, "closed", "open")]
    registry.force_open(key, clock.now - 8.0, 10.0)
    assert refused(registry).retry_after_s == pytest.approx(6.0)
    registry.force_open(key, clock.now, 10.0)
    assert refused(registry).retry_after_s == pytest.approx(10.0)


def test_force_open_creates_unknown_breakers_and_ignores_stale_or_future_times(
    registry: BreakerRegistry, clock: ManualClock
) -> None:
    registry.force_open(BreakerKey("lp", "old"), clock.now - 11.0, 10.0)
    assert registry.snapshot() == []
    registry.force_open(BreakerKey("lp", "skewed"), clock.now + 3600.0, 10.0)
    assert refused(registry, "skewed").retry_after_s == pytest.approx(10.0)


def test_force_open_during_a_probe_makes_the_probe_stale(
    registry: BreakerRegistry, clock: ManualClock
) -> None:
    fail_times(registry, POLICY.fail_max)
    clock.advance(POLICY.reset_timeout_s)
    probe = admitted(registry)
    registry.force_open(BreakerKey("lp", "f"), clock.now, 10.0)
    probe.record_success()
    assert state_of(registry)["state"] == "open"


WELL_FORMED = {
    "upstream": "lp",
    "function": "f",
    "opened_at": 1.0,
    "reset_timeout_s": 5,
    "replica_id": "r",
}


def test_a_well_formed_message_is_an_open() -> None:
    expected = RemoteOpen(BreakerKey("lp", "f"), 1.0, 5.0, "r")
    assert decode_open(orjson.dumps(WELL_FORMED)) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        orjson.dumps(WELL_FORMED | {"reset_timeout_s": 0}),
        orjson.dumps(WELL_FORMED | {"opened_at": True}),
        orjson.dumps(WELL_FORMED | {"opened_at": "1.0"}),
        orjson.dumps(WELL_FORMED | {"function": 3}),
        orjson.dumps({k: v for k, v in WELL_FORMED.items() if k != "replica_id"}),
        orjson.dumps({"hello": "replica-a"}),
    ],
)
def test_malformed_messages_are_not_opens(raw: bytes) -> None:
    assert decode_open(raw) is None


def test_open_messages_round_trip() -> None:
    event = RemoteOpen(BreakerKey("lp", "f"), START, 30.0, "replica-a")
    assert orjson.loads(encode_open(event)) == {
        "upstream": "lp",
        "function": "f",
        "opened_at": START,
        "reset_timeout_s": 30.0,
        "replica_id": "replica-a",
    }
    assert decode_open(encode_open(event)) == event


def test_a_wall_clock_step_back_does_not_lengthen_an_open_period(
    registry: BreakerRegistry, clock: ManualClock
) -> None:
    fail_times(registry, POLICY.fail_max)
    clock.advance(4.0)
    clock.now -= 3600.0
    assert refused(registry).retry_after_s == pytest.approx(POLICY.reset_timeout_s)
    assert state_of(registry)["open_remaining_s"] == pytest.approx(POLICY.reset_timeout_s)
    clock.advance(POLICY.reset_timeout_s)
    assert admitted(registry).is_probe


# --- replication through a real redis-server ---------------------------------------------

REPLICATED = BreakerPolicy(fail_max=2, reset_timeout_s=30.0)
SEEN_WITHIN_S = 1.0


@dataclass
class Replica:
    registry: BreakerRegistry
    replicator: BreakerReplicator
    store: RedisStore
    log: TransitionLog

    async def close(self) -> None:
        await self.replicator.stop()
        await self.store.aclose()


@contextlib.asynccontextmanager
async def replicas(url: str, *names: str) -> AsyncIterator[list[Replica]]:
    started: list[Replica] = []
    try:
        for name in names:
            log = TransitionLog()
            registry = BreakerRegistry(time.time, log)
            # Generous socket timeout: a loaded test machine must not look like an outage.
            store = RedisStore.from_url(url, timeout_s=0.5, clock=time.monotonic)
            replicator = BreakerReplicator(registry, store, replica_id=name)
            started.append(Replica(registry, replicator, store, log))
            replicator.start()
        yield started
    finally:
        for replica in started:
            await replica.close()


async def until_refused(registry: BreakerRegistry, function: str) -> Refusal:
    """Admit (and release) until the breaker refuses; the replication is in the background."""
    while True:
        decision = registry.admit("lp", function, REPLICATED)
        if isinstance(decision, Refusal):
            return decision
        decision.release()
        await asyncio.sleep(0.01)


async def test_an_open_on_one_replica_is_seen_on_the_other(redis_server: RedisProcess) -> None:
    async with replicas(redis_server.url, "replica-a", "replica-b") as (a, b):
        async with asyncio.timeout(SEEN_WITHIN_S * 5):
            await asyncio.gather(a.replicator.wait_subscribed(), b.replicator.wait_subscribed())
        admitted(b.registry, policy=REPLICATED).record_success()
        fail_times(a.registry, REPLICATED.fail_max, policy=REPLICATED)
        async with asyncio.timeout(SEEN_WITHIN_S):
            refusal = await until_refused(b.registry, "f")
        assert 0 < refusal.retry_after_s <= REPLICATED.reset_timeout_s
        assert refusal.retry_after_s > REPLICATED.reset_timeout_s - SEEN_WITHIN_S
        assert b.log.events == [(BreakerKey("lp", "f"), "closed", "open")]
        await asyncio.sleep(0.2)  # time enough for an echo of b's apply, were there one
        assert a.log.events == [(BreakerKey("lp", "f"), "closed", "open")]
        admitted(b.registry, "other", REPLICATED)


async def test_a_replica_started_later_loads_the_open_from_the_key(
    redis_server: RedisProcess
) -> None:
    async with replicas(redis_server.url, "replica-a") as (a,):
        fail_times(a.registry, REPLICATED.fail_max, policy=REPLICATED)
        async with asyncio.timeout(SEEN_WITHIN_S):
            while (stored := await a.store.get_value("gw:breaker:lp:f")) is None:
                await asyncio.sleep(0.01)
        assert decode_open(stored).replica_id == "replica-a"
        ttl_s = int(send_command(redis_server.port, "PTTL", "gw:breaker:lp:f")[1:]) / 1000
        assert REPLICATED.reset_timeout_s - SEEN_WITHIN_S < ttl_s <= REPLICATED.reset_timeout_s
        async with replicas(redis_server.url, "replica-c") as (c,):
            assert isinstance(c.registry.admit("lp", "f", REPLICATED), Admission)
            async with asyncio.timeout(SEEN_WITHIN_S):
                refusal = await until_refused(c.registry, "f")
            assert refusal.retry_after_s > REPLICATED.reset_timeout_s - SEEN_WITHIN_S


async def test_requests_do_not_notice_that_redis_is_down(redis_server: RedisProcess) -> None:
    redis_server.stop()
    async with replicas(redis_server.url, "replica-a") as (a,):
        fail_times(a.registry, REPLICATED.fail_max, function="g", policy=REPLICATED)
        refused(a.registry, "g", REPLICATED)
        await asyncio.sleep(0.2)  # let the background tasks meet the dead server
        assert state_of(a.registry, "g")["state"] == "open"
        assert not a.replicator.apply(b'{"hello": "replica-a"}')

