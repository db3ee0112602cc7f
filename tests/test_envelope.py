"""The normalized error envelope, per dialect (SPEC.md "The envelope").

Two layers: the renderer alone (every gateway-made case of SPEC.md's table, for every dialect),
and the running gateway over loopback (upstream errors and gateway-made errors as a client
receives them). Every problem object seen is validated against the JSON Schema. The expected
codes, statuses, classes, faults and retryable flags are read from SPEC.md's own tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.envelope import ProblemContext, render_gateway_error, render_upstream_error
from gateway.outcomes import ErrorClass, Outcome
from gateway.simulators import DIALECT_REPLIES, Reply, SimulatedUpstream
from tests.harness import free_port, running_gateway, simulated, upstream_config, write_config
from tests.problem_schema import PROBLEM_JSON, assert_problem, problem_of, without_problem

SPEC_MD = Path(os.environ.get("GATEWAY_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared")) / "SPEC.md"

ROUTES = {
    "liveperson": "/api/account/{account}/lambdas/{function}/invoke",
    "lambda": "/2015-03-31/functions/{function}/invocations",
    "yuanrong": "/serverless/v1/functions/{function}/invocations",
    "http": "/svc/{account}/{function}",
}
DIALECTS = tuple(ROUTES)
BEHAVIOURS = ("fail", "timeout", "missing", "badinput", "throttle", "crash", "down")
NATIVE_HEADERS = {
    "liveperson": (),
    "lambda": ("x-amzn-errortype", "x-amz-function-error", "x-amz-executed-version", "x-amzn-requestid", "retry-after"),
    "yuanrong": ("x-inner-code",),
    "http": ("retry-after",),
}
QUICK_RETRY = "retry_policies:\n  quick: {max_attempts: 2, base_delay_s: 0.01, max_delay_s: 0.02, retry_after_max_s: 0.5}\n"


# --- SPEC.md, parsed ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayCase:
    case: str
    status: int
    error_class: ErrorClass
    code: str


def _spec() -> str:
    return SPEC_MD.read_text(encoding="utf-8")


def _table_rows(heading_text: str) -> list[list[str]]:
    text = _spec()
    start = text.index(heading_text)
    rows = []
    for line in text[start:].splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and separator


def spec_gateway_cases() -> dict[str, GatewayCase]:
    """SPEC.md's table of the errors the gateway makes itself, keyed by code."""
    rows = _table_rows("Statuses of the errors the gateway makes itself")
    cases = [GatewayCase(r[0], int(r[1]), ErrorClass(r[2].strip("`")), r[3].strip("`")) for r in rows]
    return {c.code: c for c in cases}


def spec_faults() -> dict[ErrorClass, str]:
    rows = _table_rows("| class | fault |")
    return {ErrorClass(r[0].strip("`")): r[1] for r in rows}


def spec_retryable() -> set[ErrorClass]:
    sentence = re.search(r"`retryable` is true\s+for (.*?)\:", _spec(), re.S)
    assert sentence is not None
    return {ErrorClass(name) for name in re.findall(r"`([a-z_]+)`", sentence.group(1))}


def check_problem_semantics(problem: dict[str, Any], status: int, request_id: str, upstream: str | None, attempts: int) -> None:
    """What SPEC.md says about each member, given what the client received."""
    error_class = ErrorClass(problem["class"])
    assert problem["type"] == f"urn:gateway:error:{error_class.value}"
    assert problem["status"] == status
    assert problem["retryable"] is (error_class in spec_retryable())
    assert problem["fault"] == spec_faults()[error_class]
    assert problem["upstream"] == upstream
    assert problem["attempts"] == attempts
    assert problem["request_id"] == request_id
    assert isinstance(problem["code"], str) and problem["code"]


def test_spec_tables_parse() -> None:
    assert len(spec_gateway_cases()) >= 10
    assert set(spec_faults()) == set(ErrorClass)
    assert ErrorClass.CIRCUIT_OPEN in spec_retryable() and ErrorClass.FUNCTION_ERROR not in spec_retryable()


# --- the renderer alone ------------------------------------------------------------------------

LAMBDA_NAME_BY_CLASS = {
    ErrorClass.RATE_LIMITED: "TooManyRequestsException",
    ErrorClass.NOT_FOUND: "ResourceNotFoundException",
}
YUANRONG_OWN_CODES = {400: 200400, 401: 200401, 403: 200403, 404: 200404, 413: 200413, 429: 200429}


def expected_lambda_name(case: GatewayCase) -> str:
    """The exception boto3 must raise for a gateway-made error (what real Lambda sends for it)."""
    if case.error_class in LAMBDA_NAME_BY_CLASS:
        return LAMBDA_NAME_BY_CLASS[case.error_class]
    if case.status == 413:
        return "RequestTooLargeException"
    return "InvalidRequestContentException" if case.status < 500 else "ServiceException"


@pytest.mark.parametrize("dialect", [*DIALECTS, None])
@pytest.mark.parametrize("code", sorted(spec_gateway_cases()))
def test_render_gateway_error(dialect: str | None, code: str) -> None:
    case = spec_gateway_cases()[code]
    outcome = Outcome(case.error_class, case.status, case.code, f"detail of {case.case}", 2.5 if case.status in (429, 503) else None, made_by_gateway=True)
    context = ProblemContext("up" if dialect else None, 0, "rid-1")
    rendered = render_gateway_error(dialect, outcome, context, [(b"retry-after", b"3")])
    headers = {k.decode(): v.decode() for k, v in rendered.headers}
    body = orjson.loads(rendered.body)
    assert rendered.status == case.status
    assert headers["retry-after"] == "3"
    problem = problem_of(headers["content-type"], rendered.body)
    check_problem_semantics(problem, case.status, "rid-1", context.upstream, 0)
    assert (problem["class"], problem["code"], problem["detail"]) == (case.error_class.value, case.code, f"detail of {case.case}")
    check_native_fields(dialect, headers, body, problem, case)


def check_native_fields(dialect: str | None, headers: dict[str, str], body: dict[str, Any], problem: dict[str, Any], case: GatewayCase) -> None:
    if dialect in (None, "http"):
        assert headers["content-type"] == PROBLEM_JSON and body == problem
        return
    assert headers["content-type"] == "application/json" and body["problem"] == problem
    if dialect == "liveperson":
        assert without_problem(body) == {"errorCode": problem["code"], "errorMsg": problem["detail"]}
    elif dialect == "lambda":
        name = expected_lambda_name(case)
        assert (headers["x-amzn-errortype"], body["__type"], body["message"]) == (name, name, problem["detail"])
        if case.error_class is ErrorClass.RATE_LIMITED:
            assert body["Reason"] and body["retryAfterSeconds"] == headers["retry-after"]
    else:
        inner = YUANRONG_OWN_CODES.get(case.status, 200400 if case.status < 500 else 150500)
        assert (body["code"], body["message"], headers["x-inner-code"]) == (inner, problem["detail"], str(inner))


@pytest.mark.parametrize("dialect", DIALECTS)
def test_render_upstream_error_keeps_native_fields(dialect: str) -> None:
    reply = DIALECT_REPLIES[dialect]("fail", b"")
    upstream_headers = [(k.lower().encode(), v.encode()) for k, v in reply.headers]
    native = orjson.loads(reply.body) if reply.body.startswith(b"{") else None
    outcome = Outcome(ErrorClass.FUNCTION_ERROR, reply.status, "c", "d")
    rendered = render_upstream_error(dialect, outcome, upstream_headers, native, ProblemContext("up", 1, "rid"))
    headers = {k.decode(): v.decode() for k, v in rendered.headers}
    problem = problem_of(headers["content-type"], rendered.body)
    check_problem_semantics(problem, reply.status, "rid", "up", 1)
    sent = {k.decode(): v.decode() for k, v in upstream_headers}
    for name in NATIVE_HEADERS[dialect]:
        assert headers.get(name) == sent.get(name), name
    if native is not None:
        assert without_problem(orjson.loads(rendered.body)) == native


def test_render_upstream_error_with_non_json_body_makes_a_fresh_envelope() -> None:
    outcome = Outcome(ErrorClass.SERVER_ERROR, 500, "http.500", "<html>oops</html>")
    rendered = render_upstream_error("liveperson", outcome, [(b"content-type", b"text/html"), (b"x-upstream", b"1")], None, ProblemContext("lp", 1, "r"))
    body = orjson.loads(rendered.body)
    headers = dict(rendered.headers)
    assert headers[b"content-type"] == b"application/json" and headers[b"x-upstream"] == b"1"
    assert without_problem(body) == {"errorCode": "http.500", "errorMsg": "<html>oops</html>"}
    assert_problem(body["problem"])


def test_type_base_is_configurable() -> None:
    outcome = Outcome(ErrorClass.NOT_FOUND, 404, "gateway.no_route", "x", made_by_gateway=True)
    rendered = render_gateway_error(None, outcome, ProblemContext(None, 0, "r", "https://errors.example.com/gateway#"))
    assert orjson.loads(rendered.body)["type"] == "https://errors.example.com/gateway#not_found"


# --- the running gateway -----------------------------------------------------------------------


def path_for(dialect: str, function: str, account: str = "acct-1") -> str:
    return ROUTES[dialect].replace("{account}", account).replace("{function}", function)


def config_text(upstreams: dict[str, tuple[str, str]], upstream_extra: str = "", top: str = "") -> str:
    """upstreams: name -> (dialect, url); every upstream gets the quick retry policy."""
    text = top + QUICK_RETRY + "upstreams:\n"
    for name, (dialect, url) in upstreams.items():
        text += upstream_config(name, url, dialect, [ROUTES[dialect]], retry="quick") + upstream_extra
    return text


@contextlib.asynccontextmanager
async def gateway_before(tmp_path: Path, dialect: str, url: str, upstream_extra: str = "", top: str = "") -> AsyncIterator[httpx.AsyncClient]:
    config = write_config(tmp_path, config_text({"up": (dialect, url)}, upstream_extra, top))
    async with running_gateway(config) as gateway, gateway.client() as client:
        yield client


def response_problem(response: httpx.Response) -> dict[str, Any]:
    return problem_of(response.headers.get("content-type"), response.content)


def upstream_calls(upstream: SimulatedUpstream, function: str) -> int:
    return upstream.count(f"/{function}")


# (dialect, simulator behaviour) -> the class of the simulated platform's answer
UPSTREAM_CLASSES = {
    **{(d, "fail"): ErrorClass.FUNCTION_ERROR for d in ("liveperson", "lambda", "yuanrong")},
    **{(d, "timeout"): ErrorClass.FUNCTION_TIMEOUT for d in ("liveperson", "lambda", "yuanrong")},
    **{(d, "missing"): ErrorClass.NOT_FOUND for d in DIALECTS},
    **{(d, "badinput"): ErrorClass.CLIENT_ERROR for d in DIALECTS},
    **{(d, "throttle"): ErrorClass.RATE_LIMITED for d in DIALECTS},
    **{(d, "crash"): ErrorClass.SERVER_ERROR for d in DIALECTS},
    **{(d, "down"): ErrorClass.UPSTREAM_UNAVAILABLE for d in DIALECTS},
    ("http", "fail"): ErrorClass.SERVER_ERROR,  # a plain HTTP upstream cannot say "the function failed"
    ("http", "timeout"): ErrorClass.UPSTREAM_TIMEOUT,
}


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_upstream_errors_through_the_gateway(tmp_path: Path, dialect: str) -> None:
    """Each behaviour of the simulated platform, directly and through the gateway."""
    async with simulated(dialect) as upstream, gateway_before(tmp_path, dialect, upstream.url) as client:
        for behaviour in BEHAVIOURS:
            direct = await _post(upstream.url + path_for(dialect, behaviour))
            before = upstream_calls(upstream, behaviour)
            response = await client.post(path_for(dialect, behaviour), content=b'{"x": 1}', headers={"X-Request-ID": f"req-{behaviour}"})
            attempts = upstream_calls(upstream, behaviour) - before
            check_upstream_error(dialect, behaviour, direct, response, attempts)


def check_upstream_error(dialect: str, behaviour: str, direct: httpx.Response, response: httpx.Response, attempts: int) -> None:
    assert response.status_code == direct.status_code == DIALECT_REPLIES[dialect](behaviour, b"").status, behaviour
    problem = response_problem(response)
    assert problem["class"] == UPSTREAM_CLASSES[(dialect, behaviour)].value, behaviour
    check_problem_semantics(problem, response.status_code, f"req-{behaviour}", "up", attempts)
    assert response.headers["x-request-id"] == f"req-{behaviour}"
    for name in NATIVE_HEADERS[dialect]:
        assert response.headers.get(name) == direct.headers.get(name), (behaviour, name)
    if dialect == "http":
        assert problem["detail"] == direct.text and problem["code"] == f"http.{direct.status_code}"
    else:
        assert without_problem(response.json()) == direct.json(), behaviour
    if not problem["retryable"]:
        assert attempts == 1, behaviour


async def _post(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(url, content=b'{"x": 1}')


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_success_passes_untouched(tmp_path: Path, dialect: str) -> None:
    body = b"\x00not json at all " + os.urandom(200_000)
    async with simulated(dialect) as upstream, gateway_before(tmp_path, dialect, upstream.url) as client:
        upstream.script(Reply(200, body, (("Content-Type", "application/json"), ("X-Inner-Code", "0"))))
        response = await client.post(path_for(dialect, "ok"), content=b"{}")
    assert response.status_code == 200 and response.content == body
    assert response.headers["content-type"] == "application/json"


async def test_lambda_success_mentioning_an_error_is_not_rewritten(tmp_path: Path) -> None:
    body = b'{"errorMessage": "Task timed out after 3.00 seconds", "errorType": "Error"}'
    async with simulated("lambda") as upstream, gateway_before(tmp_path, "lambda", upstream.url) as client:
        upstream.script(Reply(200, body, (("Content-Type", "application/json"),)))
        response = await client.post(path_for("lambda", "ok"), content=b"{}")
    assert (response.status_code, response.content) == (200, body)


# Error bodies the gateway cannot read: classified from status and headers, answered in a fresh
# envelope on dialect routes (the upstream's status and headers stay).
UNREADABLE = [
    ("liveperson", Reply(500, b"<html>Internal Server Error</html>", (("Content-Type", "text/html"),)), ErrorClass.SERVER_ERROR),
    ("liveperson", Reply(901, b'{"errorCode": "com.liveperson.faas.handler.custom-failure", "errorMsg": ', (("Content-Type", "application/json"),)), ErrorClass.FUNCTION_ERROR),
    ("liveperson", Reply.json(500, {"errorCode": "com.liveperson.faas.es.badinput", "pad": "x" * 70_000}), ErrorClass.SERVER_ERROR),
    ("lambda", Reply(200, b"not json", (("X-Amz-Function-Error", "Unhandled"),)), ErrorClass.FUNCTION_ERROR),
    ("lambda", Reply.json(429, {"message": "slow", "pad": "x" * 70_000}), ErrorClass.RATE_LIMITED),
    ("yuanrong", Reply(500, b"\xff\xfe binary", (("X-Inner-Code", "1005"),)), ErrorClass.RATE_LIMITED),
    ("yuanrong", Reply.json(500, {"code": 2002, "pad": "x" * 70_000}, ("X-Inner-Code", "4115")), ErrorClass.NOT_FOUND),
    ("http", Reply(502, b"y" * 100_000, (("Content-Type", "text/plain"),)), ErrorClass.UPSTREAM_UNAVAILABLE),
]


@pytest.mark.parametrize(("dialect", "reply", "expected"), UNREADABLE, ids=[f"{d}-{r.status}-{len(r.body)}" for d, r, _ in UNREADABLE])
async def test_unreadable_error_body(tmp_path: Path, dialect: str, reply: Reply, expected: ErrorClass) -> None:
    async with simulated(dialect) as upstream, gateway_before(tmp_path, dialect, upstream.url) as client:
        upstream.script(*[reply] * 2)
        response = await client.post(path_for(dialect, "scripted"), content=b"{}")
        attempts = upstream.count("/scripted")
    assert response.status_code == reply.status
    problem = response_problem(response)
    check_problem_semantics(problem, reply.status, response.headers["x-request-id"], "up", attempts)
    assert problem["class"] == expected.value
    assert 0 < len(problem["detail"]) <= 1024
    assert len(response.content) < 4096
    for name, value in reply.headers:
        if name.lower() != "content-type":
            assert response.headers.get(name) == value


# --- gateway-made errors, per dialect ------------------------------------------------------------


async def _check_gateway_made(response: httpx.Response, dialect: str | None, code: str, attempts: int, upstream: str | None = "up") -> dict[str, Any]:
    case = spec_gateway_cases()[code]
    assert response.status_code == case.status
    problem = response_problem(response)
    check_problem_semantics(problem, case.status, response.headers["x-request-id"], upstream, attempts)
    assert (problem["class"], problem["code"]) == (case.error_class.value, code)
    headers = {k.lower(): v for k, v in response.headers.items()}
    check_native_fields(dialect, headers, response.json(), problem, case)
    return problem


async def test_no_route(tmp_path: Path) -> None:
    async with gateway_before(tmp_path, "liveperson", "http://127.0.0.1:9") as client:
        response = await client.post("/nowhere/at/all", content=b"{}", headers={"X-Request-ID": "x" * 201})
    problem = await _check_gateway_made(response, None, "gateway.no_route", 0, upstream=None)
    assert len(problem["request_id"]) <= 200 and problem["request_id"] != "x" * 201


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_bad_request(tmp_path: Path, dialect: str) -> None:
    async with simulated(dialect) as upstream, gateway_before(tmp_path, dialect, upstream.url) as client:
        response = await client.post(path_for(dialect, "a%2Fb"), content=b"{}")
        assert upstream.calls == []
    await _check_gateway_made(response, dialect, "gateway.bad_request", 0)


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_body_too_large(tmp_path: Path, dialect: str) -> None:
    async with simulated(dialect) as upstream, gateway_before(tmp_path, dialect, upstream.url, top="server: {max_body_bytes: 1024}\n") as client:
        response = await client.post(path_for(dialect, "ok"), content=b"x" * 2048)
        assert upstream.calls == []
    await _check_gateway_made(response, dialect, "gateway.body_too_large", 0)


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_rate_limited(tmp_path: Path, dialect: str) -> None:
    top = "rate_limits:\n  default: {rate: 1, per_s: 60, burst: 1}\n"
    async with simulated(dialect) as upstream, gateway_before(tmp_path, dialect, upstream.url, top=top) as client:
        first = await client.post(path_for(dialect, "ok"), content=b"{}")
        response = await client.post(path_for(dialect, "ok"), content=b"{}")
        assert upstream.count() == 1
    assert first.status_code == 200
    await _check_gateway_made(response, dialect, "gateway.rate_limited", 0)
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["ratelimit-policy"] and response.headers["ratelimit"]


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_circuit_open(tmp_path: Path, dialect: str) -> None:
    top = "breaker_policies:\n  touchy: {fail_max: 1, reset_timeout_s: 30}\n"
    async with simulated(dialect) as upstream, gateway_before(tmp_path, dialect, upstream.url, "    breaker: touchy\n", top) as client:
        tripping = await client.post(path_for(dialect, "down"), content=b"{}")
        response = await client.post(path_for(dialect, "down"), content=b"{}")
        assert upstream.count("/down") == 1
    assert response_problem(tripping)["attempts"] == 1
    await _check_gateway_made(response, dialect, "gateway.circuit_open", 0)
    assert 1 <= int(response.headers["retry-after"]) <= 30


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_upstream_refused(tmp_path: Path, dialect: str) -> None:
    async with gateway_before(tmp_path, dialect, f"http://127.0.0.1:{free_port()}") as client:
        response = await client.post(path_for(dialect, "ok"), content=b"{}")
    await _check_gateway_made(response, dialect, "gateway.upstream_unavailable", 2)


@contextlib.asynccontextmanager
async def resetting_server() -> AsyncIterator[str]:
    """Reads the request, then drops the connection without an answer."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_upstream_reset(tmp_path: Path, dialect: str) -> None:
    async with resetting_server() as url, gateway_before(tmp_path, dialect, url) as client:
        response = await client.post(path_for(dialect, "ok"), content=b"{}")
    await _check_gateway_made(response, dialect, "gateway.upstream_unavailable", 2)


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_upstream_timeout(tmp_path: Path, dialect: str) -> None:
    extra = "    timeouts: {connect_s: 1.0, per_try_s: 0.2, total_s: 5.0}\n"
    async with simulated(dialect) as upstream, gateway_before(tmp_path, dialect, upstream.url, extra) as client:
        response = await client.post(path_for(dialect, "slow") + "?delay=0.5", content=b"{}")
        assert upstream.count("/slow") == 2
    await _check_gateway_made(response, dialect, "gateway.upstream_timeout", 2)


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_gateway_internal_error(tmp_path: Path, dialect: str) -> None:
    config = write_config(tmp_path, config_text({"up": (dialect, "http://127.0.0.1:9")}))
    async with running_gateway(config) as gateway, gateway.client() as client:
        runtime = gateway.app.runtime
        assert runtime is not None

        async def broken_send(*_args: Any, **_kwargs: Any) -> None:
            raise RuntimeError("a bug in the gateway")

        runtime.upstream.send = broken_send  # type: ignore[method-assign]
        response = await client.post(path_for(dialect, "ok"), content=b"{}")
    problem = await _check_gateway_made(response, dialect, "gateway.internal", 1)
    assert "a bug" not in response.text  # internals stay in the log


async def test_type_base_from_configuration(tmp_path: Path) -> None:
    top = "server: {error_type_base: 'https://errors.example.com/gateway#'}\n"
    async with gateway_before(tmp_path, "http", "http://127.0.0.1:9", top=top) as client:
        response = await client.get("/nowhere")
    assert response.json()["type"] == "https://errors.example.com/gateway#not_found"
