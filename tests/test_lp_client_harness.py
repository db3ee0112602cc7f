"""The real LivePerson Node client against a simulated LivePerson upstream on <host>:80.

Each scenario name is used as the lambda UUID (or event id), so the upstream knows what to
answer and the tests can count how many attempts the client made for it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.clients.lp_client import (
    LpHarnessError,
    can_bind_port80,
    ensure_installed,
    installed_version,
    pick_port80_host,
    run_lp_client,
    run_lp_client_async,
)

ACCOUNT = "le-1234"
V1_CUSTOM_FAILURE = {
    "errorCode": "com.liveperson.faas.handler.custom-failure",
    "errorMsg": "whoops",
}
V1_RUNTIME_EXCEPTION = {
    "errorCode": "com.liveperson.faas.handler.runtime-exception",
    "errorMsg": "x is undefined",
}
V1_MISSING = {"errorCode": "com.liveperson.faas.es.missinglambda", "errorMsg": "no such lambda"}
V1_GENERAL = {"errorCode": "com.liveperson.faas.es.general", "errorMsg": "boom"}
V2_THREW = {"code": "com.customer.faas.function.threw-error", "message": "whoops"}
V2_NOT_FOUND = {"code": "com.liveperson.faas.function.not-found", "message": "no such function"}
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
TIMEOUT_MS = 250
SLOW_REPLY_S = 1.0


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: Any


def build_response(reply: Reply) -> web.Response:
    if isinstance(reply.body, str):
        return web.Response(status=reply.status, text=reply.body, headers=reply.headers)
    return web.json_response(reply.body, status=reply.status, headers=reply.headers)


class SimulatedLivePerson:
    """A LivePerson Functions upstream on host:80, served from its own thread and loop."""

    def __init__(self, host: str, replies: dict[str, Reply]) -> None:
        self.host = host
        self.replies = replies
        self.recorded: list[Recorded] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def attempts(self, name: str) -> list[Recorded]:
        return [r for r in self.recorded if f"/{name}/" in r.path or r.path.endswith(f"/{name}")]

    async def _serve(self) -> None:
        app = web.Application()
        base = "/api/account/{account}"
        app.router.add_post(base + "/lambdas/{name}/invoke", self._invoke)
        app.router.add_post(base + "/events/{name}/invoke", self._invoke)
        app.router.add_get(base + "/events/{name}/isImplemented", self._invoke)
        app.router.add_get(base + "/lambdas/", self._list)
        app.router.add_get(base + "/functions", self._list)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, 80).start()

    async def _record(self, request: web.Request) -> None:
        body = await request.json() if request.can_read_body else None
        self.recorded.append(
            Recorded(
                request.method, request.path, dict(request.query), request.headers.copy(), body
            )
        )

    async def _invoke(self, request: web.Request) -> web.Response:
        await self._record(request)
        reply = self.replies[request.match_info["name"]]
        await asyncio.sleep(reply.delay_s)
        return build_response(reply)

    async def _list(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response([{"uuid": "fn-1", "name": "hello", "state": "Productive"}])


class ClosingServer:
    """Accepts connections on host:80 and drops them unanswered, counting them."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)

    def stop(self) -> None:
        self._server.close()
        asyncio.run_coroutine_threadsafe(self._server.wait_closed(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._drop, self.host, 80)

    async def _drop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()


def scenario_replies() -> dict[str, Reply]:
    replies = {
        "ok": Reply(200, {"greeting": "hello"}),
        "accepted": Reply(202, {"queued": True}),
        "not-json": Reply(200, "plain text, not JSON"),
        "custom-failure": Reply(901, V1_CUSTOM_FAILURE),
        "bare-901": Reply(901, {"error": "whoops"}),
        "handler-code-on-500": Reply(500, V1_RUNTIME_EXCEPTION),
        "missing": Reply(404, V1_MISSING),
        "too-large": Reply(413, V1_GENERAL),
        "retry-after-long": Reply(429, V1_GENERAL, {"Retry-After": "60"}),
        "retry-after-short": Reply(429, V1_GENERAL, {"Retry-After": "1"}),
        "retry-after-long-500": Reply(500, V1_GENERAL, {"Retry-After": "60"}),
        "too-large-retry-after": Reply(413, V1_GENERAL, {"Retry-After": "1"}),
        "v2-threw": Reply(901, V2_THREW),
        "v2-not-found": Reply(404, V2_NOT_FOUND),
        "slow": Reply(200, {"late": True}, delay_s=SLOW_REPLY_S),
        "implemented": Reply(200, {"implemented": True}),
    }
    replies.update({f"status-{status}": Reply(status, V1_GENERAL) for status in RETRY_STATUSES})
    return replies


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    ensure_installed()


@pytest.fixture
def upstream() -> Iterator[SimulatedLivePerson]:
    server = SimulatedLivePerson(pick_port80_host(), scenario_replies())
    server.start()
    yield server
    server.stop()


def invoke(upstream: SimulatedLivePerson, name: str, **fields: Any) -> dict[str, Any]:
    command = {"host": upstream.host, "accountId": ACCOUNT, "lambdaUuid": name}
    return run_lp_client({**command, **fields})


@dataclass(frozen=True)
class Case:
    name: str
    outcome: str
    error: str | None
    status: int | None
    attempts: int
    version: str = "v1"
    throw: bool = True


INVOKE_CASES = (
    Case("ok", "resolved", None, 200, 1),
    Case("accepted", "resolved", None, 202, 1),
    Case("not-json", "thrown", "FaaSInvokeError", 200, 1),
    Case("custom-failure", "thrown", "FaaSLambdaError", 901, 1),
    Case("custom-failure", "resolved", None, 901, 1, throw=False),
    Case("bare-901", "thrown", "FaaSInvokeError", 901, 1),
    Case("handler-code-on-500", "thrown", "FaaSLambdaError", 500, 4),
    Case("missing", "thrown", "FaaSInvokeError", 404, 1),
    Case("missing", "resolved", None, 404, 1, throw=False),
    Case("status-429", "resolved", None, 429, 4, throw=False),
    Case("too-large", "thrown", "FaaSInvokeError", 413, 1),
    Case("retry-after-long", "thrown", "FaaSInvokeError", 429, 1),
    Case("retry-after-short", "thrown", "FaaSInvokeError", 429, 4),
    Case("retry-after-long-500", "thrown", "FaaSInvokeError", 500, 1),
    Case("too-large-retry-after", "thrown", "FaaSInvokeError", 413, 4),
    Case("v2-threw", "thrown", "FaaSLambdaError", 901, 1, version="v2"),
    Case("v2-threw", "thrown", "FaaSInvokeError", 901, 1),
    Case("custom-failure", "thrown", "FaaSInvokeError", 901, 1, version="v2"),
    Case("v2-not-found", "thrown", "FaaSInvokeError", 404, 1, version="v2"),
)


def case_id(case: Case) -> str:
    return f"{case.name}-{case.version}-{'throw' if case.throw else 'resolve'}"


def status_of(result: dict[str, Any]) -> int | None:
    return result["value"]["status"] if result["outcome"] == "resolved" else result["status"]


def body_of(result: dict[str, Any]) -> Any:
    return result["value"]["body"] if result["outcome"] == "resolved" else result["body"]


@pytest.mark.parametrize("case", INVOKE_CASES, ids=case_id)
def test_invoke_outcome_per_upstream_reply(upstream: SimulatedLivePerson, case: Case) -> None:
    result = invoke(upstream, case.name, version=case.version, failOnErrorStatusCode=case.throw)
    assert result["outcome"] == case.outcome
    assert result.get("name") == case.error
    assert status_of(result) == case.status
    assert body_of(result) == upstream.replies[case.name].body
    assert len(upstream.attempts(case.name)) == case.attempts


def test_retryable_statuses_are_retried_three_more_times(upstream: SimulatedLivePerson) -> None:
    commands = [
        {"host": upstream.host, "lambdaUuid": f"status-{s}", "failOnErrorStatusCode": True}
        for s in RETRY_STATUSES
    ]
    with ThreadPoolExecutor(len(commands)) as pool:
        results = list(pool.map(run_lp_client, commands))
    for status, result in zip(RETRY_STATUSES, results, strict=True):
        assert (result["name"], result["status"]) == ("FaaSInvokeError", status)
        assert len(upstream.attempts(f"status-{status}")) == 4, status


def test_retries_reuse_request_id_and_body(upstream: SimulatedLivePerson) -> None:
    invoke(upstream, "status-500", requestId="req-7", payload={"n": 1})
    attempts = upstream.attempts("status-500")
    assert len(attempts) == 4
    assert {a.headers["X-Request-ID"] for a in attempts} == {"req-7"}
    assert all(a.body == attempts[0].body for a in attempts)


def test_resolved_error_reports_client_retry_count(upstream: SimulatedLivePerson) -> None:
    result = invoke(upstream, "status-503")
    assert result["value"]["ok"] is False
    assert result["value"]["retryCount"] == len(upstream.attempts("status-503")) - 1


def test_retries_false_makes_one_attempt(upstream: SimulatedLivePerson) -> None:
    result = invoke(upstream, "status-500", failOnErrorStatusCode=True, retries=False)
    assert (result["name"], result["status"]) == ("FaaSInvokeError", 500)
    assert len(upstream.attempts("status-500")) == 1


def test_non_json_success_body_is_not_ok(upstream: SimulatedLivePerson) -> None:
    result = invoke(upstream, "not-json")
    assert result["outcome"] == "resolved"
    assert (result["value"]["ok"], result["value"]["status"]) == (False, 200)
    assert result["value"]["body"] == upstream.replies["not-json"].body


def test_v1_compat_flag_rewrites_v2_body(upstream: SimulatedLivePerson) -> None:
    result = invoke(upstream, "v2-threw", version="v2", v1CompError=True)
    assert result["value"]["body"] == {
        "errorCode": V1_CUSTOM_FAILURE["errorCode"],
        "errorMsg": V2_THREW["message"],
    }


def test_timeout_is_retried_and_has_no_status(upstream: SimulatedLivePerson) -> None:
    result = invoke(upstream, "slow", timeout=TIMEOUT_MS, failOnErrorStatusCode=True)
    assert (result["name"], result["status"], result["body"]) == ("FaaSInvokeError", None, None)
    assert len(upstream.attempts("slow")) == 4


def test_connection_reset_is_retried() -> None:
    server = ClosingServer(pick_port80_host())
    server.start()
    try:
        command = {"host": server.host, "lambdaUuid": "x", "failOnErrorStatusCode": True}
        result = run_lp_client(command)
    finally:
        server.stop()
    assert (result["name"], result["status"]) == ("FaaSInvokeError", None)
    assert server.connections == 4


def test_connection_refused_resolves_without_status_or_retry() -> None:
    host = pick_port80_host()
    result = run_lp_client({"host": host, "lambdaUuid": "x"})
    assert result["outcome"] == "resolved"
    assert (result["value"]["ok"], result["value"]["status"]) == (False, None)
    assert result["value"]["retryCount"] == 0


def test_v1_invoke_request_shape(upstream: SimulatedLivePerson) -> None:
    invoke(upstream, "ok", requestId="req-1", payload={"a": 1}, headers={"h": "v"})
    (sent,) = upstream.attempts("ok")
    assert (sent.method, sent.path) == ("POST", f"/api/account/{ACCOUNT}/lambdas/ok/invoke")
    assert sent.query == {"v": "1", "skillId": "", "externalSystem": "unknown"}
    assert sent.headers["Authorization"] == "Bearer x"
    assert sent.headers["X-Request-ID"] == "req-1"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["User-Agent"].startswith("faas-client-js@")
    assert sent.headers["Host"] == upstream.host
    assert sent.body["payload"] == {"a": 1}
    assert sent.body["headers"] == [{"key": "h", "value": "v"}]
    assert isinstance(sent.body["timestamp"], int)


def test_v2_event_invoke_request_shape(upstream: SimulatedLivePerson) -> None:
    run_lp_client({"host": upstream.host, "accountId": ACCOUNT, "eventId": "ok", "version": "v2",
                   "skillId": "s-1", "lpEventSource": "tests"})
    (sent,) = upstream.attempts("ok")
    assert (sent.method, sent.path) == ("POST", f"/api/account/{ACCOUNT}/events/ok/invoke")
    assert sent.query == {"skillId": "s-1"}
    assert sent.headers["LP-EventSource"] == "tests"
    assert sent.headers["Host"].startswith("fninvocations.")


def test_is_implemented_resolves_the_flag(upstream: SimulatedLivePerson) -> None:
    command = {"host": upstream.host, "accountId": ACCOUNT, "op": "isImplemented"}
    result = run_lp_client({**command, "eventId": "implemented"})
    (sent,) = upstream.attempts("implemented")
    assert result == {"outcome": "resolved", "value": True}
    path = f"/api/account/{ACCOUNT}/events/implemented/isImplemented"
    assert (sent.method, sent.path) == ("GET", path)
    assert sent.query == {"v": "1", "skillId": "", "externalSystem": "Unknown"}


def test_is_implemented_error_is_its_own_name(upstream: SimulatedLivePerson) -> None:
    command = {"host": upstream.host, "op": "isImplemented", "eventId": "missing"}
    result = run_lp_client({**command, "failOnErrorStatusCode": True})
    assert (result["name"], result["status"]) == ("FaaSIsImplementedError", 404)
    result = run_lp_client(command)
    assert result["name"] == "FaaSIsImplementedError"
    assert result["causes"][-1]["name"] == "FaasIsImplementedParseError"


@pytest.mark.parametrize(
    ("version", "path"),
    [("v1", f"/api/account/{ACCOUNT}/lambdas/"), ("v2", f"/api/account/{ACCOUNT}/functions")],
)
def test_get_lambdas_path_per_version(
    upstream: SimulatedLivePerson, version: str, path: str
) -> None:
    result = run_lp_client({"host": upstream.host, "accountId": ACCOUNT, "op": "getLambdas",
                            "version": version})
    assert result["value"]["ok"] is True
    assert [(r.method, r.path) for r in upstream.recorded] == [("GET", path)]


async def test_async_runner_matches_sync_runner(upstream: SimulatedLivePerson) -> None:
    command = {"host": upstream.host, "lambdaUuid": "custom-failure", "failOnErrorStatusCode": True}
    result = await run_lp_client_async(command)
    assert (result["name"], result["status"]) == ("FaaSLambdaError", 901)


def test_missing_node_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LpHarnessError, match="node"):
        ensure_installed()


def test_driver_error_is_raised() -> None:
    with pytest.raises(LpHarnessError):
        run_lp_client({"lambdaUuid": "no-host"})


def test_pick_port80_host_skips_taken_address(upstream: SimulatedLivePerson) -> None:
    assert not can_bind_port80(upstream.host)
    assert pick_port80_host([upstream.host, "127.0.0.250"]) == "127.0.0.250"


def test_pinned_version_is_installed() -> None:
    assert installed_version() == "2.2.0"


def test_retry_after_above_client_timeout_stops_retries(upstream: SimulatedLivePerson) -> None:
    result = invoke(upstream, "retry-after-short", timeout=500, failOnErrorStatusCode=True)
    assert (result["name"], result["status"]) == ("FaaSInvokeError", 429)
    assert len(upstream.attempts("retry-after-short")) == 1
