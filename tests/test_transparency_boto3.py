"""The real boto3 Lambda client sees through the gateway what it sees without it.

Each case is invoked twice with boto3 (its own retries off): once with `endpoint_url` at the
simulated Lambda upstream, once at the gateway in front of it. The resolved fields, or the
raised exception's class, error code, message and modelled members, must be equal; the only
difference allowed is the `problem` member the gateway adds, which must validate.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import pytest_asyncio
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError

from gateway.simulators import SimulatedUpstream
from tests.harness import RunningGateway, free_port, running_gateway, simulated, upstream_config, write_config
from tests.problem_schema import assert_problem, without_problem

ROUTE = "/2015-03-31/functions/{function}/invocations"
PAYLOAD = b'{"order": 42, "items": ["a", "b"]}'
QUICK_RETRY = "retry_policies:\n  quick: {max_attempts: 2, base_delay_s: 0.01, max_delay_s: 0.02, retry_after_max_s: 0.5}\n"

# function name (the simulator's behaviour) -> what boto3 must do, directly and through the gateway
CASES: dict[str, tuple[str, str | None]] = {
    "ok": ("resolved", None),
    "fail": ("resolved", "Unhandled"),
    "timeout": ("resolved", "Unhandled"),
    "missing": ("raised", "ResourceNotFoundException"),
    "badinput": ("raised", "InvalidRequestContentException"),
    "throttle": ("raised", "TooManyRequestsException"),
    "crash": ("raised", "ServiceException"),
}


@dataclass
class Observed:
    """What one boto3 invoke amounted to, plus the raw HTTP answer it parsed."""

    outcome: str
    fields: dict[str, Any]
    raw_status: int = 0
    raw_body: bytes = b""
    raw_headers: dict[str, str] = field(default_factory=dict)


NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=15)


@pytest.fixture(scope="module")
def session() -> boto3.session.Session:
    """One session for the module: it caches the service model, so clients are cheap to make."""
    return boto3.session.Session(region_name="us-east-1")


def lambda_client(session: boto3.session.Session, endpoint_url: str, access_key: str = "AKIDCALLER0000000000") -> BaseClient:
    """Dummy credentials, boto3's own retries off."""
    return session.client("lambda", endpoint_url=endpoint_url, config=NO_RETRIES, aws_access_key_id=access_key, aws_secret_access_key="caller-secret")


def invoke(client: BaseClient, function: str) -> Observed:
    return invoke_with(client, function, PAYLOAD)


def invoke_with(client: BaseClient, function: str, payload: bytes) -> Observed:
    """Invoke with boto3 and keep what it resolved or raised (blocking: run it in a thread)."""
    seen: dict[str, Any] = {}

    def keep_raw(http_response: Any, **_: Any) -> None:
        seen.update(status=http_response.status_code, headers={k.lower(): v for k, v in http_response.headers.items()})
        if http_response.status_code >= 300:  # a success body is a stream boto3 has not read yet
            seen["body"] = http_response.content

    client.meta.events.register("after-call.lambda.Invoke", keep_raw)
    try:
        response = client.invoke(FunctionName=function, Payload=payload)
    except ClientError as error:
        observed = Observed("raised", raised_fields(client, error))
    else:
        seen["body"] = response["Payload"].read()
        observed = Observed("resolved", resolved_fields(response, seen["body"]))
    finally:
        client.meta.events.unregister("after-call.lambda.Invoke", keep_raw)
    observed.raw_status, observed.raw_body, observed.raw_headers = seen["status"], seen["body"], seen["headers"]
    return observed


def resolved_fields(response: dict[str, Any], payload: bytes) -> dict[str, Any]:
    fields = {k: v for k, v in response.items() if k not in ("ResponseMetadata", "Payload")}
    fields["HTTPStatusCode"] = response["ResponseMetadata"]["HTTPStatusCode"]
    fields["Payload"] = json.loads(payload) if response.get("FunctionError") else payload
    return fields


def raised_fields(client: BaseClient, error: ClientError) -> dict[str, Any]:
    modelled = getattr(client.exceptions, type(error).__name__, None)
    return {
        "exception": type(error).__name__,
        "modelled": modelled is not None and isinstance(error, modelled),
        "Error": error.response["Error"],
        "HTTPStatusCode": error.response["ResponseMetadata"]["HTTPStatusCode"],
        "members": {k: v for k, v in error.response.items() if k not in ("Error", "ResponseMetadata")},
    }


def gateway_problem(observed: Observed) -> dict[str, Any]:
    return assert_problem(json.loads(observed.raw_body)["problem"])


@dataclass
class Pair:
    upstream: SimulatedUpstream
    gateway: RunningGateway
    direct: BaseClient
    through: BaseClient


@pytest_asyncio.fixture
async def pair(tmp_path: Path, session: boto3.session.Session) -> AsyncIterator[Pair]:
    async with simulated("lambda") as upstream:
        config = write_config(tmp_path, QUICK_RETRY + "upstreams:\n" + upstream_config("aws", upstream.url, "lambda", [ROUTE], retry="quick"))
        async with running_gateway(config) as gateway:
            direct, through = lambda_client(session, upstream.url), lambda_client(session, gateway.url)
            yield Pair(upstream, gateway, direct, through)


async def invoke_both(pair: Pair, function: str) -> tuple[Observed, Observed, int, int]:
    """Direct, then through the gateway; with the upstream calls each one caused."""
    before = pair.upstream.count(f"/{function}/")
    direct = await asyncio.to_thread(invoke, pair.direct, function)
    middle = pair.upstream.count(f"/{function}/")
    through = await asyncio.to_thread(invoke, pair.through, function)
    return direct, through, middle - before, pair.upstream.count(f"/{function}/") - middle


@pytest.mark.parametrize("function", list(CASES))
async def test_boto3_sees_the_same(pair: Pair, function: str) -> None:
    direct, through, direct_calls, gateway_calls = await invoke_both(pair, function)
    outcome, name = CASES[function]
    assert direct_calls == 1, "boto3's own retries must be off"
    assert (direct.outcome, through.outcome) == (outcome, outcome)
    if outcome == "raised":
        assert direct.fields["exception"] == name and direct.fields["modelled"]
        assert through.fields == direct.fields
    else:
        assert direct.fields.get("FunctionError") == name
        assert {**through.fields, "Payload": None} == {**direct.fields, "Payload": None}
        assert without_problem(through.fields["Payload"]) == direct.fields["Payload"]
    if function == "ok":
        assert through.raw_body == direct.raw_body == PAYLOAD
        assert "problem" not in through.raw_body.decode()
        return
    problem = gateway_problem(through)
    assert problem["status"] == through.raw_status == direct.raw_status
    assert problem["attempts"] == gateway_calls
    assert problem["request_id"] == through.raw_headers["x-request-id"]
    assert problem["upstream"] == "aws"


async def test_function_error_payload_keeps_every_native_field(pair: Pair) -> None:
    direct, through, _, _ = await invoke_both(pair, "fail")
    payload = through.fields["Payload"]
    assert set(payload) == {"errorType", "errorMessage", "trace", "problem"}
    assert without_problem(payload) == direct.fields["Payload"]
    assert (payload["problem"]["class"], payload["problem"]["status"], payload["problem"]["retryable"]) == ("function_error", 200, False)


async def test_upstream_throttle_is_too_many_requests_with_its_hints(pair: Pair) -> None:
    direct, through, _, _ = await invoke_both(pair, "throttle")
    assert through.fields["members"] == direct.fields["members"]
    assert through.fields["members"]["retryAfterSeconds"] and through.fields["members"]["Reason"]
    assert through.raw_headers.get("retry-after") == direct.raw_headers.get("retry-after")
    assert gateway_problem(through)["class"] == "rate_limited"


async def test_gateway_rate_limit_raises_too_many_requests(tmp_path: Path, session: boto3.session.Session) -> None:
    tiny = "rate_limits:\n  default: {rate: 1, per_s: 60, burst: 1}\n"
    async with simulated("lambda") as upstream:
        config = write_config(tmp_path, tiny + "upstreams:\n" + upstream_config("aws", upstream.url, "lambda", [ROUTE]))
        async with running_gateway(config) as gateway:
            client = lambda_client(session, gateway.url)
            first = await asyncio.to_thread(invoke, client, "ok")
            second = await asyncio.to_thread(invoke, client, "ok")
            other_account = await asyncio.to_thread(invoke, lambda_client(session, gateway.url, "AKIDOTHER00000000000"), "ok")
            assert upstream.count("/ok/") == 2
    assert first.outcome == other_account.outcome == "resolved"
    assert second.outcome == "raised"
    assert second.fields["exception"] == "TooManyRequestsException" and second.fields["modelled"]
    assert second.fields["HTTPStatusCode"] == 429
    assert second.fields["members"]["Reason"]
    assert int(second.fields["members"]["retryAfterSeconds"]) == int(second.raw_headers["retry-after"]) >= 1
    problem = gateway_problem(second)
    assert (problem["class"], problem["code"], problem["attempts"]) == ("rate_limited", "gateway.rate_limited", 0)
    assert second.fields["Error"]["Message"] == problem["detail"]


async def test_gateway_made_errors_raise_modelled_exceptions(tmp_path: Path, session: boto3.session.Session) -> None:
    """413 -> RequestTooLargeException; refused upstream (502) and open circuit (503) -> ServiceException."""
    text = (
        "server: {max_body_bytes: 1024}\n"
        "breaker_policies:\n  touchy: {fail_max: 1, reset_timeout_s: 30}\n"
        "upstreams:\n" + upstream_config("aws", f"http://127.0.0.1:{free_port()}", "lambda", [ROUTE], retry="none", breaker="touchy")
    )
    async with running_gateway(write_config(tmp_path, text)) as gateway:
        client = lambda_client(session, gateway.url)
        too_large = await asyncio.to_thread(invoke_with, client, "f", b"x" * 2048)
        refused = await asyncio.to_thread(invoke_with, client, "f", PAYLOAD)
        circuit = await asyncio.to_thread(invoke_with, client, "f", PAYLOAD)
    expected = [
        (too_large, "RequestTooLargeException", 413, "gateway.body_too_large"),
        (refused, "ServiceException", 502, "gateway.upstream_unavailable"),
        (circuit, "ServiceException", 503, "gateway.circuit_open"),
    ]
    for observed, name, status, code in expected:
        assert (observed.outcome, observed.fields["exception"], observed.fields["modelled"]) == ("raised", name, True)
        problem = gateway_problem(observed)
        assert (observed.fields["HTTPStatusCode"], problem["code"]) == (status, code)
        assert observed.fields["Error"] == {"Code": name, "Message": problem["detail"]}
