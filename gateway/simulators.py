"""Simulated upstreams that speak each platform's wire format (DIALECTS.md), on loopback.

Used by `gateway demo` and by the tests. The function name in the path picks the behaviour:

    ok        success (echoes the payload)
    fail      the function ran and threw (LP 901 custom-failure, Lambda X-Amz-Function-Error,
              openYuanrong 500 + code 2002)
    timeout   the function ran out of time (LP executiontime-exceeded, Lambda "Task timed
              out", openYuanrong 4010)
    missing   no such function                  badinput  the request was malformed
    throttle  the platform throttles (429, openYuanrong 500 + code 1005)
    crash     the platform failed (500)         down      the platform is unavailable (503)
    slow      answers after `?delay=` seconds (default 2)
    flaky     fails with 502 twice per X-Request-ID, then succeeds (shows the gateway's retries)

Tests can also script exact replies (`script`) and read what arrived (`calls`).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0

    @classmethod
    def json(cls, status: int, data: Any, *headers: tuple[str, str], delay_s: float = 0.0) -> "Reply":
        return cls(status, orjson.dumps(data), (("Content-Type", JSON), *headers), delay_s)


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


def liveperson_reply(behaviour: str, body: bytes) -> Reply:
    def error(status: int, code: str, message: str) -> Reply:
        return Reply.json(status, {"errorCode": code, "errorMsg": message})

    table: dict[str, Callable[[], Reply]] = {
        "fail": lambda: error(901, "com.liveperson.faas.handler.custom-failure", "whoops"),
        "timeout": lambda: error(901, "com.liveperson.faas.handler.executiontime-exceeded", "Function exceeded its execution time"),
        "missing": lambda: error(404, "com.liveperson.faas.es.missinglambda", "Function does not exist"),
        "badinput": lambda: error(400, "com.liveperson.faas.es.badinput", "Payload was in the wrong format"),
        "throttle": lambda: error(429, "com.liveperson.faas.es.ratelimit", "Too many requests for this account"),
        "crash": lambda: error(500, "com.liveperson.faas.es.general", "General error"),
        "down": lambda: error(503, "com.liveperson.faas.es.unavailable", "Could not reach remote system"),
    }
    if behaviour in table:
        return table[behaviour]()
    payload = _json_or_none(body)
    return Reply.json(200, {"result": "ok", "payload": payload.get("payload") if isinstance(payload, dict) else None})


def lambda_reply(behaviour: str, body: bytes) -> Reply:
    def service(status: int, name: str, message: str, *extra: tuple[str, str], **fields: Any) -> Reply:
        data = {"Type": "User" if status < 500 else "Service", "message": message, **fields}
        return Reply.json(status, data, ("X-Amzn-ErrorType", name), ("x-amzn-RequestId", "sim-request"), *extra)

    def function_error(message: str) -> Reply:
        data = {"errorType": "Error", "errorMessage": message, "trace": ["Error: " + message, "    at Runtime.handler (index.mjs:2:9)"]}
        return Reply.json(200, data, ("X-Amz-Function-Error", "Unhandled"), ("X-Amz-Executed-Version", "$LATEST"))

    table: dict[str, Callable[[], Reply]] = {
        "fail": lambda: function_error("Unhandled exception!"),
        "timeout": lambda: Reply.json(200, {"errorMessage": "2024-01-01T00:00:00.000Z abc Task timed out after 3.00 seconds"}, ("X-Amz-Function-Error", "Unhandled")),
        "missing": lambda: service(404, "ResourceNotFoundException", "Function not found: arn:aws:lambda:us-east-1:000000000000:function:missing"),
        "badinput": lambda: service(400, "InvalidRequestContentException", "Could not parse request body into json"),
        "throttle": lambda: service(429, "TooManyRequestsException", "Rate Exceeded.", ("Retry-After", "1"), Reason="ReservedFunctionConcurrentInvocationLimitExceeded", retryAfterSeconds="1"),
        "crash": lambda: service(500, "ServiceException", "Internal failure"),
        "down": lambda: service(503, "ServiceUnavailableException", "Service unavailable"),
    }
    if behaviour in table:
        return table[behaviour]()
    return Reply(200, body or b"null", (("Content-Type", JSON), ("X-Amz-Executed-Version", "$LATEST")))


def yuanrong_reply(behaviour: str, body: bytes) -> Reply:
    def error(code: int, message: str, status: int = 500) -> Reply:
        return Reply.json(status, {"code": code, "message": message, "trace_id": "sim-trace"}, ("X-Inner-Code", str(code)))

    table: dict[str, Callable[[], Reply]] = {
        "fail": lambda: error(2002, "user code has core dump or exception: ValueError('boom')"),
        "timeout": lambda: error(4010, "function invocation timed out in the runtime"),
        "missing": lambda: error(150424, "function metadata not found"),
        "badinput": lambda: error(1001, "parameter validation failed"),
        "throttle": lambda: error(1005, "request limit reached"),
        "crash": lambda: error(3003, "internal error"),
        "down": lambda: Reply.json(503, {"code": 3002, "message": "communication error"}, ("X-Inner-Code", "3002")),
    }
    if behaviour in table:
        return table[behaviour]()
    return Reply(200, body or b"null", (("Content-Type", JSON), ("X-Inner-Code", "0"), ("X-Billing-Duration", "3")))


def http_reply(behaviour: str, body: bytes) -> Reply:
    table: dict[str, Callable[[], Reply]] = {
        "missing": lambda: Reply(404, b"not found", (("Content-Type", "text/plain"),)),
        "badinput": lambda: Reply(400, b"bad input", (("Content-Type", "text/plain"),)),
        "throttle": lambda: Reply(429, b"slow down", (("Content-Type", "text/plain"), ("Retry-After", "1"))),
        "crash": lambda: Reply(500, b"internal error", (("Content-Type", "text/plain"),)),
        "down": lambda: Reply(503, b"unavailable", (("Content-Type", "text/plain"),)),
        "fail": lambda: Reply(500, b"function failed", (("Content-Type", "text/plain"),)),
        "timeout": lambda: Reply(504, b"timed out", (("Content-Type", "text/plain"),)),
    }
    if behaviour in table:
        return table[behaviour]()
    return Reply(200, body or b"ok", (("Content-Type", "application/octet-stream"),))


DIALECT_REPLIES: dict[str, Callable[[str, bytes], Reply]] = {
    "liveperson": liveperson_reply,
    "lambda": lambda_reply,
    "yuanrong": yuanrong_reply,
    "http": http_reply,
}
BEHAVIOURS = ("ok", "fail", "timeout", "missing", "badinput", "throttle", "crash", "down", "slow", "flaky")


def behaviour_of(path: str) -> str:
    """The first path segment that names a behaviour, else `ok`."""
    for segment in path.split("/"):
        for behaviour in BEHAVIOURS:
            if segment == behaviour or segment.startswith(behaviour + "-"):
                return behaviour
    return "ok"


@dataclass
class SimulatedUpstream:
    """An aiohttp server on loopback answering in one dialect; records every call."""

    dialect: str
    host: str = "127.0.0.1"
    port: int = 0
    calls: list[Call] = field(default_factory=list)
    _scripted: deque[Reply] = field(default_factory=deque)
    _flaky: Counter[str] = field(default_factory=Counter)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def script(self, *replies: Reply) -> None:
        """The next requests get these replies, in order, whatever their path."""
        self._scripted.extend(replies)

    def count(self, path_part: str = "") -> int:
        return sum(1 for c in self.calls if path_part in c.path)

    async def start(self) -> "SimulatedUpstream":
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.calls.append(Call(request.method, request.raw_path.split("?")[0], request.query_string, dict(request.headers), body))
        reply = self._scripted.popleft() if self._scripted else self._canned(request, body)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        response = web.Response(status=reply.status, body=reply.body)
        for name, value in reply.headers:
            response.headers.add(name, value)
        return response

    def _canned(self, request: web.Request, body: bytes) -> Reply:
        behaviour = behaviour_of(request.path)
        if behaviour == "slow":
            delay = float(request.query.get("delay", "2"))
            return _with_delay(DIALECT_REPLIES[self.dialect]("ok", body), min(delay, 60.0))
        if behaviour == "flaky":
            key = request.headers.get("X-Request-ID", "")
            self._flaky[key] += 1
            if self._flaky[key] <= 2:
                return Reply(502, b"bad gateway (simulated)", (("Content-Type", "text/plain"),))
            behaviour = "ok"
        return DIALECT_REPLIES[self.dialect](behaviour, body)


def _with_delay(reply: Reply, delay_s: float) -> Reply:
    return Reply(reply.status, reply.body, reply.headers, delay_s)


def _json_or_none(body: bytes) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
