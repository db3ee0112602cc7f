"""Hot reload: POST /admin/reload and SIGHUP, in one process and with several workers.

A valid change takes effect for new requests while requests in flight finish on the
configuration they started with; an invalid file is rejected with `gateway check`'s messages
and the old configuration keeps serving; breakers and buckets whose keys are unchanged survive.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest

from gateway.app import create_app
from gateway.cli import run_check
from gateway.settings import load_settings
from gateway.simulators import SimulatedUpstream
from tests.harness import GatewayProcess, gateway_process, running_gateway, simulated, upstream_config, write_config
from tests.redis_servers import RedisProcess

pytestmark = pytest.mark.timeout(90)

TOKEN = "reload-token-9c2"
AUTH = {"authorization": f"Bearer {TOKEN}"}
ROUTE = "/api/account/{account}/lambdas/{function}/invoke"
POLICIES = """\
retry_policies:
  single: {max_attempts: 1}
breaker_policies:
  once: {fail_max: 1, reset_timeout_s: 120}
rate_limits:
  default: {rate: 1, per_s: 3600, burst: 1000}
  accounts:
    tight: {rate: 1, per_s: 3600, burst: 1}
"""
INVALID = "upstreams:\n  lp:\n    url: ftp://nowhere\n    dialect: cobol\n    routes: [/x]\n"


def gateway_yaml(url: str, extra: str = "") -> str:
    return "upstreams:\n" + upstream_config("lp", url, "liveperson", [ROUTE], retry="single", breaker="once") + POLICIES + extra


def invoke(function: str, account: str = "acc") -> str:
    return f"/api/account/{account}/lambdas/{function}/invoke"


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)


def check_messages(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What `gateway check` prints for this file, one problem a line."""
    capsys.readouterr()
    assert run_check(path) == 2
    return capsys.readouterr().err.splitlines()


# --- in one process, through the admin API ---------------------------------------------------


async def test_in_flight_request_finishes_on_the_old_upstream(tmp_path: Path) -> None:
    async with simulated("liveperson") as old, simulated("liveperson") as new:
        config = write_config(tmp_path, gateway_yaml(old.url))
        async with running_gateway(config) as gw, gw.client() as client:
            slow = asyncio.create_task(client.post(invoke("slow") + "?delay=1.5", json={"payload": "in flight"}))
            await wait_for(lambda: old.count("slow") == 1, "the slow request to reach the old upstream")
            config.write_text(gateway_yaml(new.url))
            reload = await client.post("/admin/reload", headers=AUTH)
            assert reload.status_code == 200 and reload.json()["reloaded"] is True
            assert new.url in reload.json()["summary"]
            assert not slow.done()
            fresh = await client.post(invoke("ok"), json={"payload": "after"})
            finished = await slow
    assert fresh.status_code == 200 and finished.status_code == 200
    assert finished.json()["payload"] == "in flight"
    assert (old.count("slow"), new.count("slow")) == (1, 0)
    assert (old.count("/ok/"), new.count("/ok/")) == (0, 1)


async def test_invalid_file_is_rejected_with_the_check_messages_and_old_routes_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with simulated("liveperson") as sim:
        config = write_config(tmp_path, gateway_yaml(sim.url))
        async with running_gateway(config) as gw, gw.client() as client:
            for text in (INVALID, "upstreams: [", gateway_yaml(sim.url).replace("routes:", "routez:")):
                config.write_text(text)
                rejected = await client.post("/admin/reload", headers=AUTH)
                assert rejected.status_code == 400
                body = rejected.json()
                assert body["reloaded"] is False
                assert body["problems"] == check_messages(config, capsys)
                assert all(p.startswith(f"{config}:") for p in body["problems"])
                assert (await client.post(invoke("ok"))).status_code == 200
            served = await client.get("/admin/config", headers=AUTH)
    assert served.json()["upstreams"]["lp"]["url"] == sim.url
    assert sim.count("/ok/") == 3


async def test_breakers_and_buckets_with_unchanged_keys_survive(tmp_path: Path) -> None:
    async with simulated("liveperson") as old, simulated("liveperson") as new:
        config = write_config(tmp_path, gateway_yaml(old.url))
        async with running_gateway(config) as gw, gw.client() as client:
            assert (await client.post(invoke("down"))).status_code == 503  # opens the breaker (fail_max 1)
            assert (await client.post(invoke("ok", "tight"))).status_code == 200  # empties the bucket (burst 1)
            config.write_text(gateway_yaml(new.url).replace("reset_timeout_s: 120", "reset_timeout_s: 100"))
            assert (await client.post("/admin/reload", headers=AUTH)).status_code == 200
            refused = await client.post(invoke("down"))
            limited = await client.post(invoke("ok", "tight"))
            other = await client.post(invoke("ok", "other"))
            breakers = (await client.get("/admin/breakers", headers=AUTH)).json()["breakers"]
    assert refused.status_code == 503 and refused.json()["problem"]["code"] == "gateway.circuit_open"
    assert limited.status_code == 429
    assert other.status_code == 200
    assert (old.count("down"), new.count("down")) == (1, 0)
    assert (old.count("/ok/"), new.count("/ok/")) == (1, 1)
    down = next(b for b in breakers if b["function"] == "down")
    assert down["state"] == "open" and down["reset_timeout_s"] == 100  # state kept, policy retuned


# --- SIGHUP to a served process ----------------------------------------------------------------


def log_events(process: GatewayProcess, logger: str | None = None) -> list[dict]:
    events = []
    for line in process.log().splitlines():
        if line.startswith("{"):
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if logger is None or event.get("logger") == logger:
                events.append(event)
    return events


def access_pids(process: GatewayProcess) -> dict[str, int]:
    return {e["request_id"]: e["pid"] for e in log_events(process) if "request_id" in e}


async def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def send_fresh(url: str, path: str) -> tuple[str, int]:
    """One request on a new connection (so several workers get a share); returns (request id, status)."""
    request_id = uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.post(path, headers={"x-request-id": request_id})
    return request_id, response.status_code


def upstream_of(request_id: str, *upstreams: SimulatedUpstream) -> int:
    return next(i for i, u in enumerate(upstreams) if any(c.headers.get("X-Request-ID") == request_id for c in u.calls))


def reload_events(process: GatewayProcess) -> list[dict]:
    return [e for e in log_events(process, "gateway.app") if "configuration" in e["message"]]


async def test_sighup_reloads_a_single_process_and_rejects_an_invalid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with simulated("liveperson") as old, simulated("liveperson") as new:
        config = write_config(tmp_path, gateway_yaml(old.url))
        with gateway_process(config) as gw:
            request_id, status = await send_fresh(gw.url, invoke("ok"))
            assert status == 200 and upstream_of(request_id, old, new) == 0
            config.write_text(gateway_yaml(new.url))
            gw.process.send_signal(signal.SIGHUP)
            await wait_for(lambda: len(reload_events(gw)) == 1, "the reload to be logged")
            request_id, status = await send_fresh(gw.url, invoke("ok"))
            assert status == 200 and upstream_of(request_id, old, new) == 1

            config.write_text(INVALID)
            gw.process.send_signal(signal.SIGHUP)
            await wait_for(lambda: len(reload_events(gw)) == 2, "the rejection to be logged")
            rejection = reload_events(gw)[-1]
            assert rejection["level"] == "ERROR"
            for message in check_messages(config, capsys):
                assert message in rejection["message"]
            assert gw.process.poll() is None
            request_id, status = await send_fresh(gw.url, invoke("ok"))
            assert status == 200 and upstream_of(request_id, old, new) == 1


def worker_pids(process: GatewayProcess) -> set[int]:
    children = psutil.Process(process.process.pid).children()
    return {c.pid for c in children if "spawn_main" in " ".join(c.cmdline())}


async def traffic_until_every_worker_answered(url: str, workers: set[int], process: GatewayProcess, limit: int = 200) -> list[str]:
    """Fresh-connection requests until each worker has answered at least one (bounded)."""
    sent: list[str] = []
    while len(sent) < limit:
        batch = await asyncio.gather(*(send_fresh(url, invoke("ok")) for _ in range(8)))
        assert all(status == 200 for _, status in batch)
        sent += [request_id for request_id, _ in batch]
        await asyncio.sleep(0.05)  # the access log is written after the response
        pids = access_pids(process)
        if workers <= {pids.get(r) for r in sent}:
            return sent
    raise AssertionError(f"not every worker of {workers} answered {limit} requests")


async def test_sighup_with_workers_checks_the_file_first_and_reloads_every_worker(tmp_path: Path, redis_server: RedisProcess) -> None:
    state = f"state: {{redis_url: '{redis_server.url}'}}\n"
    async with simulated("liveperson") as first, simulated("liveperson") as second:
        config = write_config(tmp_path, gateway_yaml(first.url, state))
        with gateway_process(config, workers=2) as gw:
            workers = worker_pids(gw)
            assert len(workers) == 2

            config.write_text(gateway_yaml(second.url, state))
            gw.process.send_signal(signal.SIGHUP)
            await wait_for(lambda: {e["pid"] for e in reload_events(gw)} == workers, "both workers to reload")
            sent = await traffic_until_every_worker_answered(gw.url, workers, gw)
            assert {upstream_of(r, first, second) for r in sent} == {1}

            config.write_text(INVALID)
            gw.process.send_signal(signal.SIGHUP)
            await wait_for(lambda: any("rejected" in e["message"] for e in log_events(gw, "gateway.server")), "the supervisor to reject the file")
            assert len(reload_events(gw)) == 2  # no worker was touched
            assert worker_pids(gw) == workers
            sent = await traffic_until_every_worker_answered(gw.url, workers, gw)
            assert {upstream_of(r, first, second) for r in sent} == {1}

            config.write_text(gateway_yaml(first.url, state))
            async with httpx.AsyncClient(base_url=gw.url) as client:
                assert (await client.post("/admin/reload", headers=AUTH)).status_code == 200  # reaches one worker
            await wait_for(lambda: workers <= {e["pid"] for e in reload_events(gw)[2:]}, "the admin reload to reach both workers")
            sent = await traffic_until_every_worker_answered(gw.url, workers, gw)
            assert {upstream_of(r, first, second) for r in sent} == {0}
            assert worker_pids(gw) == workers


async def test_a_sighup_while_the_workers_still_import_kills_none_and_reaches_both(tmp_path: Path, redis_server: RedisProcess) -> None:
    """SIGHUP's default action ends a process: a worker not yet able to reload must hold the signal."""
    state = f"state: {{redis_url: '{redis_server.url}'}}\n"
    async with simulated("liveperson") as first, simulated("liveperson") as second:
        config = write_config(tmp_path, gateway_yaml(first.url, state))
        signalled: set[int] = set()

        def reload_while_starting(process: Any) -> None:
            deadline = time.monotonic() + 20
            while len(signalled) < 2 and time.monotonic() < deadline:  # both workers exist, neither serves yet
                signalled.update(c.pid for c in psutil.Process(process.pid).children() if "spawn_main" in " ".join(c.cmdline()))
                time.sleep(0.005)
            assert len(signalled) == 2, "the workers were not started"
            config.write_text(gateway_yaml(second.url, state))
            process.send_signal(signal.SIGHUP)

        # each worker takes a second before it imports anything (as on a loaded machine), so the
        # supervisor passes the signal on while both are still starting
        slow = tmp_path / "slow-start"
        slow.mkdir()
        (slow / "sitecustomize.py").write_text("import time\nif b'spawn_main' in open('/proc/self/cmdline', 'rb').read():\n    time.sleep(1.0)\n")
        env = {"PYTHONPATH": os.pathsep.join([str(slow), *filter(None, [os.environ.get("PYTHONPATH")])])}
        with gateway_process(config, workers=2, env=env, before_ready=reload_while_starting) as gw:
            assert worker_pids(gw) == signalled  # no worker was killed and replaced
            sent = await traffic_until_every_worker_answered(gw.url, signalled, gw)
            assert {upstream_of(r, first, second) for r in sent} == {1}  # each runs the new file


async def test_a_sighup_while_the_worker_still_starts_is_not_lost(tmp_path: Path) -> None:
    """A supervisor may pass a reload on before a worker's lifespan has installed its handler."""
    config = write_config(tmp_path, gateway_yaml("http://127.0.0.1:9"))
    app = create_app(load_settings(config), reload_on_sighup=True)
    config.write_text(gateway_yaml("http://127.0.0.1:10"))
    signal.raise_signal(signal.SIGHUP)  # before start(): nothing reloads yet, nothing is lost either
    assert app.settings.config.upstreams["lp"].url.endswith(":9")
    await app.start()
    try:
        await wait_for(lambda: app.settings.config.upstreams["lp"].url.endswith(":10"), "the remembered reload")
    finally:
        await app.stop()
