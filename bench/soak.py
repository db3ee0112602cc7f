"""Soak: `gateway serve` as its own process under mixed load, with Redis killed and restarted
half-way, and the figures that show nothing leaked and nothing was lost.

    .venv/bin/python bench/soak.py --minutes 10            # a longer run than the suite's
    .venv/bin/python bench/soak.py --minutes 1 --json out.json

The load is `--concurrency` loops of one request at a time over keep-alive connections, each
request drawn (seeded) from a mix of successes, function errors (LivePerson 901), upstream
502s that a retry cures, 500s that no retry cures (they open breakers, which close again),
upstream throttles and an account that the gateway itself throttles. Every request carries a
unique X-Request-ID, so each response, access-log line and upstream call can be matched.

Figures: requests sent, responses, transport errors, access-log lines, upstream calls against
the attempts the access log reports (in total and per request), statuses and classes, the
gateway's RSS (average of the second half of the samples against the first half; sampling
starts after a warm-up), its file descriptors before and after (by kind), and the slowest
request. `verdicts()` turns them into the list of failed checks; `tests/test_soak.py` runs a
45-second soak with the same code and asserts that list is empty. Exit status 1 when a check
fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.harness import gateway_process, simulated, upstream_config, write_config  # noqa: E402
from tests.redis_servers import RedisProcess, remove_workdir, start_redis  # noqa: E402

ROUTE = "/api/account/{account}/lambdas/{function}/invoke"
TOTAL_S = 5.0
CLIENT_BOUND_S = TOTAL_S + 5.0  # no request may take longer: it would be a hang
WARM_UP_S = 3.0
SETTLE_S = 1.0  # for the gateway to see closed client connections before counting descriptors
RSS_GROWTH_ALLOWED = 0.05  # second-half average over first-half average
RSS_SLACK_BYTES = 2 * 1024 * 1024  # allocator noise on a ~60 MB process
REDIS_MAX_CONNECTIONS = 16
# (function, account, weight): the function name picks the simulated upstream's behaviour
MIX = (
    ("ok", "acct", 55),
    ("fail", "acct", 15),  # 901: a function error, never retried
    ("flaky", "acct", 10),  # 502, 502, then 200: two retries
    ("crash", "acct", 5),  # 500 every time: three attempts; soon its breaker opens, and every probe reopens it
    ("throttle", "acct", 5),  # upstream 429
    ("ok", "limited", 10),  # over the account's 5/s: the gateway's own 429
)


def soak_yaml(upstream_url: str, redis_url: str) -> str:
    timeouts = f"{{connect_s: 0.5, per_try_s: 2, total_s: {TOTAL_S}}}"
    return (
        "server: {shutdown_grace_s: 5}\n"
        f"state: {{redis_url: '{redis_url}', on_redis_error: local, redis_max_connections: {REDIS_MAX_CONNECTIONS}}}\n"
        "upstreams:\n"
        + upstream_config("lp", upstream_url, "liveperson", [ROUTE], retry="soak", breaker="soak", timeouts=timeouts)
        + "rate_limits:\n  default: {rate: 100000, per_s: 1, burst: 100000}\n  accounts:\n    limited: {rate: 5, per_s: 1, burst: 5}\n"
        + "retry_policies:\n  soak: {max_attempts: 3, base_delay_s: 0.005, max_delay_s: 0.02, retry_after_max_s: 1, budget_ratio: 0.5, budget_min_per_s: 20}\n"
        + "breaker_policies:\n  soak: {fail_max: 20, reset_timeout_s: 2}\n"
    )


@dataclass
class Tally:
    """What the load generator saw."""

    sent: int = 0
    answers: dict[str, tuple[int, str]] = field(default_factory=dict)  # request id -> (status, class)
    errors: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    finished_at: list[float] = field(default_factory=list)  # monotonic time of each answer


@dataclass
class Samples:
    rss_bytes: list[int] = field(default_factory=list)


async def load(client: httpx.AsyncClient, rng: random.Random, deadline: float, tally: Tally) -> None:
    """One loop: a request at a time until the deadline."""
    weights = [weight for _, _, weight in MIX]
    while time.monotonic() < deadline:
        function, account, _ = rng.choices(MIX, weights)[0]
        if account == "acct":
            account = f"acct-{rng.randrange(50)}"
        request_id = f"soak-{rng.getrandbits(64):016x}"
        tally.sent += 1
        started = time.monotonic()
        try:
            response = await client.post(f"/api/account/{account}/lambdas/{function}/invoke", json={"payload": request_id}, headers={"X-Request-ID": request_id})
            tally.answers[request_id] = (response.status_code, class_of(response))
        except httpx.HTTPError as exc:
            tally.errors.append(f"{request_id}: {type(exc).__name__}: {exc}")
        tally.slowest_s = max(tally.slowest_s, time.monotonic() - started)
        tally.finished_at.append(time.monotonic())


def class_of(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "success"
    try:
        body = response.json()
    except ValueError:
        return "unparsed"
    problem = body.get("problem", body) if isinstance(body, dict) else {}
    return str(problem.get("class", "unparsed"))


async def run_load(url: str, seconds: float, concurrency: int, rng: random.Random, tally: Tally) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_BOUND_S, limits=limits) as client:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(load(client, random.Random(rng.random()), deadline, tally) for _ in range(concurrency)))


async def sample_rss(pid: int, samples: Samples, stop: asyncio.Event, every_s: float = 0.5) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        samples.rss_bytes.append(process.memory_info().rss)
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


async def restart_redis_at(redis: RedisProcess, delay_s: float, gateway_url: str, down_s: float = 1.0) -> dict[str, float]:
    """Kill Redis after `delay_s`, start it again `down_s` later; the rate-limit decisions so far."""
    await asyncio.sleep(delay_s)
    redis.kill()
    await asyncio.sleep(down_s)
    await asyncio.to_thread(redis.restart)
    return await decision_sources(gateway_url)


async def decision_sources(gateway_url: str) -> dict[str, float]:
    """gateway_ratelimit_decisions_total summed by source (redis, fallback-local, ...)."""
    async with httpx.AsyncClient(base_url=gateway_url, timeout=5) as client:
        text = (await client.get("/metrics")).text
    sources: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_ratelimit_decisions_total":
                sources[sample.labels["source"]] += sample.value
    return dict(sources)


def descriptors(pid: int, ports: dict[str, int]) -> dict[str, int]:
    """The process's open file descriptors by kind: sockets by peer, everything else together."""
    total = len(os.listdir(f"/proc/{pid}/fd"))
    kinds: Counter[str] = Counter()
    for conn in psutil.Process(pid).net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN:
            kinds["listening"] += 1
        elif conn.laddr and conn.laddr.port == ports["gateway"]:
            kinds["clients"] += 1
        elif conn.raddr and conn.raddr.port == ports["upstream"]:
            kinds["upstream"] += 1
        elif conn.raddr and conn.raddr.port == ports["redis"]:
            kinds["redis"] += 1
        else:
            kinds["other sockets"] += 1
    kinds["not sockets"] = total - sum(kinds.values())
    kinds["total"] = total
    return dict(kinds)


def access_lines(log: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in log.splitlines() if line.startswith('{"time"') and '"request_id"' in line]


async def soak(workdir: Path, seconds: float, concurrency: int = 8, seed: int = 1) -> dict[str, Any]:
    """Run one soak and return its figures (see the module docstring)."""
    rng = random.Random(seed)
    tally = Tally()
    samples = Samples()
    redis = start_redis()
    try:
        async with simulated("liveperson") as sim:
            config = write_config(workdir, soak_yaml(sim.url, redis.url), name="soak.yaml")
            with gateway_process(config) as gw:
                pid = gw.process.pid
                ports = {"gateway": int(gw.url.rsplit(":", 1)[1]), "upstream": sim.port, "redis": redis.port}
                await run_load(gw.url, WARM_UP_S, concurrency, rng, tally)
                await asyncio.sleep(SETTLE_S)
                before = descriptors(pid, ports)
                stop = asyncio.Event()
                sampler = asyncio.create_task(sample_rss(pid, samples, stop))
                restart = asyncio.create_task(restart_redis_at(redis, seconds / 2, gw.url))
                main_started = time.monotonic()
                await run_load(gw.url, seconds, concurrency, rng, tally)
                at_restart = await restart
                stop.set()
                await sampler
                await asyncio.sleep(SETTLE_S)
                after = descriptors(pid, ports)
                at_end = await decision_sources(gw.url)
            log = gw.log()
            upstream_ids = Counter(call.headers.get("X-Request-ID", "") for call in sim.calls)
    finally:
        redis.close()
        remove_workdir(redis)
    result = figures(tally, access_lines(log), upstream_ids, samples, before, after, seconds + WARM_UP_S, concurrency)
    result["ratelimit_decisions"] = {"until_redis_was_back": at_restart, "at_end": at_end}
    result["requests_per_s_by_quarter"] = rates_by_quarter(tally.finished_at, main_started, seconds)
    return result


def figures(tally: Tally, lines: list[dict[str, Any]], upstream_ids: Counter[str], samples: Samples, before: dict[str, int], after: dict[str, int], seconds: float, concurrency: int) -> dict[str, Any]:
    logged_attempts = {line["request_id"]: line["attempts"] for line in lines}
    mismatched = [rid for rid, attempts in logged_attempts.items() if upstream_ids.get(rid, 0) != attempts]
    half = len(samples.rss_bytes) // 2
    first, second = samples.rss_bytes[:half], samples.rss_bytes[half:]
    return {
        "seconds": round(seconds, 1),
        "concurrency": concurrency,
        "sent": tally.sent,
        "responses": len(tally.answers),
        "transport_errors": tally.errors[:10],
        "access_lines": len(lines),
        "answered_without_access_line": len(set(tally.answers) - set(logged_attempts)),
        "upstream_calls": sum(upstream_ids.values()),
        "logged_attempts": sum(logged_attempts.values()),
        "retries": sum(attempts - 1 for attempts in logged_attempts.values() if attempts > 1),
        "requests_whose_calls_differ_from_logged_attempts": len(mismatched),
        "requests_per_s": round(tally.sent / seconds, 1),
        "slowest_s": round(tally.slowest_s, 3),
        "statuses": dict(sorted(Counter(status for status, _ in tally.answers.values()).items())),
        "classes": dict(Counter(cls for _, cls in tally.answers.values()).most_common()),
        "redis_restarts": 1,
        "rss_mb": {
            "samples": len(samples.rss_bytes),
            "first_half_avg": round(statistics.fmean(first) / 2**20, 2) if first else None,
            "second_half_avg": round(statistics.fmean(second) / 2**20, 2) if second else None,
            "min": round(min(samples.rss_bytes) / 2**20, 2) if samples.rss_bytes else None,
            "max": round(max(samples.rss_bytes) / 2**20, 2) if samples.rss_bytes else None,
        },
        "descriptors": {"before": before, "after": after},
    }


def rates_by_quarter(finished_at: list[float], started: float, seconds: float) -> list[float]:
    """Answers per second in each quarter of the main phase (the Redis restart is at the half)."""
    quarter = seconds / 4
    counts = Counter(min(3, int((t - started) // quarter)) for t in finished_at if t >= started)
    return [round(counts[q] / quarter, 1) for q in range(4)]


def verdicts(f: dict[str, Any]) -> list[str]:
    """Every check the figures fail (empty: the soak passed)."""
    failed = []
    if f["transport_errors"] or f["responses"] != f["sent"]:
        failed.append(f"{f['sent']} sent, {f['responses']} answered: {f['transport_errors']}")
    if f["access_lines"] != f["sent"] or f["answered_without_access_line"]:
        failed.append(f"{f['sent']} sent, {f['access_lines']} access-log lines, {f['answered_without_access_line']} answers not logged")
    if f["upstream_calls"] != f["logged_attempts"] or f["requests_whose_calls_differ_from_logged_attempts"]:
        failed.append(f"{f['upstream_calls']} upstream calls, {f['logged_attempts']} attempts logged, {f['requests_whose_calls_differ_from_logged_attempts']} requests differ")
    if f["slowest_s"] >= CLIENT_BOUND_S:
        failed.append(f"slowest request took {f['slowest_s']} s")
    failed += redis_verdicts(f["ratelimit_decisions"])
    failed += rss_verdicts(f["rss_mb"])
    failed += descriptor_verdicts(f["descriptors"]["before"], f["descriptors"]["after"], f["concurrency"])
    return failed


def redis_verdicts(decisions: dict[str, dict[str, float]]) -> list[str]:
    """The outage was seen (decisions made without Redis) and Redis was used again after it."""
    back, end = decisions["until_redis_was_back"], decisions["at_end"]
    failed = []
    if not back.get("fallback-local"):
        failed.append(f"no rate-limit decision was made without Redis while it was down: {back}")
    if end.get("redis", 0) <= back.get("redis", 0):
        failed.append(f"Redis was not used again after its restart: {back} then {end}")
    return failed


def rss_verdicts(rss: dict[str, Any]) -> list[str]:
    if rss["samples"] < 4:
        return [f"only {rss['samples']} RSS samples"]
    allowed = rss["first_half_avg"] * (1 + RSS_GROWTH_ALLOWED) + RSS_SLACK_BYTES / 2**20
    if rss["second_half_avg"] > allowed:
        return [f"RSS grew: first half {rss['first_half_avg']} MB, second half {rss['second_half_avg']} MB (allowed {allowed:.2f})"]
    return []


def descriptor_verdicts(before: dict[str, int], after: dict[str, int], concurrency: int) -> list[str]:
    failed = []
    for kind in ("not sockets", "listening", "other sockets"):
        if after.get(kind, 0) > before.get(kind, 0):
            failed.append(f"{kind}: {before.get(kind, 0)} before, {after.get(kind, 0)} after")
    if after.get("clients", 0):
        failed.append(f"{after['clients']} client connections still open after the clients left")
    if after.get("upstream", 0) > concurrency:
        failed.append(f"{after['upstream']} upstream connections for {concurrency} concurrent requests")
    if after.get("redis", 0) > REDIS_MAX_CONNECTIONS + 1:  # + the pub/sub connection
        failed.append(f"{after['redis']} Redis connections (pool of {REDIS_MAX_CONNECTIONS})")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="load time after the warm-up (default 5)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gw-soak-") as workdir:
        result = asyncio.run(soak(Path(workdir), args.minutes * 60, args.concurrency, args.seed))
    failed = verdicts(result)
    result["failed_checks"] = failed
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print("PASS" if not failed else "FAIL:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
