"""Dialect packs and named policy sets, read from a `policies/` folder.

A dialect pack is data: the ordered rules that turn (status, headers, parsed error body) into
an error class, and where the upstream's own error code, message and retry hint live. A policy
set file holds named retry and breaker policies. Both are validated with the same
`FILE:LINE: key.path: message` reports as the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from gateway.config import BreakerPolicyConfig, RetryPolicyConfig, problems_from_validation
from gateway.outcomes import ErrorClass
from gateway.yamlsource import ConfigError, Problem, SourceDocument, load_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Matcher(_Strict):
    """One test on a value. Exactly one key is set; a bare scalar in YAML means `equals`."""

    equals: str | int | None = None
    prefix: str | None = None
    contains: str | None = None
    one_of: tuple[str | int, ...] | None = Field(None, alias="in")
    range: tuple[int, int] | None = None
    present: StrictBool | None = None

    @model_validator(mode="before")
    @classmethod
    def _scalar_means_equals(cls, value: Any) -> Any:
        return {"equals": value} if isinstance(value, (str, int)) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> "Matcher":
        chosen = [k for k in ("equals", "prefix", "contains", "one_of", "range", "present") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError("a matcher takes exactly one of: equals, prefix, contains, in, range, present")
        return self


class Rule(_Strict):
    """All conditions given must hold; `code` tests the upstream code extracted by `code_sources`."""

    error_class: ErrorClass = Field(alias="class")
    status: Matcher | None = None
    code: Matcher | None = None
    headers: dict[str, Matcher] = {}
    fields: dict[str, Matcher] = {}
    note: str | None = None

    @model_validator(mode="after")
    def _has_condition(self) -> "Rule":
        if not (self.status or self.code or self.headers or self.fields):
            raise ValueError("a rule needs at least one of: status, code, headers, fields")
        return self


class Source(_Strict):
    """Where a value lives: a header or a dotted field of the JSON error body."""

    header: str | None = None
    field: str | None = None
    before: str | None = None
    after: str | None = None

    @model_validator(mode="after")
    def _one_place(self) -> "Source":
        if (self.header is None) == (self.field is None):
            raise ValueError("a source names exactly one of: header, field")
        return self


class DialectPack(_Strict):
    kind: Literal["dialect"]
    dialect: str
    description: str = ""
    inspect_success_when_headers: tuple[str, ...] = ()
    code_sources: tuple[Source, ...] = ()
    message_sources: tuple[Source, ...] = ()
    retry_after_sources: tuple[Source, ...] = ()
    rules: tuple[Rule, ...] = ()


class PolicySet(_Strict):
    kind: Literal["policies"]
    description: str = ""
    retry_policies: dict[str, RetryPolicyConfig] = {}
    breaker_policies: dict[str, BreakerPolicyConfig] = {}


@dataclass(frozen=True, slots=True)
class PolicyLibrary:
    packs: dict[str, DialectPack]
    retry_policies: dict[str, RetryPolicyConfig]
    breaker_policies: dict[str, BreakerPolicyConfig]


def shipped_policies_dir() -> Path:
    return Path(str(resources.files("gateway.shipped_policies")))


def load_policy_folder(folder: Path) -> PolicyLibrary:
    """Read every `*.yaml` in `folder`; collect every problem before raising."""
    if not folder.is_dir():
        raise ConfigError([Problem(str(folder), 1, "policies", "is not a folder")])
    packs: dict[str, DialectPack] = {}
    retry: dict[str, RetryPolicyConfig] = {}
    breakers: dict[str, BreakerPolicyConfig] = {}
    problems: list[Problem] = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            item, document = _read_policy_file(path)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if isinstance(item, DialectPack):
            if item.dialect in packs:
                problems.append(document.problem(("dialect",), f"dialect {item.dialect!r} is defined twice"))
            packs[item.dialect] = item
        else:
            retry.update(item.retry_policies)
            breakers.update(item.breaker_policies)
    if problems:
        raise ConfigError(problems)
    return PolicyLibrary(packs, retry, breakers)


def _read_policy_file(path: Path) -> tuple[DialectPack | PolicySet, SourceDocument]:
    document = load_yaml(path)
    data = document.data
    kind = data.get("kind") if isinstance(data, dict) else None
    model: type[DialectPack] | type[PolicySet] = DialectPack if kind == "dialect" else PolicySet
    if kind not in ("dialect", "policies"):
        raise ConfigError([document.problem(("kind",), "must be 'dialect' or 'policies'")])
    try:
        return model.model_validate(data), document
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc, document)) from None
