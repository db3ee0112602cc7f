"""Classification of every upstream signal, dialect by dialect (SPEC.md "Error classes").

The tables below name the class of every code in `shared/seeds/` and of the codes that
`shared/DIALECTS.md` adds. The seed files are parsed here: a code found in them without an
entry in these tables fails `test_every_seed_code_has_an_expectation`, so a new seed can
never be classified by accident.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import botocore.session
import orjson
import pytest

from gateway.classify import (
    ERROR_BODY_LIMIT,
    CompiledPack,
    TransportFailure,
    classify_response,
    classify_transport,
    compile_pack,
    needs_inspection,
    parse_error_body,
    parse_retry_after,
)
from gateway.outcomes import ErrorClass, Outcome, traits_of
from gateway.policies import Rule, load_policy_folder, shipped_policies_dir
from gateway.yamlsource import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared"
SEEDS = SHARED / "seeds"
DIALECTS_MD = SHARED / "DIALECTS.md"
NOW = 1_700_000_000.0

CLIENT = ErrorClass.CLIENT_ERROR
AUTH = ErrorClass.AUTH_ERROR
NOT_FOUND = ErrorClass.NOT_FOUND
RATE = ErrorClass.RATE_LIMITED
FUNC = ErrorClass.FUNCTION_ERROR
FUNC_TIMEOUT = ErrorClass.FUNCTION_TIMEOUT
UNAVAILABLE = ErrorClass.UPSTREAM_UNAVAILABLE
TIMEOUT = ErrorClass.UPSTREAM_TIMEOUT
SERVER = ErrorClass.SERVER_ERROR

# --- expectations --------------------------------------------------------------------------

# LivePerson V1/V2 codes -> (the status they usually arrive with, class). The code decides the
# class; it is checked at that status and at a bare 500, where nothing but the code can decide.
LIVEPERSON_CODES: dict[str, tuple[int, ErrorClass]] = {
    "com.liveperson.faas.es.general": (500, SERVER),
    "com.liveperson.faas.es.unavailable": (503, UNAVAILABLE),
    "com.liveperson.faas.es.badinput": (400, CLIENT),
    "com.liveperson.faas.es.notdeployed": (404, NOT_FOUND),
    "com.liveperson.faas.es.missinglambda": (404, NOT_FOUND),
    "com.liveperson.faas.handler.custom-failure": (901, FUNC),
    "com.liveperson.faas.handler.runtime-exception": (901, FUNC),
    "com.liveperson.faas.handler.executiontime-exceeded": (901, FUNC_TIMEOUT),
    "com.liveperson.faas.handler.log-limit-reached": (901, FUNC),
    "com.liveperson.faas.fm.general": (500, SERVER),
    "com.liveperson.faas.fm.unavailable": (502, UNAVAILABLE),
    # V2 bodies ({"code", "message"}), DIALECTS.md
    "com.customer.faas.function.threw-error": (901, FUNC),
    "com.customer.faas.function.js-runtime-error": (901, FUNC),
    "com.customer.faas.function.execution-exceeded": (901, FUNC_TIMEOUT),
    "com.liveperson.faas.function.not-found": (404, NOT_FOUND),
}
LIVEPERSON_V2_CODES = {c for c in LIVEPERSON_CODES if c.startswith("com.customer.") or ".function." in c}

# LivePerson HTTP statuses (seed 001), body-less: None is a success.
LIVEPERSON_STATUSES: dict[int, ErrorClass | None] = {
    200: None, 202: None, 400: CLIENT, 401: AUTH, 403: AUTH, 404: NOT_FOUND, 405: CLIENT,
    408: TIMEOUT, 429: RATE, 500: SERVER, 502: UNAVAILABLE, 503: UNAVAILABLE, 504: TIMEOUT, 901: FUNC,
}

# Lambda / Stedi service error names -> class at the status the Lambda API sends them with
# (botocore's service model; names it does not model carry their status here).
LAMBDA_NAMES: dict[str, ErrorClass] = {
    "InvalidParameterValueException": CLIENT,
    "InvalidRequestContentException": CLIENT,
    "RequestTooLargeException": CLIENT,
    "SerializedRequestEntityTooLargeException": CLIENT,
    "UnsupportedMediaTypeException": CLIENT,
    "NoPublishedVersionException": CLIENT,
    "ModeNotSupportedException": CLIENT,
    "RecursiveInvocationException": CLIENT,
    "ServiceQuotaExceededException": CLIENT,
    "ResourceConflictException": CLIENT,
    "RuntimeAliasDeletedException": CLIENT,
    "RuntimeVersionDeletedException": CLIENT,
    "CodeArtifactUserDeletedException": CLIENT,
    "CodeArtifactUserPendingException": CLIENT,
    "CodeArtifactUserFailedException": CLIENT,
    "SnapStartRegenerationFailureException": CLIENT,
    "DurableExecutionAlreadyStartedException": CLIENT,
    "SnapStartException": FUNC,  # the function's own afterRestore() hook failed
    "SnapStartNotReadyException": UNAVAILABLE,
    "AccessDeniedException": AUTH,
    "EFSMountFailureException": AUTH,
    "S3FilesMountFailureException": AUTH,
    "ResourceNotFoundException": NOT_FOUND,
    "TooManyRequestsException": RATE,
    "ServiceException": SERVER,
    "ServiceUnavailableException": UNAVAILABLE,
    "ResourceNotReadyException": UNAVAILABLE,
    "EC2ThrottledException": UNAVAILABLE,
    "EC2UnexpectedException": UNAVAILABLE,
    "EC2AccessDeniedException": UNAVAILABLE,
    "ENILimitReachedException": UNAVAILABLE,
    "ENINotReadyException": UNAVAILABLE,
    "SubnetIPAddressLimitReachedException": UNAVAILABLE,
    "InvalidSubnetIDException": UNAVAILABLE,
    "InvalidSecurityGroupIDException": UNAVAILABLE,
    "InvalidZipFileException": UNAVAILABLE,
    "InvalidRuntimeException": UNAVAILABLE,
    "KMSAccessDeniedException": UNAVAILABLE,
    "KMSDisabledException": UNAVAILABLE,
    "KMSInvalidStateException": UNAVAILABLE,
    "KMSNotFoundException": UNAVAILABLE,
    "EFSIOException": UNAVAILABLE,
    "EFSMountConnectivityException": TIMEOUT,
    "EFSMountTimeoutException": TIMEOUT,
    "S3FilesMountConnectivityException": TIMEOUT,
    "S3FilesMountTimeoutException": TIMEOUT,
    "SnapStartTimeoutException": TIMEOUT,
}
LAMBDA_UNMODELLED_STATUS = {"AccessDeniedException": 403, "ServiceUnavailableException": 503}

# Function-failure headers on a 200 (Lambda, Stedi REST) and their values.
LAMBDA_FUNCTION_HEADERS = ("X-Amz-Function-Error", "x-stedi-invocationerror")
LAMBDA_FUNCTION_ERROR_VALUES = {"Unhandled": FUNC, "Handled": FUNC}
LAMBDA_TIMEOUT_PHRASE = "Task timed out"

# openYuanrong inner codes (SDK 1001-9000, REST 4037-330404, DIALECTS.md extras) -> class.
# They are checked on the HTTP 500 that almost all of them arrive with.
YUANRONG_CODES: dict[int, ErrorClass] = {
    # SDK codes
    1001: CLIENT, 1002: UNAVAILABLE, 1003: UNAVAILABLE, 1004: CLIENT, 1005: RATE, 1006: CLIENT,
    1007: FUNC, 1008: CLIENT, 1009: SERVER, 1010: CLIENT, 1011: CLIENT, 1012: RATE, 1013: UNAVAILABLE,
    1014: AUTH, 1015: NOT_FOUND, 1016: SERVER, 1017: UNAVAILABLE,
    2001: FUNC, 2002: FUNC,
    3001: UNAVAILABLE, 3002: UNAVAILABLE, 3003: SERVER, 3004: SERVER, 3005: SERVER, 3006: SERVER,
    3007: SERVER, 3008: SERVER, 3009: SERVER, 3010: SERVER, 3011: SERVER, 3012: SERVER,
    3013: SERVER, 3014: SERVER,
    4001: FUNC, 4002: FUNC, 4003: SERVER, 4004: NOT_FOUND, 4005: TIMEOUT, 4006: CLIENT,
    4007: CLIENT, 4008: CLIENT, 4009: CLIENT, 4010: FUNC_TIMEOUT, 4021: RATE,
    4201: SERVER, 4202: SERVER, 4203: SERVER, 4204: SERVER, 4205: SERVER, 4299: SERVER,
    4306: CLIENT, 9000: FUNC,
    # REST API codes
    4037: CLIENT, 4101: CLIENT, 4102: CLIENT, 4103: CLIENT, 4104: CLIENT, 4105: CLIENT,
    4106: CLIENT, 4107: CLIENT, 4108: CLIENT, 4109: CLIENT, 4110: CLIENT, 4111: CLIENT,
    4112: CLIENT, 4113: NOT_FOUND, 4114: CLIENT, 4115: NOT_FOUND, 4116: NOT_FOUND,
    4117: NOT_FOUND, 4118: NOT_FOUND, 4119: NOT_FOUND, 4120: NOT_FOUND, 4123: CLIENT,
    4124: CLIENT, 4125: CLIENT, 4126: CLIENT, 4127: CLIENT, 4128: CLIENT, 4129: CLIENT,
    4130: CLIENT, 4134: CLIENT,
    121016: SERVER, 121017: SERVER, 121018: CLIENT, 121019: TIMEOUT, 121026: NOT_FOUND,
    121029: CLIENT, 121030: SERVER, 121032: SERVER, 121036: CLIENT, 121046: CLIENT,
    121047: CLIENT, 121048: CLIENT, 121049: AUTH, 121052: CLIENT, 121057: NOT_FOUND,
    121058: CLIENT,
    122001: NOT_FOUND, 122002: SERVER, 122003: SERVER, 122004: SERVER, 122005: SERVER,
    122006: CLIENT, 122007: CLIENT, 122008: CLIENT, 122009: NOT_FOUND,
    130600: CLIENT, 150424: NOT_FOUND, 150444: NOT_FOUND, 150500: SERVER, 214503: RATE,
    330404: UNAVAILABLE,
    # the frontend's own status mappings (they arrive with that status, not 500)
    200400: CLIENT, 200401: AUTH, 200403: AUTH, 200404: NOT_FOUND, 200413: CLIENT, 200429: RATE,
}
YUANRONG_OWN_STATUS = {200400: 400, 200401: 401, 200403: 403, 200404: 404, 200413: 413, 200429: 429}

HTTP_STATUSES: dict[int, ErrorClass | None] = {
    200: None, 204: None, 301: None, 400: CLIENT, 401: AUTH, 403: AUTH, 404: NOT_FOUND,
    405: CLIENT, 408: TIMEOUT, 409: CLIENT, 413: CLIENT, 415: CLIENT, 422: CLIENT, 429: RATE,
    499: CLIENT, 500: SERVER, 501: SERVER, 502: UNAVAILABLE, 503: UNAVAILABLE, 504: TIMEOUT,
    599: SERVER,
}


# --- the seeds, parsed -----------------------------------------------------------------------


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _seed(prefix: str) -> str:
    (path,) = SEEDS.glob(f"{prefix}_*.txt")
    return _read(path)


def _dialects_section(title: str) -> str:
    text = _read(DIALECTS_MD)
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def seed_liveperson_codes() -> set[str]:
    """Every `com.liveperson.faas.*` code in seeds 000/001, and the V2 codes of DIALECTS.md."""
    found = set()
    for prefix in ("000", "001"):
        found |= set(re.findall(r"com\.liveperson\.faas\.[a-z]+\.[a-z-]+", _seed(prefix)))
    v2_bullet = re.search(r"^- V2 error body.*?(?=^- |^$)", _dialects_section("LivePerson"), re.M | re.S)
    assert v2_bullet is not None, "DIALECTS.md lost its V2 error body bullet"
    for token in re.findall(r"`((?:com\.[a-z]+\.faas\.|…)[a-z.-]+)`", v2_bullet.group(0)):
        found.add(token.replace("…", "com.customer.faas.", 1))
    return found


def seed_liveperson_statuses() -> set[int]:
    table = _seed("001").split("### HTTP Response Codes", 1)[1]
    return {int(code) for row in re.findall(r"^\|\s*([\d,\s]+?)\s*\|", table, re.M) for code in row.split(",")}


def seed_lambda_names() -> set[str]:
    """Service error names in the Stedi seed and in DIALECTS.md's Lambda section."""
    text = _seed("002") + _dialects_section("AWS Lambda")
    return set(re.findall(r"\b([A-Z][A-Za-z0-9]*Exception)\b", text))


def seed_lambda_name_families() -> set[str]:
    """Name families DIALECTS.md gives by prefix only (`EC2…`, `KMS…`...)."""
    return set(re.findall(r"`([A-Z][A-Za-z0-9]*)…`", _dialects_section("AWS Lambda")))


def seed_lambda_function_error_values() -> set[str]:
    text = _seed("002") + _dialects_section("AWS Lambda")
    values = set(re.findall(r'"error": "(\w+)"', text))
    values |= set(re.findall(r"X-Amz-Function-Error: (\w+)`(?: \(or `(\w+)`\))?", text)[0])
    return values - {""}


def seed_yuanrong_codes() -> set[int]:
    """SDK and REST codes of seed 004 (one per line) and the inner codes named in DIALECTS.md."""
    codes = {int(line) for line in _seed("004").splitlines() if re.fullmatch(r"\d{4,6}", line.strip())}
    codes |= {int(n) for n in re.findall(r"\b(\d{4,6})\b", _dialects_section("openYuanrong"))}
    return codes


def botocore_invoke_statuses() -> dict[str, int]:
    """Lambda Invoke's modelled errors and their HTTP statuses, from botocore's service model."""
    operation = botocore.session.get_session().get_service_model("lambda").operation_model("Invoke")
    return {shape.name: shape.metadata["error"]["httpStatusCode"] for shape in operation.error_shapes}


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packs() -> dict[str, CompiledPack]:
    library = load_policy_folder(shipped_policies_dir())
    return {name: compile_pack(pack) for name, pack in library.packs.items()}


def classify(pack: CompiledPack, status: int, headers: Mapping[str, str] | None = None, body: Any = None, raw: bytes | None = None) -> Outcome:
    """Classify as the pipeline does: raw bytes parsed (bounded) when no parsed body is given."""
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    if body is None and raw is not None:
        body = parse_error_body(raw)
    if raw is None and body is not None:
        raw = orjson.dumps(body)
    return classify_response(pack, status, lowered, body, raw, NOW)


def lambda_status_of(name: str) -> int:
    return botocore_invoke_statuses().get(name) or LAMBDA_UNMODELLED_STATUS[name]


# --- every seed code has an expectation -------------------------------------------------------


def test_every_seed_code_has_an_expectation() -> None:
    missing = {
        "liveperson codes": seed_liveperson_codes() - set(LIVEPERSON_CODES),
        "liveperson statuses": seed_liveperson_statuses() - set(LIVEPERSON_STATUSES),
        "lambda names": seed_lambda_names() - set(LAMBDA_NAMES),
        "lambda function-error values": seed_lambda_function_error_values() - set(LAMBDA_FUNCTION_ERROR_VALUES),
        "yuanrong codes": seed_yuanrong_codes() - set(YUANRONG_CODES),
    }
    assert not any(missing.values()), f"seed codes without an expected class: {missing}"


def test_seed_parsers_find_the_documented_tables() -> None:
    """Guards the parsers themselves: each finds the sizes the seed files actually hold."""
    assert len(seed_liveperson_codes()) == 15
    assert seed_liveperson_statuses() == {200, 202, 400, 401, 403, 404, 405, 408, 429, 500, 502, 504, 901}
    assert {"TooManyRequestsException", "ResourceNotFoundException", "ServiceException"} <= seed_lambda_names()
    assert seed_lambda_name_families() == {"EC2", "ENI", "Subnet", "KMS", "InvalidRuntime"}
    assert seed_lambda_function_error_values() == {"Unhandled", "Handled"}
    sdk, rest = _seed("004").split("REST API Error Codes", 1)
    assert len(re.findall(r"^\d{4}$", sdk, re.M)) == 49
    assert len(re.findall(r"^\d{4,6}$", rest, re.M)) == 60
    assert {1005, 4010, 4021, 214503, 200429, 1009} <= seed_yuanrong_codes()


def test_every_lambda_name_family_is_covered() -> None:
    for family in seed_lambda_name_families():
        members = [n for n in LAMBDA_NAMES if n.startswith(family)]
        assert members, f"no {family}… name in the table"
        assert all(lambda_status_of(n) == 502 for n in members if n.startswith(("EC2", "ENI", "Subnet", "KMS")))


# --- LivePerson ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(LIVEPERSON_CODES))
def test_liveperson_code(packs: dict[str, CompiledPack], code: str) -> None:
    status, expected = LIVEPERSON_CODES[code]
    body = {"code": code, "message": "m"} if code in LIVEPERSON_V2_CODES else {"errorCode": code, "errorMsg": "m"}
    for at_status in (status, 500):
        outcome = classify(packs["liveperson"], at_status, {"Content-Type": "application/json"}, body)
        assert (outcome.error_class, outcome.code, outcome.detail) == (expected, code, "m"), at_status


@pytest.mark.parametrize("status", sorted(LIVEPERSON_STATUSES))
def test_liveperson_status(packs: dict[str, CompiledPack], status: int) -> None:
    outcome = classify(packs["liveperson"], status)
    assert outcome.error_class is LIVEPERSON_STATUSES[status]
    if outcome.error_class is not None:
        assert outcome.code == f"http.{status}"


def test_liveperson_function_error_on_a_5xx_stays_a_function_error(packs: dict[str, CompiledPack]) -> None:
    """The function ran: a handler code wins over any status (the Node client agrees)."""
    body = {"errorCode": "com.liveperson.faas.handler.runtime-exception", "errorMsg": "x is undefined"}
    for status in (500, 502, 503, 504, 429):
        assert classify(packs["liveperson"], status, body=body).error_class is FUNC


# --- Lambda / Stedi --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAMBDA_NAMES))
def test_lambda_service_error_name(packs: dict[str, CompiledPack], name: str) -> None:
    status = lambda_status_of(name)
    expected = LAMBDA_NAMES[name]
    by_header = classify(packs["lambda"], status, {"X-Amzn-ErrorType": f"{name}:http://internal.amazon.com/coral/com.amazonaws.lambda/"}, {"Type": "User", "message": "m"})
    by_body = classify(packs["lambda"], status, {}, {"__type": f"com.amazonaws.lambda#{name}", "Message": "m"})
    for outcome in (by_header, by_body):
        assert (outcome.error_class, outcome.code, outcome.detail) == (expected, name, "m")


def test_botocore_invoke_errors_are_all_in_the_table() -> None:
    """boto3 raises these from Invoke; each has a decided class (fails when botocore adds one)."""
    assert set(botocore_invoke_statuses()) - set(LAMBDA_NAMES) == set()


@pytest.mark.parametrize("header", LAMBDA_FUNCTION_HEADERS)
@pytest.mark.parametrize("value", sorted(LAMBDA_FUNCTION_ERROR_VALUES))
def test_lambda_function_error_header(packs: dict[str, CompiledPack], header: str, value: str) -> None:
    body = {"errorType": "Error", "errorMessage": "Unhandled exception!", "trace": ["Error: Unhandled exception!"]}
    assert needs_inspection(packs["lambda"], 200, [(header.lower().encode(), value.encode())])
    outcome = classify(packs["lambda"], 200, {header: value}, body)
    assert (outcome.error_class, outcome.status, outcome.code, outcome.detail) == (LAMBDA_FUNCTION_ERROR_VALUES[value], 200, value, "Unhandled exception!")


@pytest.mark.parametrize("header", LAMBDA_FUNCTION_HEADERS)
def test_lambda_task_timed_out(packs: dict[str, CompiledPack], header: str) -> None:
    body = {"errorMessage": f"2024-01-01T00:00:00.000Z 1c2d {LAMBDA_TIMEOUT_PHRASE} after 3.01 seconds"}
    outcome = classify(packs["lambda"], 200, {header: "Unhandled"}, body)
    assert outcome.error_class is FUNC_TIMEOUT
    assert "Task timed out" in (outcome.detail or "")


def test_lambda_task_timed_out_without_the_header_is_a_success(packs: dict[str, CompiledPack]) -> None:
    """The function's own output may mention the phrase; only the header marks a failure."""
    assert classify(packs["lambda"], 200, {}, {"errorMessage": "Task timed out after 3.01 seconds"}).is_success


def test_lambda_throttle_carries_its_retry_hint(packs: dict[str, CompiledPack]) -> None:
    body = {"Type": "User", "message": "Rate Exceeded.", "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded", "retryAfterSeconds": "2"}
    outcome = classify(packs["lambda"], 429, {"X-Amzn-ErrorType": "TooManyRequestsException"}, body)
    assert (outcome.error_class, outcome.retry_after_s) == (RATE, 2.0)
    with_header = classify(packs["lambda"], 429, {"X-Amzn-ErrorType": "TooManyRequestsException", "Retry-After": "3"}, body)
    assert with_header.retry_after_s == 3.0


# --- openYuanrong ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(YUANRONG_CODES))
def test_yuanrong_code(packs: dict[str, CompiledPack], code: int) -> None:
    """By the body's code alone, by X-Inner-Code alone (body not JSON), and both together."""
    status = YUANRONG_OWN_STATUS.get(code, 500)
    expected = YUANRONG_CODES[code]
    body = {"code": code, "message": "m", "trace_id": "t"}
    by_body = classify(packs["yuanrong"], status, {}, body)
    by_header = classify(packs["yuanrong"], status, {"X-Inner-Code": str(code)}, raw=b"<html>upstream error</html>")
    both = classify(packs["yuanrong"], status, {"X-Inner-Code": str(code)}, body)
    for outcome in (by_body, by_header, both):
        assert (outcome.error_class, outcome.code) == (expected, str(code))


def test_yuanrong_body_code_wins_over_the_header(packs: dict[str, CompiledPack]) -> None:
    outcome = classify(packs["yuanrong"], 500, {"X-Inner-Code": "3003"}, {"code": 1005, "message": "request limit reached"})
    assert (outcome.error_class, outcome.code) == (RATE, "1005")


def test_yuanrong_500_without_a_code_is_a_server_error(packs: dict[str, CompiledPack]) -> None:
    assert classify(packs["yuanrong"], 500, raw=b"oops").error_class is SERVER
    assert classify(packs["yuanrong"], 500, body={"message": "no code"}).error_class is SERVER


def test_yuanrong_json_message_becomes_text_detail(packs: dict[str, CompiledPack]) -> None:
    outcome = classify(packs["yuanrong"], 500, {}, {"code": 2002, "message": {"error": "ValueError", "line": 3}})
    assert outcome.error_class is FUNC
    assert orjson.loads(outcome.detail or "") == {"error": "ValueError", "line": 3}


# --- plain HTTP ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(HTTP_STATUSES))
def test_http_status(packs: dict[str, CompiledPack], status: int) -> None:
    outcome = classify(packs["http"], status, {"Content-Type": "text/plain"}, raw=b"whatever")
    assert outcome.error_class is HTTP_STATUSES[status]


def test_http_ignores_bodies_that_look_like_other_dialects(packs: dict[str, CompiledPack]) -> None:
    body = {"errorCode": "com.liveperson.faas.handler.custom-failure", "code": 1005, "__type": "TooManyRequestsException"}
    assert classify(packs["http"], 500, {}, body).error_class is SERVER


# --- bounded parsing: malformed, non-JSON and huge error bodies -------------------------------

# (dialect, status, headers, what would have decided otherwise, class from what is left)
UNREADABLE_CASES = [
    ("liveperson", 500, {}, SERVER),
    ("liveperson", 901, {}, FUNC),
    ("liveperson", 404, {}, NOT_FOUND),
    ("liveperson", 429, {}, RATE),
    ("lambda", 429, {}, RATE),
    ("lambda", 500, {}, SERVER),
    ("lambda", 200, {"X-Amz-Function-Error": "Unhandled"}, FUNC),
    ("lambda", 400, {"X-Amzn-ErrorType": "InvalidRequestContentException"}, CLIENT),
    ("yuanrong", 500, {}, SERVER),
    ("yuanrong", 500, {"X-Inner-Code": "1005"}, RATE),
    ("http", 503, {}, UNAVAILABLE),
]
UNREADABLE_BODIES = {
    "truncated JSON": b'{"errorCode": "com.liveperson.faas.es.badinput", "code": 4115, "__type": "ResourceNotFoundException"',
    "HTML": b"<html><body><h1>502 Bad Gateway</h1></body></html>",
    "binary": bytes(range(256)),
    "JSON array": b'["com.liveperson.faas.es.badinput", 4115]',
    "JSON string": b'"com.liveperson.faas.es.badinput"',
    "empty": b"",
    "huge JSON": orjson.dumps({"errorCode": "com.liveperson.faas.es.badinput", "code": 4115, "__type": "ResourceNotFoundException", "pad": "x" * ERROR_BODY_LIMIT}),
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE_BODIES))
@pytest.mark.parametrize(("dialect", "status", "headers", "expected"), UNREADABLE_CASES)
def test_unreadable_error_body_is_classified_from_status_and_headers(
    packs: dict[str, CompiledPack], kind: str, dialect: str, status: int, headers: dict[str, str], expected: ErrorClass
) -> None:
    raw = UNREADABLE_BODIES[kind]
    outcome = classify(packs[dialect], status, headers, raw=raw)
    assert outcome.error_class is expected
    assert outcome.detail and len(outcome.detail) <= 1024


def test_huge_body_is_not_parsed() -> None:
    assert parse_error_body(b"{" + b" " * ERROR_BODY_LIMIT + b"}") is None
    assert parse_error_body(b"{" + b" " * (ERROR_BODY_LIMIT - 2) + b"}") == {}


def test_non_json_body_is_kept_as_bounded_detail(packs: dict[str, CompiledPack]) -> None:
    outcome = classify(packs["http"], 502, raw=b"  upstream says no \n" + b"y" * 5000)
    assert outcome.detail is not None and outcome.detail.startswith("upstream says no")
    assert 1000 < len(outcome.detail) <= 1024


# --- success bodies are never parsed ---------------------------------------------------------


@pytest.mark.parametrize("dialect", ["liveperson", "lambda", "yuanrong", "http"])
@pytest.mark.parametrize("status", [200, 201, 202, 204, 301, 304])
def test_success_is_not_inspected(packs: dict[str, CompiledPack], dialect: str, status: int) -> None:
    headers = [(b"content-type", b"application/json"), (b"x-inner-code", b"0"), (b"x-amz-executed-version", b"$LATEST")]
    assert needs_inspection(packs[dialect], status, headers) is False


@pytest.mark.parametrize("dialect", ["liveperson", "lambda", "yuanrong", "http"])
@pytest.mark.parametrize("status", [400, 404, 429, 500, 502, 599])
def test_errors_are_inspected(packs: dict[str, CompiledPack], dialect: str, status: int) -> None:
    assert needs_inspection(packs[dialect], status, []) is True


def test_901_is_inspected_only_where_a_rule_names_it(packs: dict[str, CompiledPack]) -> None:
    """LivePerson's 901 is a function error; from a plain HTTP upstream it is relayed as it is."""
    assert needs_inspection(packs["liveperson"], 901, []) is True
    assert needs_inspection(packs["http"], 901, []) is False


@pytest.mark.parametrize("header", ["x-amz-function-error", "x-stedi-invocationerror"])
def test_function_error_header_makes_a_lambda_200_inspected(packs: dict[str, CompiledPack], header: str) -> None:
    assert needs_inspection(packs["lambda"], 200, [(header.encode(), b"Unhandled")]) is True
    assert needs_inspection(packs["liveperson"], 200, [(header.encode(), b"Unhandled")]) is False


# --- Retry-After -----------------------------------------------------------------------------

RETRY_AFTER_CASES: list[tuple[str, float | None]] = [
    ("0", 0.0),
    ("1", 1.0),
    ("120", 120.0),
    (" 7 ", 7.0),
    ("1.5", 1.5),
    (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
    (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),
    ("Sunday, 06-Nov-94 08:49:37 GMT", 0.0),  # obsolete RFC 850 form, long past
    (email.utils.formatdate(NOW + 45).rsplit(" ", 1)[0] + " -0000", 45.0),  # no zone given: GMT
    ("9" * 400, None),
    ("", None),
    ("soon", None),
    ("-5", None),
    ("nan", None),
    ("inf", None),
    ("1e3", None),
    ("1_0", None),
    ("+5", None),
    ("0x10", None),
    ("5 seconds", None),
    ("Wed, 99 Foo 2015 07:28:00 GMT", None),
]


@pytest.mark.parametrize(("value", "expected"), RETRY_AFTER_CASES)
def test_parse_retry_after(value: str, expected: float | None) -> None:
    parsed = parse_retry_after(value, NOW)
    assert parsed == pytest.approx(expected) if expected is not None else parsed is None


def test_junk_retry_after_does_not_change_the_class(packs: dict[str, CompiledPack]) -> None:
    outcome = classify(packs["http"], 429, {"Retry-After": "whenever"})
    assert (outcome.error_class, outcome.retry_after_s) == (RATE, None)


# --- transport failures ----------------------------------------------------------------------

TRANSPORT_CASES = [
    (TransportFailure.REFUSED, UNAVAILABLE, 502, "gateway.upstream_unavailable"),
    (TransportFailure.RESET, UNAVAILABLE, 502, "gateway.upstream_unavailable"),
    (TransportFailure.TIMEOUT, TIMEOUT, 504, "gateway.upstream_timeout"),
]


@pytest.mark.parametrize(("failure", "expected", "status", "code"), TRANSPORT_CASES)
def test_transport_failure(failure: TransportFailure, expected: ErrorClass, status: int, code: str) -> None:
    outcome = classify_transport(failure, "what happened")
    assert (outcome.error_class, outcome.status, outcome.code, outcome.detail, outcome.made_by_gateway) == (expected, status, code, "what happened", True)
    traits = traits_of(expected)
    assert traits.retryable and traits.breaker_failure and traits.fault == "upstream"


# --- the packs themselves ---------------------------------------------------------------------


def test_shipped_packs_cover_every_dialect(packs: dict[str, CompiledPack]) -> None:
    assert set(packs) == {"liveperson", "lambda", "yuanrong", "http"}


def test_every_pack_ends_with_the_status_fallbacks(packs: dict[str, CompiledPack]) -> None:
    """Step 5 of SPEC.md: whatever no rule names still gets a class from its status."""
    for name, pack in packs.items():
        for status in (418, 599):
            expected = CLIENT if status < 500 else SERVER
            assert classify(pack, status).error_class is expected, name


def test_a_broken_pack_is_reported_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text(
        "kind: dialect\ndialect: broken\nrules:\n  - {class: client_error, status: 400}\n  - {class: nonsense, status: 500}\n  - {class: server_error}\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_policy_folder(tmp_path)
    lines = str(raised.value).splitlines()
    assert any(line.startswith(f"{tmp_path / 'broken.yaml'}:5: rules[1].class") for line in lines), lines
    assert any(line.startswith(f"{tmp_path / 'broken.yaml'}:6: rules[2]") for line in lines), lines


def _matcher_values(rule: Rule) -> list[str]:
    matchers = [m for m in (rule.status, rule.code, *rule.headers.values(), *rule.fields.values()) if m is not None]
    values: list[str] = []
    for matcher in matchers:
        if matcher.one_of is not None:
            values += [str(v) for v in matcher.one_of]
        values += [str(v) for v in (matcher.equals, matcher.prefix, matcher.contains) if v is not None]
    return values + list(rule.headers) + list(rule.fields)


def test_docs_mapping_table_shows_every_rule(packs: dict[str, CompiledPack]) -> None:
    """docs/errors.md lists each pack's rules, in order, with the class each one gives."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text(encoding="utf-8")
    mapping = doc[doc.index("## The mapping table") : doc.index("## Extending a pack")]
    for name, pack in packs.items():
        section = mapping.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        rows = [line for line in section.splitlines() if re.match(r"^\| \d+ \|", line)]
        assert len(rows) == len(pack.pack.rules), name
        for row, rule in zip(rows, pack.pack.rules):
            assert row.endswith(f"| `{rule.error_class.value}` |"), row
            for value in _matcher_values(rule):
                assert f"`{value}`" in row, (name, value, row)
