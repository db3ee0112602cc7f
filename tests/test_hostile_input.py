"""Hostile input: the gateway never answers 500 for its own sake, never crashes, never forwards
anywhere but the configured upstream, and always answers with the envelope or the upstream's reply.

Property-based cases (hypothesis) over paths, query strings, header names and values, bodies,
JSON error bodies from the upstream and account ids aimed at Redis keys, and specific attacks
over raw sockets: traversal and encoded slashes, absolute-form targets, Host
tricks, CRLF in header values, conflicting Content-Length / Transfer-Encoding, oversized
headers and bodies, gigantic or deeply nested JSON error bodies from the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
import pytest
import redis as redis_client
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from gateway.simulators import Reply, SimulatedUpstream
from tests.faulty_upstream import ANSWER, Exchanged, FaultyUpstream, RawResponse, exchange_blocking, final_responses, request_bytes
from tests.harness import RunningGateway, running_gateway, simulated, upstream_config, write_config
from tests.problem_schema import assert_problem
from tests.redis_servers import RedisProcess, remove_workdir, start_redis


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
        assert_problem(problem)
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
            assert_problem(orjson.loads(body_of(response)).get("problem") or orjson.loads(body_of(response)))
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


@pytest.mark.parametrize("path", ["/api/account/a/lambdas/ok/invoke", "/healthz", "/nowhere"])
async def test_a_websocket_upgrade_gets_a_problem_not_a_bare_403(tmp_path: Path, path: str) -> None:
    async with gateway_with(tmp_path) as (gateway, upstream):
        request = (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Request-ID: ws-1\r\n\r\n"
        ).encode()
        response = await raw_exchange(gateway.url, request, read_timeout_s=2.0)
        assert status_of(response) == 400, response[:300]
        problem = assert_problem(orjson.loads(body_of(response)))
        assert (problem["code"], problem["request_id"]) == ("gateway.bad_request", "ws-1")
        assert "WebSocket" in problem["detail"]
        assert upstream.calls == []
        async with gateway.client() as client:
            metrics = (await client.get("/metrics")).text
        assert 'gateway_requests_total{class="client_error",status="400",upstream="-"} 1.0' in metrics


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
        assert_problem(orjson.loads(body_of(response)))
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
@example(path="readyz", query="", header_value="", body=b"")  # once a plain-text 405 from Starlette
def test_property_any_request_gets_an_envelope_or_the_upstream_reply(tmp_path: Path, path: str, query: str, header_value: str, body: bytes) -> None:
    asyncio.run(_one_fuzzed_request(tmp_path, "/" + path, query, header_value, body))


async def _one_fuzzed_request(tmp_path: Path, path: str, query: str, header_value: str, body: bytes) -> None:
    async with gateway_with(tmp_path) as (gateway, upstream):
        target = path + ("?" + query if query else "")
        request = f"POST {target} HTTP/1.1\r\nHost: x\r\nX-Fuzz: {header_value}\r\nX-Request-ID: {header_value[:50]}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        response = await raw_exchange(gateway.url, request, read_timeout_s=5.0)
        status = status_of(response)
        assert status in (200, 400, 404, 405, 413, 431), response[:300]  # 405: POST on /healthz, /readyz, /metrics
        if status >= 400:
            data = orjson.loads(body_of(response))
            assert_problem(data.get("problem", data))
        for call in upstream.calls:
            assert call.body == body


# --- properties against one gateway shared by many examples ---------------------------------
#
# The gateway, its upstreams and Redis run once per module in a background thread with its own
# event loop; each hypothesis example is a blocking raw-socket request against it, so hundreds
# of examples take seconds. Breakers never open (fail_max is huge) and nothing is retried, so
# an example never changes what the next one sees except through the state it checks.

RAW_ROUTE = "/raw/account/{account}/lambdas/{function}/invoke"
BOUND_S = 5.0


class SharedGateway:
    """Not a dataclass: hypothesis prints a failing example's arguments field by field."""

    def __init__(self, url: str, lp: SimulatedUpstream, raw: FaultyUpstream, redis: RedisProcess) -> None:
        self.url = url
        self.lp = lp  # scripted error bodies
        self.raw = raw  # records the exact header lines that arrive
        self.redis = redis

    def __repr__(self) -> str:
        return f"SharedGateway({self.url})"


def shared_config(lp_url: str, raw_url: str, redis_url: str) -> str:
    return (
        "server: {max_body_bytes: 65536, max_header_bytes: 8192}\n"
        f"state: {{redis_url: '{redis_url}', redis_timeout_s: 1}}\n"
        "rate_limits: {default: {rate: 1, per_s: 3600, burst: 100000}}\n"  # slow refill: a used bucket's key stays for the run
        "retry_policies: {once: {max_attempts: 1}}\n"
        "breaker_policies: {never: {fail_max: 1000000000, reset_timeout_s: 1}}\n"
        "upstreams:\n"
        + upstream_config("lp", lp_url, "liveperson", LP_ROUTES, retry="once", breaker="never")
        + upstream_config("raw", raw_url, "liveperson", [RAW_ROUTE], retry="once", breaker="never")
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedGateway]:
    redis = start_redis()
    ready: queue.Queue[tuple[SharedGateway, asyncio.AbstractEventLoop, asyncio.Event] | BaseException] = queue.Queue()
    folder = tmp_path_factory.mktemp("shared-gateway")

    async def serve() -> None:
        try:
            async with simulated("liveperson") as lp:
                raw = await FaultyUpstream(default=ANSWER).start()
                try:
                    async with running_gateway(write_config(folder, shared_config(lp.url, raw.url, redis.url))) as gw:
                        stop = asyncio.Event()
                        ready.put((SharedGateway(gw.url, lp, raw, redis), asyncio.get_running_loop(), stop))
                        await stop.wait()
                finally:
                    await raw.stop()
        except BaseException as exc:
            ready.put(exc)
            raise

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    try:
        started = ready.get(timeout=30)
        if isinstance(started, BaseException):
            raise started
        gateway, loop, stop = started
        try:
            yield gateway
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(30)
    finally:
        redis.close()
        remove_workdir(redis)


def final_answer(exchanged: Exchanged) -> RawResponse:
    finals = final_responses(exchanged.responses)
    assert len(finals) == 1, exchanged.responses  # one answer: never none (a hang), never two
    return finals[0]


def assert_envelope(response: RawResponse) -> dict:
    data = orjson.loads(response.body)
    problem = data.get("problem", data)
    assert_problem(problem)
    assert problem["code"] != "gateway.internal" and problem["status"] == response.status
    return problem


# Header names: the ones a proxy must own or drop, in any letter case, and arbitrary tokens.
GATEWAY_OWNED = ["Host", "Content-Length", "Transfer-Encoding", "Connection", "Keep-Alive", "TE", "Trailer", "Upgrade", "Proxy-Connection", "Proxy-Authorization", "X-Gateway-Attempt", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Request-ID", "Expect"]
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection", "proxy-authorization"}


def any_case(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(lambda flips: "".join(c.upper() if f else c.lower() for c, f in zip(name, flips)))


HEADER_NAMES = st.one_of(
    st.sampled_from(GATEWAY_OWNED).flatmap(any_case),
    st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),  # ( ) , / : ; < = > ? @ [ \ ] { } " too
)
HEADER_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), min_size=1, max_size=6))
def test_property_header_names_and_values_never_confuse_what_the_upstream_gets(shared: SharedGateway, headers: list[tuple[str, str]]) -> None:
    body = b'{"n": 1}'
    head = f"POST /raw/account/acct/lambdas/ok/invoke HTTP/1.1\r\nHost: gateway\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers) + "Connection: close\r\n\r\n"
    before = len(shared.raw.received)
    response = final_answer(exchange_blocking(shared.url, head.encode() + body, BOUND_S))
    arrived = shared.raw.received[before:]
    event(f"status {response.status}")
    assert response.status in (200, 400, 413, 431), response
    if response.status != 200:
        assert_envelope(response)
        assert arrived == []
        return
    if response.headers.get("x-gateway-replayed") == "true":  # a fuzzed X-Request-ID seen before, same body
        assert arrived == [] and response.body == ANSWER.body
        return
    assert response.body == ANSWER.body and len(arrived) == 1
    names = [name.lower() for name, _ in arrived[0].raw_headers]
    assert names.count("host") == 1 and arrived[0].headers["host"] == f"127.0.0.1:{shared.raw.port}"
    assert names.count("x-gateway-attempt") == 1 and arrived[0].headers["x-gateway-attempt"] == "1"
    assert names.count("x-request-id") == 1 and names.count("content-length") + names.count("transfer-encoding") == 1
    assert not HOP_BY_HOP & set(names) - {"transfer-encoding"}
    assert arrived[0].body == body


# JSON error bodies from the upstream: any shape, with the fields the LivePerson pack reads.
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63, max_value=2**70), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
LP_CODES = st.sampled_from(["com.liveperson.faas.handler.custom-failure", "com.liveperson.faas.handler.executiontime-exceeded", "com.liveperson.faas.es.unavailable", "com.liveperson.faas.es.general", "com.liveperson.faas.es.badinput", "com.customer.faas.function.threw-error", "com.liveperson.faas.function.not-found"])
LP_FIELDS = st.fixed_dictionaries({}, optional={"errorCode": LP_CODES | JSON_VALUES, "errorMsg": JSON_VALUES, "code": LP_CODES | JSON_VALUES, "message": JSON_VALUES, "problem": JSON_VALUES})
ERROR_BODIES = st.one_of(LP_FIELDS, st.tuples(LP_FIELDS, st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=3)).map(lambda t: {**t[1], **t[0]}), JSON_VALUES)
ERROR_STATUSES = st.sampled_from([400, 401, 403, 404, 405, 408, 409, 413, 429, 500, 501, 502, 503, 504, 599, 901])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=ERROR_STATUSES, body=ERROR_BODIES)
def test_property_any_json_error_body_gets_the_envelope_and_keeps_its_fields(shared: SharedGateway, status: int, body: object) -> None:
    raw = json.dumps(body).encode()  # orjson cannot write integers beyond 64 bits; an upstream can
    shared.lp.script(Reply(status, raw, (("Content-Type", "application/json"),)))
    request = request_bytes("POST", "/api/account/acct/lambdas/f/invoke", b"{}")
    response = final_answer(exchange_blocking(shared.url, request, BOUND_S))
    assert response.status == status and response.complete
    problem = assert_envelope(response)
    assert problem["attempts"] == 1 and problem["upstream"] == "lp"
    answered = orjson.loads(response.body)
    readable = as_orjson_reads(raw)
    event(f"class {problem['class']}")
    if isinstance(readable, dict):  # the native fields the dialect's client reads survive
        assert {k: v for k, v in answered.items() if k != "problem"} == {k: v for k, v in readable.items() if k != "problem"}
    else:  # not an object: fresh native fields
        assert set(answered) == {"errorCode", "errorMsg", "problem"}


def as_orjson_reads(raw: bytes) -> object:
    """The body as the gateway reads it: integers beyond 64 bits come back as floats (a known limit)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


# Account ids that try to reach other Redis keys: every character class, encoded into the path.
ACCOUNT_CHARS = st.one_of(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E),
    st.sampled_from(["{", "}", ":", "*", "?", "[", "]", "\\", "/", " ", "\t", "\r", "\n", "\x00", "%", "é", "\u2028", "\U0001f600"]),
)
ACCOUNT_IDS = st.one_of(
    st.text(alphabet=ACCOUNT_CHARS, min_size=0, max_size=24),
    st.sampled_from(["*", "gw:rl:*", "a}{b", "{lp}", "a\r\nFLUSHALL\r\n", "..", ".", "x" * 256, "x" * 257]),
)


def acceptable_account(account: str) -> bool:
    """SPEC.md's refusals plus the rate limiter's: 1-256 visible ASCII characters, no braces, no dot segment, no slashes."""
    return (
        0 < len(account) <= 256
        and all("!" <= c <= "~" for c in account)
        and not set(account) & set("{}/\\")
        and account not in (".", "..")
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(account=ACCOUNT_IDS)
def test_property_account_ids_reach_exactly_their_own_redis_key(shared: SharedGateway, account: str) -> None:
    client = redis_client.Redis(port=shared.redis.port)
    try:
        client.set("bystander", b"untouched")
        before = set(client.keys("*"))
        target = "/raw/account/" + quote(account.encode("utf-8", "surrogatepass"), safe="") + "/lambdas/ok/invoke"  # an upstream that always answers 200
        response = final_answer(exchange_blocking(shared.url, request_bytes("POST", target, b"{}"), BOUND_S))
        after = set(client.keys("*"))
        assert client.get("bystander") == b"untouched" and before <= after  # nothing removed or overwritten
        own_key = f"gw:rl:{{raw:{account}}}".encode()
        own_exists = bool(client.exists(own_key)) if acceptable_account(account) else False
    finally:
        client.close()
    created = after - before
    event(f"status {response.status}")
    if acceptable_account(account):
        assert response.status == 200, (account, response)
        assert own_exists and created <= {own_key}  # its own bucket and nothing else (already there if seen before)
    else:
        assert response.status == 400 and assert_envelope(response)["code"] == "gateway.bad_request"
        assert created == set()
