"""Per-account token buckets: the decision, the backends, the fallback, the headers.

A bucket holds up to ``burst`` tokens and refills continuously at ``rate`` tokens per
``per_s`` seconds; each request takes one; an account's first request finds its bucket
full. The state is kept as GCRA's "theoretical arrival time" (the instant the bucket is
full again), which is the same bucket in one number: :func:`step_bucket` is the pure
arithmetic, run in process memory by :class:`MemoryRateLimiter` and, as a Lua script on
the server's clock, by the Redis store (``gateway.store``), so both backends agree.

:class:`RedisRateLimiter` shares buckets between replicas through Redis. While Redis is
unreachable (the store fails fast and cools down), ``on_error`` decides: ``local`` keeps
enforcing the same rates per process with memory buckets, ``allow`` lets traffic through,
``deny`` refuses (the pipeline answers 503). Shared enforcement resumes by itself when the
store's probe succeeds.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from gateway.store import RedisStore, StoreUnavailable

MAX_ACCOUNT_ID_LENGTH = 256
# visible ASCII ('!'..'~') without '{' and '}'; checked twice per request, so one regex pass
_ACCOUNT_ID = re.compile(r"[!-z|~]{1,%d}" % MAX_ACCOUNT_ID_LENGTH)
TOLERANCE_S = 1e-6
OnRedisError = Literal["local", "allow", "deny"]


@dataclass(frozen=True, slots=True)
class BucketPolicy:
    name: str
    rate: float
    per_s: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.per_s > 0 and self.burst >= 1):
            raise ValueError("a bucket needs rate > 0, per_s > 0 and burst >= 1")

    @property
    def interval_s(self) -> float:
        """Seconds to earn one token."""
        return self.per_s / self.rate


class Decision(NamedTuple):
    allowed: bool
    remaining: int
    retry_after_s: float
    reset_s: float
    policy: BucketPolicy
    source: str


class BucketStep(NamedTuple):
    """One request against one bucket: the verdict and the bucket's new full-again instant."""

    allowed: bool
    full_at: float
    remaining: int
    retry_after_s: float
    reset_s: float


def step_bucket(full_at: float, now: float, policy: BucketPolicy) -> BucketStep:
    """Take one token from the bucket that is full at ``full_at`` (pure; mirrors the Lua)."""
    interval = policy.interval_s
    capacity = policy.burst * interval
    tat = min(max(full_at, now), now + capacity)
    new_tat = tat + interval
    if new_tat - now > capacity + TOLERANCE_S:
        return BucketStep(False, tat, 0, new_tat - now - capacity, tat - now)
    reset = new_tat - now
    remaining = math.floor((capacity - reset) / interval + TOLERANCE_S)
    return BucketStep(True, new_tat, remaining, 0.0, reset)


def validate_account_id(account: str) -> bool:
    """1..256 visible ASCII characters, no braces (they would move a Redis Cluster hash tag)."""
    return _ACCOUNT_ID.fullmatch(account) is not None


def bucket_key(upstream: str, account: str | None) -> str:
    """The bucket's key; the hash tag keeps each bucket on one Redis Cluster slot."""
    if account is None:
        return f"gw:rl-anon:{{{key_part(upstream)}}}"
    if validate_account_id(account) and validate_account_id(upstream) and ":" not in upstream:
        return f"gw:rl:{{{upstream}:{account}}}"
    # Unsafe ids are hashed, under another prefix so no valid id can collide with them.
    return f"gw:rl-h:{{{digest(upstream)}:{digest(account)}}}"


def key_part(value: str) -> str:
    return value if validate_account_id(value) else f"h-{digest(value)}"


def digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


class MemoryRateLimiter:
    """Token buckets in this process's memory; full buckets are forgotten, entries capped."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        max_entries: int = 100_000,
        source: str = "memory",
    ) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._source = source
        # Least recently used first: the front is where full (forgettable) buckets gather.
        self._full_at: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._full_at)

    async def take(self, key: str, policy: BucketPolicy) -> Decision:
        return self.take_now(key, policy)

    def take_now(self, key: str, policy: BucketPolicy) -> Decision:
        now = self._clock()
        step = step_bucket(self._full_at.pop(key, now), now, policy)
        self._forget_full(now)
        if step.full_at > now:
            self._full_at[key] = step.full_at
            self._enforce_cap()
        return decision_from_step(step, policy, self._source)

    def _forget_full(self, now: float) -> None:
        while self._full_at and next(iter(self._full_at.values())) <= now:
            self._full_at.popitem(last=False)

    def _enforce_cap(self) -> None:
        # Forgetting a bucket that is not yet full hands its account a full one early:
        # the price of bounded memory when more accounts are active than the cap.
        while len(self._full_at) > self._max_entries:
            self._full_at.popitem(last=False)


class RedisRateLimiter:
    """Buckets shared through Redis, with the ``on_error`` fallback while Redis is away."""

    def __init__(
        self, store: RedisStore, on_error: OnRedisError, clock: Callable[[], float]
    ) -> None:
        if on_error not in ("local", "allow", "deny"):
            raise ValueError(f"on_error must be local, allow or deny, not {on_error!r}")
        self._store = store
        self._on_error = on_error
        self._local = MemoryRateLimiter(clock, source="fallback-local")

    @property
    def healthy(self) -> bool:
        return self._store.healthy

    async def take(self, key: str, policy: BucketPolicy) -> Decision:
        try:
            answer = await self._store.take_token(key, policy.rate, policy.per_s, policy.burst)
        except StoreUnavailable:
            return self._fallback(key, policy)
        allowed, remaining, retry_after_s, reset_s = answer
        return Decision(allowed, remaining, retry_after_s, reset_s, policy, "redis")

    def _fallback(self, key: str, policy: BucketPolicy) -> Decision:
        if self._on_error == "local":
            return self._local.take_now(key, policy)
        if self._on_error == "allow":
            return Decision(True, policy.burst, 0.0, 0.0, policy, "fallback-allow")
        wait_s = self._store.cooldown_left_s()
        return Decision(False, 0, wait_s, wait_s, policy, "unavailable")


def decision_from_step(step: BucketStep, policy: BucketPolicy, source: str) -> Decision:
    return Decision(step.allowed, step.remaining, step.retry_after_s, step.reset_s, policy, source)


def rate_limit_headers(decision: Decision) -> list[tuple[str, str]]:
    """RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers-10), Retry-After."""
    name = quote_sf_string(decision.policy.name)
    headers = [("RateLimit-Policy", policy_header(decision.policy)), ("RateLimit", limit_header(decision, name))]
    if not decision.allowed:
        headers.append(("Retry-After", str(max(1, whole_seconds(decision.retry_after_s)))))
    return headers


def policy_header(policy: BucketPolicy) -> str:
    """RateLimit-Policy's value; it depends on the policy alone, so callers may keep it."""
    quota, window = quota_and_window(policy)
    return f"{quote_sf_string(policy.name)};q={quota};w={window}"


def limit_header(decision: Decision, quoted_name: str) -> str:
    """RateLimit's value; `quoted_name` is `quote_sf_string(decision.policy.name)`."""
    wait_s = decision.reset_s if decision.allowed else decision.retry_after_s
    return f"{quoted_name};r={max(0, decision.remaining)};t={whole_seconds(wait_s)}"


def quota_and_window(policy: BucketPolicy) -> tuple[int, int]:
    """The policy as integer ``q`` tokens per ``w`` seconds, as the draft's fields require."""
    window = max(1, round(policy.per_s))
    return max(1, round(policy.rate * window / policy.per_s)), window


def whole_seconds(seconds: float) -> int:
    # Tolerate float noise so 2.0000000001 s reads as 2, not 3.
    return max(0, math.ceil(seconds - TOLERANCE_S))


def quote_sf_string(value: str) -> str:
    """An RFC 8941 sf-string; characters it cannot carry become '?'."""
    safe = "".join(char if " " <= char <= "~" else "?" for char in value)
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'
