"""retry.py: the pure retry decision and the sliding-window retry budget (no sleeping, no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import RetryPolicyConfig
from gateway.outcomes import CLASS_TRAITS, RETRIED_CLASSES, ErrorClass, Outcome
from gateway.retry import BUDGET_WINDOW_S, RetryBudget, backoff_delay, decide_retry
from tests.clocks import ManualClock

POLICY = RetryPolicyConfig(max_attempts=4, base_delay_s=0.1, max_delay_s=1.0, retry_after_max_s=5.0, budget_ratio=0.2, budget_min_per_s=2)
TOTAL_S = 30.0
START = 1_700_000_000.0


class FixedRandom:
    """A random source that always answers `value` and counts how often it was asked."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


def outcome(error_class: ErrorClass | None, retry_after_s: float | None = None) -> Outcome:
    return Outcome(error_class, 500, "x", "detail", retry_after_s)


# --- which classes are retried ------------------------------------------------------------

RETRIED = sorted(RETRIED_CLASSES, key=lambda c: c.value)
NEVER = sorted(set(ErrorClass) - RETRIED_CLASSES, key=lambda c: c.value)


def test_retried_classes_are_exactly_the_spec_table() -> None:
    assert {c.value for c in RETRIED_CLASSES} == {"rate_limited", "upstream_unavailable", "upstream_timeout", "server_error"}


@pytest.mark.parametrize("error_class", RETRIED, ids=lambda c: c.value)
def test_retried_class_is_retried(error_class: ErrorClass) -> None:
    decision = decide_retry(POLICY, outcome(error_class), 1, 0.0, TOTAL_S, FixedRandom(0.5))
    assert decision.retry
    assert decision.delay_s == pytest.approx(0.05)


@pytest.mark.parametrize("error_class", NEVER, ids=lambda c: c.value)
@pytest.mark.parametrize("max_attempts", [1, 3, 20])
def test_never_class_wins_over_any_policy(error_class: ErrorClass, max_attempts: int) -> None:
    policy = POLICY.model_copy(update={"max_attempts": max_attempts})
    decision = decide_retry(policy, outcome(error_class, retry_after_s=0.1), 1, 0.0, TOTAL_S, FixedRandom(0.5))
    assert (decision.retry, decision.reason) == (False, "not retryable")


def test_success_is_never_retried() -> None:
    decision = decide_retry(POLICY, outcome(None), 1, 0.0, TOTAL_S, FixedRandom(0.5))
    assert not decision.retry


@pytest.mark.parametrize("error_class", list(ErrorClass), ids=lambda c: c.value)
def test_circuit_open_and_function_failures_are_not_retried_by_the_gateway(error_class: ErrorClass) -> None:
    """`circuit_open` is retryable for the *client* (after Retry-After) but the gateway never loops on it."""
    decision = decide_retry(POLICY, outcome(error_class), 1, 0.0, TOTAL_S, FixedRandom(0.5))
    expected = CLASS_TRAITS[error_class].retryable and error_class is not ErrorClass.CIRCUIT_OPEN
    assert decision.retry is expected


# --- attempts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_attempts", "attempt", "retry"),
    [(1, 1, False), (2, 1, True), (2, 2, False), (4, 3, True), (4, 4, False), (4, 5, False), (20, 19, True), (20, 20, False)],
)
def test_max_attempts_counts_every_call(max_attempts: int, attempt: int, retry: bool) -> None:
    policy = POLICY.model_copy(update={"max_attempts": max_attempts})
    decision = decide_retry(policy, outcome(ErrorClass.SERVER_ERROR), attempt, 0.0, TOTAL_S, FixedRandom(0.5))
    assert decision.retry is retry
    if not retry:
        assert decision.reason == "attempts exhausted"


# --- backoff --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "random_value", "expected"),
    [
        (1, 0.0, 0.0),
        (1, 0.5, 0.05),  # ceiling 0.1
        (1, 0.999, 0.0999),
        (2, 0.5, 0.1),  # ceiling 0.2
        (3, 0.25, 0.1),  # ceiling 0.4
        (4, 1.0, 0.8),  # ceiling 0.8
        (5, 1.0, 1.0),  # 1.6 capped at max_delay_s
        (19, 0.5, 0.5),  # far past the cap: no overflow, still capped
    ],
)
def test_backoff_is_full_jitter_under_an_exponential_cap(attempt: int, random_value: float, expected: float) -> None:
    assert backoff_delay(POLICY, attempt, FixedRandom(random_value)) == pytest.approx(expected)


def test_decision_uses_the_backoff_when_no_retry_after() -> None:
    random = FixedRandom(0.75)
    decision = decide_retry(POLICY, outcome(ErrorClass.UPSTREAM_UNAVAILABLE), 2, 1.0, TOTAL_S, random)
    assert decision.retry and decision.delay_s == pytest.approx(0.15)
    assert random.calls == 1


@given(attempt=st.integers(1, 20), value=st.floats(0.0, 1.0, exclude_max=True), base=st.floats(0.0, 5.0), cap=st.floats(0.0, 30.0))
def test_backoff_stays_between_zero_and_the_cap(attempt: int, value: float, base: float, cap: float) -> None:
    policy = POLICY.model_copy(update={"base_delay_s": base, "max_delay_s": cap})
    delay = backoff_delay(policy, attempt, FixedRandom(value))
    assert 0.0 <= delay <= min(cap, base * 2 ** (attempt - 1))


# --- Retry-After ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after_s", "elapsed_s", "total_s", "retry", "delay_s", "reason"),
    [
        (1.0, 0.0, TOTAL_S, True, 1.0, "retry"),  # wins over the (much shorter) backoff
        (0.0, 0.0, TOTAL_S, True, 0.0, "retry"),
        (5.0, 0.0, TOTAL_S, True, 5.0, "retry"),  # exactly retry_after_max_s: still obeyed
        (5.01, 0.0, TOTAL_S, False, 0.0, "retry-after too long"),
        (120.0, 0.0, TOTAL_S, False, 0.0, "retry-after too long"),
        (3.0, 0.0, 2.0, False, 0.0, "deadline"),  # within max, but would overrun total_s
        (3.0, 27.5, TOTAL_S, False, 0.0, "deadline"),
        (3.0, 26.5, TOTAL_S, True, 3.0, "retry"),
    ],
)
def test_retry_after_replaces_backoff_within_bounds(
    retry_after_s: float, elapsed_s: float, total_s: float, retry: bool, delay_s: float, reason: str
) -> None:
    random = FixedRandom(0.5)
    decision = decide_retry(POLICY, outcome(ErrorClass.RATE_LIMITED, retry_after_s), 1, elapsed_s, total_s, random)
    assert (decision.retry, decision.reason) == (retry, reason)
    assert decision.delay_s == pytest.approx(delay_s)
    assert random.calls == 0  # the upstream's wait is obeyed exactly, never jittered


@pytest.mark.parametrize("error_class", RETRIED, ids=lambda c: c.value)
def test_retry_after_applies_to_every_retried_class(error_class: ErrorClass) -> None:
    decision = decide_retry(POLICY, outcome(error_class, 2.0), 1, 0.0, TOTAL_S, FixedRandom(0.1))
    assert decision.retry and decision.delay_s == 2.0


# --- deadline -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed_s", "random_value", "retry"),
    [(0.0, 0.5, True), (29.0, 0.5, True), (29.9, 0.5, True), (29.96, 0.9, False), (30.0, 0.0, False), (31.0, 0.0, False)],
)
def test_backoff_that_would_overrun_total_s_stops(elapsed_s: float, random_value: float, retry: bool) -> None:
    decision = decide_retry(POLICY, outcome(ErrorClass.UPSTREAM_TIMEOUT), 1, elapsed_s, TOTAL_S, FixedRandom(random_value))
    assert decision.retry is retry
    if not retry:
        assert decision.reason == "deadline"


def test_stop_reasons_are_checked_in_order() -> None:
    """A never-class beats exhausted attempts, which beat a too-long Retry-After and the deadline."""
    exhausted = POLICY.model_copy(update={"max_attempts": 1})
    assert decide_retry(exhausted, outcome(ErrorClass.FUNCTION_ERROR, 99.0), 1, 99.0, 1.0, FixedRandom(0.5)).reason == "not retryable"
    assert decide_retry(exhausted, outcome(ErrorClass.SERVER_ERROR, 99.0), 1, 99.0, 1.0, FixedRandom(0.5)).reason == "attempts exhausted"
    assert decide_retry(POLICY, outcome(ErrorClass.SERVER_ERROR, 99.0), 1, 99.0, 1.0, FixedRandom(0.5)).reason == "retry-after too long"


# --- budget ---------------------------------------------------------------------------------


def spend_all(budget: RetryBudget, limit: int = 10_000) -> int:
    spent = 0
    while spent < limit and budget.try_spend():
        spent += 1
    return spent


@pytest.mark.parametrize(
    ("ratio", "min_per_s", "firsts", "allowed"),
    [
        (0.2, 2, 0, 20),  # the floor alone: budget_min_per_s x 10 s
        (0.2, 2, 100, 40),
        (0.2, 2, 500, 120),
        (0.5, 0, 3, 1),  # 1.5 allowed: one whole retry
        (0.0, 0, 1000, 0),  # no budget at all
        (1.0, 0, 7, 7),
        (0.0, 0.5, 0, 5),
    ],
)
def test_budget_allows_floor_plus_ratio_of_first_attempts(ratio: float, min_per_s: float, firsts: int, allowed: int) -> None:
    budget = RetryBudget(ratio, min_per_s, ManualClock(START))
    for _ in range(firsts):
        budget.record_first_attempt()
    assert spend_all(budget) == allowed


def test_budget_window_slides_over_ten_seconds() -> None:
    clock = ManualClock(START + 0.3)
    budget = RetryBudget(0.2, 2, clock)
    assert spend_all(budget) == 20
    clock.advance(BUDGET_WINDOW_S - 1)
    assert not budget.try_spend()  # the first second's retries are still in the window
    clock.advance(1.0)
    assert spend_all(budget) == 20  # and now they have left it


def test_budget_counts_retries_spread_over_the_window() -> None:
    clock = ManualClock(START)
    budget = RetryBudget(0.0, 1, clock)
    for _ in range(BUDGET_WINDOW_S):
        assert spend_all(budget, limit=1) == 1
        clock.advance(1.0)
    clock.advance(-1.0)
    assert not budget.try_spend()
    clock.advance(1.0)
    assert spend_all(budget) == 1  # exactly one second's worth has slid out


def test_first_attempts_leave_the_window_too() -> None:
    clock = ManualClock(START)
    budget = RetryBudget(0.5, 0, clock)
    for _ in range(10):
        budget.record_first_attempt()
    clock.advance(BUDGET_WINDOW_S)
    assert spend_all(budget) == 0
    budget.record_first_attempt()
    budget.record_first_attempt()
    assert spend_all(budget) == 1


def test_refused_retries_are_not_counted() -> None:
    clock = ManualClock(START)
    budget = RetryBudget(0.0, 0.2, clock)
    assert spend_all(budget) == 2
    for _ in range(50):
        assert not budget.try_spend()
    budget.reconfigure(0.0, 0.3)
    assert spend_all(budget) == 1


def test_reconfigure_retunes_without_forgetting() -> None:
    clock = ManualClock(START)
    budget = RetryBudget(0.2, 2, clock)
    for _ in range(50):
        budget.record_first_attempt()
    assert spend_all(budget) == 30
    budget.reconfigure(0.4, 2)
    assert spend_all(budget) == 10
    assert (budget.ratio, budget.min_per_s) == (0.4, 2)


def test_budget_starting_near_clock_zero() -> None:
    """Slots start out stamped with second 0; a clock that starts there must not break the count."""
    clock = ManualClock(0.0)
    budget = RetryBudget(0.0, 1, clock)
    assert spend_all(budget) == 10
    clock.advance(5.0)
    assert spend_all(budget) == 0
    clock.advance(5.0)
    assert spend_all(budget) == 10
