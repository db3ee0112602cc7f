"""The HTTP/1.1 connection protocol: uvicorn's httptools protocol, made fit for a gateway.

- every status line from 100 to 999 (LivePerson answers 901; uvicorn drops the connection);
- unparseable requests answered with the problem envelope instead of uvicorn's plain text;
- a future per request resolved when the client goes (the pipeline watches it);
- bounds on what a client can make the gateway hold: the raw request head, a head or body
  that arrives too slowly, a connection that never speaks (`ConnectionSettings`).
"""

from __future__ import annotations

import asyncio
import http
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.envelope import render_unrouted
from gateway.outcomes import ErrorClass, Outcome
from gateway.pipeline import ANSWERED_EXTENSION, DISCONNECT_EXTENSION, request_id_of


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """What one client connection may cost before its request reaches the app."""

    max_head_bytes: int = 2 * 32 * 1024  # the raw request line and headers
    head_timeout_s: float = 10.0  # from a request's first byte to the end of its headers
    body_timeout_s: float = 30.0  # between two pieces of a request body
    error_type_base: str = "urn:gateway:error:"
    # Told of each request the protocol answered itself: (outcome, request id, method, seconds).
    on_refusal: Callable[[Outcome, str, str, float], None] | None = None


def allow_nonstandard_statuses() -> None:
    """Give uvicorn a status line for every three-digit status (LivePerson answers 901).

    uvicorn's protocols look status lines up in a table built for 100-599 and drop the
    connection on anything else; a reverse proxy must relay what the upstream said.
    """
    from uvicorn.protocols.http import h11_impl, httptools_impl

    for status in range(100, 1000):
        if status not in httptools_impl.STATUS_LINE:
            phrase = _phrase(status)
            httptools_impl.STATUS_LINE[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
            h11_impl.STATUS_PHRASES[status] = phrase


def _phrase(status: int) -> bytes:
    """The standard phrase, else none: the upstream's own phrase cannot be relayed through ASGI,
    and an empty one is what the simulators send and what clients show as absent (statusText)."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


# How long an idle kept-alive connection stays open (uvicorn's `timeout_keep_alive`). Longer
# than clients' own idle expiry (httpx, aiohttp: 5 s... 15 s), so that a client never sends a
# request on a connection the gateway is closing at that very moment.
KEEP_ALIVE_S = 30

# Where a connection stands in its current request.
FRESH, HEAD, BODY, IDLE = "fresh", "head", "body", "idle"
LINGER_S = 2.0


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering unparseable requests with the problem envelope.

    It also tells each request when its client goes away: a future in
    `scope["extensions"][DISCONNECT_EXTENSION]`, resolved on connection loss, which the pipeline
    watches instead of running a task per request that waits on `receive()`.

    And it bounds what a client can make it hold, which uvicorn does not: a request head is
    refused with 431 once its raw bytes pass ``max_head_bytes`` (uvicorn and httptools would
    buffer an endless header in memory), a head still incomplete ``head_timeout_s`` after its
    first byte gets 408, as does a body that stalls for ``body_timeout_s``, and a connection
    that sends nothing at all is closed after ``head_timeout_s``. One timer per connection,
    re-armed only when it fires, keeps this off the per-request path.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._settings = connection_settings_of(self.app)
        self._phase = FRESH
        self._phase_since = 0.0
        self._request_started = 0.0
        self._head_bytes = 0
        self._read_timer: asyncio.TimerHandle | None = None
        self._lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase_since = self._request_started = self.loop.time()
        self._watch_reads()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered already: what the client still sends is read and dropped
        counts_as_head = self._phase is not BODY  # a chunk that began inside a body is mostly body
        super().data_received(data)
        if self._phase is HEAD and counts_as_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self._settings.max_head_bytes:
                detail = f"request line and headers exceed {self._settings.max_head_bytes} bytes"
                outcome = Outcome(ErrorClass.CLIENT_ERROR, 431, "gateway.headers_too_large", detail, made_by_gateway=True)
                self._answer_and_close(outcome, linger=True)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase, self._phase_since, self._head_bytes = HEAD, self.loop.time(), 0
        self._request_started = self._phase_since
        self._watch_reads()

    def on_headers_complete(self) -> None:
        self._phase, self._phase_since = BODY, self.loop.time()
        self.scope["extensions"] = {DISCONNECT_EXTENSION: self.loop.create_future()}
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._phase_since = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._phase = IDLE
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            tell_gone(cycle.scope)

    def handle_websocket_upgrade(self) -> None:
        self._stop_watching()  # the connection is the WebSocket protocol's now
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        outcome = Outcome(ErrorClass.CLIENT_ERROR, 400, "gateway.bad_request", f"malformed HTTP request: {msg}", made_by_gateway=True)
        self._answer_and_close(outcome)

    def _stop_watching(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _watch_reads(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self._settings.head_timeout_s, self._on_read_timer)

    def _on_read_timer(self) -> None:
        self._read_timer = None
        if self._phase is IDLE or self._lingering or self.transport.is_closing():
            return  # between requests uvicorn's keep-alive timeout applies; on_message_begin re-arms
        if self._phase is BODY and self.flow.read_paused:
            self._phase_since = self.loop.time()  # we stopped reading (backpressure), not the client
        limit = self._settings.body_timeout_s if self._phase is BODY else self._settings.head_timeout_s
        due = self._phase_since + limit
        if self.loop.time() < due:
            self._read_timer = self.loop.call_at(due, self._on_read_timer)
        elif self._phase is FRESH:
            self.transport.close()  # connected, never said a word: nobody to answer
        else:
            what = "request headers not complete within" if self._phase is HEAD else "request body stalled for"
            self._answer_and_close(Outcome(ErrorClass.CLIENT_ERROR, 408, "gateway.request_timeout", f"{what} {limit:g} s", made_by_gateway=True))

    def _answer_and_close(self, outcome: Outcome, *, linger: bool = False) -> None:
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
        cycle = self.cycle if self._phase is BODY else None
        if cycle is not None and cycle.response_started:
            self.transport.close()  # the app is answering already: nothing can be added
            return
        request_id = request_id_of(cycle.scope) if cycle is not None else uuid.uuid4().hex
        rendered = render_unrouted(outcome, request_id, self._settings.error_type_base)
        head = [STATUS_LINE[rendered.status]]
        head += [name + b": " + value + b"\r\n" for name, value in rendered.headers]
        head += [b"content-length: %d\r\n" % len(rendered.body), b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + rendered.body)
        if cycle is not None:
            extensions = cycle.scope.setdefault("extensions", {})
            extensions[ANSWERED_EXTENSION] = (outcome, request_id)
            cycle.disconnected = True
            cycle.message_event.set()
            tell_gone(cycle.scope)
        elif self._settings.on_refusal is not None:
            self._settings.on_refusal(outcome, request_id, "-", self.loop.time() - self._request_started)
        if linger and self.transport.can_write_eof():
            self._lingering = True
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def tell_gone(scope: dict[str, Any]) -> None:
    """Resolve the request's disconnect future, which the pipeline watches."""
    gone = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
    if gone is not None and not gone.done():
        gone.set_result(None)


def connection_settings_of(app: Any) -> ConnectionSettings:
    """The limits of the gateway behind uvicorn's wrappers (read per connection: reloads apply)."""
    for _ in range(8):
        limits = getattr(app, "connection_settings", None)
        if limits is not None:
            return limits()
        app = getattr(app, "app", None)
    return ConnectionSettings()
