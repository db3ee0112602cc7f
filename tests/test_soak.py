"""A bounded soak in the suite: `gateway serve` as its own process under mixed load for 40 s
after a warm-up, Redis killed and restarted half-way (the same code as `bench/soak.py`, which
runs it for longer).

It checks that every request is accounted for (sent == answered == access-log lines, upstream
calls == logged attempts for each request), that no request took longer than its bound, that
the gateway's RSS stays flat (second-half average within 5 % + 2 MB of the first half) and that
no file descriptor leaked (nothing but pooled upstream and Redis connections grows, and no client
connection is left open). The figures are printed (`pytest -s`) and written to
`soak-figures.json` in the test's tmp folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.soak import soak, verdicts

pytestmark = pytest.mark.timeout(120)

LOAD_S = 40.0


async def test_soak_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    figures = await soak(tmp_path, LOAD_S, concurrency=8, seed=9)
    (tmp_path / "soak-figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    assert verdicts(figures) == []
    assert figures["sent"] > 0 and figures["transport_errors"] == []
    classes = set(figures["classes"])
    assert {"success", "function_error", "rate_limited"} <= classes  # the mix really was mixed
    assert classes & {"server_error", "upstream_unavailable", "circuit_open"}
