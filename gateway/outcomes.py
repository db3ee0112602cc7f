"""The error classes of SPEC.md and what each one implies for retry, breaker and envelope."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorClass(str, enum.Enum):
    CLIENT_ERROR = "client_error"
    AUTH_ERROR = "auth_error"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    FUNCTION_ERROR = "function_error"
    FUNCTION_TIMEOUT = "function_timeout"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    SERVER_ERROR = "server_error"
    CIRCUIT_OPEN = "circuit_open"
    GATEWAY_ERROR = "gateway_error"


@dataclass(frozen=True, slots=True)
class ClassTraits:
    fault: str
    title: str
    retryable: bool
    breaker_failure: bool


CLASS_TRAITS: dict[ErrorClass, ClassTraits] = {
    ErrorClass.CLIENT_ERROR: ClassTraits("client", "Bad request", False, False),
    ErrorClass.AUTH_ERROR: ClassTraits("client", "Not authorized", False, False),
    ErrorClass.NOT_FOUND: ClassTraits("client", "Not found", False, False),
    ErrorClass.RATE_LIMITED: ClassTraits("client", "Rate limited", True, False),
    ErrorClass.FUNCTION_ERROR: ClassTraits("function", "Function execution failed", False, False),
    ErrorClass.FUNCTION_TIMEOUT: ClassTraits("function", "Function timed out", False, False),
    ErrorClass.UPSTREAM_UNAVAILABLE: ClassTraits("upstream", "Upstream unavailable", True, True),
    ErrorClass.UPSTREAM_TIMEOUT: ClassTraits("upstream", "Upstream timed out", True, True),
    ErrorClass.SERVER_ERROR: ClassTraits("upstream", "Upstream server error", True, True),
    ErrorClass.CIRCUIT_OPEN: ClassTraits("upstream", "Circuit open", True, False),
    ErrorClass.GATEWAY_ERROR: ClassTraits("gateway", "Gateway error", False, False),
}

RETRIED_CLASSES = frozenset(
    {
        ErrorClass.RATE_LIMITED,
        ErrorClass.UPSTREAM_UNAVAILABLE,
        ErrorClass.UPSTREAM_TIMEOUT,
        ErrorClass.SERVER_ERROR,
    }
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one upstream attempt (or the gateway itself) amounted to.

    `error_class` is None for a success. `code` is the upstream's own code as a string, or
    the gateway's (`gateway.*`). `retry_after_s` is what the upstream asked us to wait.
    """

    error_class: ErrorClass | None
    status: int
    code: str | None = None
    detail: str | None = None
    retry_after_s: float | None = None
    made_by_gateway: bool = False

    @property
    def is_success(self) -> bool:
        return self.error_class is None


def traits_of(error_class: ErrorClass) -> ClassTraits:
    return CLASS_TRAITS[error_class]


NO_ROUTE = Outcome(ErrorClass.NOT_FOUND, 404, "gateway.no_route", "no route matches this path", made_by_gateway=True)
