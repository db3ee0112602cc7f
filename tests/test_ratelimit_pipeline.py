"""Rate limiting end to end: real sockets through the gateway, memory and real Redis backends.

Every test drives the real app on uvicorn (tests.harness.running_gateway) in front of
simulated upstreams of each dialect; the Redis backend runs against a redis-server (or a
three-node Cluster) that the test starts. Refill rates are slow (one token an hour) wherever
exact counts are checked, so no count depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import orjson
import pytest
from botocore.config import Config as BotoConfig
from prometheus_client.parser import text_string_to_metric_families

from gateway.ratelimit import MAX_ACCOUNT_ID_LENGTH, bucket_key
from gateway.simulators import SimulatedUpstream
from tests.harness import REPO, RunningGateway, running_gateway, simulated, upstream_config, write_config
from tests.redis_servers import Cluster, RedisProcess, SentinelSetup, send_command

LP_ROUTE = "/api/account/{account}/lambdas/{function}/invoke"
LAMBDA_ROUTE = "/2015-03-31/functions/{function}/invocations"
YR_ROUTE = "/serverless/v1/functions/{function}/invocations"
TENANT_HEADER = "X-Tenant-Id"
SLOW = {"rate": 1, "per_s": 3600, "burst": 3}  # one token an hour: counts never depend on timing
# Tests that are not about outages give Redis a timeout a loaded test machine cannot hit, so
# a stalled event loop never sends them into the fallback (the outage tests use 50 ms).
OVERRIDES = {
    "vip": {"rate": 1, "per_s": 3600, "burst": 6},
    "AKIDVIP": {"rate": 1, "per_s": 3600, "burst": 5},
    "fast": {"rate": 2, "per_s": 1, "burst": 2},  # one token per 500 ms
    "13350576": {"rate": 1, "per_s": 3600, "burst": 4},  # LivePerson account ids are numbers; YAML reads an int key
}
HOUR_POLICY = '"default";q=1;w=3600'


# --- configuration and clients ----------------------------------------------------------------


@dataclass
class Upstreams:
    """One simulated upstream per dialect; `web` serves two http upstreams (web, web2)."""

    lp: SimulatedUpstream
    aws: SimulatedUpstream
    yr: SimulatedUpstream
    web: SimulatedUpstream

    def calls(self) -> int:
        return sum(len(u.calls) for u in (self.lp, self.aws, self.yr, self.web))


@contextlib.asynccontextmanager
async def all_upstreams() -> AsyncIterator[Upstreams]:
    async with simulated("liveperson") as lp, simulated("lambda") as aws, simulated("yuanrong") as yr, simulated("http") as web:
        yield Upstreams(lp, aws, yr, web)


def flow(mapping: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"


def gateway_yaml(upstreams: Upstreams, redis_url: str | None = None, on_redis_error: str = "local", default: dict[str, Any] = SLOW, redis_timeout_s: float = 0.5) -> str:
    state = f"state: {{redis_url: '{redis_url}', on_redis_error: {on_redis_error}, redis_timeout_s: {redis_timeout_s}}}\n" if redis_url else "state: {redis_url: null}\n"
    no_retry = "{max_attempts: 1}"
    return (
        state
        + "retry_policies:\n  once: " + no_retry + "\n"
        + "upstreams:\n"
        + upstream_config("lp", upstreams.lp.url, "liveperson", [LP_ROUTE], retry="once")
        + upstream_config("aws", upstreams.aws.url, "lambda", [LAMBDA_ROUTE], retry="once")
        + upstream_config("yr", upstreams.yr.url, "yuanrong", [YR_ROUTE], retry="once", account_header=TENANT_HEADER)
        + upstream_config("web", upstreams.web.url, "http", ["/web/{function}"], retry="once")
        + upstream_config("web2", upstreams.web.url, "http", ["/web2/{function}"], retry="once")
        + "rate_limits:\n"
        + f"  default: {flow(default)}\n"
        + "  accounts:\n"
        + "".join(f"    {name}: {flow(bucket)}\n" for name, bucket in OVERRIDES.items())
    )


@contextlib.asynccontextmanager
async def gateway_for(tmp_path: Path, upstreams: Upstreams, name: str = "gateway.yaml", **options: Any) -> AsyncIterator[RunningGateway]:
    """A gateway in front of `upstreams`; with Redis, it checks on exit that Redis decided alone."""
    path = write_config(tmp_path, gateway_yaml(upstreams, **options), name)
    async with running_gateway(path) as gateway:
        yield gateway
        if options.get("redis_url"):
            async with gateway.client() as client:
                sources = decisions_by_source((await client.get("/metrics")).text)
            assert set(sources) <= {"redis"}, f"decisions made without Redis: {sources}"


def decisions_by_source(metrics_text: str) -> dict[str, float]:
    """gateway_ratelimit_decisions_total summed per `source` label."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "gateway_ratelimit_decisions_total":
                totals[sample.labels["source"]] = totals.get(sample.labels["source"], 0.0) + sample.value
    return totals


def lp_path(account: str, function: str = "ok") -> str:
    return f"/api/account/{account}/lambdas/{function}/invoke"


def rate_headers(response: httpx.Response) -> tuple[str | None, str | None, str | None]:
    return response.headers.get("ratelimit-policy"), response.headers.get("ratelimit"), response.headers.get("retry-after")


def remaining_of(response: httpx.Response) -> int:
    """The `r` parameter of the RateLimit field."""
    field = response.headers["ratelimit"]
    params = dict(part.split("=", 1) for part in field.split(";")[1:])
    return int(params["r"])


async def burst(client: httpx.AsyncClient, path: str, count: int, **kwargs: Any) -> list[httpx.Response]:
    return [await client.post(path, json={"payload": n}, **kwargs) for n in range(count)]


def statuses(responses: list[httpx.Response]) -> list[int]:
    return [r.status_code for r in responses]


def expected_statuses(burst_size: int, count: int) -> list[int]:
    return [200] * burst_size + [429] * (count - burst_size)


def lambda_client(url: str, access_key: str) -> Any:
    """boto3's own Lambda client aimed at the gateway, with dummy credentials and no retries."""
    config = BotoConfig(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=10)
    return boto3.client("lambda", endpoint_url=url, region_name="us-east-1", aws_access_key_id=access_key, aws_secret_access_key="dummy-secret", config=config)


def invoke_outcome(client: Any, function: str = "ok") -> tuple[str, dict[str, Any]]:
    """('ok', response) or (exception class name, error response)."""
    try:
        return "ok", client.invoke(FunctionName=function, Payload=b'{"n": 1}')
    except client.exceptions.ClientError as error:
        return type(error).__name__, error.response


async def invoke_many(client: Any, count: int) -> list[tuple[str, dict[str, Any]]]:
    return [await asyncio.to_thread(invoke_outcome, client) for _ in range(count)]


# --- backends -----------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    """None for the in-process backend, else the URL of a fresh redis-server."""
    if request.param == "memory":
        return None
    server: RedisProcess = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    async with all_upstreams() as found:
        yield found


# --- the answer: a burst passes, the next is refused, per dialect --------------------------------


async def test_liveperson_burst_then_429_without_calling_upstream(tmp_path: Path, upstreams: Upstreams, redis_url: str | None) -> None:
    async with gateway_for(tmp_path, upstreams, redis_url=redis_url) as gw, gw.client() as client:
        passed = await burst(client, lp_path("acct-1"), SLOW["burst"])
        assert statuses(passed) == [200] * SLOW["burst"]
        assert [remaining_of(r) for r in passed] == list(range(SLOW["burst"] - 1, -1, -1))
        assert {r.headers["ratelimit-policy"] for r in passed} == {HOUR_POLICY}
        calls_before = upstreams.lp.count()
        refused = await client.post(lp_path("acct-1"), json={"payload": "over"})
        assert upstreams.lp.count() == calls_before
    assert refused.status_code == 429
    policy, limit, retry_after = rate_headers(refused)
    assert policy == HOUR_POLICY
    assert limit is not None and limit.startswith('"default";r=0;t=')
    assert retry_after is not None and 3500 < int(retry_after) <= 3600  # the next token, an hour away
    body = refused.json()
    problem = body["problem"]
    assert (problem["class"], problem["code"], problem["status"], problem["attempts"]) == ("rate_limited", "gateway.rate_limited", 429, 0)
    assert (problem["retryable"], problem["upstream"]) == (True, "lp")
    assert (body["errorCode"], body["errorMsg"]) == (problem["code"], problem["detail"])
    assert refused.headers["x-request-id"] == problem["request_id"]


async def test_yuanrong_429_carries_code_and_inner_code(tmp_path: Path, upstreams: Upstreams, redis_url: str | None) -> None:
    tenant = {TENANT_HEADER: "tenant-1"}
    async with gateway_for(tmp_path, upstreams, redis_url=redis_url) as gw, gw.client() as client:
        answers = await burst(client, "/serverless/v1/functions/ok/invocations", SLOW["burst"] + 1, headers=tenant)
    assert statuses(answers) == expected_statuses(SLOW["burst"], SLOW["burst"] + 1)
    assert len(upstreams.yr.calls) == SLOW["burst"]
    refused = answers[-1]
    body = refused.json()
    assert body["code"] == 200429 and refused.headers["x-inner-code"] == "200429"  # DIALECTS.md: 200429 <-> 429
    assert body["message"] == body["problem"]["detail"]
    assert (body["problem"]["class"], body["problem"]["code"]) == ("rate_limited", "gateway.rate_limited")
    assert all(header is not None for header in rate_headers(refused))


async def test_http_429_is_problem_json(tmp_path: Path, upstreams: Upstreams, redis_url: str | None) -> None:
    async with gateway_for(tmp_path, upstreams, redis_url=redis_url) as gw, gw.client() as client:
        answers = await burst(client, "/web/ok", SLOW["burst"] + 1)
    assert statuses(answers) == expected_statuses(SLOW["burst"], SLOW["burst"] + 1)
    refused = answers[-1]
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert (problem["class"], problem["code"], problem["status"], problem["upstream"]) == ("rate_limited", "gateway.rate_limited", 429, "web")
    assert all(header is not None for header in rate_headers(refused))


async def test_boto3_raises_too_many_requests_and_access_keys_are_accounts(tmp_path: Path, upstreams: Upstreams, redis_url: str | None) -> None:
    async with gateway_for(tmp_path, upstreams, redis_url=redis_url) as gw:
        alpha, beta, vip = [await asyncio.to_thread(lambda_client, gw.url, key) for key in ("AKIDALPHA", "AKIDBETA", "AKIDVIP")]
        first = await invoke_many(alpha, SLOW["burst"] + 1)
        calls_after_alpha = len(upstreams.aws.calls)
        second = await invoke_many(beta, SLOW["burst"] + 1)
        overridden = await invoke_many(vip, OVERRIDES["AKIDVIP"]["burst"] + 1)
    assert [name for name, _ in first] == ["ok"] * SLOW["burst"] + ["TooManyRequestsException"]
    assert calls_after_alpha == SLOW["burst"]  # the refused invoke never reached Lambda
    assert [name for name, _ in second] == ["ok"] * SLOW["burst"] + ["TooManyRequestsException"]
    assert [name for name, _ in overridden] == ["ok"] * OVERRIDES["AKIDVIP"]["burst"] + ["TooManyRequestsException"]
    error = first[-1][1]
    headers = error["ResponseMetadata"]["HTTPHeaders"]
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert error["Error"]["Code"] == "TooManyRequestsException"
    assert headers["x-amzn-errortype"] == "TooManyRequestsException"
    assert int(headers["retry-after"]) > 0 and "ratelimit" in headers and "ratelimit-policy" in headers
    assert orjson.loads(first[0][1]["Payload"].read()) == {"n": 1}


# --- accounts: isolation, overrides, refill, anonymous buckets ----------------------------------


async def test_other_account_unaffected_and_override_applies(tmp_path: Path, upstreams: Upstreams, redis_url: str | None) -> None:
    async with gateway_for(tmp_path, upstreams, redis_url=redis_url) as gw, gw.client() as client:
        exhausted = await burst(client, lp_path("acct-a"), SLOW["burst"] + 1)
        other = await burst(client, lp_path("acct-b"), SLOW["burst"] + 1)
        vip = await burst(client, lp_path("vip"), OVERRIDES["vip"]["burst"] + 1)
        numeric = await burst(client, lp_path("13350576"), OVERRIDES["13350576"]["burst"] + 1)
    assert statuses(exhausted) == expected_statuses(SLOW["burst"], SLOW["burst"] + 1)
    assert statuses(other) == expected_statuses(SLOW["burst"], SLOW["burst"] + 1)
    assert statuses(vip) == expected_statuses(OVERRIDES["vip"]["burst"], OVERRIDES["vip"]["burst"] + 1)
    assert vip[0].headers["ratelimit-policy"] == '"vip";q=1;w=3600'
    assert statuses(numeric) == expected_statuses(OVERRIDES["13350576"]["burst"], OVERRIDES["13350576"]["burst"] + 1)


async def test_tokens_refill_at_the_configured_rate(tmp_path: Path, upstreams: Upstreams, redis_url: str | None) -> None:
    fast = OVERRIDES["fast"]
    interval_s = fast["per_s"] / fast["rate"]
    async with gateway_for(tmp_path, upstreams, redis_url=redis_url) as gw, gw.client() as client:
        await client.get("/web/ok")  # warm the connection so timing covers the bucket only
        first = await burst(client, lp_path("fast"), fast["burst"] + 1)
        await asyncio.sleep(interval_s * 1.5)  # one token earned, the second half-way
        refilled = await burst(client, lp_path("fast"), 2)
        await asyncio.sleep(interval_s * fast["burst"] + 0.1)  # long enough to fill the bucket
        full_again = await burst(client, lp_path("fast"), fast["burst"] + 1)
    assert statuses(first) == expected_statuses(fast["burst"], fast["burst"] + 1)
    assert first[-1].headers["retry-after"] == "1"
    assert statuses(refilled) == [200, 429]
    assert statuses(full_again) == expected_statuses(fast["burst"], fast["burst"] + 1)
    assert first[0].headers["ratelimit-policy"] == f'"fast";q={fast["rate"]};w={fast["per_s"]}'


async def test_account_header_names_the_bucket(tmp_path: Path, upstreams: Upstreams) -> None:
    path = "/serverless/v1/functions/ok/invocations"
    async with gateway_for(tmp_path, upstreams) as gw, gw.client() as client:
        one = await burst(client, path, SLOW["burst"] + 1, headers={TENANT_HEADER: "t-1"})
        two = await burst(client, path, SLOW["burst"] + 1, headers={TENANT_HEADER: "t-2"})
        vip = await burst(client, path, OVERRIDES["vip"]["burst"] + 1, headers={TENANT_HEADER: "vip"})
        anonymous = await burst(client, path, SLOW["burst"] + 1)
    for answers in (one, two, anonymous):
        assert statuses(answers) == expected_statuses(SLOW["burst"], SLOW["burst"] + 1)
    assert statuses(vip) == expected_statuses(OVERRIDES["vip"]["burst"], OVERRIDES["vip"]["burst"] + 1)


async def test_requests_without_account_share_one_bucket_per_upstream(tmp_path: Path, upstreams: Upstreams, redis_url: str | None) -> None:
    async with gateway_for(tmp_path, upstreams, redis_url=redis_url) as gw, gw.client() as first, gw.client() as second:
        shared = [await (first if n % 2 else second).post(f"/web/fn-{n}") for n in range(SLOW["burst"] + 2)]
        other_upstream = await burst(second, "/web2/ok", SLOW["burst"] + 1)
        unsigned_lambda = await burst(first, "/2015-03-31/functions/ok/invocations", SLOW["burst"] + 1)
    assert statuses(shared) == expected_statuses(SLOW["burst"], SLOW["burst"] + 2)
    assert statuses(other_upstream) == expected_statuses(SLOW["burst"], SLOW["burst"] + 1)
    assert statuses(unsigned_lambda) == expected_statuses(SLOW["burst"], SLOW["burst"] + 1)


# --- hostile account ids ------------------------------------------------------------------------


async def raw_request(url: str, target: bytes, headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, bytes]:
    """One request with exactly these bytes on the wire (httpx would normalise them)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = b"POST " + target + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nConnection: close\r\n"
        writer.write(head + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n{}")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


LONG_ID = "x" * (MAX_ACCOUNT_ID_LENGTH + 1)
HOSTILE_PATH_ACCOUNTS = [
    b"%7Bevil%7D", b"{evil}", b"a%7Db", b"a%20b", b"%C3%A9", b"\xc3\xa9", b"%FF", b"a%00b", b"a%0D%0ASET%20x%201",
    b"%2e%2e", b"..", b"a%2Fb", b"a%5Cb", LONG_ID.encode(),
]  # fmt: skip
HOSTILE_HEADER_ACCOUNTS = [b"{evil}", b"a b", b"\xe9t\xe9", b"a/b", b"..", b"", b"tab\there", LONG_ID.encode(), b"a%2Fb"]
HOSTILE_CREDENTIALS = [b"{evil}", b"AK ID", LONG_ID.encode(), b"\xff\xfe"]
ODD_BUT_VALID = ["a:b", "gw:rl:lp", "%25", "~!*'()", "x" * MAX_ACCOUNT_ID_LENGTH, "A:" + "z" * 10]


async def test_hostile_account_ids_are_refused_never_a_500(tmp_path: Path, upstreams: Upstreams, redis_url: str | None) -> None:
    path_cases = [b"/api/account/" + account + b"/lambdas/ok/invoke" for account in HOSTILE_PATH_ACCOUNTS]
    header_cases = [[(TENANT_HEADER.encode(), account)] for account in HOSTILE_HEADER_ACCOUNTS]
    credential_cases = [[(b"authorization", b"AWS4-HMAC-SHA256 Credential=" + akid + b"/20240101/us-east-1/lambda/aws4_request, SignedHeaders=host, Signature=00")] for akid in HOSTILE_CREDENTIALS]
    async with gateway_for(tmp_path, upstreams, redis_url=redis_url) as gw:
        calls_before = upstreams.calls()
        answers = [await raw_request(gw.url, target) for target in path_cases]
        answers += [await raw_request(gw.url, b"/serverless/v1/functions/ok/invocations", headers) for headers in header_cases]
        answers += [await raw_request(gw.url, b"/2015-03-31/functions/ok/invocations", headers) for headers in credential_cases]
        calls_after = upstreams.calls()
        async with gw.client() as client:
            still_fine = await client.post(lp_path("acct-normal"))
    assert [status for status, _ in answers] == [400] * len(answers), answers
    assert calls_after == calls_before
    problems = [orjson.loads(body) for _, body in answers]
    problems = [body.get("problem", body) for body in problems]  # bytes the HTTP parser rejects get a bare problem
    assert {(p["class"], p["code"], p["attempts"]) for p in problems} == {("client_error", "gateway.bad_request", 0)}
    assert still_fine.status_code == 200


async def test_odd_but_valid_account_ids_get_their_own_buckets(tmp_path: Path, upstreams: Upstreams, redis_url: str | None) -> None:
    async with gateway_for(tmp_path, upstreams, redis_url=redis_url) as gw, gw.client() as client:
        results = {}
        for account in ODD_BUT_VALID:
            encoded = "".join(c if c.isalnum() or c in "-._~" else f"%{ord(c):02X}" for c in account)
            results[account] = statuses(await burst(client, lp_path(encoded), SLOW["burst"] + 1))
            results[account + " (header)"] = statuses(await burst(client, "/serverless/v1/functions/ok/invocations", SLOW["burst"] + 1, headers={TENANT_HEADER: account}))
    assert results == {name: expected_statuses(SLOW["burst"], SLOW["burst"] + 1) for name in results}


# --- memory and Redis agree ------------------------------------------------------------------


def agreement_script() -> list[tuple[str, dict[str, str]]]:
    """A mixed sequence: accounts from paths and headers, an override, anonymous traffic."""
    steps: list[tuple[str, dict[str, str]]] = []
    for round_ in range(8):
        steps.append((lp_path("acct-a"), {}))
        steps.append((lp_path("vip"), {}))
        steps.append(("/serverless/v1/functions/ok/invocations", {TENANT_HEADER: f"t-{round_ % 2}"}))
        steps.append(("/web/ok" if round_ % 3 else "/web2/ok", {}))
        if round_ % 2:
            steps.append((lp_path("acct-b"), {}))
    return steps


def observed(response: httpx.Response) -> tuple[int, str | None, str | None, str | None]:
    code = response.json().get("problem", response.json()).get("code") if response.status_code != 200 else None
    return response.status_code, response.headers.get("ratelimit-policy"), response.headers.get("ratelimit"), code


async def test_memory_and_redis_agree_through_the_gateway(tmp_path: Path, upstreams: Upstreams, redis_server: RedisProcess) -> None:
    async with (
        gateway_for(tmp_path, upstreams, name="memory.yaml") as memory_gw,
        gateway_for(tmp_path, upstreams, name="redis.yaml", redis_url=redis_server.url) as redis_gw,
        memory_gw.client() as memory,
        redis_gw.client() as shared,
    ):
        pairs = []
        for path, headers in agreement_script():
            pairs.append((await memory.post(path, headers=headers), await shared.post(path, headers=headers)))
    assert [observed(m) for m, _ in pairs] == [observed(r) for _, r in pairs]
    assert {m.status_code for m, _ in pairs} == {200, 429}
    for from_memory, from_redis in pairs:
        if from_memory.status_code == 429:
            assert abs(int(from_memory.headers["retry-after"]) - int(from_redis.headers["retry-after"])) <= 1


# --- Redis Cluster --------------------------------------------------------------------------


async def test_cluster_enforces_the_same_limits_through_the_gateway(tmp_path: Path, upstreams: Upstreams, redis_cluster: Cluster) -> None:
    accounts = [f"acct-{n}" for n in range(12)]  # spread over the three nodes' slots
    async with gateway_for(tmp_path, upstreams, redis_url=redis_cluster.url) as gw, gw.client() as client:
        ready = await client.get("/readyz")
        per_account = {account: statuses(await burst(client, lp_path(account), SLOW["burst"] + 1)) for account in accounts}
        vip = statuses(await burst(client, lp_path("vip"), OVERRIDES["vip"]["burst"] + 1))
        anonymous = statuses(await burst(client, "/web/ok", SLOW["burst"] + 1))
        metrics = (await client.get("/metrics")).text
    assert ready.status_code == 200 and ready.json()["redis"] == "reachable"
    assert per_account == {account: expected_statuses(SLOW["burst"], SLOW["burst"] + 1) for account in accounts}
    assert vip == expected_statuses(OVERRIDES["vip"]["burst"], OVERRIDES["vip"]["burst"] + 1)
    assert anonymous == expected_statuses(SLOW["burst"], SLOW["burst"] + 1)
    assert set(decisions_by_source(metrics)) == {"redis"}
    keys_per_node = [int(send_command_text(node.port, "DBSIZE")) for node in redis_cluster.nodes]
    assert sum(1 for count in keys_per_node if count > 0) >= 2, keys_per_node


async def test_sentinel_url_enforces_the_same_limits_through_the_gateway(tmp_path: Path, upstreams: Upstreams, redis_sentinel: SentinelSetup) -> None:
    async with gateway_for(tmp_path, upstreams, redis_url=redis_sentinel.url) as gw, gw.client() as client:
        ready = await client.get("/readyz")
        answers = statuses(await burst(client, lp_path("acct-s"), SLOW["burst"] + 1))
        other = statuses(await burst(client, lp_path("acct-t"), SLOW["burst"] + 1))
    assert ready.status_code == 200
    assert answers == other == expected_statuses(SLOW["burst"], SLOW["burst"] + 1)
    keys = (bucket_key("lp", "acct-s"), bucket_key("lp", "acct-t"))
    assert int(send_command_text(redis_sentinel.master.port, "EXISTS", *keys)) == 2  # the buckets live on the master


def send_command_text(port: int, *words: str) -> str:
    return send_command(port, *words).decode().strip().lstrip(":+")


# --- operations -----------------------------------------------------------------------------


async def test_readyz_with_memory_state(tmp_path: Path, upstreams: Upstreams) -> None:
    async with gateway_for(tmp_path, upstreams) as gw, gw.client() as client:
        ready = await client.get("/readyz")
        for _ in range(SLOW["burst"] + 2):
            assert (await client.get("/readyz")).status_code == 200  # never rate limited
    assert (ready.status_code, ready.json()["state"]) == (200, "memory")


def test_memory_state_with_several_workers_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, "state: {redis_url: null}\nupstreams:\n" + upstream_config("web", "http://127.0.0.1:9", "http", ["/web/{function}"]))
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", "0", "--workers", "2"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert finished.returncode == 2
    assert "--workers" in finished.stderr and "state.redis_url" in finished.stderr
