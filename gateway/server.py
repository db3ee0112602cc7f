"""Running the gateway on uvicorn (uvloop + httptools), one or several worker processes."""

from __future__ import annotations

import asyncio
import gc
import http
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uuid

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from gateway.app import ConnectionSettings, Gateway, create_app
from gateway.envelope import ProblemContext, render_gateway_error
from gateway.outcomes import ErrorClass, Outcome
from gateway.observability import MULTIPROCESS_ENV, configure_logging
from gateway.pipeline import ANSWERED_EXTENSION, DISCONNECT_EXTENSION, request_id_of
from gateway.settings import load_settings
from gateway.yamlsource import ConfigError

CONFIG_ENV = "GATEWAY_CONFIG"
SUPERVISOR_ENV = "GATEWAY_SUPERVISOR_PID"
log = logging.getLogger("gateway.server")


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
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            gone = cycle.scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
            if gone is not None and not gone.done():
                gone.set_result(None)

    def handle_websocket_upgrade(self) -> None:
        if self._read_timer is not None:  # the connection is the WebSocket protocol's now
            self._read_timer.cancel()
            self._read_timer = None
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        outcome = Outcome(ErrorClass.CLIENT_ERROR, 400, "gateway.bad_request", f"malformed HTTP request: {msg}", made_by_gateway=True)
        self._answer_and_close(outcome)

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
        elif self._phase is HEAD:
            self._answer_and_close(Outcome(ErrorClass.CLIENT_ERROR, 408, "gateway.request_timeout", f"request headers not complete within {limit:g} s", made_by_gateway=True))
        else:
            self._time_out_body(limit)

    def _time_out_body(self, limit: float) -> None:
        detail = f"request body stalled for {limit:g} s"
        self._answer_and_close(Outcome(ErrorClass.CLIENT_ERROR, 408, "gateway.request_timeout", detail, made_by_gateway=True))

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
        rendered = render_gateway_error(None, outcome, ProblemContext(None, 0, request_id, self._settings.error_type_base))
        head = [STATUS_LINE[rendered.status]]
        head += [name + b": " + value + b"\r\n" for name, value in rendered.headers]
        head += [b"content-length: %d\r\n" % len(rendered.body), b"x-request-id: " + request_id.encode() + b"\r\n", b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + rendered.body)
        if cycle is not None:
            extensions = cycle.scope.setdefault("extensions", {})
            extensions[ANSWERED_EXTENSION] = (outcome, request_id)
            cycle.disconnected = True
            cycle.message_event.set()
            gone = extensions.get(DISCONNECT_EXTENSION)
            if gone is not None and not gone.done():
                gone.set_result(None)
        elif self._settings.on_refusal is not None:
            self._settings.on_refusal(outcome, request_id, "-", self.loop.time() - self._request_started)
        if linger and self.transport.can_write_eof():
            self._lingering = True
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def connection_settings_of(app: Any) -> ConnectionSettings:
    """The limits of the gateway behind uvicorn's wrappers (read per connection: reloads apply)."""
    for _ in range(8):
        limits = getattr(app, "connection_settings", None)
        if limits is not None:
            return limits()
        app = getattr(app, "app", None)
    return ConnectionSettings()


def app_from_environment() -> Gateway:
    """uvicorn factory for worker processes: each worker loads the file named by GATEWAY_CONFIG."""
    allow_nonstandard_statuses()
    configure_logging(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the lifespan installs the reload handler
    supervisor = _supervisor_pid()
    announce = None if supervisor is None else lambda: os.kill(supervisor, signal.SIGHUP)
    app = create_app(load_settings(Path(os.environ[CONFIG_ENV])), reload_on_sighup=True, announce_reload=announce)
    settle_heap()
    return app


def settle_heap() -> None:
    """Hide the start-up heap from the cyclic collector (collect once, then freeze), and let
    the young generation grow past what is in flight.

    Imports (pydantic, aiohttp, botocore's models...) leave hundreds of thousands of objects
    that never die; every full collection walked them all, a 25-75 ms stall several times a
    second under load (bench/, docs/performance.md). Frozen, they are skipped.
    """
    gc.collect()
    gc.freeze()
    # A young generation of 700 objects is crossed by the objects merely alive at once under
    # load (tens of requests in flight), not by garbage: at 64 connections that was ~60 young
    # collections a second, 1-5 % of the CPU (bench/, a gc.callbacks census), collecting nothing
    # to speak of. At 10,000 they become rare; the older generations keep their ratios.
    gc.set_threshold(10_000, 10, 10)


def _supervisor_pid() -> int | None:
    """The supervisor's pid when this process is one of its workers."""
    value = os.environ.get(SUPERVISOR_ENV)
    return int(value) if value and int(value) == os.getppid() else None


class GatewaySupervisor(Multiprocess):
    """uvicorn's worker supervisor, except that SIGHUP reloads the workers in place.

    uvicorn's own SIGHUP handler replaces every worker, which drops breaker state and would
    start workers on a file nobody checked. Here the file is checked first; only a valid one
    is announced, by forwarding SIGHUP to each worker, which reloads it as a single process does.
    """

    def handle_hup(self) -> None:
        path = Path(os.environ[CONFIG_ENV])
        try:
            load_settings(path)
        except ConfigError as exc:
            log.error("SIGHUP: configuration %s rejected, workers keep theirs: %s", path, "; ".join(map(str, exc.problems)))
            return
        for worker in self.processes:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signal.SIGHUP)


def serve(config_path: Path, host: str, port: int, workers: int, grace_s: float) -> None:
    allow_nonstandard_statuses()
    configure_logging(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    os.environ[CONFIG_ENV] = str(config_path.resolve())
    options = dict(
        host=host,
        port=port,
        loop="uvloop",
        http=GatewayHttpProtocol,
        lifespan="on",
        server_header=False,
        date_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=grace_s,
        timeout_keep_alive=30,
        access_log=False,
        log_level="warning",
    )
    if workers > 1:
        run_workers(uvicorn.Config("gateway.server:app_from_environment", factory=True, workers=workers, **options))
    else:
        uvicorn.run(app_from_environment(), **options)


def run_workers(config: uvicorn.Config) -> None:
    """What `uvicorn.run` does for workers > 1, with the reloading supervisor.

    The workers share one metrics directory (prometheus_client's multiprocess mode), made
    fresh here and removed at exit, so `/metrics` on any worker counts every worker's requests.
    """
    os.environ[SUPERVISOR_ENV] = str(os.getpid())
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ[MULTIPROCESS_ENV] = metrics_dir  # read by prometheus_client when a worker imports it
    socket = config.bind_socket()
    try:
        GatewaySupervisor(config, sockets=[socket]).run()
    finally:
        socket.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
