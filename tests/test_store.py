"""gateway.store against real redis-server processes (standalone, unix socket, Sentinel, Cluster)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster

from gateway.store import (
    OutageBreaker,
    RedisStore,
    StoreOptions,
    StoreUnavailable,
    build_client,
    parse_multi_host_url,
)
from tests.clocks import ManualClock
from tests.redis_servers import (  # noqa: F401  (fixtures)
    RedisProcess,
    redis_cluster,
    redis_sentinel,
    redis_server,
    remove_workdir,
    send_command,
    start_redis,
)

BOUND_S = 5.0


def make_store(url: str, clock: ManualClock | None = None, **options: float) -> RedisStore:
    store_options = StoreOptions(**options)
    return RedisStore(
        build_client(url, store_options, listening=False),
        build_client(url, store_options, listening=True),
        clock=clock or time.monotonic,
        options=store_options,
    )


@pytest.fixture
async def store(redis_server: RedisProcess) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_server.url, clock=time.monotonic)
    yield store
    await store.aclose()


@pytest.mark.parametrize(
    ("url", "hosts", "path", "credentials", "tls"),
    [
        ("redis+sentinel://s1:26379,s2:26380/mymaster", (("s1", 26379), ("s2", 26380)), "mymaster", {}, False),
        ("redis+sentinel://u:p%40ss@s1/mymaster/2", (("s1", 6379),), "mymaster/2", {"username": "u", "password": "p@ss"}, False),
        ("rediss+cluster://:secret@10.0.0.1:7000,[::1]:7001", (("10.0.0.1", 7000), ("::1", 7001)), "", {"password": "secret"}, True),
    ],
)  # fmt: skip
def test_multi_host_urls_are_parsed(
    url: str, hosts: tuple, path: str, credentials: dict, tls: bool
) -> None:
    parsed = parse_multi_host_url(url)
    assert (parsed.hosts, parsed.path, parsed.credentials, parsed.tls) == (
        hosts, path, credentials, tls,
    )  # fmt: skip


@pytest.mark.parametrize(
    "url", ["http://h:1", "redis+sentinel://h:1", "redis+sentinel://h:1/a/1/x", "redis+cluster:///"]
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        build_client(url, StoreOptions(), listening=False)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1", "unix:///tmp/none.sock"]
)
def test_standalone_clients_fail_fast_without_retries(url: str) -> None:
    client = build_client(url, StoreOptions(timeout_s=0.03, max_connections=7), listening=False)
    pool = client.connection_pool
    connection = pool.make_connection()
    assert connection.retry.get_retries() == 0
    assert connection.socket_timeout == 0.03
    assert pool.max_connections == 7


def test_cluster_client_has_no_retries() -> None:
    client = build_client("redis+cluster://127.0.0.1:1", StoreOptions(), listening=False)
    assert isinstance(client, RedisCluster)
    assert client.retry.get_retries() == 0


def test_sentinel_clients_fail_fast_without_retries() -> None:
    client = build_client("redis+sentinel://127.0.0.1:1/m", StoreOptions(), listening=False)
    sentinel = client.connection_pool.sentinel_manager.sentinels[0]
    for connection in (
        client.connection_pool.make_connection(),
        sentinel.connection_pool.make_connection(),
    ):
        assert (connection.retry.get_retries(), connection.socket_timeout) == (0, 0.05)


def test_listening_client_waits_without_read_timeout() -> None:
    client = build_client("redis://127.0.0.1:1", StoreOptions(), listening=True)
    assert client.connection_pool.make_connection().socket_timeout is None


def test_outage_breaker_cools_down_then_admits_one_probe() -> None:
    clock = ManualClock()
    breaker = OutageBreaker(clock, cooldown_s=1.0)
    assert breaker.admit() == "closed"
    breaker.fail()
    assert (breaker.healthy, breaker.admit()) == (False, None)
    clock.advance(1.0)
    assert breaker.admit() == "probe"
    assert breaker.admit() is None  # one probe at a time
    breaker.succeed("probe")
    assert (breaker.healthy, breaker.admit()) == (True, "closed")


def test_outage_breaker_probe_failure_reopens_and_stale_success_does_not_close() -> None:
    clock = ManualClock()
    breaker = OutageBreaker(clock, cooldown_s=1.0)
    breaker.fail()
    breaker.succeed("closed")  # a call admitted before the outage
    assert not breaker.healthy
    clock.advance(1.0)
    assert breaker.admit() == "probe"
    breaker.fail()
    assert breaker.admit() is None
    assert breaker.seconds_left() == pytest.approx(1.0)
    clock.advance(1.0)
    assert breaker.admit() == "probe"
    breaker.abandon("probe")
    assert breaker.admit() == "probe"


async def test_take_token_enforces_burst_on_server_clock(store: RedisStore) -> None:
    answers = [await store.take_token("gw:t:{a}", 1.0, 10.0, 3) for _ in range(4)]
    assert [a[:2] for a in answers] == [(True, 2), (True, 1), (True, 0), (False, 0)]
    allowed, _, retry_after_s, reset_s = answers[-1]
    assert 9.0 < retry_after_s <= 10.0
    assert 29.0 < reset_s <= 30.0


async def test_bucket_key_gets_a_ttl_until_full(store: RedisStore, redis_server: RedisProcess) -> None:
    _, _, _, reset_s = await store.take_token("gw:t:{ttl}", 1.0, 2.0, 5)
    ttl_ms = int(send_command(redis_server.port, "PTTL", "gw:t:{ttl}")[1:].split(b"\r")[0])
    assert 0 < ttl_ms <= reset_s * 1000 + 1


async def test_idle_bucket_expires(store: RedisStore, redis_server: RedisProcess) -> None:
    await store.take_token("gw:t:{idle}", 1000.0, 1.0, 10)  # full again after 1 ms
    await asyncio.sleep(0.05)
    assert send_command(redis_server.port, "EXISTS", "gw:t:{idle}") == b":0\r\n"


async def test_script_is_reloaded_after_noscript(
    store: RedisStore, redis_server: RedisProcess
) -> None:
    await store.take_token("gw:t:{s}", 1.0, 60.0, 2)
    assert send_command(redis_server.port, "SCRIPT", "FLUSH") == b"+OK\r\n"
    assert await store.take_token("gw:t:{s}", 1.0, 60.0, 2) == (True, 0, 0.0, pytest.approx(120.0, abs=1))


async def test_values_set_get_delete(store: RedisStore) -> None:
    assert await store.set_value("gw:v:{1}", b"one", 5.0, only_if_absent=True)
    assert not await store.set_value("gw:v:{1}", b"two", 5.0, only_if_absent=True)
    assert await store.get_value("gw:v:{1}") == b"one"
    assert await store.set_value("gw:v:{1}", b"three", 0.02)
    assert await store.get_value("gw:v:{1}") == b"three"
    await asyncio.sleep(0.05)
    assert await store.get_value("gw:v:{1}") is None
    await store.set_value("gw:v:{2}", b"x", 5.0)
    await store.delete("gw:v:{2}")
    assert await store.get_value("gw:v:{2}") is None
    assert await store.ping()


async def test_outage_cools_down_without_touching_redis() -> None:
    server = start_redis()
    clock = ManualClock()
    store = make_store(server.url, clock, cooldown_s=1.0)
    try:
        assert await store.ping()
        server.kill()
        assert not await store.ping()
        assert not store.healthy
        server.start()
        clock.advance(0.9)
        with pytest.raises(StoreUnavailable, match="cooling down"):
            await store.get_value("k")  # Redis is back, but the store stays away for now
        assert not await store.ping()
        clock.advance(0.1)
        assert await store.ping()
        assert store.healthy
    finally:
        await store.aclose()
        server.close()
        remove_workdir(server)


async def test_frozen_redis_costs_one_timeout_then_nothing(redis_server: RedisProcess) -> None:
    store = make_store(redis_server.url, ManualClock(), timeout_s=0.05)
    try:
        await store.take_token("gw:t:{f}", 1.0, 1.0, 5)
        redis_server.pause()
        durations = []
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.take_token("gw:t:{f}", 1.0, 1.0, 5)
            durations.append(time.monotonic() - started)
        print(f"take_token while Redis is frozen: {[round(d * 1000, 2) for d in durations]} ms")
        assert max(durations) < 1.0  # sanity: bounded by the timeouts, not by the OS
    finally:
        redis_server.resume()
        await store.aclose()


async def test_subscription_survives_a_redis_restart(redis_server: RedisProcess) -> None:
    store = make_store(redis_server.url, cooldown_s=0.05, resubscribe_s=0.05)
    messages = store.subscribe("gw:chan")
    try:
        assert await publish_until_received(store, messages, b"before") == b"before"
        redis_server.kill()
        redis_server.start()
        assert await publish_until_received(store, messages, b"after") == b"after"
    finally:
        await messages.aclose()
        await store.aclose()


async def publish_until_received(
    store: RedisStore, messages: AsyncIterator[bytes], payload: bytes
) -> bytes:
    """Publish repeatedly (a message sent before the subscription lands is lost) until one arrives."""
    receiver = asyncio.ensure_future(anext(messages))
    try:
        async with asyncio.timeout(BOUND_S):
            while not receiver.done():
                try:
                    await store.publish("gw:chan", payload)
                except StoreUnavailable:
                    pass
                await asyncio.wait({receiver}, timeout=0.05)
        return receiver.result()
    finally:
        receiver.cancel()


async def test_unix_socket_url(tmp_path: pytest.TempPathFactory) -> None:
    socket_path = tmp_path / "redis.sock"
    server = start_redis(extra_args=("--unixsocket", str(socket_path), "--unixsocketperm", "700"))
    store = RedisStore.from_url(f"unix://{socket_path}", clock=time.monotonic)
    try:
        assert await store.take_token("gw:t:{u}", 1.0, 1.0, 2) == (True, 1, 0.0, 1.0)
    finally:
        await store.aclose()
        server.close()
        remove_workdir(server)


async def test_sentinel_url_reaches_the_master(redis_sentinel) -> None:
    store = RedisStore.from_url(redis_sentinel.url, clock=time.monotonic)
    try:
        assert await store.take_token("gw:t:{s}", 1.0, 1.0, 2) == (True, 1, 0.0, 1.0)
        assert await store.set_value("gw:v:{s}", b"v", 5.0)
        reply = send_command(redis_sentinel.master.port, "GET", "gw:v:{s}")
        assert reply == b"$1\r\nv\r\n"
    finally:
        await store.aclose()


async def test_cluster_runs_the_script_on_every_slot(redis_cluster) -> None:
    store = RedisStore.from_url(redis_cluster.url, clock=time.monotonic)
    keys = [f"gw:t:{{acct-{n}}}" for n in range(12)]
    try:
        for key in keys:
            answers = [await store.take_token(key, 1.0, 60.0, 2) for _ in range(3)]
            assert [a[0] for a in answers] == [True, True, False]
        for node in redis_cluster.nodes:  # every node ran the script and holds buckets
            assert send_command(node.port, "DBSIZE") != b":0\r\n"
        assert await store.set_value("gw:v:{c}", b"v", 5.0)
        assert await store.get_value("gw:v:{c}") == b"v"
    finally:
        await store.aclose()


async def test_cluster_pubsub(redis_cluster) -> None:
    store = RedisStore.from_url(redis_cluster.url, clock=time.monotonic)
    messages = store.subscribe("gw:chan")
    try:
        assert await publish_until_received(store, messages, b"hello") == b"hello"
    finally:
        await messages.aclose()
        await store.aclose()
