"""Breakers shared by gateway processes through a real Redis (issue 5).

Two `python -m gateway serve` processes share one redis-server: a breaker opened by failures
seen on one replica is open on the other within a second (it answers `circuit_open` without
calling the upstream), and an admin reset on either replica closes it on both and removes
the key that would make a replica starting later open it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.breakers import (
    Admission,
    BreakerKey,
    BreakerPolicy,
    BreakerRegistry,
    BreakerReplicator,
    RemoteOpen,
    RemoteReset,
    decode_open,
    decode_reset,
    encode_open,
    encode_reset,
    store_key,
)
from gateway.store import RedisStore
from gateway.simulators import Reply, SimulatedUpstream
from tests.harness import GatewayProcess, gateway_process, simulated, upstream_config, write_config
from tests.redis_servers import RedisProcess, redis_server, send_command  # noqa: F401 (fixture)

FAIL_MAX = 3
RESET_TIMEOUT_S = 30.0
SEEN_WITHIN_S = 1.0  # the promise for replication; not a performance measurement
ADMIN_TOKEN = "replicas-admin-token"
FUNCTION = "ok-f"  # answers 200 unless a failure is scripted
PATH = f"/api/account/le1/lambdas/{FUNCTION}/invoke"


def config_text(upstream_url: str, redis_url: str) -> str:
    upstream = upstream_config("up", upstream_url, "liveperson", ["/api/account/{account}/lambdas/{function}/invoke"], retry="once", breaker="tight", rate_limited="false")
    return (
        "state:\n"
        f"  redis_url: {redis_url}\n"
        "  redis_timeout_s: 0.5\n"  # a loaded test machine must not look like a Redis outage
        "retry_policies:\n"
        "  once: {max_attempts: 1}\n"
        "breaker_policies:\n"
        f"  tight: {{fail_max: {FAIL_MAX}, reset_timeout_s: {RESET_TIMEOUT_S}}}\n"
        "upstreams:\n" + upstream
    )


@dataclass
class Replica:
    process: GatewayProcess
    client: httpx.AsyncClient

    async def invoke(self) -> httpx.Response:
        return await self.client.post(PATH, json={"payload": 1})

    async def breaker(self) -> dict[str, Any] | None:
        listing = await self.client.get("/admin/breakers", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert listing.status_code == 200, listing.text
        found = [e for e in listing.json()["breakers"] if e["function"] == FUNCTION]
        return found[0] if found else None

    async def reset(self) -> httpx.Response:
        return await self.client.post(f"/admin/breakers/up/{FUNCTION}/reset", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


@contextlib.asynccontextmanager
async def two_replicas(tmp_path: Path, upstream: SimulatedUpstream, redis: RedisProcess) -> AsyncIterator[tuple[Replica, Replica]]:
    path = write_config(tmp_path, config_text(upstream.url, redis.url))
    with contextlib.ExitStack() as stack:
        # Both processes start at once (each start blocks until /healthz answers).
        a, b = await asyncio.gather(*(asyncio.to_thread(stack.enter_context, gateway_process(path)) for _ in range(2)))
        async with httpx.AsyncClient(base_url=a.url, timeout=10.0) as client_a, httpx.AsyncClient(base_url=b.url, timeout=10.0) as client_b:
            yield Replica(a, client_a), Replica(b, client_b)


async def until_state(replica: Replica, state: str, within_s: float) -> dict[str, Any]:
    async with asyncio.timeout(within_s):
        while True:
            entry = await replica.breaker()
            if entry is not None and entry["state"] == state:
                return entry
            await asyncio.sleep(0.02)


async def open_on(replica: Replica, upstream: SimulatedUpstream) -> float:
    """Open the breaker with FAIL_MAX scripted 500s through `replica`; when it opened (monotonic)."""
    upstream.script(*[Reply.json(500, {"errorCode": "com.liveperson.faas.es.general", "errorMsg": "down"})] * FAIL_MAX)
    for _ in range(FAIL_MAX):
        assert (await replica.invoke()).status_code == 500
    opened = time.monotonic()
    assert (await replica.breaker() or {}).get("state") == "open"
    return opened


def key_exists(redis: RedisProcess) -> bool:
    return key_exists_for(redis, FUNCTION)


async def test_an_open_on_one_process_is_seen_on_the_other_within_a_second(tmp_path: Path, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    async with simulated("liveperson") as upstream, two_replicas(tmp_path, upstream, redis_server) as (a, b):
        assert (await b.invoke()).status_code == 200  # b knows the function and finds it healthy
        opened = await open_on(a, upstream)
        entry = await until_state(b, "open", SEEN_WITHIN_S - (time.monotonic() - opened))
        assert RESET_TIMEOUT_S - SEEN_WITHIN_S < entry["open_remaining_s"] <= RESET_TIMEOUT_S
        assert key_exists(redis_server)

        calls = upstream.count(PATH)
        response = await b.invoke()
        assert response.status_code == 503
        problem = response.json()["problem"]
        assert (problem["class"], problem["attempts"]) == ("circuit_open", 0)
        assert 1 <= int(response.headers["retry-after"]) <= RESET_TIMEOUT_S
        assert upstream.count(PATH) == calls  # b did not call the upstream
        assert (await b.breaker() or {}).get("failures") == 0  # b's own count never moved


@pytest.mark.parametrize("reset_on", ["the replica that opened it", "the other replica"])
async def test_an_admin_reset_on_one_process_closes_the_breaker_on_both(tmp_path: Path, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch, reset_on: str) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    async with simulated("liveperson") as upstream, two_replicas(tmp_path, upstream, redis_server) as (a, b):
        assert (await b.invoke()).status_code == 200
        await open_on(a, upstream)
        await until_state(b, "open", SEEN_WITHIN_S * 5)
        assert key_exists(redis_server)
        here, there = (a, b) if reset_on == "the replica that opened it" else (b, a)

        reset = await here.reset()
        assert (reset.status_code, reset.json()) == (200, {"reset": True})
        assert (await here.breaker() or {}).get("state") == "closed"
        await until_state(there, "closed", SEEN_WITHIN_S)
        await until_gone(redis_server)

        calls = upstream.count(PATH)
        for replica in (a, b):
            assert (await replica.invoke()).status_code == 200
        assert upstream.count(PATH) == calls + 2


@contextlib.asynccontextmanager
async def third_replica(tmp_path: Path) -> AsyncIterator[Replica]:
    """One more process on the same configuration, started now."""
    with contextlib.ExitStack() as stack:
        process = await asyncio.to_thread(stack.enter_context, gateway_process(tmp_path / "gateway.yaml"))
        async with httpx.AsyncClient(base_url=process.url, timeout=10.0) as client:
            yield Replica(process, client)


async def test_a_replica_started_after_an_open_refuses_its_first_request(tmp_path: Path, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """It loads the opens in progress before it serves: not even one call reaches the failing function."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    async with simulated("liveperson") as upstream, two_replicas(tmp_path, upstream, redis_server) as (a, _):
        await open_on(a, upstream)
        await until_gone_or_present(redis_server, present=True)
        async with third_replica(tmp_path) as late:
            calls = upstream.count(PATH)
            response = await late.invoke()
            assert response.status_code == 503, response.text
            assert response.json()["problem"]["class"] == "circuit_open"
            assert upstream.count(PATH) == calls
            entry = await late.breaker()
            assert entry is not None and entry["state"] == "open"
            assert RESET_TIMEOUT_S - 5 < entry["open_remaining_s"] <= RESET_TIMEOUT_S


async def test_a_reset_on_a_replica_that_never_saw_the_breaker_closes_it_everywhere(tmp_path: Path, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    async with simulated("liveperson") as upstream, two_replicas(tmp_path, upstream, redis_server) as (a, b):
        await open_on(a, upstream)
        await until_state(b, "open", SEEN_WITHIN_S)
        # A replica that missed the open (started while the index was unreadable, say) has no
        # breaker for the function; an operator who resets through it must still close it.
        send_command(redis_server.port, "DEL", "gw:breakers:open")
        async with third_replica(tmp_path) as blank:
            assert await blank.breaker() is None
            reset = await blank.reset()
            assert (reset.status_code, reset.json()) == (200, {"reset": True, "known_here": False})
            unknown = await blank.client.post("/admin/breakers/nope/f/reset", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert (unknown.status_code, unknown.json()) == (404, {"reset": False})
        for replica in (a, b):
            await until_state(replica, "closed", SEEN_WITHIN_S)
        await until_gone(redis_server)
        calls = upstream.count(PATH)
        for replica in (a, b):
            assert (await replica.invoke()).status_code == 200
        assert upstream.count(PATH) == calls + 2


async def test_a_reset_also_removes_the_open_a_new_replica_would_load(tmp_path: Path, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    async with simulated("liveperson") as upstream, two_replicas(tmp_path, upstream, redis_server) as (a, _):
        await open_on(a, upstream)
        assert (await a.reset()).status_code == 200
        await until_gone(redis_server)
        async with asyncio.timeout(SEEN_WITHIN_S):
            while send_command(redis_server.port, "ZCARD", "gw:breakers:open").strip() != b":0":
                await asyncio.sleep(0.02)
        async with third_replica(tmp_path) as late:
            assert (await late.invoke()).status_code == 200


async def until_gone_or_present(redis: RedisProcess, present: bool) -> None:
    async with asyncio.timeout(SEEN_WITHIN_S):
        while key_exists(redis) != present:
            await asyncio.sleep(0.02)


async def until_gone(redis: RedisProcess) -> None:
    async with asyncio.timeout(SEEN_WITHIN_S):
        while key_exists(redis):
            await asyncio.sleep(0.02)


# --- the reset message, and replicators in one process ------------------------------------


def test_reset_messages_round_trip_and_are_never_taken_for_opens() -> None:
    reset = RemoteReset(BreakerKey("up", "f"), "replica-a")
    opened = RemoteOpen(BreakerKey("up", "f"), 1_700_000_000.0, 30.0, "replica-a")
    assert decode_reset(encode_reset(reset)) == reset
    assert decode_open(encode_reset(reset)) is None
    assert decode_reset(encode_open(opened)) is None
    for raw in (b"", b"[]", b'{"reset": 1, "upstream": "up", "function": "f", "replica_id": "x"}', b'{"reset": true, "upstream": "up"}'):
        assert decode_reset(raw) is None


class Transitions(list[tuple[str, str]]):
    """The registry's on_transition hook, keeping (old, new) in order."""

    def __call__(self, key: BreakerKey, old: str, new: str) -> None:
        self.append((old, new))


@dataclass
class InProcess:
    registry: BreakerRegistry
    replicator: BreakerReplicator
    store: RedisStore
    transitions: Transitions


@contextlib.asynccontextmanager
async def in_process(url: str, *names: str) -> AsyncIterator[list[InProcess]]:
    started: list[InProcess] = []
    try:
        for name in names:
            transitions = Transitions()
            registry = BreakerRegistry(time.time, transitions)
            store = RedisStore.from_url(url, timeout_s=0.5, clock=time.monotonic)
            replicator = BreakerReplicator(registry, store, replica_id=name)
            started.append(InProcess(registry, replicator, store, transitions))
            replicator.start()
        async with asyncio.timeout(SEEN_WITHIN_S * 5):
            await asyncio.gather(*(r.replicator.wait_subscribed() for r in started))
        yield started
    finally:
        for replica in started:
            await replica.replicator.stop()
            await replica.store.aclose()


async def test_a_replicated_reset_is_applied_once_and_not_echoed(redis_server: RedisProcess) -> None:
    policy = BreakerPolicy(fail_max=2, reset_timeout_s=RESET_TIMEOUT_S)
    async with in_process(redis_server.url, "replica-a", "replica-b") as (a, b):
        for _ in range(policy.fail_max):
            decision = a.registry.admit("up", "f", policy)
            assert isinstance(decision, Admission)
            decision.record_failure()
        async with asyncio.timeout(SEEN_WITHIN_S):
            while b.transitions != [("closed", "open")]:
                await asyncio.sleep(0.01)

        assert b.registry.reset("up", "f")
        async with asyncio.timeout(SEEN_WITHIN_S):
            while a.transitions != [("closed", "open"), ("open", "closed")]:
                await asyncio.sleep(0.01)
        assert not key_exists_for(redis_server, "f")
        await asyncio.sleep(0.2)  # time enough for an echo, were there one
        assert a.transitions == b.transitions == [("closed", "open"), ("open", "closed")]
        assert isinstance(a.registry.admit("up", "f", policy), Admission)
        assert not b.replicator.apply(encode_reset(RemoteReset(BreakerKey("up", "unknown"), "replica-a")))


def key_exists_for(redis: RedisProcess, function: str) -> bool:
    return send_command(redis.port, "EXISTS", store_key(BreakerKey("up", function))).strip() == b":1"
