"""Forwarding end to end over real loopback sockets: the gateway in front of simulated upstreams.

What goes through must arrive as it was sent: status (901 included), headers minus the
hop-by-hop ones, body bytes, method, raw path and query. What the gateway adds is named:
`X-Request-ID` and the RateLimit fields towards the client; `X-Forwarded-For`,
`X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Request-ID` and `X-Gateway-Attempt` towards the
upstream. Large bodies stream both ways; the memory tests run `gateway serve` as its own
process and measure its resident set while 20 MB pass through.

`RawUpstream` (bytes in, bytes out) is used where aiohttp's server would add or interpret
headers itself; `SimulatedUpstream` (gateway.simulators) everywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import random
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import psutil
import pytest
from aiohttp import web

from gateway.pipeline import RandomIds, first_values, header_bytes
from gateway.simulators import Reply, SimulatedUpstream
from tests.harness import RunningGateway, gateway_process, running_gateway, simulated, upstream_config, write_config
from tests.problem_schema import problem_of

MiB = 1024 * 1024
BIG = 20 * MiB
RSS_GROWTH_LIMIT = 10 * MiB
ADDED_TO_RESPONSE = {b"x-request-id", b"ratelimit-policy", b"ratelimit"}
ADDED_TO_REQUEST = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "x-gateway-attempt"}
FIXED = (("Date", "Tue, 01 Jan 2030 00:00:00 GMT"), ("Server", "simulated/1.0"))
LP_INVOKE = "/api/account/{account}/lambdas/{function}/invoke"


# --- upstreams -------------------------------------------------------------------------------


@dataclass
class RawRequest:
    line: bytes
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class RawUpstream:
    """HTTP/1.1 on a socket, no framework: records request bytes, answers with exact bytes."""

    head: bytes = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
    body: bytes = b"raw ok"
    requests: list[RawRequest] = field(default_factory=list)
    url: str = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                request = await _read_request(reader)
                self.requests.append(request)
                body = b"" if request.line.startswith(b"HEAD ") else self.body
                writer.write(self.head + b"Content-Length: %d\r\n\r\n" % len(self.body) + body)
                await writer.drain()
        writer.close()


async def _read_request(reader: asyncio.StreamReader) -> RawRequest:
    head = await reader.readuntil(b"\r\n\r\n")
    line, *fields = head[:-4].split(b"\r\n")
    headers = [(k.decode("latin-1"), v.strip().decode("latin-1")) for k, _, v in (f.partition(b":") for f in fields)]
    request = RawRequest(line, headers, b"")
    if (request.header("transfer-encoding") or "").lower() == "chunked":
        request.body = await _read_chunked(reader)
    else:
        request.body = await reader.readexactly(int(request.header("content-length") or 0))
    return request


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    await reader.readuntil(b"\r\n")
    return b"".join(parts)


@contextlib.asynccontextmanager
async def raw_upstream(head: bytes | None = None, body: bytes | None = None) -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    upstream.head = head if head is not None else upstream.head
    upstream.body = body if body is not None else upstream.body
    server = await asyncio.start_server(upstream._serve, "127.0.0.1", 0)
    upstream.url = "http://127.0.0.1:%d" % server.sockets[0].getsockname()[1]
    try:
        yield upstream
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class StreamingUpstream:
    """Streams chunks slowly until told to stop or until its writes fail (client gone)."""

    chunk: bytes = b"s" * 16384
    write_failed: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        try:
            for _ in range(4000):
                await response.write(self.chunk)
                await asyncio.sleep(0.005)
            self.finished = True
        except BaseException:
            self.write_failed.set()
            raise
        return response


@dataclass
class SlowSink:
    """Reads a request body in small pieces with pauses; answers its size and SHA-256."""

    async def consume(self, request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(65536):
            digest.update(chunk)
            size += len(chunk)
            await asyncio.sleep(0.002)
        framing = {"transfer_encoding": request.headers.get("Transfer-Encoding"), "content_length": request.headers.get("Content-Length")}
        return web.json_response({"size": size, "sha256": digest.hexdigest(), **framing})


@contextlib.asynccontextmanager
async def aiohttp_upstream(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    app = web.Application(client_max_size=64 * MiB)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield "http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


# --- gateway helpers -------------------------------------------------------------------------


def config_text(*upstreams: str, server: str = "") -> str:
    return (f"server:\n{server}" if server else "") + "upstreams:\n" + "".join(upstreams)


@contextlib.asynccontextmanager
async def gateway_for(tmp_path: Path, url: str, dialect: str = "http", routes: list[str] | None = None, server: str = "", **extra: str) -> AsyncIterator[RunningGateway]:
    text = config_text(upstream_config("up", url, dialect, routes or ["/web/{function}"], **extra), server=server)
    async with running_gateway(write_config(tmp_path, text)) as gateway:
        yield gateway


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def without(self, names: set[bytes]) -> list[tuple[bytes, bytes]]:
        return [(k, v) for k, v in self.headers if k not in names]


async def fetch_raw(client: httpx.AsyncClient, method: str, url: str, **kwargs: object) -> RawResponse:
    """Status, headers (lower-case names, in order) and the body bytes exactly as received."""
    async with client.stream(method, url, **kwargs) as response:  # type: ignore[arg-type]
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    return RawResponse(response.status_code, [(k.lower(), v) for k, v in response.headers.raw], body)


async def raw_http(url: str, request: bytes) -> bytes:
    """Send bytes as they are, read the answer until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return data


def seeded_bytes(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


# --- byte-identical pass-through -----------------------------------------------------------------

JSON_BODY = orjson.dumps({"result": {"ok": True, "items": list(range(50)), "text": "héllo ✓"}})
BINARY_BODY = seeded_bytes(300_000)
REPLIES = {
    "json": Reply(200, JSON_BODY, (("Content-Type", "application/json; charset=utf-8"), ("ETag", '"v1"'), ("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/"), ("X-Custom", "  spaced  value"), ("Cache-Control", "no-store"), *FIXED)),
    "binary": Reply(200, BINARY_BODY, (("Content-Type", "application/octet-stream"), ("Content-Disposition", 'attachment; filename="x.bin"'), *FIXED)),
    "gzip": Reply(200, gzip.compress(JSON_BODY, mtime=0), (("Content-Type", "application/json"), ("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding"), *FIXED)),
    "accepted": Reply(202, b'{"requestId":"r-1"}', (("Content-Type", "application/json"), *FIXED)),
    "no content": Reply(204, b"", (("X-Amz-Executed-Version", "$LATEST"), *FIXED)),
    "redirect": Reply(302, b"", (("Location", "http://elsewhere.invalid/x"), *FIXED)),
}
SUCCESS_ROUTES = {
    "http": ("/web/{function}", "/web/fn"),
    "liveperson": (LP_INVOKE, "/api/account/le-1234/lambdas/fn/invoke"),
    "lambda": ("/2015-03-31/functions/{function}/invocations", "/2015-03-31/functions/fn/invocations"),
    "yuanrong": ("/serverless/v1/functions/{function}/invocations", "/serverless/v1/functions/fn/invocations"),
}


@pytest.mark.parametrize("dialect", sorted(SUCCESS_ROUTES))
@pytest.mark.parametrize("kind", sorted(REPLIES))
async def test_success_passes_through_byte_identical(tmp_path: Path, dialect: str, kind: str) -> None:
    template, path = SUCCESS_ROUTES[dialect]
    async with simulated(dialect) as upstream, gateway_for(tmp_path, upstream.url, dialect, [template]) as gateway:
        upstream.script(REPLIES[kind], REPLIES[kind])
        async with httpx.AsyncClient(timeout=10) as client:
            direct = await fetch_raw(client, "POST", upstream.url + path, content=b"{}")
            proxied = await fetch_raw(client, "POST", gateway.url + path, content=b"{}")
    assert (proxied.status, proxied.without(ADDED_TO_RESPONSE), proxied.body) == (direct.status, direct.headers, direct.body)
    assert direct.body == REPLIES[kind].body
    assert [k for k, _ in proxied.headers if k in ADDED_TO_RESPONSE] == [b"ratelimit-policy", b"ratelimit", b"x-request-id"]
    assert len(upstream.calls) == 2


async def test_a_chunked_upstream_reply_arrives_whole(tmp_path: Path) -> None:
    async def short_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"X-Parts": "3"})
        await response.prepare(request)
        for part in (b"one,", b"two,", b"three"):
            await response.write(part)
        return response

    async with aiohttp_upstream(short_stream) as url, gateway_for(tmp_path, url, rate_limited="false") as gateway:
        async with gateway.client() as client:
            response = await fetch_raw(client, "GET", "/web/fn")
    assert (response.status, response.body) == (200, b"one,two,three")
    assert (b"x-parts", b"3") in response.headers


# --- 901 ---------------------------------------------------------------------------------------

NINE_O_ONE = Reply(901, b'{"anything":"the function said"}', (("Content-Type", "application/json"), ("X-Trace", "t-1"), *FIXED))


async def test_901_passes_through_intact_on_a_plain_http_route(tmp_path: Path) -> None:
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream.url) as gateway:
        upstream.script(NINE_O_ONE, NINE_O_ONE, NINE_O_ONE)
        async with httpx.AsyncClient(timeout=10) as client:
            direct = await fetch_raw(client, "POST", upstream.url + "/web/fn", content=b"{}")
            proxied = await fetch_raw(client, "POST", gateway.url + "/web/fn", content=b"{}")
        raw = await raw_http(gateway.url, b"POST /web/fn HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert (proxied.status, proxied.without(ADDED_TO_RESPONSE), proxied.body) == (901, direct.headers, NINE_O_ONE.body)
    assert raw.startswith(b"HTTP/1.1 901 ") and raw.endswith(b"\r\n\r\n" + NINE_O_ONE.body)
    assert len(upstream.calls) == 3  # one call per request: a 901 is an answer, never retried


async def test_901_function_error_on_liveperson_keeps_status_headers_and_native_fields(tmp_path: Path) -> None:
    async with simulated("liveperson") as upstream, gateway_for(tmp_path, upstream.url, "liveperson", [LP_INVOKE]) as gateway:
        async with gateway.client() as client:
            response = await client.post("/api/account/le-1/lambdas/fail/invoke", json={"payload": {}})
    body = response.json()
    assert response.status_code == 901
    assert {k: body[k] for k in ("errorCode", "errorMsg")} == {"errorCode": "com.liveperson.faas.handler.custom-failure", "errorMsg": "whoops"}
    problem = problem_of(response.headers["content-type"], response.content)
    assert (problem["status"], problem["class"], problem["attempts"], problem["request_id"]) == (901, "function_error", 1, response.headers["x-request-id"])
    assert upstream.count("/fail/") == 1


async def test_901_over_a_real_gateway_serve_process(tmp_path: Path) -> None:
    async with simulated("liveperson") as lp, simulated("http") as web_upstream:
        text = config_text(upstream_config("lp", lp.url, "liveperson", [LP_INVOKE]), upstream_config("web", web_upstream.url, "http", ["/web/{function}"]))
        with gateway_process(write_config(tmp_path, text)) as process:
            web_upstream.script(NINE_O_ONE, NINE_O_ONE)
            async with httpx.AsyncClient(timeout=10) as client:
                direct = await fetch_raw(client, "POST", web_upstream.url + "/web/fn", content=b"{}")
                proxied = await fetch_raw(client, "POST", process.url + "/web/fn", content=b"{}")
                lp_reply = await client.post(process.url + "/api/account/le-1/lambdas/fail/invoke", json={})
    assert (proxied.status, proxied.without(ADDED_TO_RESPONSE), proxied.body) == (901, direct.headers, NINE_O_ONE.body)
    assert lp_reply.status_code == 901 and lp_reply.json()["errorCode"] == "com.liveperson.faas.handler.custom-failure"
    assert problem_of(lp_reply.headers["content-type"], lp_reply.content)["class"] == "function_error"


# --- hop-by-hop and forwarding headers -----------------------------------------------------------

HOP_REPLY = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Connection: keep-alive, X-Hop-Reply\r\n"
    b"Keep-Alive: timeout=30, max=100\r\n"
    b"Proxy-Authenticate: Basic realm=inner\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"Trailer: X-Checksum\r\n"
    b"Upgrade: h2c\r\n"
    b"X-Hop-Reply: only-for-the-gateway\r\n"
    b"X-End-To-End: kept\r\n"
)
HOP_REQUEST_HEADERS = [
    ("Connection", "keep-alive, X-Hop-Request"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Upgrade", "websocket"),
    ("Proxy-Authorization", "Basic c2VjcmV0"),
    ("Proxy-Connection", "keep-alive"),
    ("X-Hop-Request", "only-for-the-gateway"),
    ("X-End-To-End", "kept"),
    ("Authorization", "Bearer end-to-end"),
]
HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "proxy-authenticate", "proxy-connection", "transfer-encoding"}


async def test_hop_by_hop_headers_are_dropped_both_ways(tmp_path: Path) -> None:
    async with raw_upstream(HOP_REPLY, b"hello") as upstream, gateway_for(tmp_path, upstream.url) as gateway:
        async with gateway.client() as client:
            response = await fetch_raw(client, "POST", "/web/fn", content=b"body", headers=HOP_REQUEST_HEADERS)
    [arrived] = upstream.requests
    assert arrived.names().isdisjoint(HOP_BY_HOP | {"x-hop-request"}), arrived.headers
    assert (arrived.header("X-End-To-End"), arrived.header("Authorization"), arrived.body) == ("kept", "Bearer end-to-end", b"body")
    names = {k.decode() for k, _ in response.headers}
    assert names.isdisjoint(HOP_BY_HOP | {"x-hop-reply"}), response.headers
    assert (response.status, response.body, (b"x-end-to-end", b"kept") in response.headers) == (200, b"hello", True)


async def test_forwarding_headers_are_set_upstream(tmp_path: Path) -> None:
    async with raw_upstream() as upstream, gateway_for(tmp_path, upstream.url) as gateway:
        async with gateway.client() as client:
            await client.get("/web/fn")
            await client.get("/web/fn", headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https", "X-Gateway-Attempt": "7"})
    first, second = upstream.requests
    host = gateway.url.removeprefix("http://")
    assert (first.header("X-Forwarded-For"), first.header("X-Forwarded-Proto"), first.header("X-Forwarded-Host")) == ("127.0.0.1", "http", host)
    assert (second.header("X-Forwarded-For"), second.header("X-Forwarded-Proto")) == ("203.0.113.9, 127.0.0.1", "http")
    assert [v for k, v in second.headers if k.lower() == "x-gateway-attempt"] == ["1"]
    assert first.header("Host") == upstream.url.removeprefix("http://")


# --- method, raw path, query -------------------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


@pytest.mark.parametrize("method", METHODS)
async def test_method_query_and_raw_path_pass_through_unchanged(tmp_path: Path, method: str) -> None:
    target = b"/web/fn%20name:$v1?v=1&skillId=a%20b&plus=a+b&slash=%2F&empty=&flag&dup=1&dup=2"
    async with raw_upstream() as upstream, gateway_for(tmp_path, upstream.url) as gateway:
        async with gateway.client() as client:
            body = b"" if method in ("GET", "HEAD", "OPTIONS") else b'{"k":"v"}'
            response = await client.request(method, gateway.url + "/x", content=body, extensions={"target": target})
    [arrived] = upstream.requests
    assert arrived.line == method.encode() + b" " + target + b" HTTP/1.1"
    assert arrived.body == body
    assert response.status_code == 200


@pytest.mark.parametrize("query", ["", "?", "?a=%zz", "?%00=1"])
async def test_odd_query_strings_are_forwarded_as_they_are(tmp_path: Path, query: str) -> None:
    async with raw_upstream() as upstream, gateway_for(tmp_path, upstream.url) as gateway:
        async with gateway.client() as client:
            await client.get(gateway.url + "/x", extensions={"target": b"/web/fn" + query.encode()})
    [arrived] = upstream.requests
    # an empty query ("?") carries nothing: uvicorn's scope cannot tell it from no query at all
    assert arrived.line == b"GET /web/fn" + (query.encode() if len(query) > 1 else b"") + b" HTTP/1.1"


# --- X-Request-ID --------------------------------------------------------------------------------

VALID_IDS = ["abc-123", "7f0c" * 8, "x" * 200, "!~#:/%{}"]
INVALID_IDS = ["x" * 201, "has space", "tab\there", "caf\u00e9"]


async def _request_id_roundtrip(tmp_path: Path, headers: dict[str, str]) -> tuple[str, str]:
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream.url) as gateway:
        async with gateway.client() as client:
            response = await client.get("/web/fn", headers={k: v.encode("latin-1") for k, v in headers.items()})  # type: ignore[misc]
    [call] = upstream.calls
    return response.headers["x-request-id"], call.headers["X-Request-ID"]


async def test_request_id_is_created_when_absent(tmp_path: Path) -> None:
    returned, sent = await _request_id_roundtrip(tmp_path, {})
    assert returned == sent
    assert re.fullmatch(r"[0-9a-f]{32}", returned)


def test_new_request_ids_are_random_128_bit_hex_across_pool_refills() -> None:
    new_id = RandomIds()
    ids = [new_id() for _ in range(1000)]  # four draws of the 256-id pool
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in ids)
    assert len(set(ids)) == len(ids)
    assert len(set(RandomIds()() for _ in range(3))) == 3  # each pipeline draws its own


@pytest.mark.parametrize("value", VALID_IDS)
async def test_request_id_is_kept_when_valid(tmp_path: Path, value: str) -> None:
    assert await _request_id_roundtrip(tmp_path, {"X-Request-ID": value}) == (value, value)


@pytest.mark.parametrize("value", INVALID_IDS, ids=["too-long", "space", "tab", "non-ascii"])
async def test_request_id_is_replaced_when_invalid(tmp_path: Path, value: str) -> None:
    returned, sent = await _request_id_roundtrip(tmp_path, {"X-Request-ID": value})
    assert returned == sent and returned != value
    assert re.fullmatch(r"[0-9a-f]{32}", returned)


async def test_request_id_with_control_characters_is_replaced(tmp_path: Path) -> None:
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream.url) as gateway:
        raw = await raw_http(gateway.url, b"GET /web/fn HTTP/1.1\r\nHost: x\r\nX-Request-ID: ab\x01cd\r\nConnection: close\r\n\r\n")
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    returned = re.search(rb"\r\nx-request-id: ([^\r]*)", head)
    assert returned is not None and b"\x01" not in returned.group(1) and re.fullmatch(rb"[0-9a-f]{32}", returned.group(1))
    assert all(b"\x01" not in call.headers.get("X-Request-ID", "").encode() for call in upstream.calls)


async def test_request_id_is_on_gateway_errors_too(tmp_path: Path) -> None:
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream.url) as gateway:
        async with gateway.client() as client:
            response = await client.get("/nowhere", headers={"X-Request-ID": "mine-1"})
    assert response.headers["x-request-id"] == "mine-1"
    assert problem_of(response.headers["content-type"], response.content)["request_id"] == "mine-1"


# --- 413, unknown route, refused captures --------------------------------------------------------

SMALL_LIMITS = "  max_body_bytes: 1000\n  replay_max_bytes: 400\n"


async def _chunks(total: int, size: int = 100) -> AsyncIterator[bytes]:
    for offset in range(0, total, size):
        yield b"x" * min(size, total - offset)


@pytest.mark.parametrize("dialect", ["http", "liveperson"])
async def test_declared_body_over_the_limit_gets_413_without_calling_upstream(tmp_path: Path, dialect: str) -> None:
    template, path = SUCCESS_ROUTES[dialect]
    async with simulated(dialect) as upstream, gateway_for(tmp_path, upstream.url, dialect, [template], server=SMALL_LIMITS) as gateway:
        async with gateway.client() as client:
            response = await client.post(path, content=b"x" * 1001)
            at_limit = await client.post(path, content=b"x" * 1000)
    problem = problem_of(response.headers["content-type"], response.content)
    assert (response.status_code, problem["class"], problem["code"], problem["attempts"]) == (413, "client_error", "gateway.body_too_large", 0)
    assert at_limit.status_code == 200
    assert [len(c.body) for c in upstream.calls] == [1000]


def metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


@pytest.mark.parametrize("replay", ["1000", "400"], ids=["buffered", "streamed"])
async def test_chunked_body_over_the_limit_gets_413_and_never_reaches_upstream_whole(tmp_path: Path, replay: str) -> None:
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream.url, server=f"  max_body_bytes: 1000\n  replay_max_bytes: {replay}\n") as gateway:
        async with gateway.client() as client:
            response = await client.post("/web/fn", content=_chunks(5000))
            fits = await client.post("/web/fn", content=_chunks(1000))
            metrics = (await client.get("/metrics")).text
    problem = problem_of(response.headers["content-type"], response.content)
    assert (response.status_code, problem["code"]) == (413, "gateway.body_too_large")
    assert fits.status_code == 200
    assert [len(c.body) for c in upstream.calls] == [1000]
    # a streamed body cut short by its own size is not the upstream's failure
    assert metric_lines(metrics, "gateway_upstream_attempts_total") == ['gateway_upstream_attempts_total{class="success",upstream="up"} 1.0']


async def test_client_leaving_mid_upload_is_not_an_upstream_failure(tmp_path: Path) -> None:
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream.url, server=SMALL_LIMITS) as gateway:
        host, port = gateway.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /web/fn HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 600)
        await writer.drain()
        await asyncio.sleep(0.2)  # let the gateway start streaming the first 600 bytes upstream
        writer.close()
        async with gateway.client() as client:
            for _ in range(200):
                metrics = (await client.get("/metrics")).text
                if 'status="499"' in metrics:
                    break
                await asyncio.sleep(0.02)
    [answered] = metric_lines(metrics, "gateway_requests_total")
    assert 'status="499"' in answered and 'class="client_closed"' in answered
    assert metric_lines(metrics, "gateway_upstream_attempts_total") == []
    assert upstream.calls == []


async def test_unknown_route_gets_404_problem_and_nothing_is_forwarded(tmp_path: Path) -> None:
    async with raw_upstream() as upstream, gateway_for(tmp_path, upstream.url) as gateway:
        async with gateway.client() as client:
            responses = [await client.request(m, p, content=b"{}") for m, p in (("GET", "/nowhere"), ("POST", "/web"), ("POST", "/web/a/b"), ("GET", "/"))]
    for response in responses:
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        problem = problem_of(response.headers["content-type"], response.content)
        assert (problem["class"], problem["code"], problem["upstream"], problem["attempts"]) == ("not_found", "gateway.no_route", None, 0)
    assert upstream.requests == []


REFUSED_TARGETS = {
    "dot-dot": b"/web/..",
    "encoded-dot-dot": b"/web/%2e%2e",
    "encoded-slash": b"/web/a%2fb",
    "encoded-backslash": b"/web/a%5Cb",
    "control-char": b"/web/a%01b",
    "encoded-newline": b"/web/a%0d%0aX-Injected:%201",
    "too-long": b"/web/" + b"f" * 257,
    "lp-account-dot-dot": b"/api/account/../lambdas/fn/invoke",
    "lp-account-encoded-slash": b"/api/account/le%2F1/lambdas/fn/invoke",
}


@pytest.mark.parametrize("name", sorted(REFUSED_TARGETS))
async def test_refused_captures_get_400_before_anything_else(tmp_path: Path, name: str) -> None:
    routes = ["/web/{function}", LP_INVOKE]
    async with raw_upstream() as upstream, gateway_for(tmp_path, upstream.url, routes=routes) as gateway:
        async with gateway.client() as client:
            response = await client.post(gateway.url + "/x", content=b"{}", extensions={"target": REFUSED_TARGETS[name]})
            accepted = await client.post(gateway.url + "/x", content=b"{}", extensions={"target": b"/web/" + b"f" * 256})
    problem = problem_of(response.headers["content-type"], response.content)
    assert (response.status_code, problem["class"], problem["code"], problem["attempts"]) == (400, "client_error", "gateway.bad_request", 0)
    assert accepted.status_code == 200
    assert [r.line for r in upstream.requests] == [b"POST /web/" + b"f" * 256 + b" HTTP/1.1"]


# --- streaming and memory --------------------------------------------------------------------------


class RssSampler:
    """Samples a process's resident set size on a thread until stopped; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.005) -> None:
        self._process = psutil.Process(pid)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0
        self.samples = 0

    def rss(self) -> int:
        return self._process.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self.samples += 1
            self._stop.wait(self._interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def _read_slowly(client: httpx.AsyncClient, url: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    async with client.stream("GET", url) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw(65536):
            digest.update(chunk)
            size += len(chunk)
            await asyncio.sleep(0.002)
    return size, digest.hexdigest()


@contextlib.contextmanager
def big_gateway(tmp_path: Path, url: str, routes: list[str]) -> Iterator[tuple[str, RssSampler]]:
    text = config_text(upstream_config("up", url, "http", routes, rate_limited="false"), server=f"  max_body_bytes: {64 * MiB}\n")
    with gateway_process(write_config(tmp_path, text)) as process:
        yield process.url, RssSampler(process.process.pid)


async def test_20_mb_response_streams_through_with_bounded_memory(tmp_path: Path) -> None:
    big = seeded_bytes(BIG)
    async with simulated("http") as upstream:
        with big_gateway(tmp_path, upstream.url, ["/web/{function}"]) as (url, sampler):
            async with httpx.AsyncClient(timeout=30) as client:
                upstream.script(Reply(200, seeded_bytes(2 * MiB, 3), (("Content-Type", "application/octet-stream"),)))
                await _read_slowly(client, url + "/web/warm-up")
                baseline = sampler.rss()
                upstream.script(Reply(200, big, (("Content-Type", "application/octet-stream"),)))
                with sampler:
                    size, digest = await _read_slowly(client, url + "/web/big")
    assert (size, digest) == (BIG, hashlib.sha256(big).hexdigest())
    assert sampler.samples > 10
    assert sampler.peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew by {(sampler.peak - baseline) / MiB:.1f} MiB while 20 MiB streamed"


async def test_20_mb_request_body_over_the_replay_limit_streams_upstream_with_bounded_memory(tmp_path: Path) -> None:
    big = seeded_bytes(BIG, 11)

    async def body(data: bytes) -> AsyncIterator[bytes]:
        for offset in range(0, len(data), 65536):
            yield data[offset : offset + 65536]

    async with aiohttp_upstream(SlowSink().consume) as upstream_url:
        with big_gateway(tmp_path, upstream_url, ["/web/{function}"]) as (url, sampler):
            async with httpx.AsyncClient(timeout=30) as client:
                warm = await client.post(url + "/web/warm-up", content=body(seeded_bytes(2 * MiB)))
                assert warm.status_code == 200
                baseline = sampler.rss()
                with sampler:
                    response = await client.post(url + "/web/big", content=body(big))
                    declared = await client.post(url + "/web/big", content=big)
    assert response.status_code == 200
    digest = hashlib.sha256(big).hexdigest()
    assert response.json() == {"size": BIG, "sha256": digest, "transfer_encoding": "chunked", "content_length": None}
    assert declared.json() == {"size": BIG, "sha256": digest, "transfer_encoding": None, "content_length": str(BIG)}
    assert sampler.peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew by {(sampler.peak - baseline) / MiB:.1f} MiB while 20 MiB streamed"


async def test_client_disconnect_mid_response_releases_the_upstream_connection(tmp_path: Path) -> None:
    upstream = StreamingUpstream()
    async with aiohttp_upstream(upstream.stream) as url, gateway_for(tmp_path, url, rate_limited="false") as gateway:
        async with gateway.client() as client:
            async with client.stream("GET", "/web/endless") as response:
                received = 0
                async for chunk in response.aiter_raw():
                    received += len(chunk)
                    if received > 256 * 1024:
                        break
            await asyncio.wait_for(upstream.write_failed.wait(), 10)
            after = await client.get("/healthz")
    assert not upstream.finished
    assert after.status_code == 200


def test_a_repeated_header_is_read_by_its_first_value_and_every_line_counts_toward_the_size() -> None:
    raw = [(b"host", b"a"), (b"x-request-id", b"first"), (b"accept", b"*/*"), (b"x-request-id", b"second")]
    assert first_values(raw) == {b"host": b"a", b"x-request-id": b"first", b"accept": b"*/*"}
    assert header_bytes(raw) == sum(len(name) + len(value) + len(b": \r\n") for name, value in raw)
    assert header_bytes(iter(raw)) == header_bytes(raw) and header_bytes([]) == 0
