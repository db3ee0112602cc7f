"""The admin API over real sockets: 404 while no token is set, 401 without the right one, and what it does with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.admin import SESSION_COOKIE, mask_secrets, mask_url, session_value
from tests.harness import ADMIN_ENDPOINTS, running_gateway, simulated, upstream_config, write_config
from tests.problem_schema import problem_of

pytestmark = pytest.mark.timeout(60)

TOKEN = "admin-token-5d1f"
ROUTE = "/api/account/{account}/lambdas/{function}/invoke"


def gateway_yaml(url: str, extra: str = "") -> str:
    breaker = "breaker_policies:\n  once: {fail_max: 1, reset_timeout_s: 60}\nretry_policies:\n  single: {max_attempts: 1}\n"
    return "upstreams:\n" + upstream_config("lp", url, "liveperson", [ROUTE], retry="single", breaker="once") + breaker + extra


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    return TOKEN


async def test_every_admin_path_is_404_while_the_token_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN", raising=False)
    async with simulated("liveperson") as sim:
        async with running_gateway(write_config(tmp_path, gateway_yaml(sim.url))) as gw, gw.client() as client:
            for method, path in [*ADMIN_ENDPOINTS, ("GET", "/admin/status"), ("POST", "/admin/login"), ("GET", "/admin/static/status.js")]:
                response = await client.request(method, path, headers={"authorization": f"Bearer {TOKEN}", "x-request-id": "req-404"})
                assert response.status_code == 404, (method, path)
                problem = problem_of(response.headers["content-type"], response.content)
                assert (problem["code"], problem["class"], problem["request_id"]) == ("gateway.no_route", "not_found", "req-404")
            assert (await client.get("/healthz")).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer  x", "Bearer wrong", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN],
)
async def test_missing_or_wrong_token_is_401(tmp_path: Path, token: str, authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    async with simulated("liveperson") as sim:
        async with running_gateway(write_config(tmp_path, gateway_yaml(sim.url))) as gw, gw.client() as client:
            for method, path in ADMIN_ENDPOINTS:
                response = await client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path)
                assert response.headers["www-authenticate"].startswith("Bearer")
                problem = problem_of(response.headers["content-type"], response.content)
                assert (problem["code"], problem["class"], problem["status"]) == ("gateway.unauthorized", "auth_error", 401)
    assert sim.calls == []


async def test_breakers_list_and_reset_with_the_right_token(tmp_path: Path, token: str) -> None:
    auth = {"authorization": f"bearer {token}"}  # the scheme is case-insensitive
    async with simulated("liveperson") as sim:
        async with running_gateway(write_config(tmp_path, gateway_yaml(sim.url))) as gw, gw.client() as client:
            assert (await client.post("/api/account/a/lambdas/down/invoke")).status_code == 503
            assert (await client.post("/api/account/a/lambdas/down/invoke")).json()["problem"]["code"] == "gateway.circuit_open"
            listed = (await client.get("/admin/breakers", headers=auth)).json()["breakers"]
            assert [(b["upstream"], b["function"], b["state"]) for b in listed] == [("lp", "down", "open")]
            assert 0 < listed[0]["open_remaining_s"] <= 60
            reset = await client.post("/admin/breakers/lp/down/reset", headers=auth)
            assert reset.status_code == 200 and reset.json() == {"reset": True}
            assert (await client.get("/admin/breakers", headers=auth)).json()["breakers"][0]["state"] == "closed"
            calls_before = sim.count("down")
            assert (await client.post("/api/account/a/lambdas/down/invoke")).status_code == 503
            assert sim.count("down") == calls_before + 1  # the upstream is called again
            unknown = await client.post("/admin/breakers/lp/never-used/reset", headers=auth)
            assert unknown.status_code == 404 and unknown.json() == {"reset": False}
            assert (await client.get("/admin/nothing-here", headers=auth)).status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/readyz", "GET, HEAD"),
        ("DELETE", "/healthz", "GET, HEAD"),
        ("PUT", "/metrics", "GET, HEAD"),
        ("GET", "/admin/reload", "POST"),
        ("DELETE", "/admin/breakers", "GET, HEAD"),
        ("GET", "/admin/breakers/lp/down/reset", "POST"),
    ],
)
async def test_a_wrong_method_on_a_known_path_is_405_with_allow(tmp_path: Path, token: str, method: str, path: str, allowed: str) -> None:
    async with simulated("liveperson") as sim:
        async with running_gateway(write_config(tmp_path, gateway_yaml(sim.url))) as gw, gw.client() as client:
            response = await client.request(method, path, headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    problem = problem_of(response.headers["content-type"], response.content)
    assert (problem["code"], problem["class"], problem["status"]) == ("gateway.method_not_allowed", "client_error", 405)
    assert method in problem["detail"]


async def test_a_wrong_method_on_an_admin_path_reveals_nothing_without_the_token(tmp_path: Path, token: str) -> None:
    async with simulated("liveperson") as sim:
        async with running_gateway(write_config(tmp_path, gateway_yaml(sim.url))) as gw, gw.client() as client:
            response = await client.get("/admin/reload")
    assert response.status_code == 401 and "allow" not in response.headers


async def test_a_fault_on_an_ops_path_is_a_500_problem_without_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with simulated("liveperson") as sim:
        async with running_gateway(write_config(tmp_path, gateway_yaml(sim.url))) as gw, gw.client() as client:

            async def broken_ready() -> tuple[bool, dict]:
                raise RuntimeError("secret internals")

            monkeypatch.setattr(gw.app, "ready", broken_ready)
            response = await client.get("/readyz")
            assert (await client.get("/healthz")).status_code == 200  # the gateway goes on
    assert response.status_code == 500
    problem = problem_of(response.headers["content-type"], response.content)
    assert (problem["code"], problem["class"]) == ("gateway.internal", "gateway_error")
    assert b"secret internals" not in response.content and b"Traceback" not in response.content


async def test_config_is_served_with_secrets_masked(tmp_path: Path, token: str) -> None:
    extra = "state: {redis_url: 'redis://gw-user:Pa55-w0rd@127.0.0.1:1/0', redis_timeout_s: 0.01}\nadmin: {token_env: GATEWAY_ADMIN_TOKEN}\n"
    async with simulated("liveperson") as sim:
        upstream_url = sim.url.replace("http://", "http://svc:Upstream-Pa55@")
        async with running_gateway(write_config(tmp_path, gateway_yaml(upstream_url, extra))) as gw, gw.client() as client:
            response = await client.get("/admin/config", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200
    text = response.text
    assert "Pa55-w0rd" not in text and "Upstream-Pa55" not in text and token not in text
    config = response.json()
    assert config["state"]["redis_url"] == "redis://gw-user:***@127.0.0.1:1/0"
    assert config["upstreams"]["lp"]["url"] == upstream_url.replace("Upstream-Pa55", "***")
    assert config["admin"]["token_env"] == "GATEWAY_ADMIN_TOKEN"  # the variable's name is not a secret
    assert config["upstreams"]["lp"]["routes"] == [ROUTE]


MASKING = [
    ({"redis_url": "redis://:pw@h:6379/0"}, {"redis_url": "redis://:***@h:6379/0"}),
    ({"redis_url": "rediss+sentinel://u:p%40ss@a:1,b:2/svc"}, {"redis_url": "rediss+sentinel://u:***@a:1,b:2/svc"}),
    ({"redis_url": "redis://h:1/0?password=pw&db=2"}, {"redis_url": "redis://h:1/0?password=***&db=2"}),
    ({"redis_url": "unix://tok@/run/redis.sock"}, {"redis_url": "unix://***@/run/redis.sock"}),
    ({"url": "https://fn.example/path@v2"}, {"url": "https://fn.example/path@v2"}),
    ({"api_key": "k", "client_secret": "s", "password": "p", "Token": "t"}, {"api_key": "***", "client_secret": "***", "password": "***", "Token": "***"}),
    ({"token_env": "GW_TOKEN", "auth": "aws_sigv4", "account_header": "X-Account"}, {"token_env": "GW_TOKEN", "auth": "aws_sigv4", "account_header": "X-Account"}),
    ({"list": ["redis://a:b@c", "plain"]}, {"list": ["redis://a:***@c", "plain"]}),
    ({"n": 3, "flag": True, "none": None}, {"n": 3, "flag": True, "none": None}),
]


@pytest.mark.parametrize(("given", "masked"), MASKING)
def test_mask_secrets(given: dict, masked: dict) -> None:
    assert mask_secrets(given) == masked


def test_mask_url_keeps_non_urls() -> None:
    assert mask_url("user@example.com") == "user@example.com"


async def test_status_login_sets_an_httponly_cookie_that_only_reads(tmp_path: Path, token: str) -> None:
    async with simulated("liveperson") as sim:
        async with running_gateway(write_config(tmp_path, gateway_yaml(sim.url))) as gw, gw.client() as client:
            form = await client.get("/admin/status")
            assert form.status_code == 401 and "<form" in form.text and 'name="token"' in form.text
            wrong = await client.post("/admin/login", data={"token": "nope"})
            assert wrong.status_code == 401 and "wrong token" in wrong.text and "set-cookie" not in wrong.headers
            login = await client.post("/admin/login", data={"token": token})
            assert login.status_code == 303 and login.headers["location"] == "/admin/status"
            cookie = login.headers["set-cookie"]
            assert cookie.startswith(f"{SESSION_COOKIE}={session_value(token)};")
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
            assert token not in cookie
            page = await client.get("/admin/status")  # httpx keeps the cookie
            assert page.status_code == 200 and 'id="upstreams"' in page.text
            assert "script-src 'self'" in page.headers["content-security-policy"]
            assert (await client.get("/admin/stats")).status_code == 200
            assert (await client.get("/admin/static/status.js")).status_code == 200
            for method, path in [("POST", "/admin/reload"), ("GET", "/admin/config"), ("GET", "/admin/breakers"), ("POST", "/admin/breakers/lp/x/reset")]:
                assert (await client.request(method, path)).status_code == 401, path
            client.cookies.set(SESSION_COOKIE, session_value("another-token"), path="/admin")
            assert (await client.get("/admin/stats")).status_code == 401


async def test_static_assets_are_a_closed_list(tmp_path: Path, token: str) -> None:
    async with simulated("liveperson") as sim:
        async with running_gateway(write_config(tmp_path, gateway_yaml(sim.url))) as gw, gw.client() as client:
            for name in ("status.html", "nope.js", "login.html", "__init__.py"):
                assert (await client.get(f"/admin/static/{name}")).status_code == 404, name
            escape = await client.get("/admin/static/..%2f..%2fadmin.py")
            assert escape.status_code in (401, 404) and "import" not in escape.text
            assert (await client.get("/admin/static/status.css")).headers["content-type"].startswith("text/css")
