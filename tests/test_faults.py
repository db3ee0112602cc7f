"""Fault injection over loopback: what the client gets, how many upstream calls were made, and
that every request is answered exactly once within a bound.

Upstream faults come from `tests.faulty_upstream` (a raw socket server acting out a script per
connection); clients are raw sockets too, so a test counts the responses that came back on the
wire (none would be a hang, two a double answer) and whether the last one was whole. Redis is a
real `redis-server` killed and restarted under load; the SIGTERM cases run `gateway serve` as
its own process. Every wait is bounded and every process is stopped by its handle.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.faulty_upstream import Behaviour, Exchanged, exchange, faulty_upstream, request_bytes
from tests.harness import RunningGateway, gateway_process, running_gateway, simulated, upstream_config, write_config
from tests.redis_servers import RedisProcess

pytestmark = pytest.mark.timeout(60)

ROUTE = "/api/account/{account}/lambdas/{function}/invoke"
ATTEMPTS = 3
PER_TRY_S = 0.5
TOTAL_S = 4.0
BOUND_S = TOTAL_S + 3.0  # a client call that takes longer than this is a hang
BODY = b'{"payload": "fault"}'


def gateway_yaml(url: str, *, fail_max: int = 100, reset_timeout_s: float = 1.0, per_try_s: float = PER_TRY_S, total_s: float = TOTAL_S, extra: str = "") -> str:
    timeouts = f"{{connect_s: 0.5, per_try_s: {per_try_s}, total_s: {total_s}}}"
    return (
        "upstreams:\n"
        + upstream_config("up", url, "liveperson", [ROUTE], retry="quick", breaker="quick", timeouts=timeouts)
        + f"retry_policies:\n  quick: {{max_attempts: {ATTEMPTS}, base_delay_s: 0.01, max_delay_s: 0.02, budget_ratio: 10, budget_min_per_s: 100}}\n"
        + f"breaker_policies:\n  quick: {{fail_max: {fail_max}, reset_timeout_s: {reset_timeout_s}}}\n"
        + "rate_limits:\n  default: {rate: 100000, per_s: 1, burst: 100000}\n"
        + extra
    )


async def call(url: str, function: str = "f", request_id: str | None = None, bound_s: float = BOUND_S) -> Exchanged:
    headers = {"Content-Type": "application/json"} | ({"X-Request-ID": request_id} if request_id else {})
    return await exchange(url, request_bytes("POST", f"/api/account/acct/lambdas/{function}/invoke", BODY, headers), bound_s)


def problem(exchanged: Exchanged) -> dict:
    return orjson.loads(exchanged.only.body)["problem"]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]


def assert_answered_once(exchanged: Exchanged, request_id: str | None, caplog: pytest.LogCaptureFixture) -> None:
    """One response on the wire, the connection closed within the bound, one access-log line."""
    assert exchanged.closed, f"no close within {BOUND_S} s: the request was left hanging"
    assert len(exchanged.responses) == 1, exchanged.responses
    if request_id is not None:
        assert exchanged.only.headers["x-request-id"] == request_id
        assert [line["request_id"] for line in access_lines(caplog)].count(request_id) == 1


# --- faults before the response head: retried, answered once --------------------------------

RESET_ON_ACCEPT = Behaviour("reset_on_accept")
RESET_AFTER_REQUEST = Behaviour("reset_after_request")
CLOSE_AFTER_REQUEST = Behaviour("close_after_request")
HOLD_HEAD = Behaviour("hold_head", hold_s=30.0)
DRIBBLE_HEAD = Behaviour("dribble_head", interval_s=0.05)  # ~100 bytes of head: 5 s, each byte in time
TRUNCATED_500 = Behaviour("truncate_body", status=500, body=b'{"errorCode": "com.liveperson.faas.es.general", "errorMsg": "' + b"x" * 900 + b'"}', sent_bytes=40)
ANSWER = Behaviour()

# name: (script, status, problem code or None for success, connections, requests read whole)
HEAD_FAULTS = {
    "reset before the request is read, every time": ([RESET_ON_ACCEPT] * 3, 502, "gateway.upstream_unavailable", 3, 0),
    "reset before the request is read, then an answer": ([RESET_ON_ACCEPT, ANSWER], 200, None, 2, 1),
    "reset after the request is read, every time": ([RESET_AFTER_REQUEST] * 3, 502, "gateway.upstream_unavailable", 3, 3),
    "closed after the request, then an answer": ([CLOSE_AFTER_REQUEST, ANSWER], 200, None, 2, 2),
    "no response head within per_try_s, every time": ([HOLD_HEAD] * 3, 504, "gateway.upstream_timeout", 3, 3),
    "head dribbled a byte at a time, then an answer": ([DRIBBLE_HEAD, ANSWER], 200, None, 2, 2),
    "error body cut short, every time": ([TRUNCATED_500] * 3, 500, "http.500", 3, 3),  # unread body: the status speaks
}


@pytest.mark.parametrize("name", list(HEAD_FAULTS))
async def test_faults_before_the_response_head_are_retried_and_answered_once(tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str) -> None:
    script, status, code, connections, received = HEAD_FAULTS[name]
    caplog.set_level(logging.INFO, logger="gateway.access")
    request_id = uuid.uuid4().hex
    async with faulty_upstream() as upstream:
        upstream.script(*script)
        async with running_gateway(write_config(tmp_path, gateway_yaml(upstream.url))) as gw:
            exchanged = await call(gw.url, request_id=request_id)
        assert_answered_once(exchanged, request_id, caplog)
        response = exchanged.only
        assert response.status == status and response.complete
        if code is None:
            assert response.body == ANSWER.body
        else:
            assert (problem(exchanged)["code"], problem(exchanged)["attempts"]) == (code, len(script))
        assert (upstream.connections, len(upstream.received)) == (connections, received)
        assert upstream.attempts_of(request_id) == list(range(len(script) - received + 1, len(script) + 1))
        assert access_lines(caplog)[-1]["attempts"] == len(script)


async def test_a_silent_upstream_costs_per_try_s_per_attempt_never_more(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with faulty_upstream(HOLD_HEAD) as upstream:
        async with running_gateway(write_config(tmp_path, gateway_yaml(upstream.url))) as gw:
            exchanged = await call(gw.url)
    assert exchanged.only.status == 504
    assert ATTEMPTS * PER_TRY_S <= exchanged.elapsed_s < ATTEMPTS * PER_TRY_S + 2.0


# --- faults after the response head: one cut response, never retried -----------------------

SUCCESS_BODY = b'{"result": "' + b"r" * 4000 + b'"}'
STALLED = Behaviour("stall_body", body=SUCCESS_BODY, sent_bytes=1000, hold_s=30.0)
TRUNCATED = Behaviour("truncate_body", body=SUCCESS_BODY, sent_bytes=1000)


@pytest.mark.parametrize("with_id", [True, False], ids=["with-request-id", "without-request-id"])
@pytest.mark.parametrize("behaviour", [STALLED, TRUNCATED], ids=["body-stalls", "body-truncated"])
async def test_a_success_body_that_breaks_off_is_cut_not_retried_and_not_hung(tmp_path: Path, caplog: pytest.LogCaptureFixture, behaviour: Behaviour, with_id: bool) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    request_id = uuid.uuid4().hex if with_id else None
    async with faulty_upstream(behaviour) as upstream:
        async with running_gateway(write_config(tmp_path, gateway_yaml(upstream.url))) as gw:
            exchanged = await call(gw.url, request_id=request_id)
            after = await call(gw.url, "after")  # the gateway is unharmed
    assert_answered_once(exchanged, request_id, caplog)
    response = exchanged.only
    assert response.status == 200 and not response.complete
    assert response.body == SUCCESS_BODY[: len(response.body)] and len(response.body) <= behaviour.sent_bytes
    assert exchanged.elapsed_s < PER_TRY_S + 2.0  # a stall is cut after per_try_s without data
    assert len(upstream.received) == 2  # one call each: the head was out, a retry would answer twice
    assert after.only.status == 200 and not after.only.complete
    logged = access_lines(caplog)
    assert [(line["status"], line["class"], line["attempts"]) for line in logged] == [(200, "upstream_unavailable", 1)] * 2  # not a success


# --- an upstream that goes down and comes back ----------------------------------------------


async def test_upstream_down_opens_the_breaker_and_the_half_open_probe_closes_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    reset_timeout_s = 1.0
    async with faulty_upstream() as upstream:
        config = write_config(tmp_path, gateway_yaml(upstream.url, fail_max=ATTEMPTS, reset_timeout_s=reset_timeout_s))
        async with running_gateway(config) as gw:
            await upstream.go_down()
            refused = await call(gw.url)  # three refused attempts: the breaker opens
            while_open = [await call(gw.url) for _ in range(3)]
            await upstream.come_back()
            still_open = await call(gw.url)
            assert breaker_state(gw) == "open"
            await asyncio.sleep(reset_timeout_s)
            probes = await asyncio.gather(*(call(gw.url) for _ in range(5)))
            closed = [await call(gw.url) for _ in range(3)]
            state = breaker_state(gw)
    assert (refused.only.status, problem(refused)["code"], problem(refused)["attempts"]) == (502, "gateway.upstream_unavailable", ATTEMPTS)
    for answer in [*while_open, still_open]:
        assert (answer.only.status, problem(answer)["code"], problem(answer)["attempts"]) == (503, "gateway.circuit_open", 0)
        assert int(answer.only.headers["retry-after"]) >= 1
    probe_statuses = Counter(p.only.status for p in probes)
    print(f"\nfigures: down and back: probes {dict(probe_statuses)}, upstream received {len(upstream.received)}")
    assert probe_statuses[200] >= 1 and set(probe_statuses) <= {200, 503}
    assert [c.only.status for c in closed] == [200, 200, 200] and state == "closed"
    assert len(upstream.received) == probe_statuses[200] + 3  # nothing reached it while open
    assert len(access_lines(caplog)) == 1 + 3 + 1 + 5 + 3


def breaker_state(gw: RunningGateway) -> str:
    assert gw.app.services is not None
    return next(b["state"] for b in gw.app.services.breakers.snapshot() if b["function"] == "f")


# --- Redis killed and restarted under load --------------------------------------------------


OUTAGE_SOURCE = {"local": "fallback-local", "deny": "unavailable"}  # how a decision made without Redis is labelled


@pytest.mark.parametrize(("fault", "mode"), [("killed", "local"), ("killed", "deny"), ("frozen", "local")])
async def test_redis_killed_or_frozen_under_load(tmp_path: Path, caplog: pytest.LogCaptureFixture, redis_server: RedisProcess, fault: str, mode: str) -> None:
    """Killed: connections refused, then a restart with empty data. Frozen (SIGSTOP): connections
    stay open and nothing answers, so only the gateway's own Redis timeouts bound the wait."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    state = f"state: {{redis_url: '{redis_server.url}', on_redis_error: {mode}}}\n"
    async with simulated("liveperson") as sim:
        async with running_gateway(write_config(tmp_path, gateway_yaml(sim.url, extra=state))) as gw:
            load = asyncio.create_task(steady_load(gw.url, workers=6, duration_s=3.0))
            await asyncio.sleep(0.8)
            await redis_fault(redis_server, fault, down_s=0.8)
            results = await load
            results += await until_redis_is_used_again(gw, decision_sources(gw).get("redis", 0.0), within_s=5.0)
            sources = decision_sources(gw)
    sent = len(results)
    statuses = Counter(ex.only.status for _, ex in results if len(ex.responses) == 1)
    print(f"\nfigures: redis {fault} ({mode}): {sent} requests, {dict(statuses)}, {len(sim.calls)} upstream calls, sources {sources}")
    assert all(ex.closed and len(ex.responses) == 1 and ex.only.complete for _, ex in results)
    lines = {line["request_id"]: line for line in access_lines(caplog)}
    assert set(lines) == {rid for rid, _ in results} and len(access_lines(caplog)) == sent
    assert sum(line["attempts"] for line in lines.values()) == len(sim.calls)
    assert OUTAGE_SOURCE[mode] in sources  # the outage was seen (and Redis came back in use: until_redis_is_used_again)
    if mode == "local":
        assert statuses == {200: sent}
    else:
        refused = [ex for _, ex in results if ex.only.status == 503]
        assert set(statuses) == {200, 503} and refused
        assert {problem(ex)["code"] for ex in refused} == {"gateway.ratelimit_unavailable"}
        assert {problem(ex)["attempts"] for ex in refused} == {0}
        # when to come back: the outage cool-down left (1 s here), never less than a second
        assert {ex.only.headers.get("retry-after") for ex in refused} == {"1"}
    assert len(sim.calls) == statuses[200]


async def redis_fault(redis_server: RedisProcess, fault: str, down_s: float) -> None:
    if fault == "killed":
        redis_server.kill()
        await asyncio.sleep(down_s)
        await asyncio.to_thread(redis_server.restart)
    else:
        redis_server.pause()
        await asyncio.sleep(down_s)
        redis_server.resume()


async def steady_load(url: str, workers: int, duration_s: float) -> list[tuple[str, Exchanged]]:
    """`workers` loops of one request per fresh connection until `duration_s` has passed."""
    deadline = time.monotonic() + duration_s
    results: list[tuple[str, Exchanged]] = []

    async def worker() -> None:
        while time.monotonic() < deadline:
            results.append(await one_request(url))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return results


async def one_request(url: str) -> tuple[str, Exchanged]:
    request_id = uuid.uuid4().hex
    return request_id, await call(url, "ok", request_id=request_id)


async def until_redis_is_used_again(gw: RunningGateway, redis_decisions: float, within_s: float) -> list[tuple[str, Exchanged]]:
    """Requests one at a time until one is decided in Redis again (the store's cool-down ends)."""
    deadline = time.monotonic() + within_s
    results = []
    while decision_sources(gw).get("redis", 0.0) <= redis_decisions:
        assert time.monotonic() < deadline, f"Redis not used again within {within_s} s of coming back"
        results.append(await one_request(gw.url))
        await asyncio.sleep(0.05)
    return results


def decision_sources(gw: RunningGateway) -> dict[str, float]:
    assert gw.app.services is not None
    counts: Counter[str] = Counter()
    for labels, value in gw.app.services.metrics.counts("gateway_ratelimit_decisions"):
        counts[labels["source"]] += value
    return dict(counts)


# --- SIGTERM with requests in flight --------------------------------------------------------


async def test_sigterm_finishes_every_request_in_flight_within_the_grace(tmp_path: Path) -> None:
    in_flight = 8
    async with faulty_upstream(Behaviour(delay_s=1.5)) as upstream:
        config = write_config(tmp_path, gateway_yaml(upstream.url, per_try_s=5, total_s=10, extra="server: {shutdown_grace_s: 10}\n"))
        with gateway_process(config) as gw:
            ids = [uuid.uuid4().hex for _ in range(in_flight)]
            calls = [asyncio.create_task(call(gw.url, request_id=rid)) for rid in ids]
            await wait_for(lambda: len(upstream.received) == in_flight, 10)
            gw.process.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*calls)
            exit_code = await asyncio.to_thread(gw.process.wait, 15)
            log = gw.log()
    print(f"\nfigures: SIGTERM with {in_flight} in flight: statuses {[r.only.status for r in results]}, slowest {max(r.elapsed_s for r in results):.2f} s")
    assert [(r.closed, len(r.responses), r.only.status, r.only.complete) for r in results] == [(True, 1, 200, True)] * in_flight
    assert [r.only.headers["x-request-id"] for r in results] == ids
    logged = [orjson.loads(line) for line in log.splitlines() if line.startswith('{"time"') and '"request_id"' in line]
    assert sorted(line["request_id"] for line in logged) == sorted(ids)
    assert {line["status"] for line in logged} == {200}
    assert len(upstream.received) == in_flight
    assert exit_code in (0, -signal.SIGTERM)


async def test_sigterm_past_the_grace_answers_what_is_left_with_the_envelope(tmp_path: Path) -> None:
    grace_s = 1.0
    async with faulty_upstream(Behaviour(delay_s=20.0)) as upstream:
        config = write_config(tmp_path, gateway_yaml(upstream.url, per_try_s=30, total_s=30, extra=f"server: {{shutdown_grace_s: {grace_s}}}\n"))
        with gateway_process(config) as gw:
            ids = [uuid.uuid4().hex for _ in range(3)]
            calls = [asyncio.create_task(call(gw.url, request_id=rid, bound_s=15)) for rid in ids]
            await wait_for(lambda: len(upstream.received) == 3, 10)
            stopped_at = time.monotonic()
            gw.process.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*calls)
            exit_code = await asyncio.to_thread(gw.process.wait, 15)
            took_s = time.monotonic() - stopped_at
            log = gw.log()
    assert all(r.closed and len(r.responses) == 1 and r.only.complete for r in results)
    assert [(r.only.status, problem(r)["code"], problem(r)["attempts"], r.only.headers["x-request-id"]) for r in results] == [(503, "gateway.shutting_down", 1, rid) for rid in ids]
    logged = [orjson.loads(line) for line in log.splitlines() if line.startswith('{"time"') and '"request_id"' in line]
    assert sorted((line["request_id"], line["status"], line["class"]) for line in logged) == sorted((rid, 503, "gateway_error") for rid in ids)
    assert grace_s <= took_s < grace_s + 5.0
    assert exit_code in (0, -signal.SIGTERM)


async def wait_for(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
