"""gateway.store against real redis-server processes (standalone, unix socket, Sentinel, Cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any
from collections.abc import AsyncIterator

import pytest
import uvloop
from redis.asyncio.cluster import RedisCluster

from gateway.store import (
    OutageBreaker,
    RedisStore,
    StoreOptions,
    StoreUnavailable,
    TOKEN_BUCKET_SHA,
    build_client,
    parse_multi_host_url,
)
from tests.clocks import ManualClock
from tests.redis_servers import (  # noqa: F401  (fixtures)
    RedisProcess,
    free_port,
    redis_cluster,
    redis_sentinel,
    redis_server,
    remove_workdir,
    send_command,
    start_redis,
)

BOUND_S = 5.0
LOADED_MACHINE_TIMEOUT_S = 0.5  # where a test is not about timeouts, a busy machine must not fake an outage


def make_store(url: str, clock: ManualClock | None = None, **options: float) -> RedisStore:
    store_options = StoreOptions(**options)
    return RedisStore(
        build_client(url, store_options),
        build_client(url, store_options),
        clock=clock or time.monotonic,
        options=store_options,
    )


@pytest.fixture
async def store(redis_server: RedisProcess) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_server.url, timeout_s=LOADED_MACHINE_TIMEOUT_S, clock=time.monotonic)
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
        build_client(url, StoreOptions())


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1", "unix:///tmp/none.sock"]
)
def test_standalone_clients_fail_fast_without_retries(url: str) -> None:
    client = build_client(url, StoreOptions(timeout_s=0.03, max_connections=7))
    pool = client.connection_pool
    connection = pool.make_connection()
    assert connection.retry.get_retries() == 0
    # Connecting fails fast; reads have no timeout of their own: the store's deadlines bound them.
    assert (connection.socket_connect_timeout, connection.socket_timeout) == (0.03, None)
    assert pool.max_connections == 7


def test_cluster_client_has_no_retries() -> None:
    client = build_client("redis+cluster://127.0.0.1:1", StoreOptions())
    assert isinstance(client, RedisCluster)
    assert client.retry.get_retries() == 0


def test_sentinel_clients_fail_fast_without_retries() -> None:
    client = build_client("redis+sentinel://127.0.0.1:1/m", StoreOptions())
    sentinel = client.connection_pool.sentinel_manager.sentinels[0]
    for connection in (
        client.connection_pool.make_connection(),
        sentinel.connection_pool.make_connection(),
    ):
        assert (connection.retry.get_retries(), connection.socket_connect_timeout) == (0, 0.05)


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


async def test_frozen_redis_costs_each_caller_one_timeout_until_the_breaker_opens(redis_server: RedisProcess) -> None:
    timeout_s = 0.2  # long enough that a busy test machine's scheduling noise cannot blur the bounds below
    store = make_store(redis_server.url, ManualClock(), timeout_s=timeout_s)
    try:
        await store.take_token("gw:t:{f}", 1.0, 1.0, 5)
        redis_server.pause()
        durations = []
        started_all = time.monotonic()
        while store.healthy and time.monotonic() - started_all < BOUND_S:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.take_token("gw:t:{f}", 1.0, 1.0, 5)
            durations.append(time.monotonic() - started)
        noticed_after_s = time.monotonic() - started_all
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="cooling down"):
            await store.take_token("gw:t:{f}", 1.0, 1.0, 5)
        during_cooldown_s = time.monotonic() - started
        print(f"take_token while Redis is frozen: {[round(d * 1000, 2) for d in durations]} ms; breaker open after {noticed_after_s * 1000:.0f} ms; then {during_cooldown_s * 1000:.3f} ms")
        assert not store.healthy, "a frozen Redis must open the outage breaker"
        # Each caller waited about one timeout, never the batch's whole deadline...
        assert all(timeout_s * 0.9 <= d < timeout_s * 3 for d in durations[:-1]), durations
        # ...and the breaker opened once the first batch reached its deadline of four timeouts.
        assert noticed_after_s < timeout_s * 4 + 0.5
        assert during_cooldown_s < timeout_s / 2
    finally:
        redis_server.resume()
        await store.aclose()


async def test_takes_of_one_loop_turn_share_one_round_trip(store: RedisStore, redis_server: RedisProcess) -> None:
    def evalsha_calls_and_clients() -> tuple[int, int]:
        stats = send_command(redis_server.port, "INFO", "commandstats").decode()
        calls = next((int(part.split("=")[1]) for line in stats.splitlines() if line.startswith("cmdstat_evalsha:") for part in line.split(":")[1].split(",") if part.startswith("calls=")), 0)
        clients = send_command(redis_server.port, "INFO", "clients").decode()
        connected = next(int(line.split(":")[1]) for line in clients.splitlines() if line.startswith("connected_clients:"))
        return calls, connected

    await store.take_token("gw:t:{warm}", 1.0, 1.0, 5)  # loads the script, opens a connection
    calls_before, _ = evalsha_calls_and_clients()
    answers = await asyncio.gather(*(store.take_token("gw:t:{shared}", 1.0, 60.0, 10) for _ in range(50)))
    calls_after, connected = evalsha_calls_and_clients()
    assert calls_after - calls_before == 50  # every take ran the script...
    assert connected <= 2  # ...on the one connection already open (plus this probe's own)
    allowed = [remaining for ok, remaining, _, _ in answers if ok]
    assert sorted(allowed) == list(range(10))  # exactly the burst, each token once
    assert sum(1 for ok, *_ in answers if not ok) == 40


async def test_a_batch_reloads_the_script_after_noscript(store: RedisStore, redis_server: RedisProcess) -> None:
    await store.take_token("gw:t:{n}", 1.0, 60.0, 20)
    assert send_command(redis_server.port, "SCRIPT", "FLUSH") == b"+OK\r\n"
    *answers, claimed = await asyncio.gather(*(store.take_token("gw:t:{n}", 1.0, 60.0, 20) for _ in range(5)), store.set_value("gw:v:{n}", b"first", 5.0, only_if_absent=True))
    assert sorted(remaining for _, remaining, _, _ in answers) == [14, 15, 16, 17, 18]
    assert claimed  # only the scripts were sent again: the SET NX in the same batch was not


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_answer_held_up_by_a_stalled_loop_still_reaches_its_caller(redis_server: RedisProcess, loop: str) -> None:
    """Redis answered at once; the loop read it late. The caller gets Redis's answer, not a fallback."""

    async def scenario() -> tuple[Any, bool]:
        store = make_store(redis_server.url, timeout_s=0.05)
        try:
            await store.take_token("gw:t:{held}", 1.0, 1.0, 5)
            waiting = asyncio.ensure_future(store.take_token("gw:t:{held}", 1.0, 1.0, 5))
            for _ in range(3):  # the take joins a batch, the batch task starts, the command is written
                await asyncio.sleep(0)
            time.sleep(0.12)  # the loop stalls beyond the 50 ms timeout while Redis answers
            answer = (await asyncio.gather(waiting, return_exceptions=True))[0]
            return answer, store.healthy
        finally:
            await store.aclose()

    runner = uvloop.run if loop == "uvloop" else asyncio.run
    answer, healthy = runner(scenario())
    assert healthy
    assert not isinstance(answer, BaseException), answer
    assert answer[:2] == (True, 3)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_reply_resumes_its_caller_in_the_turn_after_it_is_read(redis_server: RedisProcess, loop: str) -> None:
    """On the open channel a batch goes out with no task, and the reply resolves the caller itself.

    Under load each turn of the loop is a whole burst of other requests' work, so every turn
    between a take and its caller's resumption is latency (docs/performance.md). Here each turn
    lasts long enough for Redis to answer before the loop next reads its sockets. The take
    queues its command in turn 1 and the batch is written in turn 2. uvloop runs the ready
    callbacks before it polls, so it reads the reply at the end of turn 2 and the caller runs in
    turn 3; asyncio polls first and runs the read as a callback, so the caller runs in turn 4.
    """

    async def scenario() -> tuple[Any, int]:
        store = make_store(redis_server.url, timeout_s=LOADED_MACHINE_TIMEOUT_S)
        try:
            await store.take_token("gw:t:{turns}", 1.0, 60.0, 5)  # the channel is open
            running = asyncio.get_running_loop()
            turns = 0

            def tick() -> None:
                nonlocal turns
                turns += 1
                time.sleep(0.01)  # Redis answers while this turn lasts
                if not taking.done():
                    running.call_soon(tick)

            async def take() -> tuple[Any, int]:
                answer = await store.take_token("gw:t:{turns}", 1.0, 60.0, 5)
                return answer, turns  # the turn the caller resumed in

            taking = asyncio.ensure_future(take())
            running.call_soon(tick)  # after the take's first step, in every turn
            return await taking
        finally:
            await store.aclose()

    runner = uvloop.run if loop == "uvloop" else asyncio.run
    answer, turns = runner(scenario())
    assert answer[:2] == (True, 3)
    # with a task per batch, two turns more: the task's start, and its resumption after the read
    assert turns == {"uvloop": 3, "asyncio": 4}[loop]


class LateForOneKey:
    """Stands in for redis-py's client: answers at once, except for keys named "late", which it
    holds for `late_s` (what an overloaded gateway's loop does to some of its batches)."""

    def __init__(self, late_s: float | None) -> None:
        self.late_s = late_s  # None: nothing ever answers (a frozen Redis)

    async def execute_command(self, *args: Any) -> Any:
        if self.late_s is None:
            await asyncio.Event().wait()
        if "late" in args[1]:
            await asyncio.sleep(self.late_s)
        return "OK"

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(("late_s", "opens"), [(1.0, False), (None, True)], ids=["others-answered", "nothing-answered"])
async def test_a_batch_past_its_deadline_opens_the_breaker_only_when_redis_answered_nobody(late_s: float | None, opens: bool) -> None:
    client = LateForOneKey(late_s)
    store = RedisStore(client, client, clock=time.monotonic, options=StoreOptions(timeout_s=0.05))  # type: ignore[arg-type]
    try:
        late = asyncio.ensure_future(store.get_value("late"))
        await asyncio.sleep(0.01)  # the late batch is out; later batches get their answers
        until = time.monotonic() + 0.35  # past the late batch's deadline (four timeouts)
        while time.monotonic() < until:
            with contextlib.suppress(StoreUnavailable):
                await store.get_value("prompt")
            await asyncio.sleep(0.02)
        assert isinstance(late.exception(), StoreUnavailable)  # its caller went on without Redis
        assert store.healthy is not opens
    finally:
        await store.aclose()


async def test_a_reply_late_only_because_the_loop_stalled_does_not_open_the_breaker(redis_server: RedisProcess) -> None:
    """The gateway's own saturated loop is not a Redis outage: the callers that waited too long
    decide without Redis, the store stays healthy, the next take uses Redis."""
    store = make_store(redis_server.url, timeout_s=0.05)
    try:
        await store.take_token("gw:t:{lag}", 1.0, 1.0, 5)
        waiting = asyncio.ensure_future(store.take_token("gw:t:{lag}", 1.0, 1.0, 5))
        await asyncio.sleep(0)  # the take joins a batch
        await asyncio.sleep(0)  # the batch is sent
        time.sleep(0.12)  # the loop stalls beyond the 50 ms timeout (Redis itself answered at once)
        await asyncio.gather(waiting, return_exceptions=True)
        await asyncio.sleep(0.01)
        assert store.healthy
        allowed, remaining, _, _ = await store.take_token("gw:t:{lag}", 1.0, 1.0, 5)
        assert (allowed, remaining) == (True, 2)  # the stalled take was counted by Redis too
    finally:
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
    store = RedisStore.from_url(f"unix://{socket_path}", timeout_s=LOADED_MACHINE_TIMEOUT_S, clock=time.monotonic)
    try:
        assert await store.take_token("gw:t:{u}", 1.0, 1.0, 2) == (True, 1, 0.0, 1.0)
        assert store._channel is not None and not store._channel.closed  # the multiplexed connection, on the socket file
    finally:
        await store.aclose()
        server.close()
        remove_workdir(server)


async def test_sentinel_url_reaches_the_master(redis_sentinel) -> None:
    store = RedisStore.from_url(redis_sentinel.url, timeout_s=LOADED_MACHINE_TIMEOUT_S, clock=time.monotonic)
    try:
        assert await store.take_token("gw:t:{s}", 1.0, 1.0, 2) == (True, 1, 0.0, 1.0)
        assert await store.set_value("gw:v:{s}", b"v", 5.0)
        reply = send_command(redis_sentinel.master.port, "GET", "gw:v:{s}")
        assert reply == b"$1\r\nv\r\n"
        assert store._channel is not None and not store._channel.closed  # opened on the master the Sentinels named
    finally:
        await store.aclose()


async def test_prepare_loads_the_script_on_every_cluster_primary(redis_cluster) -> None:
    for node in redis_cluster.nodes:
        assert send_command(node.port, "SCRIPT", "FLUSH") == b"+OK\r\n"
    store = RedisStore.from_url(redis_cluster.url, timeout_s=LOADED_MACHINE_TIMEOUT_S, clock=time.monotonic)
    try:
        assert await store.prepare()
        for node in redis_cluster.nodes:
            assert send_command(node.port, "SCRIPT", "EXISTS", TOKEN_BUCKET_SHA) == b"*1\r\n:1\r\n"
        assert store.healthy
    finally:
        await store.aclose()


async def test_prepare_against_no_redis_starts_in_the_cool_down() -> None:
    clock = ManualClock()
    store = make_store(f"redis://127.0.0.1:{free_port()}", clock, cooldown_s=1.0)
    try:
        assert not await store.prepare()
        assert not store.healthy
        with pytest.raises(StoreUnavailable, match="cooling down"):
            await store.take_token("gw:t:{down}", 1.0, 1.0, 2)
    finally:
        await store.aclose()


async def test_cluster_runs_the_script_on_every_slot(redis_cluster) -> None:
    store = RedisStore.from_url(redis_cluster.url, timeout_s=LOADED_MACHINE_TIMEOUT_S, clock=time.monotonic)
    keys = [f"gw:t:{{acct-{n}}}" for n in range(12)]
    try:
        for key in keys:
            answers = [await store.take_token(key, 1.0, 60.0, 2) for _ in range(3)]
            assert [a[0] for a in answers] == [True, True, False]
        for node in redis_cluster.nodes:  # every node ran the script and holds buckets
            assert send_command(node.port, "DBSIZE") != b":0\r\n"
        assert await store.set_value("gw:v:{c}", b"v", 5.0)
        assert await store.get_value("gw:v:{c}") == b"v"
        # One loop turn's commands across every node: one batch, split by the cluster pipeline.
        batched = await asyncio.gather(
            *(store.take_token(f"gw:t:{{batch-{n}}}", 1.0, 60.0, 1) for n in range(12)),
            *(store.set_value(f"gw:v:{{batch-{n}}}", b"x", 5.0, only_if_absent=True) for n in range(12)),
            store.get_value("gw:v:{c}"),
        )
        assert [a[0] for a in batched[:12]] == [True] * 12
        assert batched[12:24] == [True] * 12 and batched[24] == b"v"
    finally:
        await store.aclose()


async def test_cluster_pubsub(redis_cluster) -> None:
    store = RedisStore.from_url(redis_cluster.url, timeout_s=LOADED_MACHINE_TIMEOUT_S, clock=time.monotonic)
    messages = store.subscribe("gw:chan")
    try:
        assert await publish_until_received(store, messages, b"hello") == b"hello"
    finally:
        await messages.aclose()
        await store.aclose()


# --- the multiplexed connection (gateway.resp) --------------------------------------------------


def client_count(port: int) -> int:
    """Clients connected to the server, this probe excluded."""
    return send_command(port, "CLIENT", "LIST").count(b"id=") - 1


async def test_key_commands_share_one_connection_and_keep_their_order(store: RedisStore, redis_server: RedisProcess) -> None:
    await store.prepare()
    assert client_count(redis_server.port) == 1  # the channel, opened at start-up
    results = await asyncio.gather(
        store.set_value("gw:v:{o}", b"1", 5.0),
        store.get_value("gw:v:{o}"),
        store.set_value("gw:v:{o}", b"2", 5.0, only_if_absent=True),
        store.take_token("gw:t:{o}", 1.0, 60.0, 3),
        store.get_value("gw:v:{o}"),
        store.delete("gw:v:{o}"),
        store.get_value("gw:v:{o}"),
    )
    assert results[:3] == [True, b"1", False]
    assert results[3][:2] == (True, 2)
    assert results[4:] == [b"1", None, None]
    assert client_count(redis_server.port) == 1


async def test_an_error_reply_fails_only_its_own_command(store: RedisStore, redis_server: RedisProcess) -> None:
    await store.set_value("gw:v:{e}", b"text", 5.0)
    assert send_command(redis_server.port, "RPUSH", "gw:t:{e}", "not-a-bucket") == b":1\r\n"
    bad, good = await asyncio.gather(store.take_token("gw:t:{e}", 1.0, 1.0, 5), store.get_value("gw:v:{e}"), return_exceptions=True)
    assert isinstance(bad, StoreUnavailable) and "WRONGTYPE" in str(bad)  # the script's GET on a list
    assert good == b"text"
    assert store.healthy


async def test_a_killed_connection_is_noticed_and_the_next_call_reconnects(store: RedisStore, redis_server: RedisProcess) -> None:
    await store.take_token("gw:t:{k}", 1.0, 60.0, 5)
    killed = store._channel
    assert killed is not None and send_command(redis_server.port, "CLIENT", "KILL", "TYPE", "normal").startswith(b":")
    for _ in range(200):  # until the close reaches the gateway's side
        if killed.closed:
            break
        await asyncio.sleep(0.01)
    assert killed.closed
    allowed, remaining, _, _ = await store.take_token("gw:t:{k}", 1.0, 60.0, 5)
    assert (allowed, remaining) == (True, 3)  # reconnected: the bucket kept its count
    assert store._channel is not killed and store.healthy
    assert client_count(redis_server.port) == 1


async def test_a_killed_connection_fails_the_commands_waiting_on_it_at_once(store: RedisStore, redis_server: RedisProcess) -> None:
    await store.take_token("gw:t:{w}", 1.0, 60.0, 5)
    channel = store._channel
    assert channel is not None
    waiting = asyncio.ensure_future(channel.execute([("BLPOP", "gw:empty:{w}", "10")]))  # held by Redis for 10 s
    await asyncio.sleep(0.1)
    started = time.monotonic()
    send_command(redis_server.port, "CLIENT", "KILL", "TYPE", "normal")
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - started < 2  # the loss itself, not the command's own 10 s


async def test_a_demoted_master_drops_the_connection_to_find_the_new_one(store: RedisStore, redis_server: RedisProcess) -> None:
    await store.take_token("gw:t:{r}", 1.0, 60.0, 5)
    first = store._channel
    send_command(redis_server.port, "REPLICAOF", "127.0.0.1", "1")  # read-only now, as a failed-over master
    try:
        answer = (await asyncio.gather(store.set_value("gw:v:{r}", b"x", 5.0), return_exceptions=True))[0]
        assert isinstance(answer, StoreUnavailable) and "READONLY" in str(answer)
        assert first is not None and first.closed
    finally:
        send_command(redis_server.port, "REPLICAOF", "NO", "ONE")
    assert await store.set_value("gw:v:{r}", b"x", 5.0)
    assert store._channel is not first


async def test_a_frozen_server_s_connection_is_dropped_and_a_later_probe_reconnects(redis_server: RedisProcess) -> None:
    store = make_store(redis_server.url, timeout_s=0.05, cooldown_s=0.2)
    try:
        await store.take_token("gw:t:{z}", 1.0, 60.0, 5)
        frozen = store._channel
        redis_server.pause()
        with pytest.raises(StoreUnavailable):
            await store.take_token("gw:t:{z}", 1.0, 60.0, 5)
        for _ in range(100):  # the batch runs on to its deadline, then drops the silent connection
            if frozen is not None and frozen.closed:
                break
            await asyncio.sleep(0.02)
        assert frozen is not None and frozen.closed
        redis_server.resume()
        for _ in range(100):
            with contextlib.suppress(StoreUnavailable):
                allowed, remaining, _, _ = await store.take_token("gw:t:{z}", 1.0, 60.0, 5)
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("no take succeeded after the server resumed")
        assert allowed and store._channel is not frozen
    finally:
        redis_server.resume()
        await store.aclose()


async def test_password_and_database_from_the_url_apply_to_the_connection() -> None:
    server = start_redis()
    assert send_command(server.port, "CONFIG", "SET", "requirepass", "s3cret") == b"+OK\r\n"
    store = RedisStore.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/3", timeout_s=LOADED_MACHINE_TIMEOUT_S, clock=time.monotonic)
    try:
        assert await store.prepare()
        assert await store.set_value("gw:v:{db}", b"in-three", 5.0)
        with socket.create_connection(("127.0.0.1", server.port), timeout=1.0) as conn:
            conn.sendall(b"*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n*2\r\n$3\r\nGET\r\n$9\r\ngw:v:{db}\r\n")
            reply = b""
            while reply.count(b"\r\n") < 4:
                reply += conn.recv(65536)
        assert reply == b"+OK\r\n+OK\r\n$8\r\nin-three\r\n"
    finally:
        await store.aclose()
        server.close()
        remove_workdir(server)
