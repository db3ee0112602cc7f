"""(dialect pack, status, headers, bounded error body) or a transport failure -> Outcome.

Pure functions only. Success bodies are never parsed: a response is inspected only when its
status is not 2xx/3xx, or when the pack names a header that marks a success status as a
function failure (Lambda's `X-Amz-Function-Error`).
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.outcomes import ErrorClass, Outcome
from gateway.policies import DialectPack, Matcher, Rule, Source

ERROR_BODY_LIMIT = 64 * 1024
DETAIL_LIMIT = 1024
# delay-seconds is 1*DIGIT; a fraction is tolerated, but not float()'s "1e3", "+5", "1_0", "nan"
_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


class TransportFailure(enum.Enum):
    """How an attempt failed without an HTTP answer."""

    REFUSED = "refused"  # the request never reached the upstream: always safe to retry
    RESET = "reset"  # the connection broke after the request may have been sent
    TIMEOUT = "timeout"  # no answer within the per-try timeout


@dataclass(frozen=True, slots=True)
class CompiledPack:
    """A dialect pack prepared once for the hot path (lower-cased header names)."""

    pack: DialectPack
    inspect_headers: frozenset[bytes]

    @property
    def dialect(self) -> str:
        return self.pack.dialect


def compile_pack(pack: DialectPack) -> CompiledPack:
    return CompiledPack(pack, frozenset(h.lower().encode("latin-1") for h in pack.inspect_success_when_headers))


def needs_inspection(pack: CompiledPack, status: int, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """True when the response may be an error and its (bounded) body must be read.

    `headers` are the raw ones (lower-case names, as ASGI has them): a success is judged
    without decoding them.
    """
    if 200 <= status < 400:
        inspect = pack.inspect_headers
        return bool(inspect) and any(name in inspect for name, _ in headers)
    if 400 <= status < 600:
        return True
    # a non-standard status no rule can match (901 on a plain HTTP route) is an answer: relay it
    return any(rule.status is None or matches(rule.status, status) for rule in pack.pack.rules)


def parse_error_body(raw: bytes | None) -> Any:
    """Parse a bounded error body; anything that is not complete JSON is None."""
    if not raw or len(raw) > ERROR_BODY_LIMIT:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def classify_response(
    pack: CompiledPack, status: int, headers: Mapping[str, str], body: Any, raw: bytes | None, now_epoch_s: float
) -> Outcome:
    """Classify an HTTP answer. `headers` must have lower-case names; `body` is the parsed JSON or None."""
    fields = body if isinstance(body, dict) else {}
    code = _first_value(pack.pack.code_sources, headers, fields)
    rule = _first_matching_rule(pack.pack.rules, status, code, headers, fields)
    if rule is None and 200 <= status < 400:
        return Outcome(None, status)
    error_class = rule.error_class if rule else _class_of_unknown_status(status)
    return Outcome(
        error_class,
        status,
        code=code or f"http.{status}",
        detail=_detail(pack, headers, fields, raw, status),
        retry_after_s=_retry_after(pack, headers, fields, now_epoch_s),
    )


def classify_transport(failure: TransportFailure, detail: str) -> Outcome:
    if failure is TransportFailure.TIMEOUT:
        return Outcome(ErrorClass.UPSTREAM_TIMEOUT, 504, "gateway.upstream_timeout", detail, made_by_gateway=True)
    return Outcome(ErrorClass.UPSTREAM_UNAVAILABLE, 502, "gateway.upstream_unavailable", detail, made_by_gateway=True)


def _class_of_unknown_status(status: int) -> ErrorClass:
    return ErrorClass.CLIENT_ERROR if 400 <= status < 500 else ErrorClass.SERVER_ERROR


def _first_matching_rule(
    rules: tuple[Rule, ...], status: int, code: str | None, headers: Mapping[str, str], fields: dict[str, Any]
) -> Rule | None:
    for rule in rules:
        if _rule_matches(rule, status, code, headers, fields):
            return rule
    return None


def _rule_matches(rule: Rule, status: int, code: str | None, headers: Mapping[str, str], fields: dict[str, Any]) -> bool:
    if rule.status is not None and not matches(rule.status, status):
        return False
    if rule.code is not None and not matches(rule.code, code):
        return False
    for name, matcher in rule.headers.items():
        if not matches(matcher, headers.get(name.lower())):
            return False
    for path, matcher in rule.fields.items():
        if not matches(matcher, field_value(fields, path)):
            return False
    return True


def matches(matcher: Matcher, value: Any) -> bool:
    """Apply one matcher; values compare as text, so 1005 and "1005" are the same code."""
    if matcher.present is not None:
        return (value is not None) == matcher.present
    if value is None or isinstance(value, (dict, list)):
        return False
    text = str(value)
    if matcher.equals is not None:
        return text == str(matcher.equals)
    if matcher.prefix is not None:
        return text.startswith(matcher.prefix)
    if matcher.contains is not None:
        return matcher.contains in text
    if matcher.one_of is not None:
        return text in {str(v) for v in matcher.one_of}
    assert matcher.range is not None
    return _in_range(text, matcher.range)


def _in_range(text: str, bounds: tuple[int, int]) -> bool:
    try:
        return bounds[0] <= int(text) <= bounds[1]
    except ValueError:
        return False


def field_value(fields: dict[str, Any], path: str) -> Any:
    value: Any = fields
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _source_value(source: Source, headers: Mapping[str, str], fields: dict[str, Any]) -> str | None:
    raw = headers.get(source.header.lower()) if source.header else field_value(fields, source.field or "")
    if raw is None or isinstance(raw, bool):
        return None
    text = raw if isinstance(raw, str) else orjson.dumps(raw).decode()
    if source.before:
        text = text.split(source.before, 1)[0]
    if source.after:
        text = text.rsplit(source.after, 1)[-1]
    return text.strip() or None


def _first_value(sources: tuple[Source, ...], headers: Mapping[str, str], fields: dict[str, Any]) -> str | None:
    for source in sources:
        value = _source_value(source, headers, fields)
        if value is not None:
            return value
    return None


def _detail(pack: CompiledPack, headers: Mapping[str, str], fields: dict[str, Any], raw: bytes | None, status: int) -> str:
    message = _first_value(pack.pack.message_sources, headers, fields)
    if message is None and not fields and raw:
        message = raw[:DETAIL_LIMIT].decode("utf-8", "replace").strip()
    return (message or f"upstream answered {status}")[:DETAIL_LIMIT]


def _retry_after(pack: CompiledPack, headers: Mapping[str, str], fields: dict[str, Any], now_epoch_s: float) -> float | None:
    header = headers.get("retry-after")
    if header is not None:
        return parse_retry_after(header, now_epoch_s)
    value = _first_value(pack.pack.retry_after_sources, headers, fields)
    return parse_retry_after(value, now_epoch_s) if value is not None else None


def parse_retry_after(value: str, now_epoch_s: float) -> float | None:
    """RFC 9110 Retry-After: delay-seconds or an HTTP-date; None when unreadable."""
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT, even when it says -0000
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - now_epoch_s)
