"""HTTP/1.1 to upstreams: kept-alive connections over asyncio protocols, responses parsed by llhttp.

The wire layer under `gateway.upstream`, which alone uses it. A request goes out as one write
of its head (and its body when buffered); the response is parsed by httptools (llhttp, the
parser of Node.js and of uvicorn) as it arrives. Measured on the benchmark's fast upstream, this
path costs a quarter of the CPU that aiohttp's `ClientSession` costs per request, which was the
largest share of the gateway's own cost (docs/performance.md).

What it does, and what a proxy needs from it:

- one pool for the process, idle connections kept per origin (LIFO, so the warmest is reused),
  at most `max_connections` open in all; a request waits for a free slot when all are busy;
- an idle connection that the upstream closed, or that sat idle past `idle_timeout_s`, is never
  used again; a connection is reused only after a complete response that keeps it alive, and
  never after a HEAD, an early answer to a body still being sent, or an error;
- 1xx interim responses are skipped; a body delimited by the connection's end is complete at a
  clean end; a response head larger than `max_head_bytes` is refused;
- backpressure both ways: a streamed request body waits for the socket to drain, and reading
  pauses once `read_limit` bytes of the response wait unread;
- nothing is resent: a failed request is the caller's to retry, or not.

Errors leave as `OSError` (could not connect), `TimeoutError`, or `UpstreamConnectionError`
(connected, then broken or spoke invalid HTTP); `gateway.upstream` translates them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

RawHeaders = list[tuple[bytes, bytes]]

MAX_HEAD_BYTES = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})
_FRAMING_NAMES = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class UpstreamConnectionError(Exception):
    """The connection broke, or the upstream's answer was not valid HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    host_header: bytes

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @classmethod
    def of(cls, scheme: str, netloc: str) -> "Origin":
        parts = urlsplit(f"{scheme}://{netloc}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {scheme}://{netloc}")
        default_port = 443 if parts.scheme == "https" else 80
        port = parts.port or default_port
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default_port else f"{shown}:{port}"
        return cls(parts.scheme, host, port, host_header.encode("idna" if not host.isascii() else "ascii"))


class Http1Connection(asyncio.Protocol):
    """One connection to an upstream; carries one request at a time."""

    def __init__(self, pool: "ConnectionPool", origin: Origin, read_limit: int, max_head_bytes: int) -> None:
        self._pool = pool
        self.origin = origin
        self._read_limit = read_limit
        self._max_head_bytes = max_head_bytes
        self._loop = pool.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._in_use = False
        self._reset_exchange(expect_body=True)

    def _reset_exchange(self, expect_body: bool) -> None:
        self._expect_body = expect_body
        self._status = 0
        self._headers: RawHeaders = []
        self._framing: RawHeaders = []  # Content-Length, Transfer-Encoding and Connection, as they came
        self._head_bytes = 0
        self._content_length: int | None = None
        self._interim = False
        self._headed = False
        self._eof_ends_body = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._keep_alive = True
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self._in_use or self._complete:  # nothing was asked: an upstream speaking out of turn
            self._keep_alive = False
            if not self._in_use:
                self.close()
            return
        try:
            self._parser.feed_data(data)
        except UpstreamConnectionError as exc:
            self._fail(exc)
        except httptools.HttpParserCallbackError as exc:
            self._fail(exc.__context__ if isinstance(exc.__context__, UpstreamConnectionError) else UpstreamConnectionError(f"invalid response: {exc}"))
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamConnectionError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamConnectionError(f"invalid response: {exc}"))
        else:
            if not self._headed:  # llhttp keeps a partial header line itself: count what it holds
                self._head_bytes += len(data)
                if self._head_bytes > self._max_head_bytes:
                    self._fail(UpstreamConnectionError(f"response head larger than {self._max_head_bytes} bytes"))
                    return
            if self._buffered > self._read_limit and not self._reading_paused and not self.closed:
                self._reading_paused = True
                self._transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        return False  # close our side too: HTTP/1.1 has no use for a half-open connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self._in_use and not self._complete and self._error is None:
            if self._headed and self._eof_ends_body and exc is None:
                self._complete = True  # closed already: never reused
            else:
                reason = f"{type(exc).__name__}: {exc}" if exc else "the upstream closed the connection"
                self._error = UpstreamConnectionError(reason)
        self._wake()
        self._wake_drain()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drain()

    # --- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._headed and not self._interim:  # a second response to one request
            raise UpstreamConnectionError("the upstream sent more than one response")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        if name in _FRAMING_NAMES:
            self._framing.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # an interim response (100 Continue, 103): its final one follows
            self._interim = True
            self._headers = []
            self._framing = []
            return
        self._status = status
        self._headed = True
        chunked = False
        for name, value in self._framing:
            if name == b"content-length":
                self._content_length = int(value)  # llhttp has checked it is a number
            elif name == b"transfer-encoding":
                chunked = chunked or b"chunked" in value.lower()
        if chunked:
            self._content_length = None
        self._eof_ends_body = self._content_length is None and not chunked and status not in _NO_BODY_STATUSES
        if not self._expect_body:  # the answer to a HEAD: llhttp cannot know its length means nothing
            self._complete = True
            self._keep_alive = False
        self._wake()

    @property
    def connection_values(self) -> list[bytes]:
        """The values of the response's Connection headers (the tokens they name are hop-by-hop)."""
        return [value for name, value in self._framing if name == b"connection"]

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._complete:
            return
        self._complete = True
        self._keep_alive = self._keep_alive and self._parser.should_keep_alive()
        self._wake()

    # --- the exchange -------------------------------------------------------------------------

    def send_request(self, head: bytes, body: bytes | AsyncIterable[bytes], chunked: bool, expect_body: bool) -> None:
        """Write the request; a streamed body is pumped by a task of its own."""
        self._reset_exchange(expect_body)
        self._in_use = True
        transport = self._transport
        assert transport is not None
        if isinstance(body, bytes):
            if len(body) <= 16 * 1024:
                transport.write(head + body)
            else:
                transport.writelines((head, body))
        else:
            transport.write(head)
            self._writer = self._loop.create_task(self._pump(body, chunked))

    async def response_head(self, timeout_s: float) -> tuple[int, RawHeaders]:
        """The status and the headers (names lower-cased) once they have arrived."""
        if not self._headed:
            await self._wait(timeout_s)
            if not self._headed:
                raise self._error or UpstreamConnectionError("the upstream closed the connection")
        return self._status, self._headers

    @property
    def content_length(self) -> int | None:
        return self._content_length

    async def read_some(self, timeout_s: float) -> bytes:
        """What has arrived of the body (waiting up to `timeout_s` for more); b"" at its end."""
        if not self._chunks and not self._complete:
            await self._wait(timeout_s)
        if self._chunks:
            data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            self._chunks = []
            self._buffered = 0
            if self._reading_paused and not self.closed:
                self._reading_paused = False
                self._transport.resume_reading()  # type: ignore[union-attr]
            return data
        if self._complete:
            return b""
        raise self._error or UpstreamConnectionError("the upstream closed the connection")

    async def read_all(self, timeout_s: float) -> bytes:
        """The whole body; each wait for more bounded by `timeout_s`."""
        parts: list[bytes] = []
        while True:
            data = await self.read_some(timeout_s)
            if not data:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            parts.append(data)

    def release(self) -> None:
        """The exchange is over: keep the connection for the next request, or close it."""
        reusable = self._complete and self._keep_alive and not self.closed and (self._writer is None or self._writer.done())
        self._in_use = False
        if reusable and self._pool.keep(self):
            return
        self.close()

    def close(self) -> None:
        self._in_use = False
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        if not self.closed and self._transport is not None:
            self.closed = True
            self._transport.close()
        self._pool.forget(self)  # its slot is free now, not only once the transport has closed

    # --- inner workings -----------------------------------------------------------------------

    async def _wait(self, timeout_s: float) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(timeout_s, _time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        _resolve(self._waiter)

    def _wake_drain(self) -> None:
        _resolve(self._drain_waiter)

    def _fail(self, error: Exception) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self.close()
        self._wake()

    async def _pump(self, body: AsyncIterable[bytes], chunked: bool) -> None:
        transport = self._transport
        assert transport is not None
        try:
            async for chunk in body:
                if self.closed:
                    return
                if not chunk:
                    continue
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._writing_paused:
                    self._drain_waiter = self._loop.create_future()
                    await self._drain_waiter
            if chunked and not self.closed:
                transport.write(b"0\r\n\r\n")
        except Exception:  # the caller's body broke off (it says why itself): the upstream must not take a truncated body as whole
            self._fail(UpstreamConnectionError("the request body broke off"))


def _resolve(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class ConnectionPool:
    """Connections per origin, at most `max_connections` open in all."""

    def __init__(
        self, *, max_connections: int, idle_timeout_s: float = 30.0, read_limit: int = 64 * 1024, max_head_bytes: int = MAX_HEAD_BYTES,
        ssl_context: Callable[[], ssl.SSLContext] = ssl.create_default_context,
    ) -> None:  # fmt: skip
        self.loop = asyncio.get_running_loop()
        self._max_connections = max_connections
        self._idle_timeout_s = idle_timeout_s
        self._read_limit = read_limit
        self._max_head_bytes = max_head_bytes
        self._make_ssl_context = ssl_context
        self._ssl_context: ssl.SSLContext | None = None
        self._idle: dict[Origin, list[Http1Connection]] = {}
        self._all: set[Http1Connection] = set()
        self._opening = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self._sweeper = self.loop.call_later(idle_timeout_s / 2, self._sweep)

    @property
    def open_connections(self) -> int:
        return len(self._all) + self._opening

    def take_idle(self, origin: Origin) -> Http1Connection | None:
        """A kept-alive connection to `origin` that is still fresh, if any."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest_fresh = self.loop.time() - self._idle_timeout_s
        while idle:
            connection = idle.pop()
            if _fresh(connection, oldest_fresh):
                return connection
            connection.close()
        return None

    async def connect(self, origin: Origin) -> Http1Connection:
        """A new connection, once there is room for one; the caller bounds the wait."""
        while self.open_connections >= self._max_connections:
            if not self._close_any_idle():
                waiter = self.loop.create_future()
                self._slot_waiters.append(waiter)
                try:
                    await waiter
                except BaseException:
                    if waiter in self._slot_waiters:
                        self._slot_waiters.remove(waiter)
                    elif waiter.done() and not waiter.cancelled():
                        self._wake_one()  # woken, then timed out: the free slot goes to the next in line
                    raise
            found = self.take_idle(origin)
            if found is not None:
                return found
        self._opening += 1
        try:
            _, connection = await self.loop.create_connection(
                lambda: Http1Connection(self, origin, self._read_limit, self._max_head_bytes),
                origin.host,
                origin.port,
                ssl=self._tls() if origin.tls else None,
                server_hostname=origin.host if origin.tls else None,
            )
        finally:
            self._opening -= 1
        if self._closed:
            connection.close()
            raise UpstreamConnectionError("the connection pool is closed")
        self._all.add(connection)
        return connection

    def keep(self, connection: Http1Connection) -> bool:
        """Take back a connection after a complete exchange; False when it should be closed."""
        if self._closed:
            return False
        connection.idle_since = self.loop.time()
        self._idle.setdefault(connection.origin, []).append(connection)
        self._wake_one()
        return True

    def forget(self, connection: Http1Connection) -> None:
        """The connection is closed or gone: its slot is free (idempotent)."""
        if connection in self._all:
            self._all.discard(connection)
            self._wake_one()

    async def aclose(self) -> None:
        self._closed = True
        self._sweeper.cancel()
        for connection in list(self._all):
            connection.close()
        self._idle.clear()
        for waiter in self._slot_waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamConnectionError("the connection pool is closed"))
        await asyncio.sleep(0)  # let the transports run their close callbacks

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = self._make_ssl_context()
        return self._ssl_context

    def _wake_one(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close_any_idle(self) -> bool:
        for idle in self._idle.values():
            while idle:
                connection = idle.pop(0)  # the one idle longest
                if not connection.closed:
                    connection.close()
                    return True
        return False

    def _sweep(self) -> None:
        """Close what sat idle too long, and drop closed connections from the idle lists."""
        oldest_fresh = self.loop.time() - self._idle_timeout_s
        for origin, idle in list(self._idle.items()):
            fresh = []
            for connection in idle:
                if _fresh(connection, oldest_fresh):
                    fresh.append(connection)
                else:
                    connection.close()
            if fresh:
                self._idle[origin] = fresh
            else:
                del self._idle[origin]
        if not self._closed:
            self._sweeper = self.loop.call_later(self._idle_timeout_s / 2, self._sweep)


def _fresh(connection: Http1Connection, oldest_fresh: float) -> bool:
    """Still open, and idle since after `oldest_fresh` (a loop time)."""
    return not connection.closed and connection.idle_since > oldest_fresh
