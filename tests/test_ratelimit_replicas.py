"""Rate limiting across replicas and through Redis outages, end to end over real sockets.

Two gateway processes (``python -m gateway serve``), and one process with two workers, share
one redis-server and must enforce one bucket per account between them. Then Redis is killed
(SIGKILL) or frozen (SIGSTOP) while traffic flows through two in-process gateways, for each
``on_redis_error`` mode: what the clients see, what it costs them per request, what
``/readyz`` says, and that shared enforcement comes back by itself once Redis does.

Latency figures are printed (run with ``-s`` to see them); the assertions on them are loose
sanity bounds, never performance thresholds.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.harness import GatewayProcess, RunningGateway, gateway_process, running_gateway, write_config
from tests.redis_servers import RedisProcess
from tests.test_ratelimit_pipeline import (
    OVERRIDES,
    SLOW,
    Upstreams,
    all_upstreams,
    decisions_by_source,
    expected_statuses,
    gateway_yaml,
    lp_path,
    remaining_of,
    statuses,
)

BUSY = "busy"  # an account with a burst no test exhausts: its traffic measures latency only
BUSY_BUCKET = {"rate": 1, "per_s": 3600, "burst": 1_000_000}
REDIS_TIMEOUT_S = 0.05
RECOVERY_LIMIT_S = 10.0


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    async with all_upstreams() as found:
        yield found


def replica_yaml(upstreams: Upstreams, redis_url: str, on_redis_error: str = "local", redis_timeout_s: float = 0.5) -> str:
    text = gateway_yaml(upstreams, redis_url=redis_url, on_redis_error=on_redis_error, redis_timeout_s=redis_timeout_s)
    return "server: {shutdown_grace_s: 1}\n" + text + f"    {BUSY}: {{rate: 1, per_s: 3600, burst: {BUSY_BUCKET['burst']}}}\n"


# --- replicas sharing one Redis -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def processes(configs: list[tuple[Path, int]]) -> AsyncIterator[list[GatewayProcess]]:
    """Start `gateway serve` processes in parallel (startup blocks, so in threads); stop them all."""
    managers = [gateway_process(path, workers=workers) for path, workers in configs]
    entered = await asyncio.gather(*(asyncio.to_thread(m.__enter__) for m in managers), return_exceptions=True)
    try:
        for result in entered:
            if isinstance(result, BaseException):
                raise result
        yield list(entered)
    finally:
        await asyncio.gather(*(asyncio.to_thread(m.__exit__, None, None, None) for m, r in zip(managers, entered) if not isinstance(r, BaseException)))


async def alternate(clients: list[httpx.AsyncClient], path: str, count: int, **kwargs: Any) -> list[httpx.Response]:
    return [await clients[n % len(clients)].post(path, json={"n": n}, **kwargs) for n in range(count)]


async def enforce_one_bucket_between(urls: list[str], upstreams: Upstreams, keepalive: bool = True) -> int:
    """Sequential, concurrent and anonymous traffic spread over `urls` sees exactly one bucket
    each; returns how many rate-limit decisions it asked for."""
    limits = httpx.Limits() if keepalive else httpx.Limits(max_keepalive_connections=0)  # a new connection, maybe a new worker, per request
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=30, limits=limits)) for url in urls]
        sequential = await alternate(clients, lp_path("acct-seq"), SLOW["burst"] + 3)
        vip = await alternate(clients, lp_path("vip"), OVERRIDES["vip"]["burst"] + 3)
        calls_before = upstreams.lp.count("acct-conc")
        concurrent = await asyncio.gather(*(clients[n % len(clients)].post(lp_path("acct-conc")) for n in range(24)))
        anonymous = await alternate(clients, "/web/ok", SLOW["burst"] + 3)
    assert statuses(sequential) == expected_statuses(SLOW["burst"], SLOW["burst"] + 3)
    assert [remaining_of(r) for r in sequential[: SLOW["burst"]]] == list(range(SLOW["burst"] - 1, -1, -1))
    assert statuses(vip) == expected_statuses(OVERRIDES["vip"]["burst"], OVERRIDES["vip"]["burst"] + 3)
    assert sorted(statuses(list(concurrent))) == expected_statuses(SLOW["burst"], 24)
    assert upstreams.lp.count("acct-conc") - calls_before == SLOW["burst"]
    assert statuses(anonymous) == expected_statuses(SLOW["burst"], SLOW["burst"] + 3)
    return len(sequential) + len(vip) + len(concurrent) + len(anonymous)


async def scrape_decisions(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        return decisions_by_source((await client.get("/metrics")).text)


async def test_two_gateway_processes_share_one_bucket_per_account(tmp_path: Path, upstreams: Upstreams, redis_server: RedisProcess) -> None:
    config = write_config(tmp_path, replica_yaml(upstreams, redis_server.url))
    async with processes([(config, 1), (config, 1)]) as (first, second):
        decisions = await enforce_one_bucket_between([first.url, second.url], upstreams)
        per_process = [await scrape_decisions(p.url) for p in (first, second)]
    assert all(set(counts) == {"redis"} for counts in per_process)
    assert sum(counts["redis"] for counts in per_process) == decisions


async def test_one_process_with_two_workers_shares_one_bucket(tmp_path: Path, upstreams: Upstreams, redis_server: RedisProcess) -> None:
    config = write_config(tmp_path, replica_yaml(upstreams, redis_server.url))
    async with processes([(config, 2)]) as (served,):
        decisions = await enforce_one_bucket_between([served.url], upstreams, keepalive=False)
        # The kernel hands each new connection to whichever worker accepts first; on a busy
        # machine one may win them all for a while. More buckets, each on fresh connections,
        # until both workers have decided within one of them.
        fresh = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=served.url, timeout=30, limits=fresh) as client:
            for extra in range(20):
                await asyncio.sleep(0.05)  # the last access lines follow their responses
                if len(deciding_pids(served.log())) == 2:
                    break
                more = await alternate([client], lp_path(f"acct-more-{extra}"), SLOW["burst"] + 2)
                assert statuses(more) == expected_statuses(SLOW["burst"], SLOW["burst"] + 2)
                decisions += len(more)
        scrapes = [await scrape_decisions(served.url) for _ in range(6)]  # on either worker: the sum of both
        pids = deciding_pids(served.log())
    assert len(pids) == 2, "only one worker ever answered"
    assert scrapes == [{"redis": float(decisions)}] * len(scrapes)  # both decided, all through Redis, one bucket


def deciding_pids(log: str) -> set[int]:
    """The workers that wrote access lines (every request here took a rate-limit decision)."""
    return {orjson.loads(line)["pid"] for line in log.splitlines() if line.startswith('{"time"') and '"request_id"' in line}


# --- Redis in trouble under traffic -----------------------------------------------------------------


@dataclass
class Sample:
    phase: str
    status: int
    latency_s: float
    code: str | None


@dataclass
class Traffic:
    """Concurrent clients posting for the busy account through every gateway, phase-tagged."""

    clients: list[httpx.AsyncClient]
    phase: str = "up"
    samples: list[Sample] = field(default_factory=list)
    _running: bool = False
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, per_client: int = 2) -> None:
        self._running = True
        self._tasks = [asyncio.create_task(self._loop(c)) for c in self.clients for _ in range(per_client)]

    async def stop(self) -> None:
        self._running = False
        await asyncio.gather(*self._tasks)

    async def _loop(self, client: httpx.AsyncClient) -> None:
        while self._running:
            phase, started = self.phase, time.perf_counter()
            response = await client.post(lp_path(BUSY), json={"n": 1})
            code = None if response.status_code == 200 else response.json()["problem"]["code"]
            # A request in flight while the phase changed belongs to neither phase.
            self.samples.append(Sample(phase if phase == self.phase else "between", response.status_code, time.perf_counter() - started, code))
            await asyncio.sleep(0.002)

    def of(self, phase: str) -> list[Sample]:
        return [s for s in self.samples if s.phase == phase]


def latency_report(label: str, traffic: Traffic) -> dict[str, float]:
    """Median and worst latency per phase in ms, printed for the record."""
    figures = {}
    for phase in ("up", "between", "down", "recovering", "back"):
        latencies = sorted(s.latency_s * 1000 for s in traffic.of(phase))
        if latencies:
            figures[f"{phase}_p50"] = statistics.median(latencies)
            figures[f"{phase}_p99"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            figures[f"{phase}_max"] = latencies[-1]
            figures[f"{phase}_n"] = len(latencies)
    print(f"\n{label}: " + ", ".join(f"{k}={v:.1f}" if not k.endswith("_n") else f"{k}={int(v)}" for k, v in figures.items()))
    return figures


async def redis_decisions(client: httpx.AsyncClient) -> float:
    return decisions_by_source((await client.get("/metrics")).text).get("redis", 0.0)


async def fallback_decisions(clients: list[httpx.AsyncClient]) -> float:
    """Decisions made without Redis so far, summed over the gateways."""
    total = 0.0
    for client in clients:
        by_source = decisions_by_source((await client.get("/metrics")).text)
        total += sum(count for source, count in by_source.items() if source != "redis")
    return total


async def shared_burst(clients: list[httpx.AsyncClient], account: str, count: int) -> list[int]:
    """Statuses of `count` requests alternating over the gateways, all decided by Redis.

    With a 50 ms Redis timeout, a test machine that stalls the event loop longer makes a
    healthy Redis look slow, and the store rightly steps aside for a cool-down. Such a burst
    proves nothing about sharing, so it is repeated (with a fresh account) once Redis is back.
    """
    for attempt in range(3):
        before = await fallback_decisions(clients)
        answers = statuses(await alternate(clients, lp_path(f"{account}-{attempt}"), count))
        if await fallback_decisions(clients) == before:
            return answers
        print(f"{account}: a Redis call timed out during the burst (loaded machine); trying again")
        await wait_for(lambda: all_resumed(clients), RECOVERY_LIMIT_S, "shared enforcement to resume")
    raise AssertionError("Redis kept timing out: no burst was decided by Redis alone")


async def wait_for(predicate: Callable[[], Any], limit_s: float, what: str) -> float:
    """Poll an async predicate every 20 ms; the seconds it took."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > limit_s:
            raise AssertionError(f"{what} did not happen within {limit_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def two_gateways(tmp_path: Path, upstreams: Upstreams, redis_url: str, on_redis_error: str) -> AsyncIterator[tuple[list[RunningGateway], list[httpx.AsyncClient]]]:
    config = replica_yaml(upstreams, redis_url, on_redis_error, REDIS_TIMEOUT_S)
    path_a, path_b = write_config(tmp_path, config, "a.yaml"), write_config(tmp_path, config, "b.yaml")
    async with running_gateway(path_a) as a, running_gateway(path_b) as b, a.client() as client_a, b.client() as client_b:
        yield [a, b], [client_a, client_b]


OUTAGE_EXPECTATIONS = {
    # mode: (statuses for one fresh account's burst+1 requests through each gateway while Redis is down, code)
    "local": (expected_statuses(SLOW["burst"], SLOW["burst"] + 1), "gateway.rate_limited"),
    "allow": ([200] * (SLOW["burst"] + 1), None),
    "deny": ([503] * (SLOW["burst"] + 1), "gateway.ratelimit_unavailable"),
}


@pytest.mark.parametrize("on_redis_error", ["local", "allow", "deny"])
async def test_redis_killed_mid_traffic(tmp_path: Path, upstreams: Upstreams, redis_server: RedisProcess, on_redis_error: str) -> None:
    async with two_gateways(tmp_path, upstreams, redis_server.url, on_redis_error) as (_, clients):
        assert [(await c.get("/readyz")).status_code for c in clients] == [200, 200]
        traffic = Traffic(clients)
        traffic.start()
        await asyncio.sleep(0.3)
        hiccups = {"up": await fallback_decisions(clients)}
        redis_server.kill()
        traffic.phase = "down"
        await asyncio.sleep(0.5)
        await traffic.stop()
        readiness = [await c.get("/readyz") for c in clients]
        calls_before = upstreams.lp.count("during-outage")
        during = [statuses(await alternate([c], lp_path("during-outage"), SLOW["burst"] + 1)) for c in clients]
        calls_during = upstreams.lp.count("during-outage") - calls_before
        refused = await clients[0].post(lp_path("during-outage"))

        redis_server.start()
        traffic.phase = "recovering"  # until the store's cool-down ends and its probe succeeds
        traffic.start()
        recovery_s = await wait_for(lambda: all_resumed(clients), RECOVERY_LIMIT_S, "shared enforcement to resume")
        back_mark = await fallback_decisions(clients)
        traffic.phase = "back"
        await asyncio.sleep(0.2)
        await traffic.stop()
        hiccups["back"] = await fallback_decisions(clients) - back_mark
        shared_again = await shared_burst(clients, "after-outage", SLOW["burst"] + 3)
        ready_again = [(await c.get("/readyz")).status_code for c in clients]

    figures = latency_report(f"redis killed, on_redis_error={on_redis_error}, resumed after {recovery_s * 1000:.0f} ms", traffic)
    expected_during, expected_code = OUTAGE_EXPECTATIONS[on_redis_error]
    assert during == [expected_during, expected_during]  # per process: `local` multiplies by the replica count
    assert calls_during == sum(status == 200 for status in expected_during) * len(clients)
    assert refused.status_code in (429, 503) or on_redis_error == "allow"
    if expected_code:
        assert refused.json()["problem"]["code"] == expected_code
    assert [r.status_code for r in readiness] == [503, 503]
    assert {r.json()["redis"] for r in readiness} == {"unreachable"}
    assert shared_again == expected_statuses(SLOW["burst"], SLOW["burst"] + 3)
    assert ready_again == [200, 200]
    assert_traffic_answers(traffic, on_redis_error, hiccups)
    assert figures["down_max"] < 1000 * (REDIS_TIMEOUT_S * 4 + 1.0)  # sanity bound; figures printed above


async def resumed_by_request(client: httpx.AsyncClient) -> bool:
    """Whether one more request is decided by Redis (a request is what probes a resting store)."""
    mark = await redis_decisions(client)
    await client.post(lp_path(BUSY))
    return await redis_decisions(client) > mark


async def all_resumed(clients: list[httpx.AsyncClient]) -> bool:
    return all([await resumed_by_request(client) for client in clients])


def assert_traffic_answers(traffic: Traffic, on_redis_error: str, hiccups: dict[str, float]) -> None:
    """No request ever fails for a reason other than the mode's own answer.

    While Redis is up every request passes, unless the metrics show that a Redis call timed
    out then (a loaded machine, see `shared_burst`): `deny` may then answer 503 as designed.
    """
    for phase in ("up", "back"):
        if hiccups[phase]:
            print(f"{phase}: {hiccups[phase]:.0f} decisions fell back while Redis was up (loaded machine)")
        allowed = {200, 503} if hiccups[phase] and on_redis_error == "deny" else {200}
        assert {s.status for s in traffic.of(phase)} <= allowed
    down = traffic.of("down")
    assert len(down) > 10
    assert {s.status for s in traffic.of("between")} <= {200, 503 if on_redis_error == "deny" else 200}
    if on_redis_error == "deny":
        assert {(s.status, s.code) for s in down[-10:]} == {(503, "gateway.ratelimit_unavailable")}
        assert {s.status for s in down} <= {200, 503}  # a reply already on its way may still pass
        assert {s.status for s in traffic.of("recovering")} <= {200, 503}  # denied until the probe succeeds
    else:
        assert {s.status for s in down + traffic.of("recovering")} == {200}


async def test_frozen_redis_costs_a_request_at_most_one_timeout(tmp_path: Path, upstreams: Upstreams, redis_server: RedisProcess) -> None:
    async with two_gateways(tmp_path, upstreams, redis_server.url, "local") as (_, clients):
        traffic = Traffic(clients)
        traffic.start()
        await asyncio.sleep(0.3)
        redis_server.pause()  # connections stay open, nothing answers: only timeouts can tell
        traffic.phase = "down"
        await asyncio.sleep(0.5)
        readiness = [(await c.get("/readyz")).status_code for c in clients]
        during = statuses(await alternate(clients[:1], lp_path("frozen"), SLOW["burst"] + 1))
        redis_server.resume()
        traffic.phase = "recovering"
        recovery_s = await wait_for(lambda: all_resumed(clients), RECOVERY_LIMIT_S, "shared enforcement to resume")
        traffic.phase = "back"
        await asyncio.sleep(0.2)
        await traffic.stop()
        shared_again = await shared_burst(clients, "after-freeze", SLOW["burst"] + 3)
    figures = latency_report(f"redis frozen, on_redis_error=local, resumed after {recovery_s * 1000:.0f} ms", traffic)
    slow = [s.latency_s for s in traffic.of("down") if s.latency_s > REDIS_TIMEOUT_S]
    print(f"requests slower than the {REDIS_TIMEOUT_S * 1000:.0f} ms Redis timeout while frozen: {len(slow)} of {len(traffic.of('down'))}")
    assert readiness == [503, 503]
    assert during == expected_statuses(SLOW["burst"], SLOW["burst"] + 1)
    assert shared_again == expected_statuses(SLOW["burst"], SLOW["burst"] + 3)
    assert {s.status for s in traffic.samples} == {200}
    # Until the first batch reaches its deadline (four timeouts) each request waits one timeout;
    # then the outage breaker sends every request past Redis, bar a probe's after the cool-down.
    concurrent_callers = 2 * len(clients)
    assert len(slow) <= concurrent_callers * (4 + 1)
    assert figures["down_max"] < 1000 * (REDIS_TIMEOUT_S * 4 + 1.0)  # sanity bound; figures printed above


async def test_a_restarted_redis_is_used_at_once_by_every_pooled_connection(tmp_path: Path, upstreams: Upstreams, redis_server: RedisProcess) -> None:
    """Connections the dead server left in the pool are replaced, not failed one by one."""
    path = write_config(tmp_path, replica_yaml(upstreams, redis_server.url, "local"))
    async with running_gateway(path) as gateway, gateway.client() as client:
        for _ in range(3):  # the pool grows to one connection per concurrent request
            await asyncio.gather(*(client.post(lp_path(BUSY)) for _ in range(8)))
        redis_server.kill()
        await client.post(lp_path(BUSY))
        redis_server.start()
        await wait_for(lambda: resumed_by_request(client), RECOVERY_LIMIT_S, "shared enforcement to resume")
        before = await fallback_decisions([client])
        for _ in range(3):
            answers = await asyncio.gather(*(client.post(lp_path(BUSY)) for _ in range(8)))
            assert statuses(list(answers)) == [200] * 8
        assert await fallback_decisions([client]) == before
