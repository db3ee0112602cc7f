"""Benchmark: direct, nginx, HAProxy and the gateway (in-process state / Redis) side by side.

    bench/run --quick          # ~2 minutes: 1 repeat of 2 s per cell, short memory check
    bench/run                  # full: 3 repeats of 6 s per cell, chart sweep, 30 s memory check
    bench/run --soak           # full + 5 minutes under load per gateway for the memory verdict
    bench/run --profile        # also py-spy each gateway under load (profile-*.md)
    bench/run --update-doc     # also copy the summary into docs/performance.md

Results go to bench/results/<time>-<mode>/ (results.json, summary.md, latency.png) and
bench/results/latest points at the newest. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from analysis import GATEWAYS, medians, memory_verdict, targets  # noqa: E402
from load import RunResult, measure, process_rss_bytes  # noqa: E402
from hotspots import parse_collapsed, profile_markdown, start_py_spy  # noqa: E402
from report import draw_chart, summary_markdown, update_doc  # noqa: E402
from stack import BENCH, BODY_BYTES, FLOORS, REDIS_GATEWAYS, REPO, TARGETS, Pinning, Stack, http_get, json_body, running_stack  # noqa: E402

FAST_CONNECTIONS = (1, 16, 64, 256)
SLOW_CONNECTIONS_FULL = (1, 16, 64, 128, 256)
SLOW_CONNECTIONS_QUICK = (64, 256)


@dataclass(frozen=True)
class Plan:
    mode: str
    repeats: int
    duration_s: float
    warmup_s: float
    memory_s: float
    scenarios: tuple[tuple[str, int], ...]
    targets: tuple[str, ...]
    profile_s: float


def plan_from(args: argparse.Namespace) -> Plan:
    quick = args.quick
    slow = SLOW_CONNECTIONS_QUICK if quick else SLOW_CONNECTIONS_FULL
    memory_s = args.memory_seconds or (300.0 if args.soak else (10.0 if quick else 30.0))
    chosen = tuple(t for t in TARGETS if not args.targets or t in args.targets.split(",") or t == "direct")
    return Plan(
        mode="quick" if quick else ("soak" if args.soak else "full"),
        repeats=args.repeats or (1 if quick else 3),
        duration_s=args.duration or (2.0 if quick else 6.0),
        warmup_s=args.warmup if args.warmup is not None else 1.0,
        memory_s=0.0 if args.no_memory else memory_s,
        scenarios=tuple(("fast", c) for c in FAST_CONNECTIONS) + tuple(("slow", c) for c in slow),
        targets=chosen,
        profile_s=(10.0 if quick else 20.0) if args.profile else 0.0,
    )


def command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


def describe_machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    memory_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")))
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_kib / 2**20,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": command_output(["nginx", "-v"]).replace("nginx version: ", ""),
        "haproxy": " ".join(command_output(["haproxy", "-v"]).split()[:3]),
        "wrk": " ".join(command_output(["wrk", "-v"]).split()[:2]),
        "redis": " ".join(command_output(["redis-server", "--version"]).split()[:3]),
        "commit": command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "dirty": bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "gateway"], capture_output=True, text=True).stdout.strip()),
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def check_targets(stack: Stack, plan: Plan, body_len: int) -> None:
    """One request per target and upstream before measuring: a 200 with the upstream's body."""
    import urllib.request

    for target in plan.targets:
        for upstream in ("fast", "slow"):
            request = urllib.request.Request(stack.url(target, upstream), data=b"{}", method="POST", headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback only
                    status, got = response.status, response.read()
            except OSError as exc:
                raise RuntimeError(f"{target}/{upstream} ({request.full_url}) failed: {exc}") from exc
            if status != 200 or len(got) != body_len:
                raise RuntimeError(f"{target}/{upstream}: status {status}, {len(got)} bytes")


def run_matrix(stack: Stack, plan: Plan, body_file: Path, log: Any) -> list[RunResult]:
    runs: list[RunResult] = []
    total = plan.repeats * len(plan.scenarios) * len(plan.targets)
    for repeat in range(plan.repeats):
        for upstream, conns in plan.scenarios:
            for target in plan.targets:
                common = dict(target=target, upstream=upstream, url=stack.url(target, upstream), connections=conns, proxy_pid=stack.proxy_pid(target, upstream),
                              helper_pids=stack.helper_pids(), core=stack.pinning.load_core, body_file=body_file)  # fmt: skip
                if plan.warmup_s > 0:
                    measure(repeat=-1, duration_s=plan.warmup_s, **common)
                decided = ratelimit_counts(stack, target) if target in REDIS_GATEWAYS else None
                result = measure(repeat=repeat, duration_s=plan.duration_s, **common)
                if decided is not None:
                    result = dataclasses.replace(result, fallback_share=fallback_share(decided, ratelimit_counts(stack, target)))
                runs.append(result)
                log(
                    f"[{len(runs)}/{total}] r{repeat} {upstream:4} c={conns:<3} {target:13} {result.rps:9,.0f} req/s  p50 {result.p50_ms:7.3f}  "
                    f"p99 {result.p99_ms:7.3f}  p99.9 {result.p999_ms:7.3f} ms  cpu {result.cpu_us_per_request:6.1f} µs/req  "
                    f"err {result.errors}  other {result.foreign_cpu_cores:.2f} cores"
                    + (f"  rate limit without Redis {result.fallback_share:.0%}" if decided is not None else "")
                )
    return runs


def measure_memory(stack: Stack, plan: Plan, body_file: Path, log: Any) -> dict[str, Any]:
    """Each gateway under 64 connections on the fast upstream for `memory_s`; RSS sampled every second."""
    found: dict[str, Any] = {}
    for name in (t for t in plan.targets if t in GATEWAYS or t in FLOORS):  # the floors to compare with
        pid = stack.pids[name]
        argv = ["taskset", "-c", str(stack.pinning.load_core), "wrk", "-t1", "-c64", f"-d{plan.memory_s:g}s", "-s", str(BENCH / "report.lua"), stack.url(name, "fast")]
        started = time.monotonic()
        samples: list[tuple[float, int]] = []
        wrk = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "BENCH_BODY_FILE": str(body_file)})
        try:
            while wrk.poll() is None:
                samples.append((time.monotonic() - started, process_rss_bytes(pid)))
                time.sleep(1.0)
        finally:
            if wrk.poll() is None:
                wrk.terminate()
            wrk.wait()
        found[name] = memory_verdict(samples[1:])  # the first second is still warming up
        found[name]["samples_mib"] = [round(rss / 2**20, 2) for _, rss in samples]
        log(f"memory {name}: {found[name].get('first_quarter_mib', 0):.1f} -> {found[name].get('last_quarter_mib', 0):.1f} MiB over {plan.memory_s:g} s")
    return found


def run_profiles(stack: Stack, plan: Plan, body_file: Path, out: Path, log: Any) -> dict[str, str]:
    written: dict[str, str] = {}
    for name in (t for t in plan.targets if t in GATEWAYS or t in FLOORS):  # the floors to compare with
        raw = out / f"profile-{name}.txt"
        spy = start_py_spy(stack.pids[name], plan.profile_s, stack.pinning.load_core, raw)
        time.sleep(0.5)
        argv = ["taskset", "-c", str(stack.pinning.load_core), "wrk", "-t1", "-c64", f"-d{plan.profile_s + 1:g}s", "-s", str(BENCH / "report.lua"), stack.url(name, "fast")]
        subprocess.run(argv, capture_output=True, env={**os.environ, "BENCH_BODY_FILE": str(body_file)}, check=False)
        _, err = spy.communicate(timeout=60)
        if not raw.exists():
            log(f"py-spy failed for {name}: {err.decode(errors='replace')[-500:]}")
            continue
        markdown = profile_markdown(parse_collapsed(raw.read_text().splitlines()))
        (out / f"profile-{name}.md").write_text(f"### py-spy: {name}, fast upstream, 64 connections\n\n{markdown}")
        written[name] = f"profile-{name}.md"
        log(f"profile {name}: {out / f'profile-{name}.md'}")
    return written


def ratelimit_counts(stack: Stack, name: str) -> dict[str, float]:
    """`decision/source` -> count, from the gateway's /metrics."""
    text = http_get(f"http://127.0.0.1:{stack.ports[name]}/metrics").decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gateway_ratelimit_decisions_total{"):
            labels, number = line.rsplit(" ", 1)
            decision = labels.split('decision="', 1)[1].split('"', 1)[0]
            source = labels.split('source="', 1)[1].split('"', 1)[0]
            counts[f"{decision}/{source}"] = counts.get(f"{decision}/{source}", 0) + float(number)
    return counts


def fallback_share(before: dict[str, float], after: dict[str, float]) -> float:
    """Share of the decisions between two scrapes that were not taken in Redis."""
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    total = sum(delta.values())
    return sum(v for key, v in delta.items() if not key.endswith("/redis")) / total if total else 0.0


def ratelimit_decisions(stack: Stack, plan: Plan) -> dict[str, dict[str, float]]:
    return {name: ratelimit_counts(stack, name) for name in plan.targets if name in GATEWAYS}


def noise_of(runs: list[RunResult], before: str, after: str) -> dict[str, Any]:
    foreign = [r.foreign_cpu_cores for r in runs] or [0.0]
    return {"mean_foreign_cores": sum(foreign) / len(foreign), "max_foreign_cores": max(foreign), "loadavg_before": before, "loadavg_after": after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the gateway against direct, nginx and HAProxy (see docs/performance.md)")
    parser.add_argument("--quick", action="store_true", help="1 repeat of 2 s per cell (about 2 minutes)")
    parser.add_argument("--soak", action="store_true", help="5 minutes under load per gateway for the memory verdict")
    parser.add_argument("--profile", action="store_true", help="py-spy each gateway and both minimal proxies under load; writes profile-*.md")
    parser.add_argument("--update-doc", action="store_true", help="copy the summary and chart into docs/performance.md")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory check")
    parser.add_argument("--memory-seconds", type=int, help="seconds under load per gateway for the memory check")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--duration", type=int, help="whole seconds per measured run")
    parser.add_argument("--warmup", type=int, help="whole seconds of warm-up before each measured run (0: none)")
    parser.add_argument("--targets", help="comma-separated subset of " + ",".join(TARGETS) + " (direct is always run)")
    parser.add_argument("--proxy-core", type=int, default=0)
    parser.add_argument("--load-core", type=int, default=1)
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    plan = plan_from(args)
    pinning = Pinning(args.proxy_core, args.load_core)
    os.sched_setaffinity(0, {pinning.load_core})  # the orchestrator mostly sleeps; keep it off the proxy's core

    started = datetime.datetime.now(datetime.timezone.utc)
    out = args.results / f"{started:%Y%m%d-%H%M%S}-{plan.mode}"
    work = out / "work"
    work.mkdir(parents=True)

    def log(message: str) -> None:
        print(message, flush=True)

    machine = describe_machine()
    body = json_body(BODY_BYTES, "padding")
    body_file = work / "request.json"
    body_file.write_bytes(body)
    before = loadavg()
    log(f"results: {out}\nmachine: {machine['cpu']} x{machine['cores']}, load average {before}\npinning: {pinning.describe()}")
    with running_stack(work, pinning, json_body(BODY_BYTES, "result")) as stack:
        check_targets(stack, plan, BODY_BYTES)
        runs = run_matrix(stack, plan, body_file, log)
        memory = measure_memory(stack, plan, body_file, log) if plan.memory_s else {}
        profiles = run_profiles(stack, plan, body_file, out, log) if plan.profile_s else {}
        decisions = ratelimit_decisions(stack, plan)
    after = loadavg()

    cells = medians(r.to_json() for r in runs)
    results = {
        "machine": machine,
        "run": {
            "command": "bench/run " + shlex.join(sys.argv[1:] if argv is None else argv),
            "mode": plan.mode,
            "started": started.isoformat(timespec="seconds"),
            "repeats": plan.repeats,
            "duration_s": plan.duration_s,
            "warmup_s": plan.warmup_s,
            "memory_s": plan.memory_s,
            "body_bytes": BODY_BYTES,
            "pinning": pinning.describe(),
        },
        "noise": noise_of(runs, before, after),
        "runs": [r.to_json() for r in runs],
        "cells": [{"target": t, "upstream": u, "connections": c, **m} for (t, u, c), m in cells.items()],
        "targets": [t.to_json() for t in targets(cells)],
        "memory": memory,
        "ratelimit_decisions": decisions,
        "profiles": profiles,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    draw_chart(results, out / "latency.png")
    summary = summary_markdown(results)
    (out / "summary.md").write_text("## Latest benchmark run\n\n" + summary)
    latest = args.results / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(out.name)
    if args.update_doc:
        docs = REPO / "docs"
        if (out / "latency.png").exists():
            shutil.copyfile(out / "latency.png", docs / "performance-latency.png")
        update_doc(docs / "performance.md", summary_markdown(results, chart="performance-latency.png"))
    log(f"\n{summary}\nwritten: {out}/results.json, summary.md, latency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
