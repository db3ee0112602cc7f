"""The only module that builds error bodies: the RFC 9457 problem object, rendered per dialect.

On a dialect route the client keeps seeing its platform's status, headers and native fields
(`errorCode`/`errorMsg`, `__type`/`message` + `X-Amzn-ErrorType`, `code`/`message` +
`X-Inner-Code`) and the problem object is added under `"problem"`. On `http` routes and
unmatched requests the body is the problem object itself (`application/problem+json`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.outcomes import ErrorClass, Outcome, traits_of

Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"
PROBLEM_JSON = b"application/problem+json"

_LAMBDA_NAMES = {
    ErrorClass.RATE_LIMITED: "TooManyRequestsException",
    ErrorClass.NOT_FOUND: "ResourceNotFoundException",
    ErrorClass.AUTH_ERROR: "AccessDeniedException",
}
_LAMBDA_CLIENT_NAMES = {413: "RequestTooLargeException", 415: "UnsupportedMediaTypeException"}
_YUANRONG_CODES = {400: 200400, 401: 200401, 403: 200403, 404: 200404, 413: 200413, 429: 200429, 431: 200400}
_YUANRONG_SERVER_CODE = 150500


@dataclass(frozen=True, slots=True)
class Rendered:
    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class ProblemContext:
    """Who answered and for what: the fields of the problem object that are not the outcome's."""

    upstream: str | None
    attempts: int
    request_id: str
    type_base: str = "urn:gateway:error:"


def problem_object(outcome: Outcome, status: int, context: ProblemContext) -> dict[str, Any]:
    error_class = outcome.error_class or ErrorClass.GATEWAY_ERROR
    traits = traits_of(error_class)
    return {
        "type": f"{context.type_base}{error_class.value}",
        "title": traits.title,
        "status": status,
        "detail": outcome.detail or traits.title,
        "class": error_class.value,
        "code": outcome.code or f"http.{outcome.status}",
        "retryable": traits.retryable,
        "fault": traits.fault,
        "upstream": context.upstream,
        "attempts": context.attempts,
        "request_id": context.request_id,
    }


def render_gateway_error(dialect: str | None, outcome: Outcome, context: ProblemContext, extra: Headers = ()) -> Rendered:
    """An error the gateway makes itself (no route, 413, rate limited, circuit open, timeouts...)."""
    problem = problem_object(outcome, outcome.status, context)
    if dialect in (None, "http"):
        return Rendered(outcome.status, [(b"content-type", PROBLEM_JSON), *extra], orjson.dumps(problem))
    fields, headers = native_fields(dialect, outcome)
    body = {**fields, "problem": problem}
    return Rendered(outcome.status, [(b"content-type", JSON), *headers, *extra], orjson.dumps(body))


def render_unrouted(outcome: Outcome, request_id: str, type_base: str) -> Rendered:
    """An error answered before or outside any route (the server protocol, the gateway's own
    paths): the problem object itself, with the request id it names as `X-Request-ID`."""
    rendered = render_gateway_error(None, outcome, ProblemContext(None, 0, request_id, type_base))
    return Rendered(rendered.status, [*rendered.headers, (b"x-request-id", request_id.encode())], rendered.body)


def render_upstream_error(
    dialect: str, outcome: Outcome, upstream_headers: Headers, body: Any, context: ProblemContext
) -> Rendered:
    """An error the upstream answered: its status and headers stay; its native body gains `problem`."""
    problem = problem_object(outcome, outcome.status, context)
    kept = [(k, v) for k, v in upstream_headers if k not in (b"content-type", b"content-length", b"content-encoding")]
    if dialect == "http":
        return Rendered(outcome.status, [(b"content-type", PROBLEM_JSON), *kept], orjson.dumps(problem))
    if isinstance(body, dict):
        return Rendered(outcome.status, [(b"content-type", JSON), *kept], orjson.dumps({**body, "problem": problem}))
    fields, _ = native_fields(dialect, outcome)
    return Rendered(outcome.status, [(b"content-type", JSON), *kept], orjson.dumps({**fields, "problem": problem}))


def native_fields(dialect: str, outcome: Outcome) -> tuple[dict[str, Any], Headers]:
    """The fields (and headers) a dialect's own client reads to recognise this error."""
    detail = outcome.detail or ""
    code = outcome.code or ""
    if dialect == "liveperson":
        return {"errorCode": code, "errorMsg": detail}, []
    if dialect == "lambda":
        return _lambda_fields(outcome, code, detail)
    if dialect == "yuanrong":
        inner = int(code) if code.isdigit() else _yuanrong_code(outcome.status)
        return {"code": inner, "message": detail}, [(b"x-inner-code", str(inner).encode())]
    return {}, []


def _lambda_fields(outcome: Outcome, code: str, detail: str) -> tuple[dict[str, Any], Headers]:
    if outcome.error_class in (ErrorClass.FUNCTION_ERROR, ErrorClass.FUNCTION_TIMEOUT):
        return {"errorType": code, "errorMessage": detail}, []
    name = code if not outcome.made_by_gateway else lambda_error_name(outcome)
    fault = "User" if outcome.error_class and traits_of(outcome.error_class).fault == "client" else "Service"
    fields: dict[str, Any] = {"__type": name, "message": detail, "Type": fault}
    if outcome.error_class is ErrorClass.RATE_LIMITED:
        fields["Reason"] = "CallerRateLimitExceeded"
        if outcome.retry_after_s is not None:
            fields["retryAfterSeconds"] = str(max(1, int(-(-outcome.retry_after_s // 1))))
    return fields, [(b"x-amzn-errortype", name.encode())]


def lambda_error_name(outcome: Outcome) -> str:
    """The Lambda service error name boto3 maps to the same exception a real Lambda would raise."""
    if outcome.error_class in _LAMBDA_NAMES:
        return _LAMBDA_NAMES[outcome.error_class]
    if outcome.error_class is ErrorClass.CLIENT_ERROR:
        return _LAMBDA_CLIENT_NAMES.get(outcome.status, "InvalidRequestContentException")
    return "ServiceException"


def _yuanrong_code(status: int) -> int:
    return _YUANRONG_CODES.get(status, _YUANRONG_SERVER_CODE)


def retry_after_header(seconds: float) -> tuple[bytes, bytes]:
    """Whole seconds, rounded up, at least 1."""
    return (b"retry-after", str(max(1, int(-(-seconds // 1)))).encode())
