"""Instructions per request of a served proxy, whole process (server, features, upstream client).

Wall-clock CPU on a shared virtual machine moves by tens of per cent between runs; instruction
counts do not. Each proxy runs under `valgrind --tool=callgrind` against nginx answering the
benchmark's fixed body; one kept-alive connection sends `--warmup` requests, the counters are
zeroed, `--requests` more are sent, and the counters dumped. Kernel time (the system calls) is
not counted: this is the user-space part of the cost, the part the code decides.

    .venv/bin/python bench/served_instructions.py [--targets minimal,minimal-gw,gateway] [--requests 1000]
"""

from __future__ import annotations

import argparse
import http.client
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import BENCH, FUNCTION_PATH, REPO, free_port, gateway_conf, json_body, nginx_upstream_conf, wait_for_port  # noqa: E402

TARGETS = ("minimal", "minimal-gw", "gateway", "gateway-ids")


def target_argv(target: str, work: Path, port: int, upstream_port: int) -> list[str]:
    upstream = f"http://127.0.0.1:{upstream_port}"
    if target.startswith("minimal"):
        client = "gateway" if target == "minimal-gw" else "aiohttp"
        return [sys.executable, str(BENCH / "minimal_proxy.py"), "--port", str(port), "--fast", upstream, "--slow", upstream, "--client", client]
    config = work / "gateway.yaml"
    config.write_text(gateway_conf(upstream_port, upstream_port, None))
    return [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]


def send(port: int, count: int, body: bytes, caller_ids: bool) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for index in range(count):
        headers = {"Content-Type": "application/json"}
        if caller_ids:
            headers["X-Request-ID"] = f"bench-{index}-{id(connection)}"
        connection.request("POST", "/fast" + FUNCTION_PATH, body, headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
    connection.close()


def measure(target: str, warmup: int, requests: int) -> int:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        upstream_port, port = free_port(), free_port()
        (work / "nginx.conf").write_text(nginx_upstream_conf(work, upstream_port, json_body(205, "result")))
        nginx = subprocess.Popen(["nginx", "-p", str(work), "-c", str(work / "nginx.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = work / "callgrind.out"
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "-q", *target_argv(target, work, port, upstream_port)]
        env = {"PYTHONPATH": str(REPO), "GATEWAY_LOG_LEVEL": "INFO", "PATH": "/usr/bin:/bin"}
        proxy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
        try:
            wait_for_port(upstream_port, nginx)
            wait_for_port(port, proxy, timeout_s=180)
            body = json_body(205, "padding")
            caller_ids = target == "gateway-ids"
            send(port, warmup, body, caller_ids)
            subprocess.run(["callgrind_control", "-z", str(proxy.pid)], check=True, capture_output=True)
            send(port, requests, body, caller_ids)
            subprocess.run(["callgrind_control", "-d", str(proxy.pid)], check=True, capture_output=True)
        finally:
            proxy.terminate()
            proxy.wait(timeout=60)
            nginx.terminate()
            nginx.wait(timeout=10)
        dumps = sorted(work.glob("callgrind.out.*"))
        if not dumps:
            raise RuntimeError(f"callgrind wrote no dump for {target}")
        summary = subprocess.run(["callgrind_annotate", str(dumps[0])], capture_output=True, text=True, check=True).stdout
        found = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", summary) or re.search(r"([\d,]+)\s+PROGRAM TOTALS", summary)
        if found is None:
            raise RuntimeError(f"no total in callgrind's summary for {target}")
        return int(found.group(1).replace(",", "")) // requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="minimal,minimal-gw,gateway", help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    for target in args.targets.split(","):
        if target not in TARGETS:
            parser.error(f"unknown target {target!r}")
        print(f"{target:12} {measure(target, args.warmup, args.requests) / 1000:7.0f} k instructions per request (one kept-alive connection)", flush=True)


if __name__ == "__main__":
    main()
