"""Pure: raw runs -> medians per cell, ratios to direct and nginx, and the issue's targets."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

METRICS = ("rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "cpu_us_per_request", "errors", "foreign_cpu_cores", "fallback_share")
Cell = tuple[str, str, int]  # target, upstream, connections

# The reference point for "CPU per request": saturating load on the fast upstream.
CPU_CELL = ("fast", 64)
SLOW_CELL = ("slow", 64)
IDLE_CELL = ("fast", 1)
CONCURRENCY_CELLS = (("fast", 16), ("fast", 256))
GATEWAYS = ("gateway", "gateway-redis", "gateway-ids")


def medians(runs: Iterable[Mapping[str, Any]]) -> dict[Cell, dict[str, float]]:
    """Each metric's median over the repeats of a cell (taken metric by metric)."""
    grouped: dict[Cell, list[Mapping[str, Any]]] = defaultdict(list)
    for run in runs:
        grouped[(run["target"], run["upstream"], run["connections"])].append(run)
    return {
        cell: {
            **{m: statistics.median(float(r.get(m, 0.0)) for r in rs) for m in METRICS},
            "repeats": len(rs),
            "cpu_min": min(float(r["cpu_us_per_request"]) for r in rs),
            "cpu_max": max(float(r["cpu_us_per_request"]) for r in rs),
            "rps_min": min(float(r["rps"]) for r in rs),
            "rps_max": max(float(r["rps"]) for r in rs),
        }
        for cell, rs in grouped.items()
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def value(table: Mapping[Cell, Mapping[str, float]], target: str, cell: tuple[str, int], metric: str) -> float | None:
    row = table.get((target, *cell))
    return None if row is None else row[metric]


@dataclass(frozen=True)
class Target:
    name: str
    proxy: str
    limit: float
    measured: float | None
    higher_is_better: bool
    unit: str

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit

    @property
    def miss_by(self) -> str:
        """How far from the limit, as a factor of it ("" when met or unknown)."""
        if self.met is not False or self.measured is None:
            return ""
        if self.higher_is_better:
            return f"{self.limit - self.measured:.3g}{self.unit} short ({self.measured / self.limit:.0%} of the target)"
        return f"{self.measured - self.limit:.3g}{self.unit} over ({self.measured / self.limit:.2f}x the target)"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "proxy": self.proxy, "limit": self.limit, "measured": self.measured, "met": self.met, "miss_by": self.miss_by}


def targets(table: Mapping[Cell, Mapping[str, float]]) -> list[Target]:
    """The issue's targets, evaluated for each gateway variant."""
    found: list[Target] = []
    nginx_cpu = value(table, "nginx", CPU_CELL, "cpu_us_per_request")
    for proxy, cpu_limit, idle_limit in (("gateway", 10.0, 0.3), ("gateway-redis", 15.0, 0.45)):
        cpu = ratio(value(table, proxy, CPU_CELL, "cpu_us_per_request"), nginx_cpu)
        found.append(Target("CPU per request vs nginx (fast, 64 conns)", proxy, cpu_limit, cpu, False, "x"))
        share = ratio(value(table, proxy, SLOW_CELL, "rps"), value(table, "direct", SLOW_CELL, "rps"))
        found.append(Target("20 ms upstream, 64 conns: share of direct req/s", proxy, 0.95, share, True, ""))
        found.append(Target("20 ms upstream, 64 conns: added p99 (ms)", proxy, 5.0, added(table, proxy, SLOW_CELL, "p99_ms"), False, " ms"))
        found.append(Target("1 conn, fast: added p50 (ms)", proxy, idle_limit, added(table, proxy, IDLE_CELL, "p50_ms"), False, " ms"))
        low, high = CONCURRENCY_CELLS
        keep = ratio(value(table, proxy, high, "rps"), value(table, proxy, low, "rps"))
        found.append(Target("req/s at 256 conns / at 16 (fast)", proxy, 0.8, keep, True, ""))
    return found


def added(table: Mapping[Cell, Mapping[str, float]], proxy: str, cell: tuple[str, int], metric: str) -> float | None:
    mine, direct = value(table, proxy, cell, metric), value(table, "direct", cell, metric)
    return None if mine is None or direct is None else mine - direct


def memory_verdict(samples: list[tuple[float, int]], max_growth_bytes: int = 5 * 2**20, max_growth_share: float = 0.05) -> dict[str, Any]:
    """Flat = the median RSS of the last quarter is within 5 MiB and 5% of the first quarter's."""
    if len(samples) < 4:
        return {"samples": len(samples), "flat": None}
    quarter = max(1, len(samples) // 4)
    first = statistics.median(rss for _, rss in samples[:quarter])
    last = statistics.median(rss for _, rss in samples[-quarter:])
    growth = last - first
    return {
        "samples": len(samples),
        "seconds": samples[-1][0] - samples[0][0],
        "first_quarter_mib": first / 2**20,
        "last_quarter_mib": last / 2**20,
        "max_mib": max(rss for _, rss in samples) / 2**20,
        "growth_mib": growth / 2**20,
        "flat": growth <= max_growth_bytes and growth <= max_growth_share * first,
    }
