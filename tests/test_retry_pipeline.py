"""Retries end to end: the real gateway on uvicorn, counting upstreams, real loopback sockets.

Every test scripts what the upstream answers and then counts what arrived there: the number of
calls, their arrival times, and the headers and bodies of each attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from gateway.simulators import Reply, SimulatedUpstream
from tests.harness import RunningGateway, free_port, running_gateway, upstream_config, write_config

pytestmark = pytest.mark.timeout(60)

ROUTES = {
    "http": "/fn/{function}",
    "liveperson": "/api/account/{account}/lambdas/{function}/invoke",
    "lambda": "/2015-03-31/functions/{function}/invocations",
    "yuanrong": "/serverless/v1/functions/{function}/invocations",
}
PATHS = {
    "http": "/fn/f",
    "liveperson": "/api/account/le-1/lambdas/f/invoke",
    "lambda": "/2015-03-31/functions/f/invocations",
    "yuanrong": "/serverless/v1/functions/f/invocations",
}
DIALECTS = sorted(ROUTES)
OK = Reply.json(200, {"ok": True})


# --- counting upstreams ---------------------------------------------------------------------


@dataclass
class TimedUpstream(SimulatedUpstream):
    """A simulated upstream that also notes when each call arrived and every attempt header it carried."""

    arrivals: list[float] = field(default_factory=list)
    wall_arrivals: list[float] = field(default_factory=list)
    attempt_headers: list[list[str]] = field(default_factory=list)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.monotonic())
        self.wall_arrivals.append(time.time())
        self.attempt_headers.append(request.headers.getall("X-Gateway-Attempt", []))
        return await super()._handle(request)


@contextlib.asynccontextmanager
async def timed(dialect: str) -> AsyncIterator[TimedUpstream]:
    upstream = await TimedUpstream(dialect).start()
    try:
        yield upstream
    finally:
        await upstream.stop()


class RawUpstream:
    """A bare TCP server that reads each request whole, then resets the connection or stays silent."""

    def __init__(self, mode: str) -> None:
        assert mode in ("reset", "silent")
        self.mode = mode
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return "http://127.0.0.1:%d" % self._server.sockets[0].getsockname()[1]

    async def start(self) -> "RawUpstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(_content_length(head))
            self.requests += 1
            if self.mode == "reset":
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                await reader.read()  # until the gateway gives up on us
                writer.transport.abort()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.transport.abort()
        finally:
            self._writers.discard(writer)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@contextlib.asynccontextmanager
async def raw_upstream(mode: str) -> AsyncIterator[RawUpstream]:
    upstream = await RawUpstream(mode).start()
    try:
        yield upstream
    finally:
        await upstream.stop()


# --- the gateway ----------------------------------------------------------------------------


def gateway_yaml(
    url: str,
    dialect: str,
    *,
    max_attempts: int = 3,
    base_delay_s: float = 0.001,
    max_delay_s: float = 0.01,
    retry_after_max_s: float = 5.0,
    budget_ratio: float = 0.2,
    budget_min_per_s: float = 1000,
    connect_s: float = 1.0,
    per_try_s: float | None = None,
    total_s: float = 15.0,
    replay_max_bytes: int = 1024 * 1024,
) -> str:
    """One upstream with its own retry policy, a breaker that never opens, and no rate limit."""
    per_try_s = min(5.0, total_s) if per_try_s is None else per_try_s
    retry = (
        f"{{max_attempts: {max_attempts}, base_delay_s: {base_delay_s}, max_delay_s: {max_delay_s}, "
        f"retry_after_max_s: {retry_after_max_s}, budget_ratio: {budget_ratio}, budget_min_per_s: {budget_min_per_s}}}"
    )
    entry = upstream_config(
        "up",
        url,
        dialect,
        [ROUTES[dialect]],
        retry="under_test",
        breaker="never_opens",
        rate_limited="false",
        timeouts=f"{{connect_s: {connect_s}, per_try_s: {per_try_s}, total_s: {total_s}}}",
    )
    return (
        f"server:\n  replay_max_bytes: {replay_max_bytes}\n"
        f"upstreams:\n{entry}"
        f"retry_policies:\n  under_test: {retry}\n"
        "breaker_policies:\n  never_opens: {fail_max: 1000000, reset_timeout_s: 1.0}\n"
    )


@contextlib.asynccontextmanager
async def gateway_for(tmp_path: Path, url: str, dialect: str, **options: Any) -> AsyncIterator[RunningGateway]:
    async with running_gateway(write_config(tmp_path, gateway_yaml(url, dialect, **options))) as gateway:
        yield gateway


async def invoke(gateway: RunningGateway, dialect: str, body: bytes = b'{"payload": 1}', **kwargs: Any) -> httpx.Response:
    async with gateway.client() as client:
        return await client.post(PATHS[dialect], content=body, **kwargs)


def problem_of(response: httpx.Response) -> dict[str, Any]:
    body = orjson.loads(response.content)
    return body if "class" in body and "attempts" in body else body["problem"]


async def eventually(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- recovering what can be recovered -------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_502_502_200_gives_the_200_after_three_calls(tmp_path: Path, dialect: str) -> None:
    async with timed(dialect) as upstream:
        upstream.script(Reply(502, b"bad gateway"), Reply(502, b"bad gateway"), OK)
        async with gateway_for(tmp_path, upstream.url, dialect, max_attempts=3) as gateway:
            response = await invoke(gateway, dialect)
    assert response.status_code == 200
    assert orjson.loads(response.content) == {"ok": True}
    assert upstream.count() == 3


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_500_every_time_makes_max_attempts_calls(tmp_path: Path, dialect: str) -> None:
    max_attempts = 4
    async with timed(dialect) as upstream:
        upstream.script(*[Reply.json(500, {"message": "internal"})] * (max_attempts + 2))
        async with gateway_for(tmp_path, upstream.url, dialect, max_attempts=max_attempts) as gateway:
            response = await invoke(gateway, dialect)
    assert response.status_code == 500
    problem = problem_of(response)
    assert (problem["class"], problem["attempts"], problem["retryable"]) == ("server_error", max_attempts, True)
    assert upstream.count() == max_attempts


async def test_yuanrong_1005_throttle_then_200(tmp_path: Path) -> None:
    async with timed("yuanrong") as upstream:
        upstream.script(Reply.json(500, {"code": 1005, "message": "request limit reached"}, ("X-Inner-Code", "1005")), OK)
        async with gateway_for(tmp_path, upstream.url, "yuanrong") as gateway:
            response = await invoke(gateway, "yuanrong")
    assert response.status_code == 200
    assert upstream.count() == 2


async def test_attempt_that_outlasts_per_try_then_a_fast_one(tmp_path: Path) -> None:
    per_try_s = 0.3
    async with timed("http") as upstream:
        upstream.script(Reply(200, b"too late", delay_s=per_try_s * 3), Reply(200, b"in time"))
        async with gateway_for(tmp_path, upstream.url, "http", per_try_s=per_try_s) as gateway:
            response = await invoke(gateway, "http")
    assert (response.status_code, response.content) == (200, b"in time")
    assert upstream.count() == 2
    assert upstream.arrivals[1] - upstream.arrivals[0] >= per_try_s


# --- never repeating what must not be repeated ----------------------------------------------

NEVER_RETRIED = [
    ("liveperson", Reply.json(901, {"errorCode": "com.liveperson.faas.handler.custom-failure", "errorMsg": "whoops"}), "function_error"),
    ("liveperson", Reply.json(901, {"errorCode": "com.liveperson.faas.handler.executiontime-exceeded", "errorMsg": "slow"}), "function_timeout"),
    ("liveperson", Reply.json(500, {"code": "com.customer.faas.function.threw-error", "message": "boom"}), "function_error"),
    ("liveperson", Reply.json(901, {"code": "com.customer.faas.function.threw-error", "message": "boom"}), "function_error"),
    ("liveperson", Reply.json(901, {"unrelated": True}), "function_error"),
    ("lambda", Reply.json(200, {"errorType": "Error", "errorMessage": "boom"}, ("X-Amz-Function-Error", "Unhandled")), "function_error"),
    ("lambda", Reply.json(200, {"errorMessage": "Task timed out after 3.00 seconds"}, ("X-Amz-Function-Error", "Unhandled")), "function_timeout"),
    ("yuanrong", Reply.json(500, {"code": 2002, "message": "user code raised"}, ("X-Inner-Code", "2002")), "function_error"),
    ("yuanrong", Reply.json(500, {"code": 4010, "message": "timed out"}, ("X-Inner-Code", "4010")), "function_timeout"),
    ("yuanrong", Reply.json(500, {"code": 1001, "message": "bad parameter"}, ("X-Inner-Code", "1001")), "client_error"),
    ("yuanrong", Reply.json(500, {"code": 1014, "message": "no auth"}, ("X-Inner-Code", "1014")), "auth_error"),
    *[("http", Reply(status, b"no", (("Content-Type", "text/plain"),)), klass) for status, klass in [
        (400, "client_error"), (401, "auth_error"), (403, "auth_error"), (404, "not_found"), (405, "client_error"),
        (409, "client_error"), (413, "client_error"), (415, "client_error"), (422, "client_error"), (451, "client_error"),
    ]],
    ("liveperson", Reply.json(400, {"errorCode": "com.liveperson.faas.es.badinput", "errorMsg": "bad"}), "client_error"),
    ("liveperson", Reply.json(404, {"errorCode": "com.liveperson.faas.es.missinglambda", "errorMsg": "gone"}), "not_found"),
    ("liveperson", Reply.json(401, {"errorCode": "com.liveperson.faas.auth", "errorMsg": "who"}), "auth_error"),
    ("lambda", Reply.json(400, {"message": "bad json"}, ("X-Amzn-ErrorType", "InvalidRequestContentException")), "client_error"),
    ("lambda", Reply.json(404, {"message": "no fn"}, ("X-Amzn-ErrorType", "ResourceNotFoundException")), "not_found"),
    ("lambda", Reply.json(403, {"message": "denied"}, ("X-Amzn-ErrorType", "AccessDeniedException")), "auth_error"),
]


@pytest.mark.parametrize(("dialect", "reply", "error_class"), NEVER_RETRIED, ids=lambda v: getattr(v, "status", v))
async def test_never_classes_get_exactly_one_call_even_with_ten_attempts(tmp_path: Path, dialect: str, reply: Reply, error_class: str) -> None:
    async with timed(dialect) as upstream:
        upstream.script(reply, OK, OK)
        async with gateway_for(tmp_path, upstream.url, dialect, max_attempts=10) as gateway:
            response = await invoke(gateway, dialect)
    assert upstream.count() == 1
    assert response.status_code == reply.status
    problem = problem_of(response)
    assert (problem["class"], problem["attempts"], problem["retryable"]) == (error_class, 1, False)


async def test_901_is_called_once_whatever_the_policy(tmp_path: Path) -> None:
    failure = Reply.json(901, {"errorCode": "com.liveperson.faas.handler.custom-failure", "errorMsg": "whoops"})
    async with timed("liveperson") as upstream:
        upstream.script(*[failure] * 10)
        async with gateway_for(tmp_path, upstream.url, "liveperson", max_attempts=10, budget_min_per_s=1000, budget_ratio=10) as gateway:
            response = await invoke(gateway, "liveperson")
    assert response.status_code == 901
    assert orjson.loads(response.content)["errorCode"] == "com.liveperson.faas.handler.custom-failure"
    assert upstream.count() == 1


# --- Retry-After ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialect", "first"),
    [
        ("http", Reply(503, b"busy", (("Retry-After", "1"),))),
        ("liveperson", Reply.json(429, {"errorCode": "com.liveperson.faas.es.ratelimit", "errorMsg": "slow down"}, ("Retry-After", "1"))),
        ("lambda", Reply.json(429, {"message": "Rate Exceeded.", "retryAfterSeconds": "1"}, ("X-Amzn-ErrorType", "TooManyRequestsException"))),
    ],
    ids=["http-retry-after", "liveperson-retry-after", "lambda-retryAfterSeconds"],
)
async def test_retry_after_one_second_is_waited_for(tmp_path: Path, dialect: str, first: Reply) -> None:
    async with timed(dialect) as upstream:
        upstream.script(first, OK)
        async with gateway_for(tmp_path, upstream.url, dialect, base_delay_s=0.001, max_delay_s=0.001) as gateway:
            response = await invoke(gateway, dialect)
    assert response.status_code == 200
    assert upstream.count() == 2
    assert upstream.arrivals[1] - upstream.arrivals[0] >= 1.0


async def test_retry_after_as_an_http_date(tmp_path: Path) -> None:
    not_before = math.floor(time.time()) + 2  # whole seconds, as an HTTP-date can only say
    first = Reply(503, b"busy", (("Retry-After", email.utils.formatdate(not_before, usegmt=True)),))
    async with timed("http") as upstream:
        upstream.script(first, OK)
        async with gateway_for(tmp_path, upstream.url, "http") as gateway:
            response = await invoke(gateway, "http")
    assert response.status_code == 200
    assert upstream.count() == 2
    assert upstream.wall_arrivals[1] >= not_before - 0.05  # tolerance: wall vs monotonic clock readings only


@pytest.mark.parametrize(
    ("retry_after", "options"),
    [
        ("30", {"retry_after_max_s": 5.0}),  # longer than the policy allows
        ("3", {"retry_after_max_s": 5.0, "total_s": 2.0}),  # allowed, but past the deadline
        (None, {"retry_after_max_s": 5.0}),  # an HTTP-date a minute away
    ],
    ids=["over-max", "over-deadline", "http-date-over-max"],
)
async def test_retry_after_too_long_answers_at_once_and_passes_it_on(tmp_path: Path, retry_after: str | None, options: dict[str, float]) -> None:
    header = retry_after or email.utils.formatdate(time.time() + 60, usegmt=True)
    async with timed("http") as upstream:
        upstream.script(Reply(503, b"busy", (("Retry-After", header),)), OK)
        async with gateway_for(tmp_path, upstream.url, "http", max_attempts=5, **options) as gateway:
            started = time.monotonic()
            response = await invoke(gateway, "http")
            took = time.monotonic() - started
    assert upstream.count() == 1
    assert response.status_code == 503
    assert response.headers["Retry-After"] == header
    assert problem_of(response)["attempts"] == 1
    assert took < options["retry_after_max_s"]  # it did not sit out even the longest wait it may obey


async def test_lambda_retry_after_seconds_too_long_is_passed_on(tmp_path: Path) -> None:
    throttle = Reply.json(429, {"message": "Rate Exceeded.", "retryAfterSeconds": "30"}, ("X-Amzn-ErrorType", "TooManyRequestsException"))
    async with timed("lambda") as upstream:
        upstream.script(throttle, OK)
        async with gateway_for(tmp_path, upstream.url, "lambda", max_attempts=5, retry_after_max_s=5.0) as gateway:
            response = await invoke(gateway, "lambda")
    assert upstream.count() == 1
    assert response.status_code == 429
    body = orjson.loads(response.content)
    assert (body["retryAfterSeconds"], body["problem"]["class"], body["problem"]["attempts"]) == ("30", "rate_limited", 1)


# --- time -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("per_try_s", "total_s"), [(0.4, 1.0), (0.8, 0.8)])
async def test_total_s_bounds_the_request_when_every_attempt_times_out(tmp_path: Path, per_try_s: float, total_s: float) -> None:
    async with raw_upstream("silent") as upstream:
        async with gateway_for(tmp_path, upstream.url, "http", max_attempts=10, per_try_s=per_try_s, total_s=total_s) as gateway:
            started = time.monotonic()
            response = await invoke(gateway, "http")
            took = time.monotonic() - started
            problem = problem_of(response)
            await eventually(lambda: upstream.requests >= problem["attempts"])
    assert took < total_s + 1.0
    assert response.status_code == 504
    assert (problem["class"], problem["code"]) == ("upstream_timeout", "gateway.upstream_timeout")
    assert 1 <= problem["attempts"] <= math.ceil(total_s / per_try_s) + 1
    assert upstream.requests == problem["attempts"]


# --- transport failures ---------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["http", "liveperson"])
async def test_connection_refused_is_retried_then_502(tmp_path: Path, dialect: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with gateway_for(tmp_path, closed, dialect, max_attempts=4) as gateway:
        response = await invoke(gateway, dialect)
    assert response.status_code == 502
    problem = problem_of(response)
    assert (problem["class"], problem["code"], problem["attempts"]) == ("upstream_unavailable", "gateway.upstream_unavailable", 4)


@pytest.mark.parametrize("method", ["POST", "GET", "PUT"])
async def test_reset_after_the_request_arrived_is_retried_then_502(tmp_path: Path, method: str) -> None:
    async with raw_upstream("reset") as upstream:
        async with gateway_for(tmp_path, upstream.url, "http", max_attempts=3) as gateway:
            async with gateway.client() as client:
                response = await client.request(method, PATHS["http"], content=b"{}")
    assert response.status_code == 502
    problem = problem_of(response)
    assert (problem["class"], problem["code"], problem["attempts"]) == ("upstream_unavailable", "gateway.upstream_unavailable", 3)
    assert upstream.requests == 3  # one call per attempt: nothing below the gateway retries on its own


# --- replay ---------------------------------------------------------------------------------


async def test_every_attempt_carries_the_same_body_and_request_id(tmp_path: Path) -> None:
    body = orjson.dumps({"payload": {"text": "héllo", "n": list(range(100))}})
    async with timed("liveperson") as upstream:
        upstream.script(Reply(502, b""), Reply.json(500, {"errorCode": "com.liveperson.faas.es.general"}), Reply(503, b""), OK)
        async with gateway_for(tmp_path, upstream.url, "liveperson", max_attempts=4) as gateway:
            response = await invoke(gateway, "liveperson", body, headers={"X-Request-ID": "caller-id-7", "X-Gateway-Attempt": "99"})
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "caller-id-7"
    assert [c.body for c in upstream.calls] == [body] * 4
    assert [c.headers["X-Request-ID"] for c in upstream.calls] == ["caller-id-7"] * 4
    assert upstream.attempt_headers == [["1"], ["2"], ["3"], ["4"]]


async def test_gateway_made_request_id_is_the_same_on_every_attempt(tmp_path: Path) -> None:
    async with timed("http") as upstream:
        upstream.script(Reply(502, b""), Reply(502, b""), OK)
        async with gateway_for(tmp_path, upstream.url, "http") as gateway:
            response = await invoke(gateway, "http")
    assert response.status_code == 200
    ids = {c.headers["X-Request-ID"] for c in upstream.calls}
    assert ids == {response.headers["X-Request-ID"]}
    assert upstream.attempt_headers == [["1"], ["2"], ["3"]]


@pytest.mark.parametrize("size", [2048, 256 * 1024])
async def test_body_over_replay_max_bytes_is_not_retried(tmp_path: Path, size: int) -> None:
    body = bytes(range(256)) * (size // 256)
    async with timed("http") as upstream:
        upstream.script(Reply(503, b"busy"), OK)
        async with gateway_for(tmp_path, upstream.url, "http", max_attempts=3, replay_max_bytes=1024) as gateway:
            response = await invoke(gateway, "http", body)
    assert upstream.count() == 1
    assert upstream.calls[0].body == body
    assert response.status_code == 503
    assert problem_of(response)["attempts"] == 1


async def test_body_within_replay_max_bytes_is_retried(tmp_path: Path) -> None:
    body = b"x" * 1024
    async with timed("http") as upstream:
        upstream.script(Reply(503, b"busy"), OK)
        async with gateway_for(tmp_path, upstream.url, "http", replay_max_bytes=1024) as gateway:
            response = await invoke(gateway, "http", body)
    assert response.status_code == 200
    assert [c.body for c in upstream.calls] == [body, body]


async def test_client_that_disconnects_during_the_backoff_stops_the_retries(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    wait_s = 2
    async with timed("http") as upstream:
        upstream.script(Reply(503, b"busy", (("Retry-After", str(wait_s)),)), OK)
        async with gateway_for(tmp_path, upstream.url, "http", retry_after_max_s=5.0) as gateway:
            host, port = gateway.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /fn/f HTTP/1.1\r\nHost: gw\r\nX-Request-ID: leaving-early\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
            await eventually(lambda: upstream.count() == 1)
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(wait_s + 0.7)
            assert upstream.count() == 1
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    mine = [line for line in lines if line["request_id"] == "leaving-early"]
    assert [(line["status"], line["attempts"]) for line in mine] == [(499, 1)]


# --- budget ---------------------------------------------------------------------------------


async def test_budget_bounds_the_calls_to_an_upstream_that_always_fails(tmp_path: Path) -> None:
    requests, concurrency, ratio, floor_per_s = 500, 50, 0.2, 2
    async with timed("http") as upstream:
        async with gateway_for(tmp_path, upstream.url, "http", max_attempts=3, budget_ratio=ratio, budget_min_per_s=floor_per_s) as gateway:
            limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
            async with gateway.client(limits=limits) as client:
                gate = asyncio.Semaphore(concurrency)

                async def one() -> httpx.Response:
                    async with gate:
                        return await client.post("/fn/down", content=b"{}")

                first_second = int(time.monotonic())  # the gateway's budget clock
                responses = await asyncio.gather(*[one() for _ in range(requests)])
                last_second = int(time.monotonic())
    assert {r.status_code for r in responses} == {503}
    attempts = [problem_of(r)["attempts"] for r in responses]
    assert sum(attempts) == upstream.count()  # every call is accounted for in some envelope
    assert upstream.count() <= requests + budget_bound(last_second - first_second + 1, requests, ratio, floor_per_s)
    assert upstream.count() > requests  # the budget allowed some retries, not none
    assert max(attempts) <= 3


def budget_bound(seconds: int, firsts: int, ratio: float, floor_per_s: float) -> float:
    """The most retries a 10 s sliding budget allows over a run spanning `seconds` clock seconds.

    Within one window it is exactly SPEC.md's `floor x 10 + ratio x firsts`. A slow run (a loaded
    machine) spans several windows: each 10 s block then gets its own floor, and a block's last
    window may also see the previous block's first attempts, hence at most twice the ratio part.
    """
    blocks = math.ceil(seconds / 10)
    return floor_per_s * 10 * blocks + ratio * firsts * (1 if blocks == 1 else 2)
