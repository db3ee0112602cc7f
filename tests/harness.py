"""Shared test harness: the gateway and simulated upstreams over real loopback sockets.

`running_gateway` runs the real app on uvicorn (httptools, as `serve` does) inside the test's
event loop; `gateway_process` runs `python -m gateway serve` as a separate process for tests
that need several replicas or signals. Every server is stopped when its context exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from gateway.app import Gateway, create_app
from gateway.http_protocol import KEEP_ALIVE_S, GatewayHttpProtocol
from gateway.settings import load_settings
from gateway.simulators import SimulatedUpstream

REPO = Path(__file__).resolve().parent.parent

# Every admin endpoint (and an unknown one): each must be closed without the right token.
ADMIN_ENDPOINTS = [
    ("GET", "/admin/breakers"),
    ("POST", "/admin/breakers/lp/down/reset"),
    ("POST", "/admin/reload"),
    ("GET", "/admin/config"),
    ("GET", "/admin/stats"),
    ("GET", "/admin/anything/else"),
]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_config(folder: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@dataclass
class RunningGateway:
    app: Gateway
    url: str
    config_path: Path

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=kwargs.pop("timeout", 30.0), **kwargs)


@contextlib.asynccontextmanager
async def running_gateway(config_path: Path, host: str = "127.0.0.1", port: int | None = None) -> AsyncIterator[RunningGateway]:
    """The real app on uvicorn + httptools in this event loop, on a free loopback port."""
    app = create_app(load_settings(config_path))
    port = port or free_port(host)
    config = uvicorn.Config(app, host=host, port=port, loop="none", http=GatewayHttpProtocol, lifespan="on", log_level="warning", server_header=False, date_header=False, proxy_headers=False, timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield RunningGateway(app, f"http://{host}:{port}", config_path)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def simulated(dialect: str, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[SimulatedUpstream]:
    upstream = await SimulatedUpstream(dialect, host=host, port=port).start()
    try:
        yield upstream
    finally:
        await upstream.stop()


def upstream_config(name: str, url: str, dialect: str, routes: list[str], **extra: Any) -> str:
    """One `upstreams:` entry as YAML text (extra keys given as ready YAML flow values)."""
    lines = [f"  {name}:", f"    url: {url}", f"    dialect: {dialect}", "    routes:"]
    lines += [f"      - {route}" for route in routes]
    lines += [f"    {key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def gateway_process(
    config_path: Path, port: int | None = None, workers: int = 1, env: dict[str, str] | None = None, startup_s: float = 20.0,
    before_ready: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> Iterator[GatewayProcess]:  # fmt: skip
    """`python -m gateway serve` in its own process; SIGTERM then SIGKILL on exit.

    `before_ready` runs once the process is started, before it is waited for (to act while it starts).
    """
    port = port or free_port()
    log_path = config_path.parent / f"gateway-{port}.log"
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), "--port", str(port), "--workers", str(workers)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        if before_ready is not None:
            before_ready(process)
        _wait_ready(process, url, startup_s, log_path)
        yield GatewayProcess(process, url, log_path)
    finally:
        stop_process(process)


def _wait_ready(process: subprocess.Popen[bytes], url: str, startup_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=0.5).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"gateway did not become healthy within {startup_s} s:\n{log_path.read_text(errors='replace')}")


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
