"""Running the gateway on uvicorn (uvloop + httptools), one or several worker processes."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess

from gateway.app import Gateway, create_app
from gateway.http_protocol import KEEP_ALIVE_S, GatewayHttpProtocol
from gateway.observability import MULTIPROCESS_ENV, configure_logging
from gateway.settings import load_settings
from gateway.yamlsource import ConfigError

CONFIG_ENV = "GATEWAY_CONFIG"
SUPERVISOR_ENV = "GATEWAY_SUPERVISOR_PID"
log = logging.getLogger("gateway.server")


def app_from_environment() -> Gateway:
    """uvicorn factory for worker processes: each worker loads the file named by GATEWAY_CONFIG."""
    configure_logging(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    supervisor = _supervisor_pid()
    announce = None if supervisor is None else lambda: os.kill(supervisor, signal.SIGHUP)
    app = create_app(load_settings(Path(os.environ[CONFIG_ENV])), reload_on_sighup=True, announce_reload=announce)
    settle_heap()
    return app


def settle_heap() -> None:
    """Hide the start-up heap from the cyclic collector (collect once, then freeze), and let
    the young generation grow past what is in flight.

    Imports (pydantic, botocore's models, prometheus-client...) leave hundreds of thousands of objects
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

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        # SIGHUP's default action ends a process, and a worker spends a second or two importing
        # before its app can handle a reload: one sent then killed it (uvicorn started a new
        # one). The signal mask survives fork and exec, so with SIGHUP blocked here every worker
        # starts with it blocked, and unblocks it once its loop handles it (`Gateway.start`).
        # The supervisor takes its own from the pending set, in its loop.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})

    def handle_signals(self) -> None:
        if signal.SIGHUP in signal.sigpending():
            signal.sigwait({signal.SIGHUP})
            self.handle_hup()
        super().handle_signals()

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
        timeout_keep_alive=KEEP_ALIVE_S,
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
    listener = config.bind_socket()
    try:
        GatewaySupervisor(config, sockets=[listener]).run()
    finally:
        listener.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
