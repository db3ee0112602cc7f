"""Hostile input: the gateway never answers 500 for its own sake, never crashes, never forwards
anywhere but the configured upstream, and always answers with the envelope or the upstream's reply.

Property-based cases (hypothesis) over paths, query strings, header values and bodies, and
specific attacks over raw sockets: traversal and encoded slashes, absolute-form targets, Host
tricks, CRLF in header values, conflicting Content-Length / Transfer-Encoding, oversized
headers and bodies, gigantic or deeply nested JSON error bodies from the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.simulators import Reply, SimulatedUpstream
from tests.harness import RunningGateway, running_gateway, simulated, upstream_config, write_config

SCHEMA = orjson.loads((Path(__file__).resolve().parent.parent / "gateway" / "schemas" / "problem.schema.json").read_bytes())


def assert_valid_problem(problem: object) -> None:
    jsonschema.validate(problem, SCHEMA)

LP_ROUTES = ["/api/account/{account}/lambdas/{function}/invoke", "/api/account/{account}/lambdas/"]


@contextlib.asynccontextmanager
async def gateway_with(tmp_path: Path, dialect: str = "liveperson", routes: list[str] | None = None) -> AsyncIterator[tuple[RunningGateway, SimulatedUpstream]]:
    async with simulated(dialect) as upstream:
        text = "server: {max_body_bytes: 65536, max_header_bytes: 8192}\nrate_limits: {default: {rate: 100000, per_s: 1, burst: 100000}}\nupstreams:\n"
        text += upstream_config("up", upstream.url, dialect, routes or LP_ROUTES)
        async with running_gateway(write_config(tmp_path, text)) as gateway:
            yield gateway, upstream


async def raw_exchange(url: str, request: bytes, read_timeout_s: float = 5.0) -> bytes:
    """Send bytes as they are and read until the server closes or goes quiet."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    chunks = []
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout_s)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


def assert_gateway_answer(response: httpx.Response) -> None:
    """Any answer that is not the upstream's must be a well-formed envelope, never a 500 of ours."""
    assert response.status_code != 500 or "problem" in response.text
    if response.status_code >= 400:
        data = response.json()
        problem = data.get("problem", data)
        assert_valid_problem(problem)
        assert problem["code"] != "gateway.internal"
    assert response.headers.get("x-request-id")


TRAVERSALS = [
    "/api/account/x/../../admin/breakers",
    "/api/account/../lambdas/f/invoke",
    "/api/account/%2e%2e/lambdas/f/invoke",
    "/api/account/a/lambdas/%2e%2e/invoke",
    "/api/account/a/lambdas/a%2fb/invoke",
    "/api/account/a/lambdas/a%2Fb/invoke",
    "/api/account/a/lambdas/a%5cb/invoke",
    "/api/account/a%00b/lambdas/f/invoke",
    "/api/account/a/lambdas/%0d%0aX-Injected:%201/invoke",
    "/api/account/" + "a" * 300 + "/lambdas/f/invoke",
]


async def test_traversal_and_encoded_separators_never_reach_the_upstream(tmp_path: Path) -> None:
    async with gateway_with(tmp_path) as (gateway, upstream):
        for path in TRAVERSALS:
            response = await raw_exchange(gateway.url, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode())
            assert status_of(response) in (400, 404), (path, response[:200])
            assert_valid_problem(orjson.loads(body_of(response)).get("problem") or orjson.loads(body_of(response)))
        assert upstream.calls == []


async def test_absolute_form_target_and_host_header_cannot_redirect_the_upstream(tmp_path: Path) -> None:
    async with gateway_with(tmp_path) as (gateway, upstream):
        request = b"POST http://evil.example:1/api/account/a/lambdas/ok/invoke HTTP/1.1\r\nHost: evil.example:1\r\nContent-Length: 2\r\n\r\n{}"
        response = await raw_exchange(gateway.url, request)
        assert status_of(response) == 200
        assert upstream.calls[-1].path == "/api/account/a/lambdas/ok/invoke"
        assert upstream.calls[-1].headers["Host"] == f"127.0.0.1:{upstream.port}"
        async with gateway.client() as client:
            answer = await client.post("/api/account/a/lambdas/ok/invoke", json={}, headers={"Host": "169.254.169.254"})
        assert answer.status_code == 200
        assert upstream.calls[-1].headers["Host"] == f"127.0.0.1:{upstream.port}"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /api/account/a/lambdas/ok/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"POST /api/account/a/lambdas/ok/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}",
        b"POST /api/account/a/lambdas/ok/invoke HTTP/1.1\r\nHost: x\r\nX-Evil: a\rb\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /api/account/a/lambdas/ok/invoke HTTP/1.1\r\nHost: x\r\nX-Evil: a\nInjected: b\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"BREW /api/account/a/lambdas/ok/invoke HTCPCP/1.0\r\n\r\n",
    ],
    ids=["cl-and-te", "two-content-lengths", "bare-cr", "bare-lf-header-injection", "nul-in-target", "not-http"],
)
async def test_request_smuggling_shapes_are_refused_or_framed_once(tmp_path: Path, request_bytes: bytes) -> None:
    async with gateway_with(tmp_path) as (gateway, upstream):
        response = await raw_exchange(gateway.url, request_bytes, read_timeout_s=2.0)
        assert status_of(response) == 400, response[:300]
        assert_valid_problem(orjson.loads(body_of(response)))
        assert upstream.calls == []


async def test_oversized_headers_get_431_and_oversized_bodies_413(tmp_path: Path) -> None:
    async with gateway_with(tmp_path) as (gateway, upstream):
        async with gateway.client() as client:
            big_header = await client.post("/api/account/a/lambdas/ok/invoke", json={}, headers={"X-Big": "v" * 9000})
            big_body = await client.post("/api/account/a/lambdas/ok/invoke", content=b"x" * 70000)

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(20):
                    yield b"y" * 8192

            chunked_body = await client.post("/api/account/a/lambdas/ok/invoke", content=chunks())
        assert big_header.status_code == 431 and big_header.json()["code"] == "gateway.headers_too_large"
        assert big_body.status_code == 413 and big_body.json()["problem"]["code"] == "gateway.body_too_large"
        assert chunked_body.status_code == 413
        assert upstream.calls == []


@pytest.mark.parametrize(
    "reply",
    [
        Reply(500, b"[" * 100_000 + b"]" * 100_000, (("Content-Type", "application/json"),)),
        Reply(500, b'{"errorCode": "' + b"x" * 5_000_000 + b'"}', (("Content-Type", "application/json"),)),
        Reply(901, b'{"errorCode": 12, "errorMsg": {"nested": [1, 2, {"deep": null}]}}', (("Content-Type", "application/json"),)),
        Reply(502, b"\xff\xfe not json at all \x00", (("Content-Type", "application/json"),)),
        Reply(400, b'"just a string"', (("Content-Type", "application/json"),)),
        Reply(429, b"{}", (("Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT"), ("Content-Type", "application/json"))),
        Reply(429, b"{}", (("Retry-After", "-5"),)),
        Reply(429, b"{}", (("Retry-After", "nan"),)),
    ],
    ids=["deeply-nested", "five-megabytes", "non-string-fields", "binary", "json-string", "past-date", "negative-retry-after", "nan-retry-after"],
)
async def test_hostile_upstream_error_bodies_still_get_an_envelope(tmp_path: Path, reply: Reply) -> None:
    async with gateway_with(tmp_path) as (gateway, upstream):
        upstream.script(*([reply] * 5))
        async with gateway.client() as client:
            response = await client.post("/api/account/a/lambdas/ok/invoke", json={})
        assert response.status_code == reply.status
        assert_gateway_answer(response)
        assert len(response.content) < 64 * 1024


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="?#"), max_size=120),
    query=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="#"), max_size=60),
    header_value=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200),
    body=st.binary(max_size=2048),
)
def test_property_any_request_gets_an_envelope_or_the_upstream_reply(tmp_path: Path, path: str, query: str, header_value: str, body: bytes) -> None:
    asyncio.run(_one_fuzzed_request(tmp_path, "/" + path, query, header_value, body))


async def _one_fuzzed_request(tmp_path: Path, path: str, query: str, header_value: str, body: bytes) -> None:
    async with gateway_with(tmp_path) as (gateway, upstream):
        target = path + ("?" + query if query else "")
        request = f"POST {target} HTTP/1.1\r\nHost: x\r\nX-Fuzz: {header_value}\r\nX-Request-ID: {header_value[:50]}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        response = await raw_exchange(gateway.url, request, read_timeout_s=5.0)
        status = status_of(response)
        assert status in (200, 400, 404, 413, 431), response[:300]
        if status >= 400:
            data = orjson.loads(body_of(response))
            assert_valid_problem(data.get("problem", data))
        for call in upstream.calls:
            assert call.body == body
