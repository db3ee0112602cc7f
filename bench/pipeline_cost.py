"""CPU per request of the gateway's own code: the pipeline driven in-process, without sockets.

The upstream is a stand-in that answers at once with a canned 200 (so aiohttp and uvicorn are
out of the picture), the ASGI receive/send are plain callables, and the access log goes to
/dev/null. What remains is routing, rate limit, breaker, classification, retry bookkeeping,
metrics and the access log: the part of the gateway's cost that is ours rather than the
stack's. Variants switch features off to price them one by one.

    .venv/bin/python bench/pipeline_cost.py [--requests 20000] [--rounds 5] [--only VARIANT]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import FUNCTION_PATH, gateway_conf, json_body  # noqa: E402

from gateway.app import create_app  # noqa: E402
from gateway.observability import configure_logging  # noqa: E402
from gateway.pipeline import DISCONNECT_EXTENSION  # noqa: E402
from gateway.settings import load_settings  # noqa: E402

BODY = json_body(205, "result")
REQUEST = json_body(205, "padding")
REPLY_HEADERS = [(b"server", b"nginx"), (b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


class CannedReply:
    """Duck-types gateway.upstream.UpstreamReply for a small 200."""

    status = 200
    declared_length = len(BODY)

    def __init__(self) -> None:
        self.headers = list(REPLY_HEADERS)

    def header_map(self) -> dict[str, str]:
        return {n.decode("latin-1"): v.decode("latin-1") for n, v in self.headers}

    async def read_whole(self) -> bytes:
        return BODY

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class CannedUpstream:
    async def send(self, request: Any, connect_s: float, per_try_s: float) -> CannedReply:
        return CannedReply()


def scope_for(path: str, request_id: bytes | None = None) -> dict[str, Any]:
    headers = [(b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json"), (b"content-length", str(len(REQUEST)).encode())]
    if request_id is not None:  # as the LivePerson client and boto3 send one: duplicate coalescing runs
        headers.append((b"x-request-id", request_id))
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
    }  # fmt: skip


async def drive(config: Path, requests: int, rounds: int, caller_ids: bool = False) -> list[float]:
    app = create_app(load_settings(config))
    await app.start()
    gc.collect()
    gc.freeze()  # as `gateway serve` does
    try:
        assert app.runtime is not None
        app.runtime.upstream = CannedUpstream()  # type: ignore[assignment]
        path = "/fast" + FUNCTION_PATH
        statuses: list[int] = []
        never = asyncio.Event()

        async def one() -> None:
            delivered = False

            async def receive() -> dict[str, Any]:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": REQUEST, "more_body": False}
                await never.wait()  # the client stays: the disconnect watch waits like it would on uvicorn
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            scope = scope_for(path, os.urandom(8).hex().encode() if caller_ids else None)
            # What the gateway's protocol puts there under uvicorn (without it the pipeline would
            # watch the client with a task per request, which the served gateway never does).
            scope["extensions"] = {DISCONNECT_EXTENSION: asyncio.get_running_loop().create_future()}
            await app(scope, receive, send)

        for _ in range(500):
            await one()
        per_round: list[float] = []
        for _ in range(rounds):
            started = time.process_time()
            for _ in range(requests):
                await one()
            per_round.append((time.process_time() - started) / requests * 1e6)
        if set(statuses) != {200}:
            raise RuntimeError(f"unexpected statuses {sorted(set(statuses))}")
        return per_round
    finally:
        await app.stop()


VARIANTS = {
    "full pipeline": ("INFO", True, False),
    "no access log": ("WARNING", True, False),
    "no rate limit": ("INFO", False, False),
    "neither": ("WARNING", False, False),
    "with caller id": ("INFO", True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=list(VARIANTS), help="run one variant (e.g. under py-spy)")
    args = parser.parse_args()
    import uvloop

    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (level, rate_limited, caller_ids) in VARIANTS.items():
            if args.only and name != args.only:
                continue
            text = gateway_conf(9, 9, None)
            if not rate_limited:
                text = text.replace("    max_connections: 1024\n", "    max_connections: 1024\n    rate_limited: false\n")
            config = Path(folder) / "gateway.yaml"
            config.write_text(text)
            configure_logging(level)
            logging.getLogger("gateway").setLevel(logging.WARNING)  # start/stop events, not the access log
            logging.getLogger("gateway.access").handlers[0].setStream(open("/dev/null", "w"))  # noqa: SIM115
            results[name] = uvloop.run(drive(config, args.requests, args.rounds, caller_ids))
    base = statistics.median(next(iter(results.values())))
    for name, rounds in results.items():
        median = statistics.median(rounds)
        print(f"{name:15} {median:6.1f} µs/request  ({base - median:+5.1f} vs the first)  rounds: {' '.join(f'{r:.1f}' for r in rounds)}")


if __name__ == "__main__":
    main()
