"""One measured run: wrk against a URL, with the CPU the proxy process and the machine used."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from stack import BENCH, REQUEST_ID_TARGETS

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def process_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def core_busy_s() -> dict[int, float]:
    """Busy (non-idle, non-iowait) seconds per core since boot, from /proc/stat."""
    busy: dict[int, float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *values = line.split()
            ticks = [int(v) for v in values[:8]]
            busy[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4]) / TICKS_PER_S
    return busy


def wait_idle(pids: list[int], *, quiet_s: float = 0.2, busy_share: float = 0.05, limit_s: float = 5.0) -> float:
    """Wait until none of `pids` used more than `busy_share` of a core over `quiet_s`; the seconds waited.

    Back-to-back wrk runs otherwise overlap: the previous run's connections are still being torn
    down (and their last requests finished) when the next run connects, and on a saturated
    single-threaded server some new connections then wait ~1 s before their first request is
    read (seen with uvicorn alone, no gateway involved). Waiting for quiet costs little for fast proxies.
    """
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        before = {pid: process_cpu_s(pid) for pid in pids}
        time.sleep(quiet_s)
        if all(process_cpu_s(pid) - used <= busy_share * quiet_s for pid, used in before.items()):
            break
    return time.monotonic() - started


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class RunResult:
    target: str
    upstream: str
    connections: int
    repeat: int
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    errors: int
    proxy_cpu_s: float
    cpu_us_per_request: float
    foreign_cpu_cores: float
    fallback_share: float = 0.0  # rate-limit decisions taken without Redis (Redis-backed gateways only)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def run_wrk(url: str, connections: int, duration_s: float, core: int, body_file: Path, request_ids: bool = False) -> dict[str, object]:
    argv = [
        "taskset", "-c", str(core), "wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "10s",
        "-s", str(BENCH / "report.lua"), url,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_REQUEST_IDS": "1" if request_ids else "0"}, timeout=duration_s + 60)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line.removeprefix("BENCH_JSON "))
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}): {done.stdout}\n{done.stderr}")


def measure(
    *, target: str, upstream: str, url: str, connections: int, repeat: int, duration_s: float, proxy_pid: int,
    helper_pids: list[int], core: int, body_file: Path,
) -> RunResult:  # fmt: skip
    """Run wrk once; CPU of the proxy from /proc, the rest of the machine's load from /proc/stat."""
    known = [proxy_pid, *(p for p in helper_pids if p != proxy_pid)]
    wait_idle(known)
    cpu_before = {pid: process_cpu_s(pid) for pid in known}
    busy_before, wrk_before, wall_before = core_busy_s(), children_cpu_s(), time.monotonic()
    report = run_wrk(url, connections, duration_s, core, body_file, request_ids=target in REQUEST_ID_TARGETS)
    wall = time.monotonic() - wall_before
    busy_after, wrk_cpu = core_busy_s(), children_cpu_s() - wrk_before
    used = {pid: process_cpu_s(pid) - cpu_before[pid] for pid in known}
    machine_busy = sum(busy_after[c] - busy_before[c] for c in busy_after)
    foreign = max(0.0, machine_busy - sum(used.values()) - wrk_cpu) / wall
    latency = report["latency_us"]
    errors = report["errors"]
    requests = int(report["requests"])
    duration = int(report["duration_us"]) / 1e6
    assert isinstance(latency, dict) and isinstance(errors, dict)
    return RunResult(
        target=target,
        upstream=upstream,
        connections=connections,
        repeat=repeat,
        requests=requests,
        duration_s=duration,
        rps=requests / duration,
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        p999_ms=latency["p999"] / 1000,
        mean_ms=latency["mean"] / 1000,
        max_ms=latency["max"] / 1000,
        errors=sum(int(v) for v in errors.values()),
        proxy_cpu_s=used[proxy_pid],
        cpu_us_per_request=used[proxy_pid] / requests * 1e6 if requests else float("nan"),
        foreign_cpu_cores=foreign,
    )


def sample_rss(pids: dict[str, int]) -> dict[str, int]:
    return {name: process_rss_bytes(pid) for name, pid in pids.items()}
