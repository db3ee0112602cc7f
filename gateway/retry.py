"""When to try an upstream again: a pure decision, plus the per-upstream retry budget.

The decision never retries a class SPEC.md marks "never" (a function that ran and failed is not
invoked again), whatever the policy says. Backoff is exponential with full jitter; a
`Retry-After` (or Lambda's `retryAfterSeconds`) replaces the backoff when it is short enough,
and ends the retries when it is not. The total deadline bounds everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import RetryPolicyConfig
from gateway.outcomes import RETRIED_CLASSES, Outcome

BUDGET_WINDOW_S = 10


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    delay_s: float
    reason: str


def decide_retry(
    policy: RetryPolicyConfig,
    outcome: Outcome,
    attempt: int,
    elapsed_s: float,
    total_s: float,
    random: Callable[[], float],
) -> RetryDecision:
    """Next delay, or stop, after `attempt` (1-based) ended with `outcome`."""
    if outcome.error_class not in RETRIED_CLASSES:
        return RetryDecision(False, 0.0, "not retryable")
    if attempt >= policy.max_attempts:
        return RetryDecision(False, 0.0, "attempts exhausted")
    if outcome.retry_after_s is not None:
        if outcome.retry_after_s > policy.retry_after_max_s:
            return RetryDecision(False, 0.0, "retry-after too long")
        delay = outcome.retry_after_s
    else:
        delay = backoff_delay(policy, attempt, random)
    if elapsed_s + delay >= total_s:
        return RetryDecision(False, 0.0, "deadline")
    return RetryDecision(True, delay, "retry")


def backoff_delay(policy: RetryPolicyConfig, attempt: int, random: Callable[[], float]) -> float:
    """Full jitter: uniform in [0, min(max_delay, base * 2^(attempt-1))]."""
    ceiling = min(policy.max_delay_s, policy.base_delay_s * (2 ** (attempt - 1)))
    return ceiling * random()


class RetryBudget:
    """Retries in a sliding 10 s window may not exceed `min_per_s * 10 + ratio * first attempts`.

    Kept in one-second slots so that recording and checking cost O(1) per request.
    """

    def __init__(self, ratio: float, min_per_s: float, clock: Callable[[], float]) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self._clock = clock
        self._firsts = [0] * BUDGET_WINDOW_S
        self._retries = [0] * BUDGET_WINDOW_S
        self._slot_second = [0] * BUDGET_WINDOW_S

    def _slot(self) -> int:
        second = int(self._clock())
        index = second % BUDGET_WINDOW_S
        if self._slot_second[index] != second:
            self._slot_second[index] = second
            self._firsts[index] = 0
            self._retries[index] = 0
        return index

    def _window_sum(self, counts: list[int]) -> int:
        now = int(self._clock())
        return sum(c for c, s in zip(counts, self._slot_second) if now - s < BUDGET_WINDOW_S)

    def record_first_attempt(self) -> None:
        self._firsts[self._slot()] += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when the window has none left."""
        index = self._slot()
        allowed = self.min_per_s * BUDGET_WINDOW_S + self.ratio * self._window_sum(self._firsts)
        if self._window_sum(self._retries) + 1 > allowed:
            return False
        self._retries[index] += 1
        return True

    def reconfigure(self, ratio: float, min_per_s: float) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
