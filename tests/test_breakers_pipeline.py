"""Breakers in the running gateway, over real loopback sockets (issue 5).

What counts (5xx, 502-504, per-try timeouts, refused connections) and what does not
(function errors, client errors, throttles); the open answer in every dialect; half-open
with one probe among 50 concurrent requests; keys per function and per upstream; retries
that stop at an open breaker; cancelled requests; and the operations surface (admin
listing and reset, metrics, one log line per transition).

A request with `max_attempts: 1` makes exactly one upstream call, so failures can be counted
one by one; `GatedUpstream` holds requests until the test lets them go, so "while the probe
is in flight" and "while the upstream is slow" need no sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.breakers import PROBE_RETRY_AFTER_S, UPSTREAM_WIDE
from gateway.simulators import Reply, SimulatedUpstream
from tests.harness import RunningGateway, free_port, running_gateway, simulated, upstream_config, write_config

FAIL_MAX = 3
RETRIES = 3  # max_attempts of the `thrice` policy
FIFTY = 50
ADMIN_TOKEN = "breaker-admin-token"
WAIT_S = 10.0  # upper bound for conditions polled in the background; never a performance bound

ROUTES = {
    "liveperson": "/api/account/{account}/lambdas/{function}/invoke",
    "lambda": "/2015-03-31/functions/{function}/invocations",
    "yuanrong": "/serverless/v1/functions/{function}/invocations",
    "http": "/web/{function}",
}
COUNTED = {"server_error", "upstream_unavailable", "upstream_timeout"}


def config_text(url: str, dialect: str, *, retry: str = "once", fail_max: int = FAIL_MAX, reset_timeout_s: float = 30.0, scope: str = "function", per_try_s: float = 5.0) -> str:
    timeouts = f"{{connect_s: 1.0, per_try_s: {per_try_s}, total_s: 30.0}}"
    upstream = upstream_config("up", url, dialect, [ROUTES[dialect]], retry=retry, breaker="tight", rate_limited="false", timeouts=timeouts)
    return (
        "retry_policies:\n"
        "  once: {max_attempts: 1}\n"
        f"  thrice: {{max_attempts: {RETRIES}, base_delay_s: 0.01, max_delay_s: 0.02, budget_ratio: 1.0, budget_min_per_s: 100}}\n"
        "breaker_policies:\n"
        f"  tight: {{fail_max: {fail_max}, reset_timeout_s: {reset_timeout_s}, scope: {scope}}}\n"
        "upstreams:\n" + upstream
    )


@dataclass
class Proxy:
    """The gateway under test, a client for it, and views of its breakers."""

    gateway: RunningGateway
    client: httpx.AsyncClient
    dialect: str

    def path(self, function: str) -> str:
        return ROUTES[self.dialect].format(account="le1", function=function)

    async def call(self, function: str, query: str = "") -> httpx.Response:
        url = self.path(function) + (f"?{query}" if query else "")
        return await self.client.post(url, json={"payload": {"n": 1}})

    def breaker(self, function: str) -> dict[str, Any]:
        """The registry's own view of one breaker (the admin listing is tested separately)."""
        services = self.gateway.app.services
        assert services is not None
        (entry,) = [e for e in services.breakers.snapshot() if e["function"] == function]
        return entry

    def answered(self, status: str | None = None) -> float:
        """Requests the gateway has finished with (answered or abandoned), with `status` if given."""
        services = self.gateway.app.services
        assert services is not None
        return sum(
            sample.value
            for metric in services.metrics.registry.collect()
            for sample in metric.samples
            if sample.name == "gateway_requests_total" and status in (None, sample.labels["status"])
        )

    async def admin(self, method: str, path: str, token: str | None = ADMIN_TOKEN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return await self.client.request(method, path, headers=headers)


@contextlib.asynccontextmanager
async def proxy(tmp_path: Path, url: str, dialect: str = "liveperson", **policy: Any) -> AsyncIterator[Proxy]:
    path = write_config(tmp_path, config_text(url, dialect, **policy))
    async with running_gateway(path) as gateway, gateway.client() as client:
        yield Proxy(gateway, client, dialect)


class GatedUpstream:
    """A LivePerson-like upstream that holds every request until the gate opens.

    Answers `status` (200 success, else an LP `es.unavailable` error) once the gate is open;
    `arrived` counts requests, `held` those waiting at the gate.
    """

    def __init__(self) -> None:
        self.arrived = 0
        self.held = 0
        self.status = 200
        self.gate = asyncio.Event()
        self.gate.set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> GatedUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self.gate.set()  # let held handlers finish so that the server stops at once
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrived += 1
        self.held += 1
        try:
            await self.gate.wait()
        finally:
            self.held -= 1
        if self.status == 200:
            return web.json_response({"result": "ok"})
        body = {"errorCode": "com.liveperson.faas.es.unavailable", "errorMsg": "Could not reach remote system"}
        return web.json_response(body, status=self.status)


@contextlib.asynccontextmanager
async def gated() -> AsyncIterator[GatedUpstream]:
    upstream = await GatedUpstream().start()
    try:
        yield upstream
    finally:
        await upstream.stop()


def calls_to(upstream: SimulatedUpstream, gw: Proxy, function: str) -> int:
    return sum(1 for call in upstream.calls if call.path == gw.path(function))


def problem_of(response: httpx.Response, dialect: str) -> dict[str, Any]:
    body = response.json()
    return body if dialect == "http" else body["problem"]


def assert_circuit_open(response: httpx.Response, dialect: str = "liveperson") -> dict[str, Any]:
    assert response.status_code == 503, response.text
    problem = problem_of(response, dialect)
    assert problem["class"] == "circuit_open"
    assert problem["code"] == "gateway.circuit_open"
    assert problem["attempts"] == 0
    assert problem["retryable"] is True
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-request-id"] == problem["request_id"]
    return problem


async def until(condition: Any, what: str, timeout_s: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


# --- what opens it ---------------------------------------------------------------------


FAILURES = {
    # kind: (function, query, scripted reply, per_try_s, class)
    "500": ("crash", "", None, 5.0, "server_error"),
    "502": ("ok", "", Reply(502, b"bad gateway", (("Content-Type", "text/plain"),)), 5.0, "upstream_unavailable"),
    "503": ("down", "", None, 5.0, "upstream_unavailable"),
    "504": ("ok", "", Reply(504, b"gateway timeout", (("Content-Type", "text/plain"),)), 5.0, "upstream_timeout"),
    "per-try timeout": ("slow", "delay=1", None, 0.1, "upstream_timeout"),
}


@pytest.mark.parametrize("kind", list(FAILURES))
async def test_fail_max_counted_failures_open_it_and_then_nothing_reaches_the_upstream(tmp_path: Path, kind: str) -> None:
    function, query, reply, per_try_s, error_class = FAILURES[kind]
    async with simulated("liveperson") as upstream, proxy(tmp_path, upstream.url, per_try_s=per_try_s) as gw:
        if reply is not None:
            upstream.script(*[reply] * FAIL_MAX)
        for n in range(1, FAIL_MAX + 1):
            response = await gw.call(function, query)
            assert problem_of(response, "liveperson")["class"] == error_class
            assert gw.breaker(function)["state"] == ("open" if n == FAIL_MAX else "closed")
        assert calls_to(upstream, gw, function) == FAIL_MAX
        for _ in range(3):
            assert_circuit_open(await gw.call(function, query))
        assert calls_to(upstream, gw, function) == FAIL_MAX


async def test_refused_connections_count_and_the_open_breaker_calls_nobody(tmp_path: Path) -> None:
    port = free_port()
    async with proxy(tmp_path, f"http://127.0.0.1:{port}") as gw:
        for _ in range(FAIL_MAX):
            response = await gw.call("f")
            assert response.status_code == 502
            assert problem_of(response, "liveperson")["code"] == "gateway.upstream_unavailable"
        assert gw.breaker("f")["state"] == "open"
        async with simulated("liveperson", port=port) as upstream:  # the upstream is back...
            for _ in range(3):
                assert_circuit_open(await gw.call("f"))
            assert upstream.calls == []  # ...but the open breaker does not look


async def test_with_retries_on_the_breaker_opens_mid_request_and_the_retries_stop(tmp_path: Path) -> None:
    fail_max = RETRIES + 2  # opens during the second request's attempts
    async with simulated("liveperson") as upstream, proxy(tmp_path, upstream.url, retry="thrice", fail_max=fail_max) as gw:
        first = await gw.call("down")
        assert problem_of(first, "liveperson")["attempts"] == RETRIES
        assert gw.breaker("down")["failures"] == RETRIES

        second = await gw.call("down")  # its attempts open the breaker; the next one is not made
        problem = problem_of(second, "liveperson")
        assert second.status_code == 503
        assert problem["class"] == "upstream_unavailable"  # the last upstream outcome, not circuit_open
        assert problem["attempts"] == fail_max - RETRIES
        assert second.json()["errorCode"] == "com.liveperson.faas.es.unavailable"
        assert calls_to(upstream, gw, "down") == fail_max
        assert gw.breaker("down")["state"] == "open"

        assert_circuit_open(await gw.call("down"))
        assert calls_to(upstream, gw, "down") == fail_max


# --- the open answer, per dialect ----------------------------------------------------------


@pytest.mark.parametrize("dialect", list(ROUTES))
async def test_the_open_answer_says_how_long_it_stays_open_in_the_routes_dialect(tmp_path: Path, dialect: str) -> None:
    async with simulated(dialect) as upstream, proxy(tmp_path, upstream.url, dialect) as gw:
        for _ in range(FAIL_MAX):
            assert problem_of(await gw.call("crash"), dialect)["class"] == "server_error"
        before_s = gw.breaker("crash")["open_remaining_s"]
        response = await gw.call("crash")
        after_s = gw.breaker("crash")["open_remaining_s"]
        problem = assert_circuit_open(response, dialect)
        assert math.ceil(after_s) <= int(response.headers["retry-after"]) <= math.ceil(before_s)
        assert problem["upstream"] == "up"
        assert "crash" in problem["detail"]
        body = response.json()
        content_type = response.headers["content-type"]
        if dialect == "liveperson":
            assert (body["errorCode"], body["errorMsg"]) == (problem["code"], problem["detail"])
        elif dialect == "lambda":
            assert response.headers["x-amzn-errortype"] == body["__type"]
            assert body["message"] == problem["detail"]
        elif dialect == "yuanrong":
            assert response.headers["x-inner-code"] == str(body["code"])
            assert body["message"] == problem["detail"]
        else:
            assert content_type == "application/problem+json"
            assert "problem" not in body
        assert content_type.startswith("application/problem+json" if dialect == "http" else "application/json")
        assert calls_to(upstream, gw, "crash") == FAIL_MAX


# --- what does not open it -------------------------------------------------------------------


async def test_fifty_function_errors_in_a_row_never_open_it(tmp_path: Path) -> None:
    async with simulated("liveperson") as upstream, proxy(tmp_path, upstream.url) as gw:
        for _ in range(FIFTY):
            response = await gw.call("fail")
            assert response.status_code == 901
            assert problem_of(response, "liveperson")["class"] == "function_error"
        assert calls_to(upstream, gw, "fail") == FIFTY
        assert (gw.breaker("fail")["state"], gw.breaker("fail")["failures"]) == ("closed", 0)


@pytest.mark.parametrize(("function", "status"), [("badinput", 400), ("missing", 404)])
async def test_client_errors_never_open_it(tmp_path: Path, function: str, status: int) -> None:
    async with simulated("liveperson") as upstream, proxy(tmp_path, upstream.url) as gw:
        for _ in range(FAIL_MAX * 3):
            assert (await gw.call(function)).status_code == status
        assert calls_to(upstream, gw, function) == FAIL_MAX * 3
        assert (gw.breaker(function)["state"], gw.breaker(function)["failures"]) == ("closed", 0)


@pytest.mark.parametrize("behaviour", ["fail", "timeout", "badinput", "missing"])
async def test_an_answer_that_shows_the_platform_is_up_resets_the_count(tmp_path: Path, behaviour: str) -> None:
    """`fail`/`timeout` are the function's own failure and time-out (901), the others 4xx."""
    async with simulated("liveperson") as upstream, proxy(tmp_path, upstream.url) as gw:
        upstream.script(*[Reply.json(500, {"errorCode": "com.liveperson.faas.es.general", "errorMsg": "x"})] * (FAIL_MAX - 1))
        for _ in range(FAIL_MAX - 1):
            await gw.call(behaviour)
        assert gw.breaker(behaviour)["failures"] == FAIL_MAX - 1
        assert problem_of(await gw.call(behaviour), "liveperson")["class"] not in COUNTED
        assert gw.breaker(behaviour)["failures"] == 0
        upstream.script(*[Reply.json(500, {"errorCode": "com.liveperson.faas.es.general", "errorMsg": "x"})] * FAIL_MAX)
        for _ in range(FAIL_MAX - 1):
            await gw.call(behaviour)
        assert gw.breaker(behaviour)["state"] == "closed"
        await gw.call(behaviour)
        assert gw.breaker(behaviour)["state"] == "open"


async def test_a_throttle_neither_counts_nor_resets_the_count(tmp_path: Path) -> None:
    async with simulated("liveperson") as upstream, proxy(tmp_path, upstream.url) as gw:
        crash = Reply.json(500, {"errorCode": "com.liveperson.faas.es.general", "errorMsg": "x"})
        throttle = Reply.json(429, {"errorCode": "com.liveperson.faas.es.ratelimit", "errorMsg": "slow down"})
        upstream.script(*[throttle] * (FAIL_MAX * 3))
        for _ in range(FAIL_MAX * 3):
            assert problem_of(await gw.call("f"), "liveperson")["class"] == "rate_limited"
        assert (gw.breaker("f")["state"], gw.breaker("f")["failures"]) == ("closed", 0)
        upstream.script(*[crash] * (FAIL_MAX - 1), *[throttle] * FAIL_MAX, crash)
        for _ in range(FAIL_MAX - 1):
            await gw.call("f")
        for _ in range(FAIL_MAX):
            assert (await gw.call("f")).status_code == 429
        assert (gw.breaker("f")["state"], gw.breaker("f")["failures"]) == ("closed", FAIL_MAX - 1)
        await gw.call("f")
        assert gw.breaker("f")["state"] == "open"
        assert calls_to(upstream, gw, "f") == FAIL_MAX * 3 + FAIL_MAX * 2


# --- half-open -------------------------------------------------------------------------------


@pytest.mark.parametrize("probe_status", [200, 503])
async def test_half_open_lets_exactly_one_of_fifty_concurrent_requests_through(tmp_path: Path, probe_status: int) -> None:
    reset_timeout_s = 0.5
    async with gated() as upstream, proxy(tmp_path, upstream.url, reset_timeout_s=reset_timeout_s) as gw:
        upstream.status = 503
        for _ in range(FAIL_MAX):
            await gw.call("f")
        assert gw.breaker("f")["state"] == "open"
        await until(lambda: gw.breaker("f")["open_remaining_s"] == 0, "the open period to pass")

        upstream.status = probe_status
        upstream.gate.clear()  # the probe's reply is slow: everyone else arrives while it is out
        before = upstream.arrived
        tasks = [asyncio.create_task(gw.call("f")) for _ in range(FIFTY)]
        await until(lambda: sum(t.done() for t in tasks) + upstream.held == FIFTY, "every request answered or upstream")
        assert upstream.arrived - before == 1
        (probe_task,) = [t for t in tasks if not t.done()]
        refused = [t.result() for t in tasks if t is not probe_task]
        for response in refused:
            assert_circuit_open(response)
            assert response.headers["retry-after"] == str(math.ceil(PROBE_RETRY_AFTER_S))

        upstream.gate.set()
        probe = await probe_task
        assert probe.status_code == probe_status
        assert upstream.arrived - before == 1
        if probe_status == 200:
            assert gw.breaker("f")["state"] == "closed"
            assert (await gw.call("f")).status_code == 200  # closed: requests flow again
            assert upstream.arrived - before == 2
        else:
            assert problem_of(probe, "liveperson")["class"] == "upstream_unavailable"
            entry = gw.breaker("f")
            assert entry["state"] == "open"
            assert 0 < entry["open_remaining_s"] <= reset_timeout_s


# --- keys ------------------------------------------------------------------------------------------


async def test_an_open_breaker_for_one_function_leaves_the_others_alone(tmp_path: Path) -> None:
    async with simulated("liveperson") as upstream, proxy(tmp_path, upstream.url) as gw:
        for _ in range(FAIL_MAX):
            await gw.call("crash-a")
        assert_circuit_open(await gw.call("crash-a"))
        for _ in range(FAIL_MAX * 2):
            assert (await gw.call("ok-b")).status_code == 200
        assert calls_to(upstream, gw, "ok-b") == FAIL_MAX * 2
        assert gw.breaker("ok-b")["state"] == "closed"
        assert_circuit_open(await gw.call("crash-a"))


async def test_scope_upstream_shares_one_breaker_between_functions(tmp_path: Path) -> None:
    async with simulated("liveperson") as upstream, proxy(tmp_path, upstream.url, scope="upstream") as gw:
        functions = ["crash-a", "down-b", "crash-c"]
        for function in functions[:FAIL_MAX]:
            await gw.call(function)
        assert gw.breaker(UPSTREAM_WIDE)["state"] == "open"
        problem = assert_circuit_open(await gw.call("ok-d"))
        assert "up/" in problem["detail"]
        assert calls_to(upstream, gw, "ok-d") == 0
        assert len(upstream.calls) == FAIL_MAX


# --- cancellation ----------------------------------------------------------------------------


async def test_a_request_whose_client_left_does_not_count(tmp_path: Path) -> None:
    requests = FAIL_MAX + 1
    # a per-try timeout far past WAIT_S: only a gateway that abandons the upstream call when its
    # client leaves finishes these requests while they are still held
    async with gated() as upstream, proxy(tmp_path, upstream.url, per_try_s=25.0) as gw:
        upstream.status = 503
        upstream.gate.clear()  # the upstream is slow, and will fail
        tasks = [asyncio.create_task(gw.call("f")) for _ in range(requests)]
        await until(lambda: upstream.held == requests, "every request at the upstream")
        for task in tasks:
            task.cancel()  # the clients give up and close their connections
        await asyncio.gather(*tasks, return_exceptions=True)
        await until(lambda: gw.answered() == requests, "the gateway to finish every request")
        assert gw.answered(status="499") == requests  # abandoned, not answered by the upstream
        assert (gw.breaker("f")["state"], gw.breaker("f")["failures"]) == ("closed", 0)

        upstream.gate.set()  # the same failures, with the clients still there, do count
        for _ in range(FAIL_MAX):
            assert (await gw.call("f")).status_code == 503
        assert gw.breaker("f")["state"] == "open"


# --- operations ------------------------------------------------------------------------------


async def test_admin_lists_breakers_and_resets_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    async with simulated("liveperson") as upstream, proxy(tmp_path, upstream.url) as gw:
        upstream.script(*[Reply(500, b"boom")] * FAIL_MAX)
        for _ in range(FAIL_MAX):
            await gw.call("f")
        await gw.call("g")
        assert (await gw.admin("GET", "/admin/breakers", token=None)).status_code == 401
        assert (await gw.admin("GET", "/admin/breakers", token="wrong")).status_code == 401

        listing = await gw.admin("GET", "/admin/breakers")
        assert listing.status_code == 200
        entries = {e["function"]: e for e in listing.json()["breakers"]}
        assert set(entries) == {"f", "g"}
        assert entries["f"]["upstream"] == "up"
        assert entries["f"]["state"] == "open"
        assert 0 < entries["f"]["open_remaining_s"] <= entries["f"]["reset_timeout_s"]
        assert (entries["f"]["fail_max"], entries["f"]["reset_timeout_s"]) == (FAIL_MAX, 30.0)
        assert (entries["g"]["state"], entries["g"]["open_remaining_s"]) == ("closed", 0)

        assert (await gw.admin("POST", "/admin/breakers/up/f/reset", token=None)).status_code == 401
        assert_circuit_open(await gw.call("f"))
        reset = await gw.admin("POST", "/admin/breakers/up/f/reset")
        assert (reset.status_code, reset.json()) == (200, {"reset": True})
        entries = {e["function"]: e for e in (await gw.admin("GET", "/admin/breakers")).json()["breakers"]}
        assert (entries["f"]["state"], entries["f"]["failures"], entries["f"]["open_remaining_s"]) == ("closed", 0, 0)
        assert (await gw.call("f")).status_code == 200
        assert calls_to(upstream, gw, "f") == FAIL_MAX + 1
        assert (await gw.admin("POST", "/admin/breakers/up/nobody/reset")).status_code == 404


async def test_admin_api_is_absent_without_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN", raising=False)
    async with simulated("liveperson") as upstream, proxy(tmp_path, upstream.url) as gw:
        assert (await gw.admin("GET", "/admin/breakers")).status_code == 404
        assert (await gw.admin("POST", "/admin/breakers/up/f/reset")).status_code == 404


async def test_transitions_show_in_metrics_and_one_log_line_each(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    caplog.set_level(logging.INFO, logger="gateway.breakers")
    reset_timeout_s = 0.5
    async with simulated("liveperson") as upstream, proxy(tmp_path, upstream.url, reset_timeout_s=reset_timeout_s) as gw:
        upstream.script(*[Reply(503, b"down")] * (FAIL_MAX + 1))
        for _ in range(FAIL_MAX):
            await gw.call("f")
        text = (await gw.client.get("/metrics")).text
        assert 'gateway_breaker_state{function="f",state="open",upstream="up"} 1.0' in text
        assert 'gateway_breaker_transitions_total{to="open",upstream="up"} 1.0' in text

        await until(lambda: gw.breaker("f")["open_remaining_s"] == 0, "the open period to pass")
        await gw.call("f")  # the probe fails: half-open, then open again
        assert (await gw.admin("POST", "/admin/breakers/up/f/reset")).status_code == 200
        text = (await gw.client.get("/metrics")).text
        assert 'gateway_breaker_state{function="f",state="closed",upstream="up"} 1.0' in text
        assert 'gateway_breaker_state{function="f",state="open",upstream="up"} 0.0' in text
        assert 'gateway_breaker_state{function="f",state="half-open",upstream="up"} 0.0' in text
        assert 'gateway_breaker_transitions_total{to="open",upstream="up"} 2.0' in text
        assert 'gateway_breaker_transitions_total{to="half-open",upstream="up"} 1.0' in text
        assert 'gateway_breaker_transitions_total{to="closed",upstream="up"} 1.0' in text

    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.breakers"]
    assert lines == [
        "breaker up/f: closed -> open",
        "breaker up/f: open -> half-open",
        "breaker up/f: half-open -> open",
        "breaker up/f: open -> closed",
    ]
