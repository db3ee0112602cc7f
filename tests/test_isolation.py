"""Isolation: one account cannot spend another's quota or open another's breaker beyond what the
configured keys imply; the admin API is closed without its token; secrets never reach logs,
envelopes or Redis.

Quota and breakers run the app in the test's loop (memory and a real Redis); the secrets test
runs `gateway serve` as its own process at DEBUG level, so its whole stdout and stderr (event
log, access log, uvicorn) is what gets searched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis

from tests.faulty_upstream import exchange, request_bytes
from tests.harness import ADMIN_ENDPOINTS, RunningGateway, free_port, gateway_process, running_gateway, simulated, upstream_config, write_config
from tests.redis_servers import RedisProcess, send_command

pytestmark = pytest.mark.timeout(90)

LP_ROUTE = "/api/account/{account}/lambdas/{function}/invoke"
BURST = 3
LIMITS = f"rate_limits:\n  default: {{rate: 1, per_s: 3600, burst: {BURST}}}\n"
POLICIES = (
    "retry_policies:\n  once: {max_attempts: 1}\n"
    "breaker_policies:\n  fn: {fail_max: 2, reset_timeout_s: 60}\n  whole: {fail_max: 2, reset_timeout_s: 60, scope: upstream}\n"
)


@contextlib.asynccontextmanager
async def lp_gateway(tmp_path: Path, breaker: str = "fn", state: str = "") -> AsyncIterator[tuple[RunningGateway, object]]:
    async with simulated("liveperson") as sim:
        text = "upstreams:\n" + upstream_config("lp", sim.url, "liveperson", [LP_ROUTE], retry="once", breaker=breaker) + LIMITS + POLICIES + state
        async with running_gateway(write_config(tmp_path, text)) as gw:
            yield gw, sim


def invoke(account: str, function: str = "ok") -> str:
    return f"/api/account/{account}/lambdas/{function}/invoke"


# --- quota ----------------------------------------------------------------------------------

# Distinct accounts that a careless key scheme would merge: prefixes, separators, glob
# characters, case, one encoding level more. No id appears in two pairs.
DISTINCT_PAIRS = [("a", "a:x"), ("lp:b", "b"), ("c*", "cd"), ("D", "d"), ("e%252A", "e*"), ("f", "f%3A")]
# One account spelled twice (percent-encoding an unreserved character): re-spelling must not buy quota.
SAME_ACCOUNT = [("%67", "g"), ("h%2Dx", "h-x")]


@pytest.mark.parametrize("state", ["memory", "redis"])
async def test_spending_one_accounts_quota_leaves_the_other_full(tmp_path: Path, redis_server: RedisProcess, state: str) -> None:
    extra = f"state: {{redis_url: '{redis_server.url}'}}\n" if state == "redis" else ""
    async with lp_gateway(tmp_path, state=extra) as (gw, sim), gw.client() as client:
        async def spend(spender: str, other: str) -> tuple[list[int], list[int]]:
            spent = [(await client.post(invoke(spender))).status_code for _ in range(BURST + 2)]
            return spent, [(await client.post(invoke(other))).status_code for _ in range(BURST)]

        distinct = [await spend(*pair) for pair in DISTINCT_PAIRS]
        same = [await spend(*pair) for pair in SAME_ACCOUNT]
        braces = [(await client.post(invoke("%7Blp:i%7D"))).status_code for _ in range(2)]
    assert distinct == [([200] * BURST + [429, 429], [200] * BURST)] * len(DISTINCT_PAIRS)
    assert same == [([200] * BURST + [429, 429], [429] * BURST)] * len(SAME_ACCOUNT)
    assert braces == [400, 400]  # braces would move a Redis Cluster hash tag: refused
    assert sim.count() == BURST * (2 * len(DISTINCT_PAIRS) + len(SAME_ACCOUNT))


async def test_redis_holds_one_bucket_key_per_account_and_nothing_else(tmp_path: Path, redis_server: RedisProcess) -> None:
    send_command(redis_server.port, "SET", "bystander", "untouched")
    accounts = ["a", "a:x", "*", "a*", "FLUSHALL", "a%0D%0AFLUSHALL", "x%20y"]
    async with lp_gateway(tmp_path, state=f"state: {{redis_url: '{redis_server.url}'}}\n") as (gw, sim), gw.client() as client:
        statuses = {account: (await client.post(invoke(account))).status_code for account in accounts}
    keys = sorted(k.decode() for k in redis.Redis(port=redis_server.port).keys("*"))
    assert statuses == {"a": 200, "a:x": 200, "*": 200, "a*": 200, "FLUSHALL": 200, "a%0D%0AFLUSHALL": 400, "x%20y": 400}
    assert send_command(redis_server.port, "GET", "bystander") == b"$9\r\nuntouched\r\n"
    assert [k for k in keys if k.startswith("gw:rl")] == sorted(f"gw:rl:{{lp:{a}}}" for a, s in statuses.items() if s == 200)
    assert [k for k in keys if not k.startswith(("gw:rl", "gateway:dedupe:"))] == ["bystander"]


# --- breakers -------------------------------------------------------------------------------


async def test_one_accounts_failures_open_only_the_breaker_its_keys_name(tmp_path: Path) -> None:
    async with lp_gateway(tmp_path, breaker="fn") as (gw, sim), gw.client() as client:
        failing = [(await client.post(invoke("tenant-a", "down"))).status_code for _ in range(3)]
        other_function = (await client.post(invoke("tenant-b", "ok"))).status_code
        same_function = await client.post(invoke("tenant-b", "down"))
        hostile = (await client.post(invoke("tenant-a", "ok%2F..%2Fdown"))).status_code
        breakers = {(b["function"], b["state"]) for b in gw.app.services.breakers.snapshot()}
    assert failing == [503, 503, 503]  # two failures open it; the third is refused
    assert other_function == 200
    # the breaker is keyed per upstream function, not per account: tenant-b shares it by design
    assert same_function.status_code == 503 and same_function.json()["problem"]["code"] == "gateway.circuit_open"
    assert hostile == 400
    assert breakers == {("down", "open"), ("ok", "closed")}
    assert sim.count("/down/") == 2


async def test_with_scope_upstream_one_breaker_covers_every_function_as_configured(tmp_path: Path) -> None:
    async with lp_gateway(tmp_path, breaker="whole") as (gw, sim), gw.client() as client:
        for _ in range(2):
            await client.post(invoke("tenant-a", "down"))
        other = await client.post(invoke("tenant-b", "ok"))
    assert other.status_code == 503 and other.json()["problem"]["code"] == "gateway.circuit_open"
    assert sim.count("/ok/") == 0


# --- coalescing never crosses callers ------------------------------------------------------

IDENTITIES = {
    "X-Api-Key": ("alice-key", "mallory-key"),
    "Cookie": ("session=alice", "session=mallory"),
    "Authorization": ("Bearer alice", "Bearer mallory"),
    "X-Amz-Security-Token": ("alice-sts", "mallory-sts"),
}


@pytest.mark.parametrize("header", list(IDENTITIES))
async def test_another_callers_id_and_body_never_fetch_their_response(tmp_path: Path, header: str) -> None:
    """Dedupe answers a caller's own retry from the stored response, never someone else's."""
    alice, mallory = IDENTITIES[header]
    async with simulated("http") as sim:
        text = "upstreams:\n" + upstream_config("web", sim.url, "http", ["/web/{function}"])  # no account in the path
        async with running_gateway(write_config(tmp_path, text)) as gw, gw.client() as client:
            first = await client.post("/web/ok", content=b"private", headers={"X-Request-ID": "r-1", header: alice})
            retry = await client.post("/web/ok", content=b"private", headers={"X-Request-ID": "r-1", header: alice})
            other = await client.post("/web/ok", content=b"private", headers={"X-Request-ID": "r-1", header: mallory})
    assert [first.status_code, retry.status_code, other.status_code] == [200, 200, 200]
    assert (retry.headers.get("x-gateway-replayed"), other.headers.get("x-gateway-replayed")) == ("true", None)
    assert len(sim.calls) == 2


# --- the admin API --------------------------------------------------------------------------

TOKEN = "SECRET-ADMIN-TOKEN-4411"
WRONG_CREDENTIALS = {
    "none": {},
    "wrong bearer": {"Authorization": "Bearer SECRET-WRONG-1"},
    "token with another scheme": {"Authorization": f"Basic {TOKEN}"},
    "token as a bare header": {"Authorization": TOKEN},
    "token prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "token with a suffix": {"Authorization": f"Bearer {TOKEN}x"},
    "token as a cookie": {"Cookie": f"gw_admin={TOKEN}"},
    "token in another header": {"X-Admin-Token": TOKEN},
}


async def test_admin_api_is_404_everywhere_while_the_token_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN", raising=False)
    async with lp_gateway(tmp_path) as (gw, sim), gw.client() as client:
        answers = {(m, p, name): (await client.request(m, p, headers=h)).status_code for m, p in ADMIN_ENDPOINTS for name, h in WRONG_CREDENTIALS.items()}
        answers |= {(m, p, "query"): (await client.request(m, p + f"?token={TOKEN}")).status_code for m, p in ADMIN_ENDPOINTS}
    assert set(answers.values()) == {404}
    assert sim.calls == []


async def test_admin_api_is_401_for_anything_but_the_bearer_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    async with lp_gateway(tmp_path) as (gw, sim), gw.client() as client:
        refused = {(m, p, name): (await client.request(m, p, headers=h)).status_code for m, p in ADMIN_ENDPOINTS for name, h in WRONG_CREDENTIALS.items()}
        refused |= {(m, p, "query"): (await client.request(m, p + f"?token={TOKEN}&access_token={TOKEN}")).status_code for m, p in ADMIN_ENDPOINTS}
        allowed = (await client.get("/admin/breakers", headers={"Authorization": f"Bearer {TOKEN}"})).status_code
    assert set(refused.values()) == {401}, {k: v for k, v in refused.items() if v != 401}
    assert allowed == 200
    assert sim.calls == []


SIDE_DOORS = ["/admin/../admin/breakers", "/api/account/a/../../admin/breakers", "//admin/breakers", "/admin%2Fbreakers", "/%61dmin/breakers", "/ADMIN/breakers", "/admin/breakers/../config"]


async def test_no_side_door_into_the_admin_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    async with lp_gateway(tmp_path) as (gw, sim):
        answers = {path: await exchange(gw.url, request_bytes("GET", path), 5.0) for path in SIDE_DOORS}
    for path, answer in answers.items():
        assert answer.only.status in (400, 401, 404), (path, answer.only)
        assert b"breakers" not in answer.only.body or b"problem" in answer.only.body or answer.only.status == 401
    assert sim.calls == []


# --- secrets --------------------------------------------------------------------------------

REDIS_PASSWORD = "SECRET-REDISPW-5521"
URL_PASSWORD = "SECRET-URLPW-5522"
AWS_SECRET_KEY = "SECRET-AWSKEY-5523"
CLIENT_SECRETS = {
    "Authorization": "Bearer SECRET-AUTHZ-5524",
    "Cookie": "session=SECRET-COOKIE-5525; other=SECRET-COOKIE-5526",
    "X-Api-Key": "SECRET-APIKEY-5527",
    "X-Amz-Security-Token": "SECRET-STSTOKEN-5528",
    "Proxy-Authorization": "Basic SECRET-PROXYAUTH-5529",
}
SIGV4 = "AWS4-HMAC-SHA256 Credential=AKIDCALLER/20240101/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=SECRETSIGNATURE5530"
SECRET = re.compile(rb"SECRET-?[A-Z]+-?\d+")


def secrets_config(lp_url: str, lambda_url: str, dead_port: int, redis_port: int) -> str:
    with_password = lp_url.replace("http://", f"http://gw:{URL_PASSWORD}@")
    return (
        "upstreams:\n"
        + upstream_config("lp", with_password, "liveperson", [LP_ROUTE], retry="quick", breaker="quick")
        + upstream_config("dead", f"http://gw:{URL_PASSWORD}@127.0.0.1:{dead_port}", "liveperson", ["/dead/{account}/{function}"], retry="quick", breaker="quick")
        + upstream_config("aws", lambda_url, "lambda", ["/2015-03-31/functions/{function}/invocations"], auth="aws_sigv4", aws_region="us-east-1")
        + f"state: {{redis_url: 'redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_port}/0', on_redis_error: local}}\n"
        + "server: {max_body_bytes: 4096, max_header_bytes: 4096}\n"
        + "rate_limits:\n  default: {rate: 1, per_s: 3600, burst: 1000}\n  accounts:\n    tight: {rate: 1, per_s: 3600, burst: 1}\n"
        + "retry_policies:\n  quick: {max_attempts: 2, base_delay_s: 0.001, max_delay_s: 0.002}\n"
        + "breaker_policies:\n  quick: {fail_max: 3, reset_timeout_s: 60}\n"
    )


SECRET_TRAFFIC = [
    ("POST", "/api/account/acct/lambdas/ok/invoke"),
    ("POST", "/api/account/acct/lambdas/fail/invoke"),
    ("POST", "/api/account/acct/lambdas/crash/invoke"),
    ("POST", "/api/account/acct/lambdas/down/invoke"),
    ("POST", "/api/account/acct/lambdas/timeout/invoke"),
    ("POST", "/api/account/acct/lambdas/missing/invoke"),
    ("POST", "/api/account/acct/lambdas/throttle/invoke"),
    ("POST", "/api/account/tight/lambdas/ok/invoke"),
    ("POST", "/api/account/tight/lambdas/ok/invoke"),  # 429 from the gateway
    ("POST", "/api/account/%2e%2e/lambdas/ok/invoke"),  # 400
    ("POST", "/nowhere"),  # 404
    ("POST", "/dead/acct/f"),  # refused: 502 with the transport detail
    ("POST", "/dead/acct/f"),
    ("POST", "/dead/acct/f"),  # the breaker is open: 503
    ("POST", "/2015-03-31/functions/ok/invocations"),
    ("POST", "/2015-03-31/functions/fail/invocations"),
]


async def test_no_secret_reaches_logs_envelopes_or_redis(tmp_path: Path, redis_server: RedisProcess) -> None:
    send_command(redis_server.port, "CONFIG", "SET", "requirepass", REDIS_PASSWORD)
    env = {"GATEWAY_LOG_LEVEL": "DEBUG", "GATEWAY_ADMIN_TOKEN": TOKEN, "AWS_ACCESS_KEY_ID": "AKIAGATEWAY", "AWS_SECRET_ACCESS_KEY": AWS_SECRET_KEY}
    answers: list[bytes] = []
    async with simulated("liveperson") as lp, simulated("lambda") as aws:
        config = write_config(tmp_path, secrets_config(lp.url, aws.url, free_port(), redis_server.port))
        with gateway_process(config, env=env) as gw:
            answers += await send_all(gw.url, headers=CLIENT_SECRETS)
            answers += await send_all(gw.url, headers={**CLIENT_SECRETS, "Authorization": SIGV4})
            answers += await send_oversized(gw.url)
            redis_server.kill()  # the store logs its errors now: with the URL?
            answers += await send_all(gw.url, headers=CLIENT_SECRETS)
            await asyncio.to_thread(redis_server.restart)
            send_command(redis_server.port, "CONFIG", "SET", "requirepass", "another-" + REDIS_PASSWORD.lower())
            answers += await send_all(gw.url, headers=CLIENT_SECRETS)  # wrong password now: AUTH errors
            send_command(redis_server.port, "AUTH", "another-" + REDIS_PASSWORD.lower())
            answers += await admin_views(gw.url)
        log = gw.log()  # after the shutdown: its lines too
        config_view = orjson.loads(answers[-1].partition(b"\r\n\r\n")[2])
    sent = {name.lower(): value for name, value in lp.calls[0].headers.items()}
    assert sent["x-api-key"] == CLIENT_SECRETS["X-Api-Key"] and sent["cookie"] == CLIENT_SECRETS["Cookie"]  # they were really sent
    assert sent["authorization"].startswith("Basic ")  # the URL's credentials replace the caller's
    assert "Signature=" in {name.lower(): value for name, value in aws.calls[0].headers.items()}["authorization"]
    loggers = set(re.findall(r'"logger":"([a-z._]+)"', log))
    assert {"gateway.pipeline", "gateway.store"} & loggers and '"request_id"' in log  # errors and access lines were written
    for where, text in [("the gateway's output", log.encode()), *(("a response", a) for a in answers)]:
        found = SECRET.findall(text) + re.findall(rb"SECRETSIGNATURE\d+", text)
        assert not found, f"{found} reached {where}"
    assert "***" in orjson.dumps(config_view).decode()
    assert_redis_holds_no_secret(redis_server.port, "another-" + REDIS_PASSWORD.lower())


async def send_all(url: str, headers: dict[str, str]) -> list[bytes]:
    """Each request of the traffic on a raw socket; the raw response bytes (head and body)."""
    raw = []
    for method, path in SECRET_TRAFFIC:
        body = b'{"payload": "x"}'
        request = request_bytes(method, path, body, headers | {"X-Request-ID": uuid.uuid4().hex, "X-Amz-Date": "20240101T000000Z"})
        raw.append(await raw_answer(url, request))
    return raw


async def send_oversized(url: str) -> list[bytes]:
    big_header = request_bytes("POST", "/api/account/acct/lambdas/ok/invoke", b"{}", CLIENT_SECRETS | {"X-Pad": "p" * 5000})
    big_body = request_bytes("POST", "/api/account/acct/lambdas/ok/invoke", b"x" * 5000, CLIENT_SECRETS)
    return [await raw_answer(url, big_header), await raw_answer(url, big_body)]


async def admin_views(url: str) -> list[bytes]:
    wrong = request_bytes("GET", "/admin/breakers", headers=CLIENT_SECRETS)
    paths = ["/readyz", "/metrics", "/admin/breakers", "/admin/stats", "/admin/config"]
    right = [request_bytes("GET", path, headers={"Authorization": f"Bearer {TOKEN}"}) for path in paths]
    answers = [await raw_answer(url, wrong)]
    answers += [await raw_answer(url, request) for request in right]
    return answers


async def raw_answer(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            return await reader.read(-1)
    finally:
        writer.close()


def assert_redis_holds_no_secret(port: int, password: str) -> None:
    client = redis.Redis(port=port, password=password)
    try:
        for key in client.scan_iter("*"):
            kind = client.type(key)
            value = client.get(key) if kind == b"string" else repr(client.hgetall(key) if kind == b"hash" else kind).encode()
            assert not SECRET.search(key + b" " + (value or b"")), key
    finally:
        client.close()


async def test_credentials_in_the_upstream_url_replace_the_callers_and_never_fail_the_request(tmp_path: Path) -> None:
    async with simulated("liveperson") as sim:
        url = sim.url.replace("http://", "http://svc:p%40ss@")
        text = "upstreams:\n" + upstream_config("lp", url, "liveperson", [LP_ROUTE])
        async with running_gateway(write_config(tmp_path, text)) as gw, gw.client() as client:
            with_caller_auth = await client.post(invoke("a"), headers={"Authorization": "Bearer caller"})
            without = await client.post(invoke("a"))
    assert (with_caller_auth.status_code, without.status_code) == (200, 200)  # aiohttp refused both at once: 500
    basic = "Basic " + base64.b64encode(b"svc:p@ss").decode()
    assert [{k.lower(): v for k, v in call.headers.items()}["authorization"] for call in sim.calls] == [basic, basic]
    assert all("svc" not in call.headers.get("Host", "") for call in sim.calls)


def test_admin_config_view_masks_every_secret_in_the_file() -> None:
    from gateway.admin import mask_secrets

    config = orjson.loads(orjson.dumps({"state": {"redis_url": f"redis://:{REDIS_PASSWORD}@h:6379/0"}, "upstreams": {"lp": {"url": f"http://gw:{URL_PASSWORD}@h:1"}}}))
    assert not SECRET.search(orjson.dumps(mask_secrets(config)))
