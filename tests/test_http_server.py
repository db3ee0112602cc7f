"""The gateway's HTTP/1.1 server protocol (gateway.http_protocol) under small ASGI apps.

Each test serves an app with uvicorn and `GatewayHttpProtocol`, as `gateway serve` does, and
talks to it over a real loopback socket with exact bytes. The gateway-level behaviours (431,
408, malformed requests, WebSocket refusal, 901 status lines) are in test_slow_clients.py,
test_hostile_input.py and test_proxy_passthrough.py; these are the protocol's own duties.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import uvicorn

from gateway.http_protocol import GatewayHttpProtocol
from gateway.pipeline import DISCONNECT_EXTENSION
from tests.harness import free_port

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class CountingProtocol(GatewayHttpProtocol):
    """The protocol with its transport's writes counted (the system calls a response costs)."""

    writes: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        real_write = transport.write

        class Counted:
            def __getattr__(self, name: str) -> Any:
                return getattr(transport, name)

            def write(self, data: bytes) -> None:
                CountingProtocol.writes.append(bytes(data))
                real_write(data)

        super().connection_made(Counted())


@contextlib.asynccontextmanager
async def serving(app: App, protocol: type = GatewayHttpProtocol, **options: Any) -> AsyncIterator[int]:
    port = free_port()
    settings = dict(host="127.0.0.1", port=port, loop="none", http=protocol, lifespan="off", log_level="critical", server_header=False, date_header=False, proxy_headers=False)
    server = uvicorn.Server(uvicorn.Config(app, **{**settings, **options}))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def read_response(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One response: (status line, headers, body), framed by its content-length or chunks."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    lines = head[:-4].split(b"\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines[1:])}
    if b"content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers[b"content-length"])), timeout_s)
    elif headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout_s))[:-2], 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), timeout_s)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = b""
    return lines[0], headers, body


def simple(body: bytes = b'{"ok":true}', status: int = 200) -> App:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


async def test_a_response_head_and_its_body_leave_in_one_write() -> None:
    CountingProtocol.writes = []
    async with serving(simple(b'{"answer":42}'), protocol=CountingProtocol) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            writer.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
            status, headers, body = await read_response(reader)
            assert (status, body) == (b"HTTP/1.1 200 OK", b'{"answer":42}')
        writer.close()
    assert len(CountingProtocol.writes) == 3  # one per response: head and body together
    assert all(write.startswith(b"HTTP/1.1 200 OK\r\n") and write.endswith(b'{"answer":42}') for write in CountingProtocol.writes)


async def test_a_head_is_sent_at_once_when_the_body_comes_later() -> None:
    release = asyncio.Event()

    async def streaming(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await release.wait()
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": False})

    async with serving(streaming) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # before the body exists
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked" in head
        release.set()
        assert await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5) == b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"
        writer.close()


async def test_pipelined_requests_are_answered_in_order() -> None:
    async def echo_path(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        if scope["path"] == "/slow":
            await asyncio.sleep(0.2)  # the second must still come after it
        body = scope["path"].encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async with serving(echo_path) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\nGET /fast HTTP/1.1\r\nHost: t\r\n\r\nGET /last HTTP/1.1\r\nHost: t\r\n\r\n")
        bodies = [(await read_response(reader))[2] for _ in range(3)]
        assert bodies == [b"/slow", b"/fast", b"/last"]
        writer.close()


async def test_expect_continue_is_answered_when_the_app_reads_the_body() -> None:
    async with serving(simple(b"read")) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        status, _, body = await read_response(reader)
        assert (status, body) == (b"HTTP/1.1 200 OK", b"read")
        writer.close()


async def test_framing_follows_the_method_and_status() -> None:
    async def unframed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        status = int(scope["path"].strip("/"))
        await send({"type": "http.response.start", "status": status, "headers": [(b"x-kind", b"unframed")]})
        await send({"type": "http.response.body", "body": b"" if status in (204, 304) else b"abc"})

    async with serving(unframed) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /200 HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert (headers.get(b"transfer-encoding"), body) == (b"chunked", b"abc")
        writer.write(b"GET /204 HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == b"HTTP/1.1 204 No Content" and b"transfer-encoding" not in headers
        writer.write(b"HEAD /200 HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK")
        writer.write(b"GET /901 HTTP/1.1\r\nHost: t\r\n\r\n")  # the HEAD left no body behind it
        status, _, body = await read_response(reader)
        assert (status, body) == (b"HTTP/1.1 901 ", b"abc")
        writer.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [(b"x-evil", b"a\r\nset-cookie: stolen=1"), (b"x-evil", b"a\nb"), (b"x-evil", b"a\x00b"), (b"x evil", b"a"), (b"x:evil", b"a"), (b"", b"a")],
)
async def test_a_header_that_would_break_the_head_is_refused_with_a_problem_500(name: bytes, value: bytes) -> None:
    async def smuggling(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain"), (name, value)]})
        await send({"type": "http.response.body", "body": b"ok"})

    async with serving(smuggling) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == b"HTTP/1.1 500 Internal Server Error"
        assert b"set-cookie" not in headers and b"x-evil" not in headers
        writer.close()


async def test_an_app_that_fails_while_its_head_is_still_held_gets_the_problem_500_instead() -> None:
    async def fails_after_start(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        raise ValueError("secret detail")  # in the same turn: the head has not left yet

    async with serving(fails_after_start) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-Request-ID: held-1\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == b"HTTP/1.1 500 Internal Server Error" and headers[b"connection"] == b"close"
        assert orjson.loads(body)["request_id"] == "held-1" and b"secret" not in body
        assert await asyncio.wait_for(reader.read(), 5) == b""  # nothing after it: the 200 head never left
        writer.close()


async def test_framing_headers_are_found_whatever_their_case_and_place() -> None:
    async def framed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"X-First", b"1"), (b"Content-Length", b"3"), (b"Connection", b"keep-alive, Close"), (b"x-last", b"value: with colon\tand tab")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"abc"})

    async with serving(framed) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert (status, body) == (b"HTTP/1.1 200 OK", b"abc")
        assert headers[b"content-length"] == b"3" and b"transfer-encoding" not in headers
        assert headers[b"x-first"] == b"1" and headers[b"x-last"] == b"value: with colon\tand tab"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the app's Connection: close is honoured
        writer.close()


@pytest.mark.parametrize("failure", ["raises", "returns-silently"])
async def test_an_app_that_fails_before_answering_gets_a_problem_500(failure: str) -> None:
    async def broken(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        if failure == "raises":
            raise ValueError("secret detail")

    async with serving(broken) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-Request-ID: fail-1\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == b"HTTP/1.1 500 Internal Server Error" and headers[b"connection"] == b"close"
        problem = orjson.loads(body)
        assert (problem["code"], problem["request_id"]) == ("gateway.internal", "fail-1")
        assert b"secret" not in body
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_the_client_leaving_resolves_the_disconnect_future_and_receive() -> None:
    seen: dict[str, Any] = {}
    started = asyncio.Event()

    async def waits(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        started.set()
        await asyncio.wait_for(scope["extensions"][DISCONNECT_EXTENSION], 5)
        seen["receive"] = (await asyncio.wait_for(receive(), 5))["type"]

    async with serving(waits) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.wait_for(started.wait(), 5)
        writer.close()
        for _ in range(100):
            if "receive" in seen:
                break
            await asyncio.sleep(0.05)
    assert seen == {"receive": "http.disconnect"}


async def test_an_idle_connection_closes_after_the_keep_alive() -> None:
    async with serving(simple(), timeout_keep_alive=1) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await read_response(reader)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 20) == b""  # closed by the server
        waited = asyncio.get_running_loop().time() - started
        assert 0.9 <= waited < 15  # the keep-alive (1 s), re-checked by the connection's one timer
        writer.close()


async def test_request_bodies_arrive_in_pieces_and_the_target_is_split() -> None:
    seen: dict[str, Any] = {}

    async def collect(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message["body"]
            if not message["more_body"]:
                break
        seen.update(path=scope["path"], raw_path=scope["raw_path"], query=scope["query_string"], body=body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async with serving(collect) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /a%20b/c?x=1&y=%20 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await asyncio.sleep(0.1)
        writer.write(b"2\r\nde\r\n0\r\n\r\n")
        await read_response(reader)
        assert seen == {"path": "/a b/c", "raw_path": b"/a%20b/c", "query": b"x=1&y=%20", "body": b"abcde"}
        writer.write(b"GET http://elsewhere.example/abs?q=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        await read_response(reader)
        assert (seen["path"], seen["query"]) == ("/abs", b"q=1")
        writer.close()


async def test_shutdown_lets_the_answer_in_progress_finish_then_closes() -> None:
    entered = asyncio.Event()

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        entered.set()
        await asyncio.sleep(0.5)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"done"})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(slow, host="127.0.0.1", port=port, loop="none", http=GatewayHttpProtocol, lifespan="off", log_level="critical"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.wait_for(entered.wait(), 5)
    server.should_exit = True
    status, headers, body = await read_response(reader)
    assert (status, body, headers.get(b"connection")) == (b"HTTP/1.1 200 OK", b"done", b"close")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await asyncio.wait_for(task, 15)
    writer.close()


@pytest.mark.parametrize("target", [b"/caf\xc3\xa9", b"http://host:99999/x"], ids=["non-ascii-path", "bad-absolute-form"])
async def test_an_unreadable_target_after_a_good_request_still_gets_its_400(target: bytes) -> None:
    async with serving(simple(b"fine")) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await read_response(reader))[2] == b"fine"
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nX-Request-ID: bad-target\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == b"HTTP/1.1 400 Bad Request" and headers[b"connection"] == b"close"
        assert orjson.loads(body)["code"] == "gateway.bad_request"
        writer.close()


async def test_http_1_0_closes_after_its_answer_and_a_body_past_its_length_is_cut() -> None:
    async def overlong(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"3")]})
        await send({"type": "http.response.body", "body": b"abc" if scope["path"] == "/fits" else b"abcdef"})

    async with serving(overlong) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /fits HTTP/1.0\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert (status, body, headers[b"connection"]) == (b"HTTP/1.1 200 OK", b"abc", b"close")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /overlong HTTP/1.1\r\nHost: t\r\n\r\n")
        sent = await asyncio.wait_for(reader.read(), 5)  # closed: never more than the declared length
        assert b"abcdef" not in sent
        writer.close()
