"""The upstream client's wire layer (gateway.http1 under gateway.upstream), against raw loopback servers.

Each test scripts a bare asyncio server that reads requests and writes exact response bytes, so
what is on the wire is what the test says, and counts the connections it accepted, so reuse is
seen from the upstream's side. Every test runs on asyncio's own loop and on uvloop (which the
served gateway uses): their transports differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trustme
import uvloop

from gateway.classify import TransportFailure
from gateway.upstream import AttemptFailure, UpstreamBodyError, UpstreamClient, UpstreamReply, UpstreamRequest, request_head, split_credentials

Handler = Callable[["Peer"], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"




def on_both_loops(test: Callable[[], Awaitable[None]]) -> Callable[[str], None]:
    """The test, run once on asyncio's own event loop and once on uvloop."""

    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    def run(loop: str) -> None:
        (uvloop.run if loop == "uvloop" else asyncio.run)(test())  # type: ignore[arg-type]

    run.__name__, run.__doc__ = test.__name__, test.__doc__
    return run


@dataclass
class Peer:
    """One accepted connection, as the upstream sees it."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    tail: bytes = b""  # what `answering` read after its last answer, until the client closed

    async def request(self) -> tuple[bytes, bytes]:
        """The next request's head and its body (Content-Length or chunked)."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        lowered = head.lower()
        if b"transfer-encoding: chunked" in lowered:
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                body += (await self.reader.readexactly(size + 2))[:-2]
                if size == 0:
                    return head, body
        length = 0
        for line in lowered.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return head, await self.reader.readexactly(length)

    async def answer(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()


@dataclass
class RawServer:
    handler: Handler
    peers: list[Peer] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(len(self.peers), reader, writer)
        self.peers.append(peer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await self.handler(peer)
        peer.finished.set()
        writer.close()


@contextlib.asynccontextmanager
async def raw_server(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[RawServer]:
    server = RawServer(handler)
    server.server = await asyncio.start_server(server._accept, "127.0.0.1", 0, ssl=tls)
    try:
        yield server
    finally:
        server.server.close()
        for peer in server.peers:
            peer.writer.close()


@contextlib.asynccontextmanager
async def client(**options: object) -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient(**options)  # type: ignore[arg-type]
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.aclose()


async def post(upstream: UpstreamClient, url: str, body: bytes = b"{}", per_try_s: float = 2.0, method: str = "POST") -> UpstreamReply:
    reply = await upstream.send(UpstreamRequest(method, url, [("X-Test", "1")], body), 1.0, per_try_s)
    assert isinstance(reply, UpstreamReply), reply
    return reply


async def attempt(upstream: UpstreamClient, url: str, connect_s: float = 1.0, per_try_s: float = 2.0) -> UpstreamReply | AttemptFailure:
    """One POST of `{}` to `url` + "/f", as the pipeline makes it: a reply or a failure."""
    return await upstream.send(UpstreamRequest("POST", url + "/f", [], b"{}"), connect_s, per_try_s)


async def fetch(upstream: UpstreamClient, url: str, **options: object) -> tuple[int, bytes]:
    reply = await post(upstream, url, **options)  # type: ignore[arg-type]
    body = await reply.read_whole()
    reply.release()
    return reply.status, body


def answering(*responses: bytes) -> Handler:
    """Reads a request and writes the next response, for as long as the connection lasts."""

    async def handle(peer: Peer) -> None:
        for raw in responses:
            await peer.request()
            await peer.answer(raw)
        peer.tail = await peer.reader.read()

    return handle


@on_both_loops
async def test_sequential_requests_share_one_kept_alive_connection() -> None:
    async with raw_server(answering(OK, OK, OK)) as upstream, client() as http:
        assert [await fetch(http, upstream.url + "/f") for _ in range(3)] == [(200, b"ok")] * 3
        assert len(upstream.peers) == 1


@on_both_loops
async def test_a_connection_close_answer_is_not_reused() -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answering(closing)) as upstream, client() as http:
        assert [await fetch(http, upstream.url + "/f") for _ in range(2)] == [(200, b"ok")] * 2
        assert len(upstream.peers) == 2


@on_both_loops
async def test_an_http_1_0_answer_without_keep_alive_is_not_reused() -> None:
    old = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answering(old, old)) as upstream, client() as http:
        assert [await fetch(http, upstream.url + "/f") for _ in range(2)] == [(200, b"ok")] * 2
        assert len(upstream.peers) == 2


@on_both_loops
async def test_an_idle_connection_the_upstream_closed_is_not_used_again() -> None:
    async def answer_once_then_close(peer: Peer) -> None:
        await peer.request()
        await peer.answer(OK)  # says nothing about closing, then closes while idle

    async with raw_server(answer_once_then_close) as upstream, client() as http:
        assert await fetch(http, upstream.url + "/f") == (200, b"ok")
        await asyncio.sleep(0.1)  # the close reaches the idle connection
        assert await fetch(http, upstream.url + "/f") == (200, b"ok")
        assert len(upstream.peers) == 2


@on_both_loops
async def test_a_connection_idle_past_the_idle_timeout_is_closed() -> None:
    async with raw_server(answering(OK, OK)) as upstream, client(idle_timeout_s=0.2) as http:
        assert await fetch(http, upstream.url + "/f") == (200, b"ok")
        await asyncio.wait_for(upstream.peers[0].finished.wait(), 2.0)  # the pool's sweep closed it
        assert await fetch(http, upstream.url + "/f") == (200, b"ok")
        assert len(upstream.peers) == 2


@on_both_loops
async def test_interim_responses_are_skipped() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    async with raw_server(answering(interim + OK, OK)) as upstream, client() as http:
        reply = await post(http, upstream.url + "/f")
        assert (reply.status, reply.headers, await reply.read_whole()) == (200, [(b"content-length", b"2")], b"ok")
        reply.release()
        assert await fetch(http, upstream.url + "/f") == (200, b"ok")
        assert len(upstream.peers) == 1


@on_both_loops
async def test_a_body_ended_by_the_connection_closing_is_whole() -> None:
    async def close_delimited(peer: Peer) -> None:
        await peer.request()
        await peer.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst ")
        await asyncio.sleep(0.05)
        await peer.answer(b"second")

    async with raw_server(close_delimited) as upstream, client() as http:
        reply = await post(http, upstream.url + "/f")
        assert reply.declared_length is None
        assert await reply.read_bounded(1024) == (b"first second", True)
        reply.release()


@on_both_loops
async def test_chunked_bodies_are_decoded_and_the_connection_reused() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    async with raw_server(answering(chunked, OK)) as upstream, client() as http:
        reply = await post(http, upstream.url + "/f")
        assert b"transfer-encoding" not in dict(reply.headers)  # hop-by-hop: framing is the server's own
        assert b"".join([chunk async for chunk in reply.iter_body()]) == b"abcdefg"
        reply.release()
        assert await fetch(http, upstream.url + "/f") == (200, b"ok")
        assert len(upstream.peers) == 1


@on_both_loops
async def test_a_head_answer_ends_at_its_head_and_its_connection_is_not_reused() -> None:
    async def head_then_ok(peer: Peer) -> None:
        await peer.request()
        await peer.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await peer.reader.read()

    async with raw_server(head_then_ok) as upstream, client() as http:
        reply = await post(http, upstream.url + "/f", body=b"", method="HEAD")
        assert (reply.status, await reply.read_whole()) == (200, b"")
        reply.release()
        reply = await post(http, upstream.url + "/f", body=b"", method="HEAD")
        reply.release()
        assert len(upstream.peers) == 2


@on_both_loops
async def test_a_body_that_stalls_fails_after_the_read_timeout() -> None:
    async def stall(peer: Peer) -> None:
        await peer.request()
        await peer.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await asyncio.sleep(5)

    async with raw_server(stall) as upstream, client() as http:
        reply = await post(http, upstream.url + "/f", per_try_s=0.2)
        with pytest.raises(UpstreamBodyError, match="no body data within 0.2 s"):
            await reply.read_whole()
        reply.close()


@on_both_loops
async def test_a_body_cut_short_is_an_error_not_a_short_body() -> None:
    async def cut(peer: Peer) -> None:
        await peer.request()
        await peer.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    async with raw_server(cut) as upstream, client() as http:
        reply = await post(http, upstream.url + "/f")
        with pytest.raises(UpstreamBodyError):
            await reply.read_whole()
        reply.close()


@on_both_loops
async def test_a_huge_response_head_is_refused() -> None:
    async def endless_head(peer: Peer) -> None:
        await peer.request()
        await peer.answer(b"HTTP/1.1 200 OK\r\n")
        for _ in range(200):
            await peer.answer(b"X-Filler: " + b"y" * 1000 + b"\r\n")

    async with raw_server(endless_head) as upstream, client() as http:
        result = await attempt(http, upstream.url)
        assert isinstance(result, AttemptFailure)
        assert (result.failure, "response head larger than" in result.detail) == (TransportFailure.RESET, True), result


@on_both_loops
async def test_an_endless_header_line_is_refused_while_it_arrives() -> None:
    async def endless_line(peer: Peer) -> None:
        await peer.request()
        await peer.answer(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(4096):  # 64 MiB if nobody stops it
                await peer.answer(b"y" * 16384)

    async with raw_server(endless_line) as upstream, client() as http:
        result = await attempt(http, upstream.url, per_try_s=10.0)
        assert isinstance(result, AttemptFailure)
        assert (result.failure, "response head larger than" in result.detail) == (TransportFailure.RESET, True), result


@on_both_loops
async def test_invalid_http_is_a_broken_connection() -> None:
    async with raw_server(answering(b"SMTP ready\r\n\r\n")) as upstream, client() as http:
        result = await attempt(http, upstream.url)
        assert isinstance(result, AttemptFailure) and result.failure is TransportFailure.RESET, result
        assert "invalid response" in result.detail


@on_both_loops
async def test_a_second_response_to_one_request_poisons_the_connection() -> None:
    async with raw_server(answering(OK + OK, OK)) as upstream, client() as http:
        assert await fetch(http, upstream.url + "/f") == (200, b"ok")
        assert await fetch(http, upstream.url + "/f") == (200, b"ok")
        assert len(upstream.peers) == 2


@on_both_loops
async def test_no_answer_within_the_per_try_timeout() -> None:
    async def silent(peer: Peer) -> None:
        await peer.request()
        await asyncio.sleep(5)

    async with raw_server(silent) as upstream, client() as http:
        result = await attempt(http, upstream.url, per_try_s=0.2)
        assert result == AttemptFailure(TransportFailure.TIMEOUT, "no answer within 0.2 s")


@on_both_loops
async def test_a_refused_connection_is_refused() -> None:
    async with raw_server(answering(OK)) as upstream:
        url = upstream.url
    async with client() as http:
        result = await attempt(http, url)
        assert isinstance(result, AttemptFailure) and result.failure is TransportFailure.REFUSED, result
        assert result.detail.startswith("connection failed:")


@on_both_loops
async def test_the_pool_holds_at_most_max_connections_and_queues_the_rest() -> None:
    gate = asyncio.Event()

    async def slow(peer: Peer) -> None:
        while True:
            await peer.request()
            await gate.wait()
            await peer.answer(OK)

    async with raw_server(slow) as upstream, client(max_connections=2) as http:
        calls = [asyncio.create_task(fetch(http, upstream.url + "/f")) for _ in range(5)]
        await asyncio.sleep(0.2)
        assert len(upstream.peers) == 2  # three wait for a free connection
        gate.set()
        assert await asyncio.gather(*calls) == [(200, b"ok")] * 5
        assert len(upstream.peers) == 2


@on_both_loops
async def test_waiting_for_a_free_connection_is_bounded_by_the_connect_timeout() -> None:
    async def never(peer: Peer) -> None:
        await peer.request()
        await asyncio.sleep(5)

    async with raw_server(never) as upstream, client(max_connections=1) as http:
        first = asyncio.create_task(attempt(http, upstream.url, connect_s=0.3, per_try_s=3.0))
        await asyncio.sleep(0.05)
        second = await attempt(http, upstream.url, connect_s=0.3, per_try_s=3.0)
        assert second == AttemptFailure(TransportFailure.REFUSED, "could not connect within 0.3 s")
        first.cancel()


@on_both_loops
async def test_a_streamed_body_goes_chunked_or_with_its_declared_length() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"ab", b"", b"cde"):
            yield piece

    received: list[tuple[bytes, bytes]] = []

    async def record(peer: Peer) -> None:
        while True:
            received.append(await peer.request())
            await peer.answer(OK)

    async with raw_server(record) as upstream, client() as http:
        for headers in ([], [("Content-Length", "5")]):
            reply = await http.send(UpstreamRequest("PUT", upstream.url + "/f", headers, pieces()), 1.0, 2.0)
            assert isinstance(reply, UpstreamReply)
            await reply.read_whole()
            reply.release()
    assert [body for _, body in received] == [b"abcde", b"abcde"]
    assert b"transfer-encoding: chunked" in received[0][0].lower() and b"content-length" not in received[0][0].lower()
    assert b"content-length: 5" in received[1][0].lower() and b"transfer-encoding" not in received[1][0].lower()


@on_both_loops
async def test_a_streamed_body_that_breaks_off_breaks_the_attempt() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"abc"
        raise RuntimeError("the caller went away")

    async def wait(peer: Peer) -> None:
        await peer.reader.read()

    async with raw_server(wait) as upstream, client() as http:
        result = await http.send(UpstreamRequest("PUT", upstream.url + "/f", [], broken()), 1.0, 2.0)
        assert result == AttemptFailure(TransportFailure.RESET, "connection broken: the request body broke off")


@on_both_loops
async def test_an_early_answer_to_a_body_still_being_sent_does_not_reuse_the_connection() -> None:
    release_body = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        yield b"abc"
        await release_body.wait()
        yield b"def"

    async def refuse_early(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        await peer.answer(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno")
        peer.tail = await peer.reader.read()

    async with raw_server(refuse_early) as upstream, client() as http:
        reply = await http.send(UpstreamRequest("PUT", upstream.url + "/f", [], endless()), 1.0, 2.0)
        assert isinstance(reply, UpstreamReply) and reply.status == 413
        assert await reply.read_whole() == b"no"
        reply.release()
        await asyncio.wait_for(upstream.peers[0].finished.wait(), 2.0)  # closed, not kept
        assert upstream.peers[0].tail == b"3\r\nabc\r\n"
        release_body.set()


@on_both_loops
async def test_a_streamed_body_waits_for_an_upstream_that_does_not_read() -> None:
    pulled = 0
    offered = 64 * 1024 * 1024

    async def plenty() -> AsyncIterator[bytes]:
        nonlocal pulled
        while pulled < offered:
            pulled += 65536
            yield b"z" * 65536

    async def read_nothing(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(5)

    async with raw_server(read_nothing) as upstream, client() as http:
        call = asyncio.create_task(http.send(UpstreamRequest("PUT", upstream.url + "/f", [], plenty()), 1.0, 5.0))
        await asyncio.sleep(0.5)
        assert pulled < offered // 4  # held back by the socket's buffers, not the whole 64 MiB taken in
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call


@on_both_loops
async def test_reading_pauses_while_the_unread_body_exceeds_the_read_limit() -> None:
    total = 8 * 1024 * 1024

    async def flood(peer: Peer) -> None:
        await peer.request()
        peer.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        sent = 0
        while sent < total:
            peer.writer.write(b"z" * 65536)
            sent += 65536
            await peer.writer.drain()

    async with raw_server(flood) as upstream, client(read_bufsize=64 * 1024) as http:
        reply = await post(http, upstream.url + "/f")
        await asyncio.sleep(0.3)  # the upstream writes as fast as it may; nothing reads the body
        chunks = reply.iter_body()
        first = await anext(chunks)
        assert len(first) < 2 * 1024 * 1024  # bounded by the read limit plus the socket's buffers, not the 8 MiB
        rest = sum([len(chunk) async for chunk in chunks])
        assert len(first) + rest == total
        reply.release()


@on_both_loops
async def test_request_heads_refuse_line_breaks_and_nul() -> None:
    async with client() as http:
        origin, target = http._split("http://127.0.0.1:1/f")
        for name, value in (("X-A", "b\r\nX-Injected: 1"), ("X-A", "b\n"), ("X-A\r", "b"), ("X-A", "b\x00")):
            with pytest.raises(ValueError, match="CR, LF or NUL"):
                request_head("POST", target, origin, [(name, value)], b"")


@on_both_loops
async def test_targets_and_host_headers_come_from_the_url_as_given() -> None:
    async with client() as http:
        cases = {
            "http://h.example:8080/a%2Fb/c?x=%20": (b"h.example:8080", "/a%2Fb/c?x=%20"),
            "http://h.example": (b"h.example", "/"),
            "http://h.example?q=1": (b"h.example", "/?q=1"),
            "https://h.example:443/p#frag": (b"h.example", "/p"),
            "http://[::1]:81/x": (b"[::1]:81", "/x"),
        }
        found = {url: (origin.host_header, target) for url, (origin, target) in ((url, http._split(url)) for url in cases)}
        assert found == cases


def test_credentials_in_the_url_become_basic_authorization() -> None:
    assert split_credentials("http://us%40er:p%3Aw@host:81/x?y") == ("http://host:81/x?y", "Basic dXNAZXI6cDp3")
    assert split_credentials("http://host/x") == ("http://host/x", None)


@on_both_loops
async def test_https_verifies_the_certificate_and_the_host_name() -> None:
    authority = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_tls)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)

    async with raw_server(answering(OK, OK), tls=server_tls) as upstream:
        url = upstream.url.replace("http://127.0.0.1", "https://localhost")
        async with client(tls_context=trusting) as http:
            assert [await fetch(http, url + "/f") for _ in range(2)] == [(200, b"ok")] * 2
            assert len(upstream.peers) == 1  # kept alive over TLS too
            wrong_name = await attempt(http, upstream.url.replace("http", "https"))
            assert isinstance(wrong_name, AttemptFailure) and wrong_name.failure is TransportFailure.REFUSED, wrong_name
            assert "certificate" in wrong_name.detail.lower() or "ip address mismatch" in wrong_name.detail.lower(), wrong_name.detail
        async with client() as http:  # the system's trust store does not know this authority
            untrusted = await attempt(http, url)
            assert isinstance(untrusted, AttemptFailure) and untrusted.failure is TransportFailure.REFUSED, untrusted
            assert "certificate verify failed" in untrusted.detail, untrusted.detail
