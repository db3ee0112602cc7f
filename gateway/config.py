"""Configuration: YAML -> validated, frozen objects. `gateway check` and `serve` share `load_config`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from gateway.yamlsource import ConfigError, Problem, SourceDocument, load_yaml, parse_yaml

Dialect = Literal["liveperson", "lambda", "yuanrong", "http"]
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(6 * 1024 * 1024, ge=0)
    replay_max_bytes: int = Field(1024 * 1024, ge=0)
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    error_type_base: str = "urn:gateway:error:"
    shutdown_grace_s: float = Field(10.0, ge=0)
    client_header_timeout_s: float = Field(10.0, gt=0, le=3600)
    client_body_timeout_s: float = Field(30.0, gt=0, le=3600)


REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")


class StateConfig(Frozen):
    redis_url: str | None = None
    on_redis_error: Literal["local", "allow", "deny"] = "local"
    redis_timeout_s: float = Field(0.05, gt=0, le=5)
    redis_max_connections: int = Field(64, ge=1)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        scheme, separator, rest = url.partition("://")
        if not separator or scheme not in REDIS_SCHEMES or not rest:
            raise ValueError(f"must be a Redis URL ({', '.join(s + '://' for s in REDIS_SCHEMES)}), or null for process memory")
        return url


class AdminConfig(Frozen):
    token_env: str = "GATEWAY_ADMIN_TOKEN"


class Timeouts(Frozen):
    connect_s: float = Field(1.0, gt=0)
    per_try_s: float = Field(10.0, gt=0)
    total_s: float = Field(30.0, gt=0)


class DedupeConfig(Frozen):
    enabled: StrictBool = True  # YAML 1.1 'yes'/'on' arrive as strings; pydantic would take them as True
    ttl_s: float = Field(30.0, ge=0)
    max_body_bytes: int = Field(65536, ge=0)
    id_headers: tuple[str, ...] = ("Idempotency-Key", "X-Request-ID", "amz-sdk-invocation-id")
    max_entries: int = Field(10000, ge=1)

    @field_validator("id_headers")
    @classmethod
    def _header_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"not a header name: {name!r}")
        return names


class UpstreamConfig(Frozen):
    url: str
    dialect: Dialect
    retry: str = "default"
    breaker: str = "default"
    timeouts: Timeouts = Timeouts()
    routes: tuple[str, ...] = Field(min_length=1)
    account_header: str | None = None
    auth: Literal["passthrough", "aws_sigv4"] = "passthrough"
    aws_region: str | None = None
    rate_limited: StrictBool = True
    dedupe: DedupeConfig | None = None
    max_connections: int = Field(256, ge=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", url):
            raise ValueError("must be an absolute http:// or https:// URL without query or fragment")
        return url.rstrip("/")

    @field_validator("account_header")
    @classmethod
    def _header_name(cls, name: str | None) -> str | None:
        if name is not None and not _HEADER_NAME.match(name):
            raise ValueError(f"not a header name: {name!r}")
        return name


class BucketConfig(Frozen):
    rate: float = Field(gt=0)
    per_s: float = Field(1.0, gt=0)
    burst: int = Field(ge=1)


class RateLimitsConfig(Frozen):
    default: BucketConfig = BucketConfig(rate=100, per_s=1, burst=200)
    accounts: dict[str, BucketConfig] = {}


class RetryPolicyConfig(Frozen):
    max_attempts: int = Field(3, ge=1, le=20)
    base_delay_s: float = Field(0.05, ge=0)
    max_delay_s: float = Field(2.0, ge=0)
    retry_after_max_s: float = Field(5.0, ge=0)
    budget_ratio: float = Field(0.2, ge=0)
    budget_min_per_s: float = Field(2.0, ge=0)


class BreakerPolicyConfig(Frozen):
    fail_max: int = Field(5, ge=1)
    reset_timeout_s: float = Field(30.0, gt=0)
    scope: Literal["function", "upstream"] = "function"


class GatewayConfig(Frozen):
    server: ServerConfig = ServerConfig()
    state: StateConfig = StateConfig()
    policies: str | None = None
    admin: AdminConfig = AdminConfig()
    upstreams: dict[str, UpstreamConfig] = Field(min_length=1)
    rate_limits: RateLimitsConfig = RateLimitsConfig()
    retry_policies: dict[str, RetryPolicyConfig] = {}
    breaker_policies: dict[str, BreakerPolicyConfig] = {}
    dedupe: DedupeConfig = DedupeConfig()

    @field_validator("upstreams")
    @classmethod
    def _upstream_names(cls, upstreams: dict[str, UpstreamConfig]) -> dict[str, UpstreamConfig]:
        for name in upstreams:
            if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name):
                raise ValueError(f"upstream name {name!r} must be 1-64 letters, digits, '_', '.', '-'")
        return upstreams


def problems_from_validation(error: ValidationError, document: SourceDocument) -> list[Problem]:
    problems = []
    for item in error.errors():
        path = _source_path(tuple(item["loc"]), document, item.get("type") == "missing")
        problems.append(document.problem(path, _describe(item)))
    return problems


def _source_path(loc: tuple[str | int, ...], document: SourceDocument, missing: bool) -> tuple[str | int, ...]:
    """Drop pydantic's union tags from a location: keep the part that names keys of the file."""
    end = len(loc)
    while end > 0 and tuple(loc[:end]) not in document.lines:
        end -= 1
    path = tuple(loc[:end])
    return (*path, loc[end]) if missing and end < len(loc) else path


def _describe(item: dict[str, Any]) -> str:
    kind = item.get("type")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "bool_type":
        return f"must be true or false (got {item.get('input')!r})"
    if kind == "literal_error":
        expected = item.get("ctx", {}).get("expected", "")
        return f"must be one of {expected} (got {item.get('input')!r})"
    message = str(item.get("msg", "invalid value"))
    return message.removeprefix("Value error, ")


def validate_document(document: SourceDocument) -> GatewayConfig:
    if not isinstance(document.data, dict):
        raise ConfigError([document.problem((), "the configuration must be a mapping")])
    try:
        return GatewayConfig.model_validate(document.data)
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc, document)) from None


def read_config_file(path: Path) -> tuple[GatewayConfig, SourceDocument]:
    document = load_yaml(path)
    return validate_document(document), document


def read_config_text(text: str, name: str) -> tuple[GatewayConfig, SourceDocument]:
    document = parse_yaml(text, name)
    return validate_document(document), document
