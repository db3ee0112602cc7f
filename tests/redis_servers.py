"""Real redis-server processes on free loopback ports, and pytest fixtures around them.

Import the fixtures into a test module (``from tests.redis_servers import redis_server``)
or list this module in ``pytest_plugins``. Every process started here is stopped by its
fixture, also when the test fails.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
CLUSTER_BUS_OFFSET = 10000


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, with_cluster_bus: bool = False) -> int:
    """A free loopback port; with ``with_cluster_bus`` also port + 10000 (Cluster's bus)."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        if port_is_free(port) and (not with_cluster_bus or port_is_free(port + CLUSTER_BUS_OFFSET)):
            return port
    raise RuntimeError("no free loopback port found")


def send_command(port: int, *words: str, timeout_s: float = 1.0) -> bytes:
    """One raw RESP command and the first reply chunk (no client library involved)."""
    payload = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
        conn.sendall(payload.encode())
        return conn.recv(65536)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if predicate():
                return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


@dataclass
class RedisProcess:
    """One redis-server; ``restart`` brings it back on the same port (with empty data)."""

    port: int
    workdir: Path
    extra_args: tuple[str, ...] = ()
    config_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisProcess:
        # redis-server reads a config file only as its first argument.
        config = [str(self.config_file)] if self.config_file else []
        args = [
            "redis-server", *config, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--protected-mode", "no",
            "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(self._answers_ping, START_TIMEOUT_S, f"redis-server on {self.port}")
        return self

    def _answers_ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {self.process.stderr.read()!r}")
        return send_command(self.port, "PING").startswith(b"+PONG")

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """Abrupt death (SIGKILL): what an outage looks like to clients."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()
        self.process.wait(STOP_TIMEOUT_S)

    def restart(self) -> RedisProcess:
        self.kill()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()


def start_redis(port: int | None = None, *, extra_args: tuple[str, ...] = ()) -> RedisProcess:
    workdir = Path(tempfile.mkdtemp(prefix="gw-redis-"))
    return RedisProcess(port or free_port(), workdir, extra_args).start()


@dataclass
class Cluster:
    """A Redis Cluster of primaries only, created with ``redis-cli --cluster create``."""

    nodes: list[RedisProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.close()


def start_redis_cluster(n: int = 3) -> Cluster:
    cluster = Cluster()
    try:
        for _ in range(n):
            port = free_port(with_cluster_bus=True)
            cluster.nodes.append(start_redis(port, extra_args=cluster_node_args(port)))
        create_cluster(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def cluster_node_args(port: int) -> tuple[str, ...]:
    return (
        "--cluster-enabled", "yes",
        "--cluster-config-file", f"nodes-{port}.conf",
        "--cluster-node-timeout", "5000",
    )  # fmt: skip


def create_cluster(cluster: Cluster) -> None:
    addresses = [f"127.0.0.1:{node.port}" for node in cluster.nodes]
    subprocess.run(
        ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    for node in cluster.nodes:
        wait_until(
            lambda port=node.port: b"cluster_state:ok" in send_command(port, "CLUSTER", "INFO"),
            START_TIMEOUT_S,
            f"cluster state ok on {node.port}",
        )


@dataclass
class SentinelSetup:
    """One master and one Sentinel watching it under ``service``."""

    master: RedisProcess
    sentinel: RedisProcess
    service: str = "gwmaster"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.service}"

    def stop(self) -> None:
        self.sentinel.close()
        self.master.close()


def start_redis_sentinel(service: str = "gwmaster") -> SentinelSetup:
    master = start_redis()
    try:
        sentinel = start_sentinel(master.port, service)
    except BaseException:
        master.close()
        raise
    setup = SentinelSetup(master, sentinel, service)
    wait_until(
        lambda: str(master.port).encode()
        in send_command(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", service),
        START_TIMEOUT_S,
        "sentinel to know its master",
    )
    return setup


def start_sentinel(master_port: int, service: str) -> RedisProcess:
    workdir = Path(tempfile.mkdtemp(prefix="gw-sentinel-"))
    config = workdir / "sentinel.conf"
    config.write_text(f"sentinel monitor {service} 127.0.0.1 {master_port} 1\n")
    return RedisProcess(free_port(), workdir, ("--sentinel",), config).start()


def remove_workdir(process: RedisProcess) -> None:
    shutil.rmtree(process.workdir, ignore_errors=True)


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    """A fresh standalone redis-server for one test."""
    server = start_redis()
    try:
        yield server
    finally:
        server.close()
        remove_workdir(server)


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[Cluster]:
    """A three-node Redis Cluster shared by one test module."""
    cluster = start_redis_cluster(3)
    try:
        yield cluster
    finally:
        cluster.stop()
        for node in cluster.nodes:
            remove_workdir(node)


@pytest.fixture
def redis_sentinel() -> Iterator[SentinelSetup]:
    """A master and a Sentinel that names it, for one test."""
    setup = start_redis_sentinel()
    try:
        yield setup
    finally:
        setup.stop()
        remove_workdir(setup.master)
        remove_workdir(setup.sentinel)
