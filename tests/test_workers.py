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
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.cli import run_check

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


async def until_both_workers_answered(gw: GatewayProcess, path: str, at_least: int = 0) -> dict[str, int]:
    """Requests on fresh connections, four at a time, until both workers have served some
    (and at least `at_least` were sent): request id -> status."""
    statuses: dict[str, int] = {}
    served_by: set[int] = set()
    while len(served_by) < 2 or len(statuses) < at_least:
        assert len(statuses) < 200, "one worker answered every request"
        statuses.update(await asyncio.gather(*(send_fresh(gw.url, path) for _ in range(4))))
        await asyncio.sleep(0.05)  # the access line follows the response
        pids = access_pids(gw)
        served_by = {pids[r] for r in statuses if r in pids}
    return statuses


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
            statuses = await until_both_workers_answered(gw, "/api/account/shared/lambdas/ok/invoke", at_least=BURST + 5)
            log = gw.log()
    allowed = sum(1 for status in statuses.values() if status == 200)
    refused = sum(1 for status in statuses.values() if status == 429)
    assert (allowed, refused) == (BURST, len(statuses) - BURST)
    assert sim.count("/shared/") == BURST
    assert SECRET not in log


def requests_counted(exposition: str) -> float:
    """gateway_requests_total summed over every label set of one /metrics answer."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "gateway_requests_total"
    )


async def test_metrics_on_any_worker_count_every_workers_requests(tmp_path: Path, redis_server: RedisProcess) -> None:
    state = f"state: {{redis_url: '{redis_server.url}'}}\n"
    async with simulated("liveperson") as sim:
        config = write_config(tmp_path, gateway_yaml(sim.url, state))
        with gateway_process(config, workers=2) as gw:
            sent = await until_both_workers_answered(gw, "/api/account/many/lambdas/ok/invoke")
            scrapes = []
            for _ in range(8):  # fresh connections: the scrapes land on both workers
                async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
                    scrapes.append(requests_counted((await client.get("/metrics")).text))
    assert set(sent.values()) == {200}
    assert scrapes == [float(len(sent))] * len(scrapes)


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
            log = gw.log()
    assert refused_new and not slow.cancelled()
    assert response.status_code == 200 and response.json()["payload"] == "last"
    assert exit_code in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once it has shut down gracefully
    assert "gateway stopped: requests finished, pools closed" in log  # the lifespan's shutdown ran


async def wait_until_refused(url: str, timeout_s: float = 10.0) -> bool:
    """True once a new connection is refused (the listening socket is closed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with httpx.AsyncClient(base_url=url, timeout=1) as client:
                await client.get("/healthz")
        except httpx.ConnectError:
            return True
        except httpx.TransportError:
            pass  # accepted into the backlog just before the socket closed: try again
        await asyncio.sleep(0.05)
    return False


# --- deploy/: what Kubernetes and compose are given ------------------------------------------

DEPLOY = REPO / "deploy"


def manifests() -> list[dict]:
    documents = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def test_kubernetes_manifests_have_probes_config_service_autoscaler_and_redis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = manifests()
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    assert {"Deployment", "ConfigMap", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Namespace"} <= set(by_kind)
    gateway = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "gateway")
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["args"][container["args"].index("--workers") + 1] == "1"
    redis = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "gateway-redis")
    assert redis["spec"]["template"]["spec"]["containers"][0]["image"].startswith("redis:")
    hpa = by_kind["HorizontalPodAutoscaler"][0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gateway" and hpa["spec"]["minReplicas"] >= 2

    config_text = by_kind["ConfigMap"][0]["data"]["gateway.yaml"]
    config = write_config(tmp_path, config_text)
    assert run_check(config) == 0, capsys.readouterr().err
    settings = yaml.safe_load(config_text)
    assert container["ports"][0]["containerPort"] == settings["server"]["port"]
    assert settings["state"]["redis_url"].startswith("redis://gateway-redis:")
    grace = gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings["server"]["shutdown_grace_s"] + int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    kustomized = set(yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())["resources"])
    assert kustomized == {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}


def test_compose_stack_config_passes_check(capsys: pytest.CaptureFixture[str]) -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    assert {"gateway", "redis"} <= set(compose["services"])
    gateway = compose["services"]["gateway"]
    assert "--workers" in gateway["command"] and gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert run_check(DEPLOY / "compose" / "config" / "gateway.yaml") == 0, capsys.readouterr().err
