"""gateway.dedupe in parts: the key, the rules, the codec, the bounded cache, the backends (Redis
for real), the flight's tee and the claim loop with an injected clock and sleep."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.config import DedupeConfig
from gateway.dedupe import (
    POLL_FIRST_S,
    Abandoned,
    Claim,
    ClaimResult,
    DedupeRule,
    Deduper,
    Flight,
    Head,
    Lease,
    MemoryBackend,
    RedisBackend,
    ResponseCache,
    StoredResponse,
    credential_of,
    decode_response,
    detach,
    effective_config,
    encode_response,
    is_final,
    request_key,
)
from gateway.observability import Metrics
from gateway.outcomes import ErrorClass
from gateway.pipeline import Exchange
from gateway.store import RedisStore
from tests.redis_servers import RedisProcess, free_port
from tests.clocks import ManualClock

pytestmark = pytest.mark.timeout(30)

RULE = DedupeRule(30.0, 100, (b"idempotency-key", b"x-request-id", b"amz-sdk-invocation-id"))
SIGV4 = b"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature="
OAUTH = b'OAuth oauth_consumer_key="ck", oauth_token="tk", oauth_nonce="%s", oauth_signature="%s"'


def scope(*headers: tuple[bytes, bytes], method: str = "POST", path: bytes = b"/fn/f", query: bytes = b"") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path.decode(), "raw_path": path, "query_string": query, "headers": list(headers)}


def key(request: dict[str, Any], body: bytes = b"{}", upstream: str = "up", account: str | None = "acc", function: str = "f") -> str | None:
    return request_key(request, upstream, account, function, body, RULE.id_headers)


def stored(body: bytes = b"answer", error_class: str | None = None, attempts: int = 1) -> StoredResponse:
    return StoredResponse(200, ((b"content-type", b"text/plain"),), body, attempts, error_class)


# --- the key ----------------------------------------------------------------------------------

ID = (b"x-request-id", b"r-1")
BASE = key(scope(ID))


@pytest.mark.parametrize(
    ("case", "other"),
    [
        ("another id", lambda: key(scope((b"x-request-id", b"r-2")))),
        ("another body", lambda: key(scope(ID), body=b'{"n": 2}')),
        ("another account", lambda: key(scope(ID), account="other")),
        ("no account", lambda: key(scope(ID), account=None)),
        ("another function", lambda: key(scope(ID), function="g")),
        ("another upstream", lambda: key(scope(ID), upstream="up2")),
        ("another method", lambda: key(scope(ID, method="PUT"))),
        ("another path", lambda: key(scope(ID, path=b"/fn/f/x"))),
        ("another query", lambda: key(scope(ID, query=b"v=2"))),
        ("a credential", lambda: key(scope(ID, (b"authorization", b"Bearer a")))),
        ("the id under another header", lambda: key(scope((b"idempotency-key", b"r-1")))),
    ],
)
def test_what_makes_another_request(case: str, other: Callable[[], str | None]) -> None:
    assert BASE is not None
    assert other() not in (None, BASE), case


def test_no_caller_id_means_no_key() -> None:
    assert key(scope()) is None
    assert key(scope((b"x-request-id", b"  "))) is None
    assert key(scope((b"x-correlation-id", b"r-1"))) is None


def test_the_first_configured_id_header_wins() -> None:
    one = key(scope((b"x-request-id", b"r-1"), (b"idempotency-key", b"k-1")))
    two = key(scope((b"x-request-id", b"r-2"), (b"idempotency-key", b"k-1")))
    assert one == two is not None


def test_same_request_same_key() -> None:
    assert key(scope(ID, (b"user-agent", b"x"))) == key(scope(ID, (b"user-agent", b"y"))) == BASE


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        (SIGV4 + b"aaa", SIGV4 + b"bbb", True),  # a new signature per retry
        (SIGV4 + b"aaa", SIGV4.replace(b"AKIDEXAMPLE", b"AKIDOTHER") + b"aaa", False),
        (OAUTH % (b"n1", b"s1"), OAUTH % (b"n2", b"s2"), True),  # a new nonce per retry
        (OAUTH % (b"n1", b"s1"), (OAUTH % (b"n1", b"s1")).replace(b'"tk"', b'"tk2"'), False),
        (b"Bearer one", b"Bearer one", True),
        (b"Bearer one", b"Bearer two", False),
    ],
)
def test_credentials_count_without_their_per_attempt_parts(first: bytes, second: bytes, same: bool) -> None:
    assert (credential_of(first) == credential_of(second)) is same
    assert (key(scope(ID, (b"authorization", first))) == key(scope(ID, (b"authorization", second)))) is same


# --- rules and outcomes -----------------------------------------------------------------------


def test_an_upstream_section_overrides_only_the_keys_it_sets() -> None:
    default = DedupeConfig(ttl_s=10, id_headers=("X-Request-ID",))
    assert effective_config(default, None) is default
    merged = effective_config(default, DedupeConfig.model_validate({"max_body_bytes": 10}))
    assert (merged.ttl_s, merged.max_body_bytes, merged.id_headers, merged.enabled) == (10, 10, ("X-Request-ID",), True)
    assert DedupeRule.of(effective_config(default, DedupeConfig.model_validate({"enabled": False}))) is None


def test_rule_header_names_are_lower_case_bytes() -> None:
    rule = DedupeRule.of(DedupeConfig(id_headers=("Idempotency-Key", "X-Request-ID")))
    assert rule is not None and rule.id_headers == (b"idempotency-key", b"x-request-id")


@pytest.mark.parametrize(
    ("error_class", "final"),
    [
        (None, True),
        (ErrorClass.FUNCTION_ERROR, True),
        (ErrorClass.FUNCTION_TIMEOUT, True),
        (ErrorClass.CLIENT_ERROR, True),
        (ErrorClass.AUTH_ERROR, False),
        (ErrorClass.NOT_FOUND, False),
        (ErrorClass.RATE_LIMITED, False),
        (ErrorClass.UPSTREAM_UNAVAILABLE, False),
        (ErrorClass.UPSTREAM_TIMEOUT, False),
        (ErrorClass.SERVER_ERROR, False),
        (ErrorClass.CIRCUIT_OPEN, False),
        (ErrorClass.GATEWAY_ERROR, False),
    ],
)
def test_only_outcomes_where_the_function_ran_are_final(error_class: ErrorClass | None, final: bool) -> None:
    assert is_final(error_class) is final
    assert stored(error_class=error_class.value if error_class else None).final is final


def test_codec_round_trip_keeps_bytes_exactly() -> None:
    response = StoredResponse(901, ((b"x-caf\xe9", b"\xff"), (b"content-type", b"application/json")), b"line\nbreak\x00\xff", 3, "function_error")
    assert decode_response(encode_response(response)) == response


@pytest.mark.parametrize("raw", [b"", b"garbage", b'{"status": 200}\nbody', b"[]\n", b'{"status": "x", "headers": [], "attempts": 1, "class": null}\n'])
def test_codec_rejects_what_it_did_not_write(raw: bytes) -> None:
    assert decode_response(raw) is None


# --- the memory cache -------------------------------------------------------------------------


def test_cache_entries_expire_after_their_ttl() -> None:
    clock = ManualClock()
    cache = ResponseCache(10, 1 << 20, clock)
    cache.put("k", stored(), 5)
    clock.now += 4.9
    assert cache.get("k") == stored()
    clock.now += 0.2
    assert cache.get("k") is None
    assert (len(cache), cache.bytes) == (0, 0)


def test_cache_evicts_least_recently_used_beyond_max_entries() -> None:
    cache = ResponseCache(2, 1 << 20, ManualClock())
    cache.put("a", stored(b"a"), 30)
    cache.put("b", stored(b"b"), 30)
    cache.get("a")
    cache.put("c", stored(b"c"), 30)
    assert [cache.get(k) is not None for k in "abc"] == [True, False, True]


def test_cache_stays_within_its_byte_bound() -> None:
    entry = stored(b"x" * 1000)
    cache = ResponseCache(100, entry.size * 3, ManualClock())
    for name in "abcde":
        cache.put(name, stored(b"x" * 1000), 30)
    assert (len(cache), cache.bytes) == (3, entry.size * 3)
    assert [cache.get(k) is not None for k in "abcde"] == [False, False, True, True, True]
    cache.put("huge", stored(b"x" * entry.size * 3), 30)
    assert cache.get("huge") is None and len(cache) == 3


def test_cache_ignores_zero_ttl_and_replaces_in_place() -> None:
    cache = ResponseCache(10, 1 << 20, ManualClock())
    cache.put("k", stored(), 0)
    assert cache.get("k") is None
    cache.put("k", stored(b"1"), 30)
    cache.put("k", stored(b"22"), 30)
    assert (cache.get("k"), len(cache), cache.bytes) == (stored(b"22"), 1, stored(b"22").size)


async def test_memory_backend_claims_then_replays_what_was_stored() -> None:
    backend = MemoryBackend(ResponseCache(10, 1 << 20, ManualClock()))
    assert await backend.claim("k", 3) is Claim.OWNED
    await backend.finish("k", None, 30)
    assert await backend.claim("k", 3) is Claim.OWNED
    await backend.finish("k", stored(), 30)
    assert await backend.claim("k", 3) == stored()


# --- the Redis backend, on a real server -------------------------------------------------------


@pytest.fixture
async def store(redis_server: RedisProcess) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_server.url, timeout_s=0.5, clock=time.monotonic)
    try:
        yield store
    finally:
        await store.aclose()


async def test_redis_backend_marks_in_flight_then_stores_or_releases(store: RedisStore) -> None:
    mine, theirs = RedisBackend(store, "a"), RedisBackend(store, "b")
    assert await mine.claim("k", 5) is Claim.OWNED
    assert await theirs.claim("k", 5) is Claim.ELSEWHERE
    await mine.finish("k", stored(error_class="function_error"), 30)
    assert await theirs.claim("k", 5) == stored(error_class="function_error")
    assert await store.get_value("k") is not None
    assert await mine.claim("k2", 5) is Claim.OWNED
    await mine.finish("k2", None, 30)  # a retryable outcome: the key is free again
    assert await theirs.claim("k2", 5) is Claim.OWNED


async def test_redis_entries_expire_by_themselves(store: RedisStore) -> None:
    backend = RedisBackend(store)
    await backend.finish("k", stored(), 0.2)
    assert await backend.claim("other", 0.2) is Claim.OWNED
    await asyncio.sleep(0.3)
    assert await store.get_value("k") is None
    assert await store.get_value("other") is None


async def test_a_lease_keeps_the_mark_and_a_dead_owners_mark_lapses(store: RedisStore) -> None:
    owner, other = RedisBackend(store, "owner"), RedisBackend(store, "other")
    assert await owner.claim("kept", 0.3) is Claim.OWNED
    assert await owner.claim("dead", 0.3) is Claim.OWNED
    lease = Lease(owner, "kept", 0.3)
    await asyncio.sleep(0.6)
    assert await other.claim("kept", 0.3) is Claim.ELSEWHERE
    assert await other.claim("dead", 0.3) is Claim.OWNED
    await lease.stop()
    await owner.finish("kept", None, 30)
    assert await other.claim("kept", 0.3) is Claim.OWNED


async def test_unreachable_redis_means_coalescing_within_the_process() -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}", timeout_s=0.05, clock=time.monotonic)
    try:
        backend = RedisBackend(store)
        assert await backend.claim("k", 3) is Claim.LOCAL
        await backend.renew("k", 3)
        await backend.finish("k", stored(), 30)
    finally:
        await store.aclose()


# --- the flight's tee ----------------------------------------------------------------------------


async def _never() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


async def _nowhere(message: dict[str, Any]) -> None:
    return None


def flight(limit: int = 100) -> Flight:
    exchange = Exchange(scope(ID), _never, _nowhere, "r-1", 0.0)
    flight = Flight("k", DedupeRule(30.0, limit, RULE.id_headers), "up")
    flight.detached = detach(exchange, flight)
    return flight


async def test_a_detached_exchange_keeps_every_field_but_its_client() -> None:
    """detach() names the fields one by one: a field added to Exchange must not be dropped."""
    original = Exchange(scope(ID), _never, _nowhere, "r-9", 12.5, account="acct", attempts=2, status=201, error_class=ErrorClass.SERVER_ERROR, replayed=True, extra_headers=[(b"a", b"b")], body_failure=ValueError("x"))
    copy = detach(original, flight())
    own_client = {"receive", "send", "extra_headers", "disconnect_watch", "shared"}
    for item in dataclasses.fields(Exchange):
        if item.name not in own_client:
            assert getattr(copy, item.name) is getattr(original, item.name), item.name
    assert (copy.extra_headers, copy.disconnect_watch, copy.shared) == ([], None, True)


def start(status: int = 200) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain"), (b"x-request-id", b"r-1")]}


def chunk(data: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


async def test_the_tee_keeps_the_response_and_relays_it_live() -> None:
    f = flight()
    assert f.detached is not None and f.detached.shared
    f.detached.attempts, f.detached.error_class = 2, ErrorClass.FUNCTION_ERROR
    await f.send(start(901))
    await f.send(chunk(b"ab"))
    await f.send(chunk(b"c", more=False))
    assert f.head.result() == Head(901, [(b"content-type", b"text/plain")])  # the per-request id is not kept
    assert [f.live.get_nowait() for _ in range(2)] == [b"ab", b"c"]
    assert f.response() == StoredResponse(901, ((b"content-type", b"text/plain"),), b"abc", 2, "function_error")


async def test_an_oversized_response_is_not_shared_and_is_abandoned_when_nobody_listens() -> None:
    f = flight(limit=4)
    await f.send(start())
    await f.send(chunk(b"abc"))
    assert not f.done.done()
    f.stop_listening()
    with pytest.raises(Abandoned):
        await f.send(chunk(b"de"))
    assert f.done.done() and f.done.result() is None and f.response() is None


async def test_an_oversized_response_still_reaches_a_listening_first_caller() -> None:
    f = flight(limit=4)
    await f.send(start())
    await f.send(chunk(b"abc"))
    sending = asyncio.ensure_future(f.send(chunk(b"de")))
    assert [await f.live.get() for _ in range(2)] == [b"abc", b"de"]
    f.live.task_done()
    f.live.task_done()
    await asyncio.wait_for(sending, 1)
    assert f.done.result() is None and f.response() is None


async def test_past_the_limit_the_first_caller_sets_the_pace_until_it_leaves() -> None:
    f = flight(limit=1)
    await f.send(start())
    blocked = asyncio.ensure_future(f.send(chunk(b"too much")))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    f.stop_listening()
    await asyncio.wait_for(blocked, 1)


async def test_the_detached_client_leaves_only_when_nobody_waits() -> None:
    f = flight()
    receive = asyncio.ensure_future(f.receive())
    f.join()
    f.leave()
    await asyncio.sleep(0.01)
    assert not receive.done()
    f.leave()
    assert await asyncio.wait_for(receive, 1) == {"type": "http.disconnect"}


# --- the claim loop -------------------------------------------------------------------------------


class ScriptedBackend:
    shared = True

    def __init__(self, *claims: ClaimResult) -> None:
        self.claims = list(claims)

    async def claim(self, key: str, lease_s: float) -> ClaimResult:
        return self.claims.pop(0)


def deduper(backend: Any, clock: ManualClock, slept: list[float]) -> Deduper:
    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would

    return Deduper(backend, Metrics(), clock, sleep=sleep)


async def test_waiting_for_another_replica_polls_with_growing_delays_until_the_response_appears() -> None:
    clock, slept = ManualClock(), []
    backend = ScriptedBackend(Claim.ELSEWHERE, Claim.ELSEWHERE, Claim.ELSEWHERE, stored())
    assert await deduper(backend, clock, slept)._settle("k", clock.now + 10, asyncio.Event()) == (stored(), "coalesced")
    assert slept == [POLL_FIRST_S, POLL_FIRST_S * 2, POLL_FIRST_S * 4]


async def test_a_stored_response_found_at_once_is_a_replay_and_a_lapsed_mark_is_claimed() -> None:
    clock, slept = ManualClock(), []
    assert await deduper(ScriptedBackend(stored()), clock, slept)._settle("k", clock.now + 10, asyncio.Event()) == (stored(), "replayed")
    assert await deduper(ScriptedBackend(Claim.ELSEWHERE, Claim.OWNED), clock, slept)._settle("k", clock.now + 10, asyncio.Event()) == (Claim.OWNED, "coalesced")


async def test_waiting_for_another_replica_ends_at_the_deadline() -> None:
    clock, slept = ManualClock(), []
    backend = ScriptedBackend(*[Claim.ELSEWHERE] * 100)
    claim, _ = await deduper(backend, clock, slept)._settle("k", clock.now + 1.0, asyncio.Event())
    assert claim is Claim.ELSEWHERE
    assert sum(slept) == pytest.approx(1.0) and max(slept) <= 0.25


async def test_waiting_for_another_replica_ends_when_nobody_waits_any_more() -> None:
    clock, slept = ManualClock(), []
    deserted = asyncio.Event()
    backend = ScriptedBackend(*[Claim.ELSEWHERE] * 100)
    dedupe = deduper(backend, clock, slept)
    waiting = asyncio.ensure_future(dedupe._settle("k", clock.now + 10, deserted))
    await asyncio.sleep(0)
    deserted.set()
    claim, _ = await asyncio.wait_for(waiting, 1)
    assert claim is Claim.ELSEWHERE and clock.now < 1000.0 + 10
