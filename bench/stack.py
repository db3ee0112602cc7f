"""The processes under test: two upstreams, Redis, and the five ways to reach the upstreams.

Every process is started pinned with `taskset` (proxies on the proxy core, upstreams and Redis
on the load core), in its own session, with its configuration written to the run's work
folder, and is stopped when the `Stack` context exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
BODY_BYTES = 205
SLOW_DELAY_MS = 20.0
FUNCTION_PATH = "/api/account/le12345678/lambdas/bench-fn/invoke"
UPSTREAMS = ("fast", "slow")
TARGETS = ("direct", "nginx", "haproxy", "minimal", "minimal-gw", "gateway", "gateway-redis", "gateway-ids")
FLOORS = ("minimal", "minimal-gw")
PROXIES = TARGETS[1:]
REDIS_GATEWAYS = ("gateway-redis", "gateway-ids")
# wrk sends a unique X-Request-ID with every request to these (real clients send one: dedupe runs)
REQUEST_ID_TARGETS = ("gateway-ids",)


def json_body(size: int, field_name: str) -> bytes:
    """A JSON object of exactly `size` bytes (padding one string field)."""
    head = b'{"headers":[],"payload":{"conversationId":"c0ffee00-1234-5678-9abc-def012345678","message":"hello","' + field_name.encode() + b'":"'
    tail = b'"}}'
    pad = size - len(head) - len(tail)
    if pad < 0:
        raise ValueError(f"{size} bytes is too small for the JSON skeleton")
    return head + b"x" * pad + tail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{process.args!r} is not listening on {port} after {timeout_s:g} s")


def http_get(url: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - loopback only
        return response.read()


@dataclass(frozen=True)
class Pinning:
    proxy_core: int
    load_core: int

    def describe(self) -> str:
        return (
            f"proxy under test pinned to core {self.proxy_core}; wrk (1 thread), both upstreams and redis-server "
            f"pinned to core {self.load_core}"
        )


@dataclass
class Stack:
    """All processes of one benchmark run. `pids[name]` is the process whose CPU is measured."""

    work: Path
    pinning: Pinning
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, target: str, upstream: str) -> str:
        port = self.ports[f"upstream-{upstream}"] if target == "direct" else self.ports[target]
        return f"http://127.0.0.1:{port}/{upstream}{FUNCTION_PATH}"

    def proxy_pid(self, target: str, upstream: str) -> int:
        return self.pids[f"upstream-{upstream}"] if target == "direct" else self.pids[target]

    def helper_pids(self) -> list[int]:
        return [pid for name, pid in self.pids.items() if name.startswith("upstream-") or name == "redis"]

    def start(self, name: str, argv: list[str], core: int, port: int, *, log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(log or os.devnull, "ab")  # noqa: SIM115 - owned by the child
        process = subprocess.Popen(["taskset", "-c", str(core), *argv], stdout=out, stderr=out, start_new_session=True, env=env, cwd=self.work)
        out.close()
        self._processes.append(process)
        wait_for_port(port, process)
        self.ports[name] = port
        self.pids[name] = process.pid  # taskset execs the command: same pid
        return process

    def stop(self) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self._processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()


def nginx_upstream_conf(work: Path, port: int, body: bytes) -> str:
    return f"""
worker_processes 1;
master_process off;
daemon off;
pid {work}/nginx-fast.pid;
error_log {work}/nginx-fast.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-fast-tmp;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{body.decode()}';
        }}
    }}
}}
"""


def nginx_proxy_conf(work: Path, port: int, fast: int, slow: int) -> str:
    upstreams = "\n".join(
        f"    upstream {name} {{ server 127.0.0.1:{p}; keepalive 512; keepalive_requests 10000000; keepalive_timeout 120s; }}"
        for name, p in (("fast", fast), ("slow", slow))
    )
    locations = "\n".join(
        f"""        location /{name}/ {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}"""
        for name in UPSTREAMS
    )
    return f"""
worker_processes 1;
master_process off;
daemon off;
pid {work}/nginx-proxy.pid;
error_log {work}/nginx-proxy.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-proxy-tmp;
    proxy_temp_path {work}/nginx-proxy-ptmp;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
{upstreams}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{locations}
    }}
}}
"""


def haproxy_conf(port: int, fast: int, slow: int) -> str:
    return f"""
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    option http-keep-alive
    http-reuse always
frontend bench
    bind 127.0.0.1:{port}
    use_backend slow if {{ path_beg /slow/ }}
    default_backend fast
backend fast
    server fast 127.0.0.1:{fast}
backend slow
    server slow 127.0.0.1:{slow}
"""


def gateway_conf(fast: int, slow: int, redis_port: int | None) -> str:
    """The default pipeline: liveperson classification, breaker, retries, a limit that never refuses."""
    state = f"state:\n  redis_url: redis://127.0.0.1:{redis_port}/0\n" if redis_port else ""
    upstreams = "".join(
        f"""  {name}:
    url: http://127.0.0.1:{p}
    dialect: liveperson
    routes: ["/{name}/api/account/{{account}}/lambdas/{{function}}/invoke"]
    max_connections: 1024
"""
        for name, p in (("fast", fast), ("slow", slow))
    )
    return f"""{state}rate_limits:
  default: {{rate: 1000000000, per_s: 1, burst: 1000000000}}
upstreams:
{upstreams}"""


@contextlib.contextmanager
def running_stack(work: Path, pinning: Pinning, body: bytes, gateway_log_level: str = "INFO") -> Iterator[Stack]:
    """Start everything; yield the stack; stop everything (also on errors and Ctrl-C)."""
    stack = Stack(work, pinning)
    load, proxy = pinning.load_core, pinning.proxy_core
    try:
        fast, slow, redis = free_port(), free_port(), free_port()
        (work / "nginx-fast.conf").write_text(nginx_upstream_conf(work, fast, body))
        stack.start("upstream-fast", ["nginx", "-p", str(work), "-c", str(work / "nginx-fast.conf")], load, fast, log=work / "nginx-fast.out")
        (work / "body.json").write_bytes(body)
        slow_argv = [sys.executable, str(BENCH / "slow_upstream.py"), "--port", str(slow), "--delay-ms", str(SLOW_DELAY_MS), "--body-file", str(work / "body.json")]
        stack.start("upstream-slow", slow_argv, load, slow, log=work / "slow-upstream.out")
        stack.start("redis", ["redis-server", "--port", str(redis), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], load, redis, log=work / "redis.out")

        port = free_port()
        (work / "nginx-proxy.conf").write_text(nginx_proxy_conf(work, port, fast, slow))
        stack.start("nginx", ["nginx", "-p", str(work), "-c", str(work / "nginx-proxy.conf")], proxy, port, log=work / "nginx-proxy.out")
        port = free_port()
        (work / "haproxy.cfg").write_text(haproxy_conf(port, fast, slow))
        stack.start("haproxy", ["haproxy", "-db", "-f", str(work / "haproxy.cfg")], proxy, port, log=work / "haproxy.out")

        for name, client in (("minimal", "aiohttp"), ("minimal-gw", "gateway")):
            port = free_port()
            minimal = [sys.executable, str(BENCH / "minimal_proxy.py"), "--port", str(port), "--fast", f"http://127.0.0.1:{fast}", "--slow", f"http://127.0.0.1:{slow}", "--client", client]
            stack.start(name, minimal, proxy, port, log=work / f"{name}.out", env={**os.environ, "PYTHONPATH": str(REPO)})

        env = {**os.environ, "GATEWAY_LOG_LEVEL": gateway_log_level, "PYTHONUNBUFFERED": "1"}
        gateway = str(Path(sys.executable).with_name("gateway"))
        for name, redis_port in (("gateway", None), ("gateway-redis", redis), ("gateway-ids", redis)):
            config = work / f"{name}.yaml"
            config.write_text(gateway_conf(fast, slow, redis_port))
            port = free_port()
            # stderr carries the access log (one JSON line per request at INFO): it goes to /dev/null
            try:
                stack.start(name, [gateway, "serve", "--config", str(config), "--port", str(port)], proxy, port, env=env)
            except RuntimeError as exc:
                check = subprocess.run([gateway, "check", "--config", str(config)], capture_output=True, text=True)
                raise RuntimeError(f"{exc}\ngateway check says: {check.stdout}{check.stderr}") from None
            http_get(f"http://127.0.0.1:{port}/readyz")
        yield stack
    finally:
        stack.stop()
