"""Re-signing for an AWS upstream (`auth: aws_sigv4`).

boto3 signs with the caller's credentials for the gateway's host; the upstream must receive a
request signed with the gateway's own credentials (from the usual AWS environment variables),
and every attempt must be signed afresh. Signatures are verified the way AWS would: recomputed
with botocore from the request as the upstream received it (method, path, query, the signed
headers' received values, body).
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.client import BaseClient
from botocore.config import Config
from botocore.credentials import Credentials

from gateway.simulators import Call, Reply
from gateway.sigv4 import RequestSigner, host_header
from tests.clients.lp_client import CANDIDATE_HOSTS, can_bind_port80
from tests.harness import running_gateway, simulated, upstream_config, write_config

ROUTE = "/2015-03-31/functions/{function}/invocations"
GATEWAY_KEY = ("AKIDGATEWAY000000000", "gateway-secret-key")
GATEWAY_REGION = "eu-west-1"
CALLER_KEY = "AKIDCALLER0000000000"
AUTHORIZATION = re.compile(r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$")


@pytest.fixture
def gateway_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The gateway's AWS environment: only these variables, no shared files or profiles."""
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", GATEWAY_KEY[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", GATEWAY_KEY[1])
    monkeypatch.setenv("AWS_REGION", GATEWAY_REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield


def caller_client(endpoint_url: str) -> BaseClient:
    session = boto3.session.Session(aws_access_key_id=CALLER_KEY, aws_secret_access_key="caller-secret", region_name="us-east-1")
    return session.client("lambda", endpoint_url=endpoint_url, config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))


def verify_signature(call: Call, key: tuple[str, str], region: str) -> dict[str, str]:
    """Recompute the SigV4 signature of a received request; return the Authorization's parts."""
    headers = {k.lower(): v for k, v in call.headers.items()}
    match = AUTHORIZATION.match(headers["authorization"])
    assert match, headers["authorization"]
    akid, day, scope_region, service, signed, signature = match.groups()
    assert (akid, scope_region, service) == (key[0], region, "lambda")
    assert "host" in signed.split(";") and "x-amz-date" in signed.split(";")
    url = f"http://{headers['host']}{call.path}" + (f"?{call.query}" if call.query else "")
    request = AWSRequest(method=call.method, url=url, data=call.body, headers={name: headers[name] for name in signed.split(";")})
    request.context["timestamp"] = headers["x-amz-date"]
    assert headers["x-amz-date"].startswith(day)
    signer = SigV4Auth(Credentials(*key), "lambda", region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    assert signature == expected, "the signature does not verify against the received request"
    return {"akid": akid, "date": headers["x-amz-date"], "signed": signed}


async def invoke(client: BaseClient, function: str, payload: bytes) -> dict[str, Any]:
    return await asyncio.to_thread(client.invoke, FunctionName=function, Payload=payload)


def sigv4_config(tmp_path: Path, url: str, auth: str = "aws_sigv4") -> Path:
    return write_config(tmp_path, "upstreams:\n" + upstream_config("aws", url, "lambda", [ROUTE], auth=auth))


async def test_request_reaches_the_upstream_signed_by_the_gateway(tmp_path: Path, gateway_credentials: None) -> None:
    payload = b'{"order": 42, "note": "caf\xc3\xa9"}'
    async with simulated("lambda") as upstream, running_gateway(sigv4_config(tmp_path, upstream.url)) as gateway:
        response = await invoke(caller_client(gateway.url), "ok", payload)
    assert response["StatusCode"] == 200 and response["Payload"].read() == payload
    (call,) = upstream.calls
    assert call.body == payload
    parts = verify_signature(call, GATEWAY_KEY, GATEWAY_REGION)
    assert CALLER_KEY not in call.headers["Authorization"]
    assert parts["akid"] == GATEWAY_KEY[0]


async def test_every_attempt_is_signed_afresh(tmp_path: Path, gateway_credentials: None) -> None:
    """A retry after Retry-After: 1 lands in a later second, so its X-Amz-Date must differ."""
    async with simulated("lambda") as upstream, running_gateway(sigv4_config(tmp_path, upstream.url)) as gateway:
        upstream.script(Reply(502, b"bad gateway", (("Retry-After", "1"),)), Reply(200, b'"done"', (("Content-Type", "application/json"),)))
        response = await invoke(caller_client(gateway.url), "ok", b'{"n": 1}')
    assert response["Payload"].read() == b'"done"'
    first, second = upstream.calls
    assert (first.headers["X-Gateway-Attempt"], second.headers["X-Gateway-Attempt"]) == ("1", "2")
    signed = [verify_signature(call, GATEWAY_KEY, GATEWAY_REGION) for call in (first, second)]
    assert signed[0]["date"] != signed[1]["date"]
    assert first.headers["Authorization"] != second.headers["Authorization"]


async def test_upstream_on_a_default_port_url(tmp_path: Path, gateway_credentials: None) -> None:
    """`http://host:80`: the Host the upstream receives is the Host that was signed."""
    candidates = list(CANDIDATE_HOSTS[40:])
    random.shuffle(candidates)
    host = next(h for h in candidates if can_bind_port80(h))
    async with simulated("lambda", host=host, port=80) as upstream, running_gateway(sigv4_config(tmp_path, f"http://{host}:80")) as gateway:
        response = await invoke(caller_client(gateway.url), "ok", b"{}")
    assert response["StatusCode"] == 200
    (call,) = upstream.calls
    verify_signature(call, GATEWAY_KEY, GATEWAY_REGION)


def test_signer_replaces_the_callers_signature_headers() -> None:
    signer = RequestSigner(Credentials(*GATEWAY_KEY, token="gateway-session-token"), {"upstream.test:8443": "ap-south-1"})
    caller = [
        ("Authorization", f"AWS4-HMAC-SHA256 Credential={CALLER_KEY}/20240101/us-east-1/lambda/aws4_request, SignedHeaders=host, Signature=" + "0" * 64),
        ("X-Amz-Date", "20240101T000000Z"),
        ("X-Amz-Security-Token", "caller-token"),
        ("X-Amz-Invocation-Type", "RequestResponse"),
        ("X-Request-ID", "r-1"),
    ]
    signed = signer.sign("POST", "https://upstream.test:8443/2015-03-31/functions/f/invocations?Qualifier=prod", caller, b"{}")
    names = [name.lower() for name, _ in signed]
    assert names.count("authorization") == names.count("x-amz-date") == names.count("x-amz-security-token") == 1
    values = {name.lower(): value for name, value in signed}
    assert values["x-amz-security-token"] == "gateway-session-token"
    assert (values["x-amz-invocation-type"], values["x-request-id"]) == ("RequestResponse", "r-1")
    call = Call("POST", "/2015-03-31/functions/f/invocations", "Qualifier=prod", {**values, "host": "upstream.test:8443"}, b"{}")
    verify_signature(call, GATEWAY_KEY, "ap-south-1")


async def test_passthrough_forwards_the_callers_authorization(tmp_path: Path, gateway_credentials: None) -> None:
    sent: dict[str, str] = {}

    def keep(request: Any, **_: Any) -> None:
        sent.update({k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()})

    async with simulated("lambda") as upstream, running_gateway(sigv4_config(tmp_path, upstream.url, auth="passthrough")) as gateway:
        client = caller_client(gateway.url)
        client.meta.events.register("before-send.lambda.Invoke", keep)
        await invoke(client, "ok", b"{}")
    (call,) = upstream.calls
    received = {k.lower(): v for k, v in call.headers.items()}
    assert (received["authorization"], received["x-amz-date"]) == (sent["authorization"], sent["x-amz-date"])
    assert f"Credential={CALLER_KEY}/" in received["authorization"]


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://h.test:80/x", "h.test"),
        ("https://lambda.eu-west-1.amazonaws.com:443/2015-03-31/functions/f/invocations", "lambda.eu-west-1.amazonaws.com"),
        ("https://h.test:8443/x", "h.test:8443"),
        ("http://h.test:443/x", "h.test:443"),
        ("http://[::1]:80/x", "[::1]"),
        ("http://user:secret@h.test:81/x", "h.test:81"),
    ],
)
def test_host_header_drops_only_the_default_port(url: str, host: str) -> None:
    assert host_header(url) == host


async def test_a_body_too_big_to_replay_is_still_signed(tmp_path: Path, gateway_credentials: None) -> None:
    """SigV4 covers the body's hash: a body past server.replay_max_bytes must still be signed."""
    payload = b'{"blob": "' + b"x" * 300_000 + b'"}'
    async with simulated("lambda") as upstream:
        text = "server: {replay_max_bytes: 65536}\nupstreams:\n" + upstream_config("aws", upstream.url, "lambda", [ROUTE], auth="aws_sigv4")
        async with running_gateway(write_config(tmp_path, text)) as gateway:
            response = await invoke(caller_client(gateway.url), "ok", payload)
    assert response["StatusCode"] == 200
    (call,) = upstream.calls
    assert call.body == payload
    verify_signature(call, GATEWAY_KEY, GATEWAY_REGION)
