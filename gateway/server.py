"""Running the gateway on uvicorn (uvloop + httptools), one or several worker processes."""

from __future__ import annotations

import http
import os
from pathlib import Path

import uuid

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.app import Gateway, create_app
from gateway.envelope import ProblemContext, render_gateway_error
from gateway.outcomes import ErrorClass, Outcome
from gateway.observability import configure_logging
from gateway.settings import load_settings

CONFIG_ENV = "GATEWAY_CONFIG"


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
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Function Error" if status == 901 else b""


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering unparseable requests with the problem envelope."""

    def send_400_response(self, msg: str) -> None:
        outcome = Outcome(ErrorClass.CLIENT_ERROR, 400, "gateway.bad_request", f"malformed HTTP request: {msg}", made_by_gateway=True)
        request_id = uuid.uuid4().hex
        rendered = render_gateway_error(None, outcome, ProblemContext(None, 0, request_id))
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in rendered.headers]
        head += [b"content-length: %d\r\n" % len(rendered.body), b"x-request-id: " + request_id.encode() + b"\r\n", b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + rendered.body)
        self.transport.close()


def app_from_environment() -> Gateway:
    """uvicorn factory for worker processes: each worker loads the file named by GATEWAY_CONFIG."""
    allow_nonstandard_statuses()
    configure_logging(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    return create_app(load_settings(Path(os.environ[CONFIG_ENV])))


def serve(config_path: Path, host: str, port: int, workers: int, grace_s: float) -> None:
    allow_nonstandard_statuses()
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
        uvicorn.run("gateway.server:app_from_environment", factory=True, workers=workers, **options)
    else:
        uvicorn.run(app_from_environment(), **options)
