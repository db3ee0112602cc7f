"""results.json -> summary.md and latency.png; the summary can be copied into docs/performance.md."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from analysis import CPU_CELL, IDLE_CELL, SLOW_CELL, Cell, added, ratio, value
from stack import REDIS_GATEWAYS, SLOW_DELAY_MS, TARGETS

DOC_BEGIN = "<!-- bench:summary:begin -->"
DOC_END = "<!-- bench:summary:end -->"


def fmt(number: float | None, digits: int = 2, suffix: str = "") -> str:
    if number is None or (isinstance(number, float) and math.isnan(number)):
        return "–"
    if abs(number) >= 1000:
        return f"{number:,.0f}{suffix}"
    return f"{number:.{digits}f}{suffix}"


def table_of(results: Mapping[str, Any]) -> dict[Cell, dict[str, float]]:
    return {(c["target"], c["upstream"], c["connections"]): c for c in results["cells"]}


def headline(table: Mapping[Cell, Mapping[str, float]]) -> list[str]:
    nginx_cpu = value(table, "nginx", CPU_CELL, "cpu_us_per_request")
    rows = [
        "| proxy | CPU per request (fast, 64 conns) | × nginx | req/s fast, 64 conns | 20 ms upstream, 64 conns: share of direct req/s | added p99, 20 ms, 64 conns | added p50 / p99 at 1 conn, fast | req/s 256 conns / 16 conns, fast |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for target in (t for t in TARGETS if any(t == cell[0] for cell in table)):
        cpu = value(table, target, CPU_CELL, "cpu_us_per_request")
        share = ratio(value(table, target, SLOW_CELL, "rps"), value(table, "direct", SLOW_CELL, "rps"))
        concurrency = ratio(value(table, target, ("fast", 256), "rps"), value(table, target, ("fast", 16), "rps"))
        is_direct = target == "direct"
        rows.append(
            f"| {target} | {fmt(cpu, 1, ' µs')}{' (upstream)' if is_direct else ''} | {'' if is_direct else fmt(ratio(cpu, nginx_cpu), 1)} "
            f"| {fmt(value(table, target, CPU_CELL, 'rps'))} | {fmt(share)} "
            f"| {'' if is_direct else fmt(added(table, target, SLOW_CELL, 'p99_ms'), 2, ' ms')} "
            f"| {'' if is_direct else fmt(added(table, target, IDLE_CELL, 'p50_ms'), 3) + ' / ' + fmt(added(table, target, IDLE_CELL, 'p99_ms'), 3) + ' ms'} "
            f"| {fmt(concurrency)} |"
        )
    return rows


def cell_rows(table: Mapping[Cell, Mapping[str, float]]) -> list[str]:
    rows = [
        "| upstream | conns | target | req/s | × direct | × nginx | p50 ms | p99 ms | p99.9 ms | CPU µs/req | CPU range over repeats | errors | other load (cores) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    cells = sorted({(u, c) for _, u, c in table}, key=lambda uc: (uc[0], uc[1]))
    for upstream, conns in cells:
        for target in TARGETS:
            row = table.get((target, upstream, conns))
            if row is None:
                continue
            rps = row["rps"]
            rows.append(
                f"| {upstream} | {conns} | {target} | {fmt(rps)} | {fmt(ratio(rps, value(table, 'direct', (upstream, conns), 'rps')))} "
                f"| {fmt(ratio(rps, value(table, 'nginx', (upstream, conns), 'rps')))} | {fmt(row['p50_ms'], 3)} | {fmt(row['p99_ms'], 3)} "
                f"| {fmt(row['p999_ms'], 3)} | {fmt(row['cpu_us_per_request'], 1)} | {spread(row)} | {row['errors']:.0f} | {fmt(row['foreign_cpu_cores'])} |"
            )
    return rows


def spread(row: Mapping[str, float]) -> str:
    if row.get("repeats", 1) < 2 or "cpu_min" not in row:
        return ""
    return f"{row['cpu_min']:.0f}–{row['cpu_max']:.0f}"


def target_rows(results: Mapping[str, Any]) -> list[str]:
    rows = ["| target | proxy | limit | measured | verdict |", "| --- | --- | ---: | ---: | --- |"]
    for t in results["targets"]:
        verdict = "no data" if t["met"] is None else ("met" if t["met"] else f"**missed**: {t['miss_by']}")
        rows.append(f"| {t['name']} | {t['proxy']} | {t['limit']:g} | {fmt(t['measured'], 3)} | {verdict} |")
    return rows


def memory_rows(results: Mapping[str, Any]) -> list[str]:
    memory = results.get("memory") or {}
    if not memory:
        return ["(not measured in this run)"]
    rows = ["| proxy | seconds under load | RSS first quarter | RSS last quarter | max | growth | flat |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, m in memory.items():
        if m.get("flat") is None:
            rows.append(f"| {name} | – | – | – | – | – | too few samples |")
            continue
        rows.append(
            f"| {name} | {m['seconds']:.0f} | {m['first_quarter_mib']:.1f} MiB | {m['last_quarter_mib']:.1f} MiB | {m['max_mib']:.1f} MiB "
            f"| {m['growth_mib']:+.2f} MiB | {'yes' if m['flat'] else '**no**'} |"
        )
    return rows


def upstream_check(table: Mapping[Cell, Mapping[str, float]]) -> str:
    """Is the 20 ms upstream keeping up? Direct req/s against the ideal connections / 20 ms."""
    parts = []
    for conns in sorted(c for t, u, c in table if t == "direct" and u == "slow"):
        row = table[("direct", "slow", conns)]
        ideal = conns / (SLOW_DELAY_MS / 1000)
        parts.append(f"{conns} conns: {fmt(row['rps'])} req/s = {row['rps'] / ideal:.0%} of the ideal {fmt(ideal)}, p50 {row['p50_ms']:.2f} ms, {row['cpu_us_per_request']:.0f} µs CPU/req")
    if not parts:
        return ""
    return "Slow upstream measured alone (direct): " + "; ".join(parts) + ". It uses little CPU per request; the gap to the ideal is timer granularity and sharing its core with wrk, and every proxy is compared with this same direct figure."


def fallback_lines(table: Mapping[Cell, Mapping[str, float]]) -> list[str]:
    """Where a Redis-backed gateway decided without Redis (its answer came later than the timeout)."""
    cells = [(t, u, c, row["fallback_share"]) for (t, u, c), row in sorted(table.items()) if t in REDIS_GATEWAYS and row.get("fallback_share")]
    if not cells:
        return []
    listed = ", ".join(f"{t} {u}/{c}: {share:.1%}" for t, u, c, share in cells)
    return [
        f"Rate-limit decisions taken without Redis (median share per cell, where any): {listed}. A request whose Redis answer "
        "has not arrived within `state.redis_timeout_s` is decided in memory (`on_redis_error: local`); on a saturated event "
        "loop the answer can sit unread past the timeout. Only a batch with no answer after four timeouts would open the "
        "outage breaker.",
        "",
    ]


def summary_markdown(results: Mapping[str, Any], chart: str = "latency.png") -> str:
    table = table_of(results)
    machine, run = results["machine"], results["run"]
    noise = results["noise"]
    lines = [
        f"Run: `{run['command']}` ({run['mode']} mode) at {run['started']}, commit `{machine['commit']}`"
        f"{' with uncommitted changes in gateway/' if machine.get('dirty') else ''}; "
        f"{run['repeats']} repeat(s) of {run['duration_s']:g} s per cell after a {run['warmup_s']:g} s warm-up, "
        "interleaved (repeat → scenario → target), median of each metric over the repeats.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']:.0f} GiB, Linux {machine['kernel']}; "
        f"Python {machine['python']}; {machine['nginx']}, {machine['haproxy']}, {machine['wrk']}, {machine['redis']}.",
        "",
        f"Pinning: {run['pinning']}. Load: wrk, 1 thread, closed loop, POST of a {run['body_bytes']}-byte JSON body; "
        f"the fast upstream is nginx answering a fixed {run['body_bytes']}-byte JSON body, the slow one an asyncio server "
        f"answering after {SLOW_DELAY_MS:g} ms. The gateway runs `gateway serve` (one uvicorn worker, uvloop, its own httptools server protocol) with its "
        "default pipeline (LivePerson classification, breaker, retries, a rate limit that never refuses, access log at INFO to "
        "/dev/null, metrics); `gateway-redis` keeps its rate-limit buckets in a local redis-server; `gateway-ids` is `gateway-redis` "
        "receiving a unique `X-Request-ID` with every request, as the LivePerson client and boto3 send one, so duplicate "
        "coalescing runs too (an in-flight mark in Redis, the stored answer). nginx (1 worker, "
        "upstream keepalive) and HAProxy (1 thread, http-reuse always) run without access logs. `minimal` is the floor the issue's "
        "reference names: a bare ASGI callable relaying through one aiohttp session on uvicorn's httptools protocol, with no "
        "feature at all (bench/minimal_proxy.py); `minimal-gw` is the same callable on the gateway's own server protocol and "
        "upstream client, the floor under the gateway itself.",
        "",
        f"Machine noise: processes outside the benchmark used {noise['mean_foreign_cores']:.2f} cores on average during the measured "
        f"runs (worst run {noise['max_foreign_cores']:.2f}); load average {noise['loadavg_before']} before, {noise['loadavg_after']} after.",
        "",
        upstream_check(table),
        "",
        "### Headline",
        "",
        *headline(table),
        "",
        "CPU per request is the proxy process's utime+stime over the run divided by the requests served "
        "(for `direct`, the fast upstream's own nginx). Added latency is the proxy's percentile minus direct's.",
        "",
        "### Targets (issue 8)",
        "",
        *target_rows(results),
        "",
        "### Every cell",
        "",
        *cell_rows(table),
        "",
        "### Memory under load",
        "",
        *memory_rows(results),
        "",
    ]
    decisions = results.get("ratelimit_decisions") or {}
    if decisions:
        lines += ["### Rate-limit decisions counted by each gateway (from /metrics)", ""]
        lines += [f"- {name}: " + (", ".join(f"{k} {v:,.0f}" for k, v in sorted(d.items())) or "none") for name, d in decisions.items()]
        lines.append("")
        lines += fallback_lines(table)
    lines += [
        f"![latency against offered load]({chart})",
        "",
        "The chart's load axis is the number of closed-loop connections (wrk2, which offers a fixed rate, is not in Debian): "
        f"against the {SLOW_DELAY_MS:g} ms upstream, c connections offer about c / {SLOW_DELAY_MS / 1000:g} s requests per second.",
    ]
    return "\n".join(lines) + "\n"


def draw_chart(results: Mapping[str, Any], path: Path) -> bool:
    """Latency (p50 and p99) against connections, one panel per upstream. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    table = table_of(results)
    upstreams = sorted({u for _, u, _ in table})
    figure, axes = plt.subplots(1, len(upstreams), figsize=(6.5 * len(upstreams), 4.8), squeeze=False)
    for ax, upstream in zip(axes[0], upstreams, strict=True):
        for index, target in enumerate(TARGETS):
            conns = sorted(c for t, u, c in table if t == target and u == upstream)
            if not conns:
                continue
            color = f"C{index}"
            ax.plot(conns, [table[(target, upstream, c)]["p50_ms"] for c in conns], "-o", color=color, label=f"{target} p50", markersize=4)
            ax.plot(conns, [table[(target, upstream, c)]["p99_ms"] for c in conns], "--", color=color, label=f"{target} p99", alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({c for _, u, c in table if u == upstream})
        rate = 1000 / SLOW_DELAY_MS
        ax.set_xticks(ticks, [f"{c}\n{short_rate(c * rate)}" if upstream == "slow" else str(c) for c in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("connections (closed loop)" + (f"; offered load ≈ conns × {1000 / SLOW_DELAY_MS:g} req/s" if upstream == "slow" else ""))
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{upstream} upstream" + (f" ({SLOW_DELAY_MS:g} ms)" if upstream == "slow" else " (nginx, fixed body)"))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def short_rate(per_s: float) -> str:
    return f"{per_s / 1000:g}k/s" if per_s >= 1000 else f"{per_s:g}/s"


def update_doc(doc: Path, summary: str) -> None:
    """Replace the text between the summary markers of docs/performance.md (append them when absent)."""
    text = doc.read_text() if doc.exists() else ""
    block = f"{DOC_BEGIN}\n{summary}{DOC_END}"
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        _, tail = rest.split(DOC_END, 1)
        text = head + block + tail
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
    doc.write_text(text)
