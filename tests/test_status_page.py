"""The status page in a real headless Chromium, and the JSON it polls.

The browser is Debian's `chromium` package, driven by playwright-core from Node
(tests/clients/browser/status_page.js); nothing is downloaded at run time. When either is
missing the test installs it (`apt-get install -y chromium`, `npm ci`) or fails loudly.
The screenshot is kept at tests/artifacts/status-page.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import REPO, running_gateway, simulated, upstream_config, write_config
from tests.redis_servers import RedisProcess

pytestmark = pytest.mark.timeout(120)

BROWSER_DIR = REPO / "tests" / "clients" / "browser"
DRIVER = BROWSER_DIR / "status_page.js"
ARTIFACT = REPO / "tests" / "artifacts" / "status-page.png"
TOKEN = "status-token-0e7"
AUTH = {"authorization": f"Bearer {TOKEN}"}
LP_ROUTE = "/api/account/{account}/lambdas/{function}/invoke"
YR_ROUTE = "/serverless/v1/functions/{function}/invocations"
INSTALL_TIMEOUT_S = 600


def chromium_path() -> str:
    """Debian's chromium, installed with apt-get when it is missing (fails loudly if it cannot be)."""
    found = shutil.which("chromium")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError("chromium is not installed and apt-get is not available: install Debian's `chromium` package")
    for command in ([apt, "update"], [apt, "install", "-y", "--no-install-recommends", "chromium"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    found = shutil.which("chromium")
    if not found:
        raise RuntimeError("apt-get installed chromium but it is not on PATH")
    return found


def pinned_playwright() -> str:
    return json.loads((BROWSER_DIR / "package.json").read_text())["dependencies"]["playwright-core"]


def installed_playwright() -> str | None:
    manifest = BROWSER_DIR / "node_modules" / "playwright-core" / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.exists() else None


def ensure_driver() -> str:
    """node and the pinned playwright-core (npm ci when missing); returns the node executable."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        raise RuntimeError("node and npm are required for the status page test (Debian: apt-get install -y nodejs npm)")
    if installed_playwright() != pinned_playwright():
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=BROWSER_DIR, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
        if done.returncode != 0 or installed_playwright() != pinned_playwright():
            raise RuntimeError(f"`npm ci` in {BROWSER_DIR} failed:\n{done.stdout}\n{done.stderr}")
    return node


async def run_driver(node: str, options: dict) -> dict:
    process = await asyncio.create_subprocess_exec(node, str(DRIVER), json.dumps(options), cwd=BROWSER_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), 90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise AssertionError(f"browser driver failed ({process.returncode}):\n{err.decode(errors='replace')}")
    return json.loads(out.decode().strip().splitlines()[-1])


def gateway_yaml(lp_url: str, yr_url: str, redis_url: str) -> str:
    return (
        "upstreams:\n"
        + upstream_config("lp", lp_url, "liveperson", [LP_ROUTE], retry="quick", breaker="once")
        + upstream_config("yr", yr_url, "yuanrong", [YR_ROUTE], account_header="X-Tenant")
        + f"state: {{redis_url: '{redis_url}'}}\n"
        + "retry_policies:\n  quick: {max_attempts: 3, base_delay_s: 0.001, max_delay_s: 0.002, budget_ratio: 10, budget_min_per_s: 100}\n"
        + "breaker_policies:\n  once: {fail_max: 3, reset_timeout_s: 90}\n"
        + "rate_limits:\n  default: {rate: 1000, per_s: 1, burst: 1000}\n  accounts:\n    small: {rate: 1, per_s: 3600, burst: 1}\n"
    )


async def keep_sending(client: object, stop: asyncio.Event) -> int:
    """Steady traffic while the page is open, so its rates have something to show."""
    sent = 0
    while not stop.is_set() and sent < 400:
        await client.post("/api/account/acc/lambdas/ok/invoke", json={})  # type: ignore[attr-defined]
        sent += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    return sent


@pytest.fixture(scope="module")
def browser() -> tuple[str, str]:
    """(chromium, node), installed first when missing; a fixture, so installing is outside the test's timeout."""
    return chromium_path(), ensure_driver()


async def test_status_page_in_headless_chromium(tmp_path: Path, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch, browser: tuple[str, str]) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    chromium, node = browser
    ARTIFACT.unlink(missing_ok=True)
    async with simulated("liveperson") as lp, simulated("yuanrong") as yr:
        config = write_config(tmp_path, gateway_yaml(lp.url, yr.url, redis_server.url))
        async with running_gateway(config) as gw, gw.client() as client:
            assert (await client.post("/api/account/acc/lambdas/flaky/invoke", json={})).status_code == 200  # two retries
            assert (await client.post("/api/account/acc/lambdas/down/invoke", json={})).status_code == 503  # opens lp/down
            for expected in (200, 429, 429):
                assert (await client.post("/api/account/small/lambdas/ok/invoke", json={})).status_code == expected
            for _ in range(3):
                assert (await client.post("/serverless/v1/functions/echo/invocations", headers={"X-Tenant": "t1"}, json={})).status_code == 200
            stop = asyncio.Event()
            traffic = asyncio.create_task(keep_sending(client, stop))
            try:
                result = await run_driver(node, {"url": gw.url, "token": TOKEN, "screenshot": str(ARTIFACT), "chromium": chromium, "refreshes": 2, "breaker": "lp/down"})
            finally:
                stop.set()
                await traffic
            stats = (await client.get("/admin/stats", headers=AUTH)).json()

    assert result["loginStatus"] == 401  # the login form first
    unexpected = [e for e in result["consoleErrors"] if "status of 401" not in e]  # the login form is served with 401
    assert unexpected == []
    shown = result["shown"]
    assert shown["error"] is None and shown["refreshed"] >= 2
    rows = {row["name"]: row["cells"] for row in shown["upstreams"]}
    assert {"lp", "yr"} <= set(rows)
    lp_row, yr_row = rows["lp"], rows["yr"]
    assert lp_row[1] == "liveperson" and yr_row[1] == "yuanrong"
    assert float(lp_row[2]) > 0  # requests per second while traffic flowed
    assert "success" in lp_row[3] and "upstream_unavailable" in lp_row[3] and "rate_limited" in lp_row[3]
    assert lp_row[4].endswith(f"· {round(stats['upstreams']['lp']['retries'])}") and stats["upstreams"]["lp"]["retries"] >= 2
    assert lp_row[5].endswith("· 2")  # two rate-limit refusals for account `small`
    assert "1 open" in lp_row[6]
    breakers = {row["key"]: row["cells"] for row in shown["breakers"]}
    down = breakers["lp/down"]
    assert down[2] == "open"
    left = re.fullmatch(r"(\d+\.\d) s", down[4])
    assert left is not None and 0 < float(left.group(1)) <= 90
    assert breakers["lp/ok"][2] == "closed" and breakers["lp/ok"][4] == "–"
    assert shown["redis"].startswith("up")
    assert shown["documentCookie"] == ""  # HttpOnly: scripts cannot read the session
    assert [c for c in result["cookies"] if c["name"] == "gw_admin"] == [{"name": "gw_admin", "httpOnly": True, "sameSite": "Strict", "path": "/admin"}]
    assert ARTIFACT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_stats_json_counts_per_upstream(tmp_path: Path, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    async with simulated("liveperson") as lp, simulated("yuanrong") as yr:
        config = write_config(tmp_path, gateway_yaml(lp.url, yr.url, redis_server.url))
        async with running_gateway(config) as gw, gw.client() as client:
            for path in ("ok", "ok", "flaky", "missing"):
                await client.post(f"/api/account/acc/lambdas/{path}/invoke", json={})
            for _ in range(2):
                await client.post("/api/account/small/lambdas/ok/invoke", json={})
            before = (await client.get("/admin/stats", headers=AUTH)).json()
            redis_server.kill()
            await client.post("/api/account/acc/lambdas/ok/invoke", json={})
            during = (await client.get("/admin/stats", headers=AUTH)).json()
    lp_stats = before["upstreams"]["lp"]
    assert lp_stats["requests"] == {"success": 4.0, "not_found": 1.0, "rate_limited": 1.0}
    assert lp_stats["attempts"] == 7 and lp_stats["retries"] == 2 and lp_stats["ratelimit_refused"] == 1
    assert {b["function"] for b in lp_stats["breakers"]} == {"ok", "flaky", "missing"}
    assert before["upstreams"]["yr"]["requests"] == {} and before["upstreams"]["yr"]["dialect"] == "yuanrong"
    assert before["redis"] == {"configured": True, "healthy": True, "mode": "local", "cooldown_left_s": 0.0, "errors": 0.0}
    assert during["redis"]["healthy"] is False and during["redis"]["errors"] >= 1
    assert during["now"] >= before["now"] and during["pid"] == os.getpid()
