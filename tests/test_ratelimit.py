"""gateway.ratelimit: bucket arithmetic, memory and Redis backends, fallback, keys, headers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.ratelimit import (
    BucketPolicy,
    Decision,
    MemoryRateLimiter,
    RedisRateLimiter,
    bucket_key,
    rate_limit_headers,
    step_bucket,
    validate_account_id,
)
from gateway.store import RedisStore
from tests.clocks import ManualClock
from tests.redis_servers import (  # noqa: F401  (fixtures)
    RedisProcess,
    redis_cluster,
    redis_server,
    send_command,
)

DEFAULT = BucketPolicy("default", rate=1.0, per_s=2.0, burst=3)
OVERRIDE = BucketPolicy("le-1234", rate=10.0, per_s=1.0, burst=5)
SLOW = BucketPolicy("default", rate=1.0, per_s=3600.0, burst=4)
HOSTILE_IDS = ["a{b}c", "}{", "x\r\nSET y 1", "with space", "a" * 1000, "{evil}", "", "tab\there", "é"]


def make_limiter(
    url: str,
    on_error: str = "local",
    store_clock: ManualClock | None = None,
    timeout_s: float = 0.5,  # a loaded test machine must not look like a Redis outage
) -> tuple[RedisStore, RedisRateLimiter]:
    store = RedisStore.from_url(url, timeout_s=timeout_s, clock=store_clock or time.monotonic)
    return store, RedisRateLimiter(store, on_error, ManualClock())


@pytest.fixture
async def redis_limiter(redis_server: RedisProcess) -> AsyncIterator[RedisRateLimiter]:
    store, limiter = make_limiter(redis_server.url)
    assert await store.prepare()
    yield limiter
    await store.aclose()


# --- the arithmetic -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("full_at", "now", "allowed", "remaining", "retry_after_s", "reset_s"),
    [
        (0.0, 100.0, True, 2, 0.0, 2.0),  # first request finds the bucket full
        (102.0, 100.0, True, 1, 0.0, 4.0),
        (104.0, 100.0, True, 0, 0.0, 6.0),
        (106.0, 100.0, False, 0, 2.0, 6.0),  # empty: one token in one interval
        (105.0, 100.0, False, 0, 1.0, 5.0),  # half a token earned
        (106.0, 102.0, True, 0, 0.0, 6.0),  # one interval later: one token again
        (500.0, 100.0, False, 0, 2.0, 6.0),  # never owes more than an empty bucket
    ],
)  # fmt: skip
def test_step_bucket(
    full_at: float, now: float, allowed: bool, remaining: int, retry_after_s: float, reset_s: float
) -> None:
    step = step_bucket(full_at, now, DEFAULT)
    assert (step.allowed, step.remaining) == (allowed, remaining)
    assert (step.retry_after_s, step.reset_s) == pytest.approx((retry_after_s, reset_s))


@given(
    rate=st.sampled_from([1.0, 3.0, 10.0, 0.5]),
    per_s=st.sampled_from([1.0, 2.0, 60.0]),
    burst=st.integers(1, 20),
    gaps_ms=st.lists(st.integers(0, 3000), min_size=1, max_size=60),
)
def test_step_bucket_matches_a_plain_token_bucket(
    rate: float, per_s: float, burst: int, gaps_ms: list[int]
) -> None:
    policy = BucketPolicy("p", rate, per_s, burst)
    tokens, full_at, now = float(burst), 0.0, 0.0
    for gap_ms in gaps_ms:
        elapsed = gap_ms / 1000
        now += elapsed
        tokens = min(burst, tokens + elapsed * rate / per_s)
        step = step_bucket(full_at, now, policy)
        assert step.allowed == (tokens >= 1 - 1e-6 * rate / per_s)
        if step.allowed:
            tokens -= 1
            assert step.remaining == int(tokens + 1e-6)
        full_at = step.full_at


def test_policy_rejects_impossible_rates() -> None:
    for rate, per_s, burst in [(0, 1, 1), (1, 0, 1), (1, 1, 0), (-1, 1, 1)]:
        with pytest.raises(ValueError):
            BucketPolicy("p", rate, per_s, burst)


# --- keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("account", "valid"),
    [("le-1234", True), ("AKIAIOSFODNN7EXAMPLE", True), ("a" * 256, True), ("!~", True)]
    + [(account, False) for account in HOSTILE_IDS],
)
def test_validate_account_id(account: str, valid: bool) -> None:
    assert validate_account_id(account) is valid


@pytest.mark.parametrize("account", HOSTILE_IDS)
def test_hostile_account_ids_cannot_break_keys(account: str) -> None:
    key = bucket_key("lp", account)
    assert key.count("{") == 1 and key.count("}") == 1 and key.endswith("}")
    assert all("!" <= char <= "~" for char in key) and len(key) < 200
    assert key not in {bucket_key("lp", other) for other in HOSTILE_IDS if other != account}
    assert key != bucket_key("lp", None)


def test_keys_are_readable_and_hash_tagged() -> None:
    assert bucket_key("lp", "le-1234") == "gw:rl:{lp:le-1234}"
    assert bucket_key("lp", None) == "gw:rl-anon:{lp}"
    assert bucket_key("lambda", "le-1234") != bucket_key("lp", "le-1234")
    assert bucket_key("a:b", "c") != bucket_key("a", "b:c")


# --- memory backend ----------------------------------------------------------------------


def test_memory_burst_then_refusal_other_account_and_override() -> None:
    limiter = MemoryRateLimiter(ManualClock())
    burst = [limiter.take_now("acct-a", DEFAULT) for _ in range(4)]
    assert [(d.allowed, d.remaining) for d in burst] == [(True, 2), (True, 1), (True, 0), (False, 0)]
    assert burst[-1].retry_after_s == pytest.approx(2.0)
    assert burst[-1].source == "memory"
    assert limiter.take_now("acct-b", DEFAULT).allowed
    overridden = [limiter.take_now("le-1234", OVERRIDE).allowed for _ in range(6)]
    assert overridden == [True] * 5 + [False]


async def test_memory_refills_at_the_configured_rate() -> None:
    clock = ManualClock()
    limiter = MemoryRateLimiter(clock)
    for _ in range(3):
        await limiter.take("k", DEFAULT)
    clock.advance(1.9)
    assert not (await limiter.take("k", DEFAULT)).allowed
    clock.advance(0.1)
    assert (await limiter.take("k", DEFAULT)).allowed  # 1 token per 2 s
    clock.advance(4.0)
    assert [(await limiter.take("k", DEFAULT)).allowed for _ in range(3)] == [True, True, False]


def test_memory_forgets_full_buckets_and_caps_entries() -> None:
    clock = ManualClock()
    limiter = MemoryRateLimiter(clock, max_entries=10)
    for n in range(5):
        limiter.take_now(f"k{n}", DEFAULT)
    clock.advance(2.0)  # each bucket got its token back: full, so forgettable
    limiter.take_now("fresh", DEFAULT)
    assert len(limiter) == 1
    for n in range(50):
        limiter.take_now(f"many{n}", DEFAULT)
    assert len(limiter) == 10


# --- Redis backend -----------------------------------------------------------------------


async def test_redis_burst_then_refusal_other_account_and_override(
    redis_limiter: RedisRateLimiter,
) -> None:
    burst = [await redis_limiter.take("gw:rl:{lp:a}", DEFAULT) for _ in range(4)]
    assert [(d.allowed, d.remaining, d.source) for d in burst] == [
        (True, 2, "redis"), (True, 1, "redis"), (True, 0, "redis"), (False, 0, "redis"),
    ]  # fmt: skip
    assert 1.9 < burst[-1].retry_after_s <= 2.0
    assert (await redis_limiter.take("gw:rl:{lp:b}", DEFAULT)).allowed
    overridden = [(await redis_limiter.take("gw:rl:{lp:le}", OVERRIDE)).allowed for _ in range(6)]
    assert overridden == [True] * 5 + [False]


async def test_redis_refills_at_the_configured_rate(redis_limiter: RedisRateLimiter) -> None:
    fast = BucketPolicy("fast", rate=20.0, per_s=1.0, burst=2)  # one token per 50 ms
    taken = [(await redis_limiter.take("gw:rl:{lp:r}", fast)).allowed for _ in range(3)]
    assert taken == [True, True, False]
    refused = await redis_limiter.take("gw:rl:{lp:r}", fast)
    await asyncio.sleep(refused.retry_after_s + 0.01)
    assert (await redis_limiter.take("gw:rl:{lp:r}", fast)).allowed
    assert not (await redis_limiter.take("gw:rl:{lp:r}", fast)).allowed


async def test_memory_and_redis_agree_on_a_sequence(redis_limiter: RedisRateLimiter) -> None:
    memory = MemoryRateLimiter(ManualClock())
    sequence = [("a", SLOW), ("b", SLOW), ("a", SLOW), ("d", OVERRIDE)] * 4 + [("c", SLOW)] * 6
    for account, policy in sequence:
        key = bucket_key("lp", account)
        expected, actual = memory.take_now(key, policy), await redis_limiter.take(key, policy)
        assert (actual.allowed, actual.remaining) == (expected.allowed, expected.remaining)
        assert actual.retry_after_s == pytest.approx(expected.retry_after_s, abs=0.5)


async def test_two_clients_share_one_bucket(redis_server: RedisProcess) -> None:
    store_a, limiter_a = make_limiter(redis_server.url)
    store_b, limiter_b = make_limiter(redis_server.url)
    try:
        key = bucket_key("lp", "shared")
        answers = [await (limiter_a if n % 2 else limiter_b).take(key, SLOW) for n in range(6)]
        assert [d.allowed for d in answers] == [True] * 4 + [False] * 2
        assert not (await limiter_a.take(key, SLOW)).allowed
    finally:
        await store_a.aclose()
        await store_b.aclose()


async def test_hostile_account_ids_are_isolated_in_redis(redis_limiter: RedisRateLimiter) -> None:
    for account in HOSTILE_IDS:
        decisions = [await redis_limiter.take(bucket_key("lp", account), SLOW) for _ in range(5)]
        assert [d.allowed for d in decisions] == [True] * 4 + [False]
        assert {d.source for d in decisions} == {"redis"}


@pytest.mark.parametrize(
    ("on_error", "source", "allowed_while_down"),
    [
        ("local", "fallback-local", [True, True, True, True, False, False]),
        ("allow", "fallback-allow", [True] * 6),
        ("deny", "unavailable", [False] * 6),
    ],
)
async def test_redis_outage_falls_back_then_shared_enforcement_resumes(
    redis_server: RedisProcess, on_error: str, source: str, allowed_while_down: list[bool]
) -> None:
    store_clock = ManualClock()
    store, limiter = make_limiter(redis_server.url, on_error, store_clock)
    key = bucket_key("lp", "outage")
    try:
        assert (await limiter.take(key, SLOW)).source == "redis"
        redis_server.kill()
        decisions, durations = await timed_takes(limiter, key, SLOW, 6)
        print(f"{on_error}: take while Redis is down: {[round(d * 1000, 2) for d in durations]} ms")
        assert [d.source for d in decisions] == [source] * 6
        assert [d.allowed for d in decisions] == allowed_while_down
        assert not limiter.healthy
        assert max(durations) < 1.0  # sanity bound only; the figures are printed above
        redis_server.start()
        store_clock.advance(1.0)  # the store's outage cool-down
        resumed = await limiter.take(key, SLOW)
        assert (resumed.source, resumed.allowed, limiter.healthy) == ("redis", True, True)
    finally:
        await store.aclose()


async def test_redis_killed_under_concurrent_traffic(redis_server: RedisProcess) -> None:
    store_clock = ManualClock()
    store, limiter = make_limiter(redis_server.url, "local", store_clock)
    policy = BucketPolicy("default", rate=1.0, per_s=3600.0, burst=1000)
    seen: list[tuple[str, str]] = []
    phase = "up"

    async def client(n: int) -> None:
        while phase != "done":
            decision = await limiter.take(bucket_key("lp", f"c{n % 3}"), policy)
            seen.append((phase, decision.source))
            await asyncio.sleep(0.001)

    clients = [asyncio.create_task(client(n)) for n in range(8)]
    try:
        await asyncio.sleep(0.05)
        redis_server.kill()
        phase = "down"
        await asyncio.sleep(0.05)
        redis_server.start()
        store_clock.advance(1.0)
        phase = "back"
        await asyncio.sleep(0.05)
    finally:
        phase = "done"
        await asyncio.gather(*clients)
        await store.aclose()
    sources = {p: [source for q, source in seen if q == p] for p in ("up", "down", "back")}
    assert set(sources["up"]) == {"redis"}
    assert "fallback-local" in sources["down"]  # replies already in flight may still say redis
    assert sources["back"][-8:] == ["redis"] * 8


async def test_frozen_redis_adds_at_most_one_timeout(redis_server: RedisProcess) -> None:
    store, limiter = make_limiter(redis_server.url, "local", ManualClock(), timeout_s=0.05)
    key = bucket_key("lp", "frozen")
    try:
        await limiter.take(key, SLOW)
        redis_server.pause()
        decisions, durations = await timed_takes(limiter, key, SLOW, 20)
        print(f"take while Redis is frozen: {[round(d * 1000, 2) for d in durations[:4]]}… ms")
        assert {d.source for d in decisions} == {"fallback-local"}
        assert max(durations) < 1.0  # the first pays the 50 ms socket timeout, the rest nothing
    finally:
        redis_server.resume()
        await store.aclose()


async def timed_takes(
    limiter: RedisRateLimiter, key: str, policy: BucketPolicy, count: int
) -> tuple[list[Decision], list[float]]:
    decisions, durations = [], []
    for _ in range(count):
        started = time.monotonic()
        decisions.append(await limiter.take(key, policy))
        durations.append(time.monotonic() - started)
    return decisions, durations


async def test_cluster_enforces_the_same_limits(redis_cluster) -> None:
    store, limiter = make_limiter(redis_cluster.url)
    memory = MemoryRateLimiter(ManualClock())
    try:
        assert await store.prepare()  # as the gateway does at start-up: slot map, connections, script
        for account in [f"acct-{n}" for n in range(9)] + ["le-1234"]:
            policy = OVERRIDE if account == "le-1234" else SLOW
            key = bucket_key("lp", account)
            for _ in range(policy.burst + 2):
                expected, actual = memory.take_now(key, policy), await limiter.take(key, policy)
                assert (actual.allowed, actual.remaining, actual.source) == (
                    expected.allowed, expected.remaining, "redis",
                )  # fmt: skip
    finally:
        await store.aclose()


# --- headers -----------------------------------------------------------------------------


def decision(allowed: bool, remaining: int, retry_after_s: float, reset_s: float) -> Decision:
    policy = BucketPolicy("default", rate=100, per_s=1, burst=200)
    return Decision(allowed, remaining, retry_after_s, reset_s, policy, "memory")


@pytest.mark.parametrize(
    ("given_decision", "expected"),
    [
        (decision(True, 42, 0.0, 0.58), [
            ("RateLimit-Policy", '"default";q=100;w=1'), ("RateLimit", '"default";r=42;t=1'),
        ]),
        (decision(True, 199, 0.0, 0.01), [
            ("RateLimit-Policy", '"default";q=100;w=1'), ("RateLimit", '"default";r=199;t=1'),
        ]),
        (decision(False, 0, 0.004, 2.0), [
            ("RateLimit-Policy", '"default";q=100;w=1'), ("RateLimit", '"default";r=0;t=1'),
            ("Retry-After", "1"),
        ]),
        (decision(False, 0, 2.2, 30.0), [
            ("RateLimit-Policy", '"default";q=100;w=1'), ("RateLimit", '"default";r=0;t=3'),
            ("Retry-After", "3"),
        ]),
    ],
)  # fmt: skip
def test_rate_limit_headers(given_decision: Decision, expected: list[tuple[str, str]]) -> None:
    assert rate_limit_headers(given_decision) == expected


@pytest.mark.parametrize(
    ("policy", "policy_header"),
    [
        (BucketPolicy("le-1234", 1000, 1, 2000), '"le-1234";q=1000;w=1'),
        (BucketPolicy("p", 30, 60, 5), '"p";q=30;w=60'),
        (BucketPolicy("p", 5, 0.5, 5), '"p";q=10;w=1'),
        (BucketPolicy('a"b\\c', 1, 1, 1), '"a\\"b\\\\c";q=1;w=1'),
    ],
)
def test_rate_limit_policy_header(policy: BucketPolicy, policy_header: str) -> None:
    headers = dict(rate_limit_headers(Decision(True, 0, 0.0, 1.0, policy, "memory")))
    assert headers["RateLimit-Policy"] == policy_header
