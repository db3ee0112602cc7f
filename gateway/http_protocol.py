"""The HTTP/1.1 server protocol: one instance per client connection, run by uvicorn.

uvicorn still owns the process (sockets, workers, signals, the lifespan, graceful shutdown)
and takes this class as its `http=` protocol; the connection itself is handled here, on
httptools (llhttp), and the app is called through ASGI as before. It is the gateway's own
rather than uvicorn's httptools protocol because a gateway needs what that one lacks:

- every status line from 100 to 999 (LivePerson answers 901; uvicorn drops the connection);
- unparseable requests and WebSocket upgrades answered with the problem envelope;
- a future per request resolved when the client goes (the pipeline watches it);
- bounds on what a client can make the gateway hold: the raw request head, a head or body
  that arrives too slowly, a connection that never speaks (`ConnectionSettings`);
- a response's head and its first body piece written in one system call (uvicorn wrote them
  in two: a second `write` and a second TCP segment per response), and no timer, event or
  URL parse per request (docs/performance.md measures both).
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httptools
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

from gateway.envelope import render_unrouted
from gateway.outcomes import ErrorClass, Outcome
from gateway.pipeline import ANSWERED_EXTENSION, DISCONNECT_EXTENSION, request_id_of

log = logging.getLogger("gateway.http")


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """What one client connection may cost before its request reaches the app."""

    max_head_bytes: int = 2 * 32 * 1024  # the raw request line and headers
    head_timeout_s: float = 10.0  # from a request's first byte to the end of its headers
    body_timeout_s: float = 30.0  # between two pieces of a request body
    error_type_base: str = "urn:gateway:error:"
    # Told of each request the protocol answered itself: (outcome, request id, method, seconds).
    on_refusal: Callable[[Outcome, str, str, float], None] | None = None


def _phrase(status: int) -> bytes:
    """The standard phrase, else none: the upstream's own phrase cannot be relayed through ASGI,
    and an empty one is what the simulators send and what clients show as absent (statusText)."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


STATUS_LINES = {status: b"HTTP/1.1 %d %s\r\n" % (status, _phrase(status)) for status in range(100, 1000)}

# How long an idle kept-alive connection stays open. Longer than clients' own idle expiry
# (httpx, aiohttp: 5 s... 15 s), so that a client never sends a request on a connection the
# gateway is closing at that very moment.
KEEP_ALIVE_S = 30

# Where a connection stands in reading its current request.
FRESH, HEAD, BODY, DONE = "fresh", "head", "body", "done"
LINGER_S = 2.0
READ_HIGH_WATER = 64 * 1024  # request body bytes held before the socket stops being read
_BAD_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')  # a character no token has
_BAD_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")  # a control character but tab: CR and LF included
_FRAMING_NAMES = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_NOT_PROXIED = Outcome(ErrorClass.CLIENT_ERROR, 400, "gateway.bad_request", "WebSocket upgrades are not proxied by this gateway", made_by_gateway=True)
_INTERNAL = Outcome(ErrorClass.GATEWAY_ERROR, 500, "gateway.internal", "the gateway failed to handle this request", made_by_gateway=True)


class GatewayHttpProtocol(asyncio.Protocol):
    """One client connection: parses requests, runs the app for each, writes the answers.

    Requests on one connection are answered in order (pipelined ones wait their turn, with
    reading paused). Each request's client-gone future is in
    `scope["extensions"][DISCONNECT_EXTENSION]`. A request head is refused with 431 once its raw
    bytes pass ``max_head_bytes``; a head still incomplete ``head_timeout_s`` after its first
    byte gets 408, as does a body that stalls for ``body_timeout_s``; a connection that sends
    nothing is closed after ``head_timeout_s``, an idle kept-alive one after the keep-alive
    timeout. One timer per connection, re-armed only when it fires, keeps all of this off the
    per-request path.
    """

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.app_state = app_state
        self.root_path: str = config.root_path
        self.keep_alive_s: float = config.timeout_keep_alive
        self.settings = connection_settings_of(self.app)
        self.parser = httptools.HttpRequestParser(self)
        # answer the first of several pipelined requests even when it asked to close
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.reading: Exchange | None = None  # the request being read (the newest)
        self.answering: Exchange | None = None  # the request whose app task runs
        self.queued: deque[Exchange] = deque()  # pipelined requests waiting for their turn
        self.read_paused = False
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        # the request head being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._expect_continue = False
        # the read watchdog
        self._phase = FRESH
        self._phase_since = 0.0
        self._request_started = 0.0
        self._idle_since = 0.0
        self._head_bytes = 0
        self._read_timer: asyncio.TimerHandle | None = None
        self._lingering = False

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.server_state.connections.add(self)
        self.transport = transport
        self.server = get_local_addr(transport)
        self.client = get_remote_addr(transport)
        self.scheme = "https" if is_ssl(transport) else "http"
        self._phase_since = self._request_started = self.loop.time()
        self._watch_reads()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered already: what the client still sends is read and dropped
        counts_as_head = self._phase is not BODY  # a chunk that began inside a body is mostly body
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # served as plain HTTP (a WebSocket upgrade was refused in on_headers_complete); nothing after it is parsed
        except httptools.HttpParserError as exc:
            self._refuse_malformed(exc)
            return
        if self._phase is HEAD and counts_as_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.settings.max_head_bytes:
                detail = f"request line and headers exceed {self.settings.max_head_bytes} bytes"
                outcome = Outcome(ErrorClass.CLIENT_ERROR, 431, "gateway.headers_too_large", detail, made_by_gateway=True)
                self._answer_and_close(outcome, linger=True)

    def eof_received(self) -> None:
        return None  # the transport closes: a client that stopped sending gets no answer (as uvicorn)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._stop_watching()
        for exchange in (self.answering, self.reading, *self.queued):
            if exchange is not None and not exchange.response_complete:
                exchange.client_left()
        self.write_paused = False
        self._wake_drainers()
        if exc is None:
            self.transport.close()
        self.parser = None  # type: ignore[assignment]  # the parser refers back to this protocol

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drainers()

    # --- called by uvicorn's server --------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful shutdown: close when idle, else after the last answer owed on this connection."""
        owed = [exchange for exchange in (self.answering, *self.queued) if exchange is not None and not exchange.response_complete]
        if owed:
            owed[-1].keep_alive = False
        else:
            self.transport.close()

    # --- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.reading = None  # until its headers are complete, this request has no exchange
        self._url = b""
        self._headers = []
        self._expect_continue = False
        self._phase, self._phase_since, self._head_bytes = HEAD, self.loop.time(), 0
        self._request_started = self._phase_since
        self._watch_reads()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace, which RFC 9110 §5.5 excludes
        if name == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        self._phase, self._phase_since = BODY, self.loop.time()
        if parser.should_upgrade() and self._asks_for_websocket():
            self._phase = DONE
            method = parser.get_method().decode("ascii", "replace")
            self._answer_and_close(_NOT_PROXIED, request_id=request_id_of({"headers": self._headers}), method=method)
            return
        method = parser.get_method().decode("ascii")
        version = parser.get_http_version()
        raw_path, query = _split_target(self._url)
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": method,
            "root_path": self.root_path,
            "path": self.root_path + path,
            "raw_path": self.root_path.encode("ascii") + raw_path if self.root_path else raw_path,
            "query_string": query,
            "headers": self._headers,
            "state": self.app_state.copy(),
            "extensions": {DISCONNECT_EXTENSION: self.loop.create_future()},
        }
        exchange = Exchange(self, scope, keep_alive=version != "1.0" and parser.should_keep_alive(), expect_continue=self._expect_continue)
        self.reading = exchange
        if self.answering is None or self.answering.response_complete:
            self._start(exchange)
        else:  # pipelined: answered after the one before it
            self.pause_reading()
            self.queued.append(exchange)

    def on_body(self, body: bytes) -> None:
        self._phase_since = self.loop.time()
        exchange = self.reading
        if exchange is None or exchange.response_complete:
            return  # answered before its body was read (a 413, say): the rest is dropped
        exchange.add_body(body)
        if exchange.body_size > READ_HIGH_WATER:
            self.pause_reading()

    def on_message_complete(self) -> None:
        self._phase = DONE
        exchange = self.reading
        if exchange is not None and not exchange.response_complete:
            exchange.end_body()

    # --- requests --------------------------------------------------------------------------

    def _start(self, exchange: Exchange) -> None:
        self.answering = exchange
        task = self.loop.create_task(exchange.run(self.app))
        tasks = self.server_state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def response_complete(self, exchange: Exchange) -> None:
        """An answer is written: start the next pipelined request, or start the keep-alive wait."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.resume_reading()
        if self.queued:
            self._start(self.queued.popleft())
        else:
            self._idle_since = self.loop.time()
            self._watch_reads()

    # --- flow control ----------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.read_paused and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.transport.is_closing():
            self.read_paused = False
            self.transport.resume_reading()

    async def drain(self) -> None:
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- refusals and the read watchdog ----------------------------------------------------

    def _asks_for_websocket(self) -> bool:
        return any(name == b"upgrade" and value.lower() == b"websocket" for name, value in self._headers)

    def _refuse_malformed(self, exc: Exception) -> None:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, httptools.HttpParserCallbackError) and exc.__context__ is not None:
            reason = f"unreadable request line ({type(exc.__context__).__name__})"  # the target failed to decode or split
        outcome = Outcome(ErrorClass.CLIENT_ERROR, 400, "gateway.bad_request", f"malformed HTTP request: {reason}", made_by_gateway=True)
        self._answer_and_close(outcome)

    def _stop_watching(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _watch_reads(self) -> None:
        if self._read_timer is None and not self._lingering:
            self._read_timer = self.loop.call_later(self.settings.head_timeout_s, self._on_read_timer)

    def _on_read_timer(self) -> None:
        self._read_timer = None
        if self._lingering or self.transport.is_closing():
            return
        now = self.loop.time()
        phase = self._phase
        if phase is DONE:
            if self.answering is not None and not self.answering.response_complete:
                return  # the app is answering; the keep-alive wait starts (and re-arms) when it is done
            since, limit = self._idle_since, self.keep_alive_s
        else:
            if phase is BODY and self.read_paused:
                self._phase_since = now  # we stopped reading (backpressure, a pipelined turn), not the client
            since = self._phase_since
            limit = self.settings.body_timeout_s if phase is BODY else self.settings.head_timeout_s
        due = since + limit
        if now < due:
            self._read_timer = self.loop.call_at(due, self._on_read_timer)
        elif phase is DONE or phase is FRESH:
            self.transport.close()  # idle past the keep-alive, or connected and never said a word
        else:
            what = "request headers not complete within" if phase is HEAD else "request body stalled for"
            self._answer_and_close(Outcome(ErrorClass.CLIENT_ERROR, 408, "gateway.request_timeout", f"{what} {limit:g} s", made_by_gateway=True))

    def _answer_and_close(self, outcome: Outcome, *, linger: bool = False, request_id: str | None = None, method: str = "-") -> None:
        """A problem object written straight to the socket, then the connection closed.

        Mid-body, the app already has the request: it is told it was answered (under
        ``ANSWERED_EXTENSION``, with the request id used) and that the client is gone, so it
        forwards nothing and counts the request itself, with its route and account. Before the
        headers are complete there is no request for the app: ``on_refusal`` counts it.

        With ``linger``, for a client that is still sending: closing with its bytes unread would
        make the kernel reset the connection, and a reset can destroy the answer before the
        client reads it. So the answer is followed by a FIN, what still arrives is read and
        dropped, and the socket closes after ``LINGER_S`` (nginx's lingering close).
        """
        exchange = self.reading if self._phase is BODY else None
        earlier = self.answering is not None and self.answering is not exchange and not self.answering.response_complete
        if earlier or (exchange is not None and exchange.response_started):
            self.transport.close()  # an answer is being written already: nothing can be added
            return
        if request_id is None:
            request_id = request_id_of(exchange.scope) if exchange is not None else uuid.uuid4().hex
        rendered = render_unrouted(outcome, request_id, self.settings.error_type_base)
        self.transport.write(_whole_response(rendered.status, rendered.headers, rendered.body, close=True))
        if exchange is not None:
            exchange.scope["extensions"][ANSWERED_EXTENSION] = (outcome, request_id)
            exchange.client_left()
        elif self.settings.on_refusal is not None:
            self.settings.on_refusal(outcome, request_id, method, self.loop.time() - self._request_started)
        self._stop_watching()
        if linger and self.transport.can_write_eof():
            self._lingering = True
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


class Exchange:
    """One request on a connection: its ASGI `receive` and `send`, and the state of its answer."""

    __slots__ = (
        "connection", "scope", "keep_alive", "waiting_for_continue", "is_head",
        "_chunks", "body_size", "more_body", "_last_delivered", "_waiter",
        "disconnected", "response_started", "response_complete", "chunked", "expected_length", "_pending_head",
    )  # fmt: skip

    def __init__(self, connection: GatewayHttpProtocol, scope: dict[str, Any], *, keep_alive: bool, expect_continue: bool) -> None:
        self.connection = connection
        self.scope = scope
        self.keep_alive = keep_alive
        self.waiting_for_continue = expect_continue
        self.is_head = scope["method"] == "HEAD"
        self._chunks: list[bytes] = []
        self.body_size = 0
        self.more_body = True
        self._last_delivered = False
        self._waiter: asyncio.Future[None] | None = None
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.chunked: bool | None = None
        self.expected_length = 0
        self._pending_head: bytes | None = None

    # --- fed by the connection -------------------------------------------------------------

    def add_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self.body_size += len(body)
        self._wake()

    def end_body(self) -> None:
        self.more_body = False
        self._wake()

    def client_left(self) -> None:
        self.disconnected = True
        self._wake()
        gone = self.scope["extensions"].get(DISCONNECT_EXTENSION)
        if gone is not None and not gone.done():
            gone.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the app ---------------------------------------------------------------------------

    async def run(self, app: Any) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:  # noqa: BLE001  # the last line of defence: log, answer if still possible
            log.error("exception in the ASGI application", exc_info=exc)
            if (not self.response_started or self._pending_head is not None) and not self.disconnected:
                self._pending_head = None  # a head still held has not left: the client can get the 500 instead
                self._write_internal_error()
            else:
                self.connection.transport.close()
        else:
            if not self.response_started and not self.disconnected:
                log.error("the ASGI application returned without starting a response")
                self._write_internal_error()
            elif not self.response_complete and not self.disconnected:
                log.error("the ASGI application returned without completing its response")
                self.connection.transport.close()

    async def receive(self) -> dict[str, Any]:
        connection = self.connection
        if self.waiting_for_continue and not connection.transport.is_closing():
            connection.transport.write(_CONTINUE)
            self.waiting_for_continue = False
        while not (self.disconnected or self.response_complete) and (self._last_delivered or (not self._chunks and self.more_body)):
            connection.resume_reading()
            self._waiter = connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        chunks, self._chunks = self._chunks, []
        self.body_size = 0
        connection.resume_reading()
        if not self.more_body:
            self._last_delivered = True
        return {"type": "http.request", "body": b"".join(chunks), "more_body": self.more_body}

    async def send(self, message: dict[str, Any]) -> None:
        connection = self.connection
        if connection.write_paused and not self.disconnected:
            await connection.drain()
        if self.disconnected or connection.transport.is_closing():
            return  # the client left, or the connection was closed under it (a refused pipelined request)
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected ASGI message 'http.response.start', got {kind!r}")
            self._pending_head = self._head(message["status"], message.get("headers", ()))  # raises on a bad header: nothing is started
            self.response_started = True
            self.waiting_for_continue = False
            # held for the first body piece, so both leave in one write; written at the end of
            # this loop turn if the app awaits something before sending any body
            connection.loop.call_soon(self._flush_head)
            return
        if self.response_complete or kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r} after the response {'ended' if self.response_complete else 'started'}")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.is_head:
            data = b""
        elif self.chunked:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more:
                data += b"0\r\n\r\n"
        else:
            if len(body) > self.expected_length:
                raise RuntimeError("response content longer than its Content-Length")
            self.expected_length -= len(body)
            data = body
        head = self._pending_head
        if head is not None:
            self._pending_head = None
            data = head + data
        if data:
            connection.transport.write(data)
        if not more:
            if self.expected_length and not self.is_head:
                raise RuntimeError("response content shorter than its Content-Length")
            self.response_complete = True
            self._wake()
            if not self.keep_alive:
                connection.transport.close()
            connection.response_complete(self)

    def _flush_head(self) -> None:
        head = self._pending_head
        if head is not None and not self.disconnected and not self.connection.transport.is_closing():
            self._pending_head = None
            self.connection.transport.write(head)

    def _head(self, status: int, headers: Any) -> bytes:
        """The status line and headers, with the framing the headers imply (uvicorn's rules)."""
        content = [STATUS_LINES[status]]
        closing = False
        for name, value in (*self.connection.server_state.default_headers, *headers):
            if not name or _BAD_NAME.search(name) or _BAD_VALUE.search(value):
                raise RuntimeError("invalid HTTP header name or value")
            name = name.lower()
            if name in _FRAMING_NAMES:
                if name == b"content-length":
                    if self.chunked is None:
                        self.expected_length = int(value)
                        self.chunked = False
                elif name == b"transfer-encoding":
                    if value.lower() == b"chunked":
                        self.expected_length = 0
                        self.chunked = True
                elif b"close" in [token.strip().lower() for token in value.split(b",")]:
                    self.keep_alive = False
                    closing = True
            content += (name, b": ", value, b"\r\n")
        if not self.keep_alive and not closing:
            content.append(b"connection: close\r\n")
        if self.chunked is None and not self.is_head and status not in (204, 304):
            self.chunked = True  # neither a length nor chunked said: the body is chunked
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        return b"".join(content)

    def _write_internal_error(self) -> None:
        """A problem object for an app that failed before answering, and the connection closed."""
        rendered = render_unrouted(_INTERNAL, request_id_of(self.scope), self.connection.settings.error_type_base)
        self.response_started = self.response_complete = True
        self._wake()
        self.connection.transport.write(_whole_response(rendered.status, rendered.headers, rendered.body, close=True))
        self.connection.transport.close()


def _whole_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool) -> bytes:
    head = [STATUS_LINES[status]]
    head += [name + b": " + value + b"\r\n" for name, value in headers]
    head.append(b"content-length: %d\r\n" % len(body))
    if close:
        head.append(b"connection: close\r\n")
    return b"".join(head) + b"\r\n" + body


def _split_target(url: bytes) -> tuple[bytes, bytes]:
    """(path, query) of a request target; origin-form is split by hand, the rest by llhttp's URL parser."""
    if url[:1] == b"/" and b"#" not in url:
        path, _, query = url.partition(b"?")
        return path, query
    parsed = httptools.parse_url(url)  # absolute-form: the authority is dropped (never an upstream)
    return parsed.path or b"", parsed.query or b""


def connection_settings_of(app: Any) -> ConnectionSettings:
    """The limits of the gateway behind uvicorn's wrappers (read per connection: reloads apply)."""
    for _ in range(8):
        limits = getattr(app, "connection_settings", None)
        if limits is not None:
            return limits()
        app = getattr(app, "app", None)
    return ConnectionSettings()
