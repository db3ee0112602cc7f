"""`gateway serve` as real processes: several workers sharing limits through Redis, graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from tests.harness import REPO, GatewayProcess, free_port, gateway_process, simulated, upstream_config, write_config
from tests.redis_servers import RedisProcess

pytestmark = pytest.mark.timeout(90)

ROUTE = "/api/account/{account}/lambdas/{function}/invoke"
BURST = 5
SECRET = "SECRET-WORKER-AUTHZ-31"


def gateway_yaml(url: str, extra: str = "") -> str:
    limits = f"rate_limits:\n  default: {{rate: 1, per_s: 3600, burst: 1000}}\n  accounts:\n    shared: {{rate: 1, per_s: 3600, burst: {BURST}}}\n"
    return "upstreams:\n" + upstream_config("lp", url, "liveperson", [ROUTE]) + limits + extra


def access_pids(process: GatewayProcess) -> dict[str, int]:
    pids = {}
    for line in process.log().splitlines():
        if line.startswith('{"time"') and '"request_id"' in line:
            entry = orjson.loads(line)
            pids[entry["request_id"]] = entry["pid"]
    return pids


async def send_fresh(url: str, path: str) -> tuple[str, int]:
    """One request on its own connection, so that every worker gets a share of them."""
    request_id = uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.post(path, headers={"x-request-id": request_id, "authorization": f"Bearer {SECRET}"})
    return request_id, response.status_code


def test_workers_with_state_in_memory_are_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, gateway_yaml("http://127.0.0.1:9"))
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(free_port()), "--workers", "2"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "state.redis_url" in done.stderr


async def test_two_workers_enforce_one_limit_per_account_through_redis(tmp_path: Path, redis_server: RedisProcess) -> None:
    state = f"state: {{redis_url: '{redis_server.url}'}}\n"
    async with simulated("liveperson") as sim:
        config = write_config(tmp_path, gateway_yaml(sim.url, state))
        with gateway_process(config, workers=2) as gw:
            statuses: dict[str, int] = {}
            served_by: set[int] = set()
            while len(served_by) < 2 or len(statuses) < BURST + 5:
                assert len(statuses) < 200, "one worker answered every request"
                batch = await asyncio.gather(*(send_fresh(gw.url, "/api/account/shared/lambdas/ok/invoke") for _ in range(4)))
                statuses.update(batch)
                await asyncio.sleep(0.05)  # the access line follows the response
                pids = access_pids(gw)
                served_by = {pids[r] for r in statuses if r in pids}
            log = gw.log()
    allowed = sum(1 for status in statuses.values() if status == 200)
    refused = sum(1 for status in statuses.values() if status == 429)
    assert (allowed, refused) == (BURST, len(statuses) - BURST)
    assert sim.count("/shared/") == BURST
    assert SECRET not in log


async def test_sigterm_lets_the_request_in_flight_finish_and_stops_accepting(tmp_path: Path) -> None:
    async with simulated("liveperson") as sim:
        config = write_config(tmp_path, gateway_yaml(sim.url, "server: {shutdown_grace_s: 20}\n"))
        with gateway_process(config) as gw:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
                slow = asyncio.create_task(client.post("/api/account/a/lambdas/slow/invoke?delay=2", json={"payload": "last"}))
                while sim.count("slow") == 0:
                    await asyncio.sleep(0.02)
                gw.process.send_signal(signal.SIGTERM)
                refused_new = await wait_until_refused(gw.url)
                response = await slow
            exit_code = await asyncio.to_thread(gw.process.wait, 20)
    assert refused_new and not slow.cancelled()
    assert response.status_code == 200 and response.json()["payload"] == "last"
    assert exit_code in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once it has shut down gracefully


async def wait_until_refused(url: str, timeout_s: float = 10.0) -> bool:
    """True once a new connection is refused (the listening socket is closed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with httpx.AsyncClient(base_url=url, timeout=1) as client:
                await client.get("/healthz")
        except httpx.ConnectError:
            return True
        await asyncio.sleep(0.05)
    return False
