"""Paired A/B of two gateway source trees: CPU per request, alternating short wrk runs.

On a shared machine one run's noise is larger than most single optimisations; running both
trees side by side, alternating which goes first, and reading the pairs shows a change of a few
per cent. Each tree is a folder holding a `gateway/` package (for example
`git archive HEAD gateway | tar -x -C /tmp/a` plus `cp -r policies /tmp/a/gateway/shipped_policies`).

    .venv/bin/python bench/compare.py /tmp/a /tmp/b --rounds 10 [--connections 64] [--log-level INFO]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import RunResult, measure  # noqa: E402
from stack import FUNCTION_PATH, Pinning, Stack, free_port, gateway_conf, json_body, nginx_upstream_conf  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2, type=Path)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        stack = Stack(work, Pinning(0, 1))
        (work / "request.json").write_bytes(json_body(205, "padding"))
        try:
            fast = free_port()
            (work / "fast.conf").write_text(nginx_upstream_conf(work, fast, json_body(205, "result")))
            stack.start("upstream-fast", ["nginx", "-p", str(work), "-c", str(work / "fast.conf")], 1, fast)
            for index, tree in enumerate(args.trees):
                config = work / f"gateway-{index}.yaml"
                config.write_text(gateway_conf(fast, fast, None))
                port = free_port()
                env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "GATEWAY_LOG_LEVEL": args.log_level}
                stack.start(f"tree-{index}", [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)], 0, port, env=env)
            results = run_pairs(stack, args, work / "request.json")
        finally:
            stack.stop()
    for index, tree in enumerate(args.trees):
        cpu = [r.cpu_us_per_request for r in results[index]]
        print(f"{tree}: CPU {statistics.median(cpu):.1f} µs/request (median; all: {' '.join(f'{c:.0f}' for c in cpu)}), req/s {statistics.median(r.rps for r in results[index]):,.0f}")
    lower = sum(b.cpu_us_per_request < a.cpu_us_per_request for a, b in zip(*results.values(), strict=True))
    print(f"{args.trees[1]} used less CPU in {lower} of {args.rounds} pairs")


def run_pairs(stack: Stack, args: argparse.Namespace, body: Path) -> dict[int, list[RunResult]]:
    results: dict[int, list[RunResult]] = {0: [], 1: []}
    for round_ in range(args.rounds):
        for index in (0, 1) if round_ % 2 == 0 else (1, 0):
            url = f"http://127.0.0.1:{stack.ports[f'tree-{index}']}/fast{FUNCTION_PATH}"
            common = dict(target=f"tree-{index}", upstream="fast", url=url, connections=args.connections, proxy_pid=stack.pids[f"tree-{index}"], helper_pids=stack.helper_pids(), core=1, body_file=body)
            if round_ == 0:
                measure(repeat=-1, duration_s=1, **common)
            results[index].append(measure(repeat=round_, duration_s=args.seconds, **common))
    return results


if __name__ == "__main__":
    main()
