"""One request through the gateway, stage by stage.

1. Request id: the caller's `X-Request-ID` when it is 1-200 visible ASCII characters, else a new one.
2. Route: the raw path against the compiled templates -> upstream, account, function
   (no match: 404 `gateway.no_route`; a refused capture: 400 `gateway.bad_request`).
3. Size: a declared body over `server.max_body_bytes` is refused with 413 before it is read.
4. Account and token bucket: 429 `gateway.rate_limited` without calling the upstream.
5. Body: buffered up to `server.replay_max_bytes` (so it can be replayed), streamed beyond
   (an `auth: aws_sigv4` upstream's body is always buffered: its signature covers the body).
6. Dedupe: a request whose (upstream, function, caller id, body) is in flight or just
   finished is answered from that invocation (see `gateway.dedupe`).
7. Attempts: breaker admission, one upstream call, classification, breaker record, and the
   retry decision (policy, deadline, budget) until an answer is final.
8. Answer: success streamed back untouched; every error rendered by `gateway.envelope`.

Errors are values until the last stage: every stage returns an Outcome or a reply, and only
`_respond_*` functions write to the client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from gateway.breakers import Admission, BreakerPolicy, BreakerRegistry, Refusal
from gateway.classify import (
    ERROR_BODY_LIMIT,
    CompiledPack,
    classify_response,
    classify_transport,
    needs_inspection,
    parse_error_body,
)
from gateway.config import RetryPolicyConfig, UpstreamConfig
from gateway.envelope import ProblemContext, Rendered, render_gateway_error, render_upstream_error, retry_after_header
from gateway.observability import AccessLog, AccessRecord, Metrics
from gateway.outcomes import NO_ROUTE, ErrorClass, Outcome, traits_of
from gateway.ratelimit import BucketPolicy, Decision, bucket_key, limit_header, policy_header, quote_sf_string, validate_account_id
from gateway.retry import RetryBudget, decide_retry
from gateway.routing import RefusedCapture, RouteMatch, capture_problem
from gateway.upstream import HOP_BY_HOP, AttemptFailure, UpstreamBodyError, UpstreamClient, UpstreamReply, UpstreamRequest, hop_by_hop_names

log = logging.getLogger("gateway.pipeline")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

ATTEMPT_HEADER = "X-Gateway-Attempt"
DISCONNECT_EXTENSION = "gateway.disconnect"  # scope["extensions"] key: a future resolved when the client goes
# scope["extensions"] key: (outcome, request id) when the server protocol answered the client
# itself mid-request (a stalled or malformed body) and closed the connection.
ANSWERED_EXTENSION = "gateway.answered"
INTERNAL_FAULT = Outcome(ErrorClass.GATEWAY_ERROR, 500, "gateway.internal", "the gateway failed to handle this request", made_by_gateway=True)
SHUTDOWN_CUT = Outcome(ErrorClass.GATEWAY_ERROR, 503, "gateway.shutting_down", "the gateway shut down before this request finished (server.shutdown_grace_s passed)", made_by_gateway=True)
STREAM_WATCH_BYTES = 64 * 1024
RECENT_BUCKETS = 4096  # bucket keys kept per pipeline
SMALL_BODY_BYTES = 64 * 1024  # a success body up to this declared length is relayed in one message
_USABLE_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,200}")
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-gateway-attempt"}


@dataclass(frozen=True, slots=True)
class UpstreamPlan:
    """Everything about one upstream that a request needs, prepared once per configuration."""

    name: str
    config: UpstreamConfig
    pack: CompiledPack
    retry: RetryPolicyConfig
    breaker: BreakerPolicy
    account_header: bytes | None
    base_url: str  # config.url without credentials
    authorization: str | None = None  # from credentials in config.url; replaces the caller's

    @property
    def dialect(self) -> str:
        return self.config.dialect


@dataclass(slots=True)
class Exchange:
    """The state of one request as it moves through the stages."""

    scope: Scope
    receive: Receive
    send: Send
    request_id: str
    started: float
    match: RouteMatch | None = None
    plan: UpstreamPlan | None = None
    account: str | None = None
    attempts: int = 0
    status: int = 0
    error_class: ErrorClass | None = None
    replayed: bool = False
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    disconnect_watch: asyncio.Future[Any] | None = None
    body_failure: Exception | None = None  # why a streamed body stopped: the upstream client reports only a broken connection
    shared: bool = False  # one invocation for several callers (gateway.dedupe): a departure only stops its retries
    headers: dict[bytes, bytes] = field(init=False)  # each request header's first value, looked up in one step

    def __post_init__(self) -> None:
        self.headers = first_values(self.scope["headers"])

    def problem_context(self, type_base: str) -> ProblemContext:
        return ProblemContext(self.plan.name if self.plan else None, self.attempts, self.request_id, type_base)

    def client_gone(self) -> bool:
        watch = self.disconnect_watch
        return watch is not None and watch.done() and not self.shared

    def watch_disconnect(self) -> None:
        """Start listening for the client going away (only once the body has been read)."""
        if self.disconnect_watch is None:
            # the server's own signal when it gives one (gateway.server); a detached exchange's
            # client is its flight, heard through `receive` like any other server's client
            gone = None if self.shared else self.scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
            self.disconnect_watch = gone if gone is not None else asyncio.ensure_future(_wait_disconnect(self.receive))


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class BodyTooLarge(Exception):
    pass


class ClientDisconnected(Exception):
    pass


@dataclass(slots=True)
class RequestBody:
    """A request body: `buffered` when it fitted the replay limit, else `stream` (one use only)."""

    buffered: bytes | None
    stream: AsyncIterator[bytes] | None = None

    @property
    def replayable(self) -> bool:
        return self.buffered is not None


class Pipeline:
    """The ASGI callable that proxies one request. Built per configuration; cheap to rebuild."""

    def __init__(self, runtime: "RuntimeView") -> None:
        self.rt = runtime
        # per policy (by identity: a policy's generated hash is Python code): it, RateLimit-Policy, its quoted name
        self._policy_headers: dict[int, tuple[BucketPolicy, bytes, str]] = {}
        self._bucket_keys: dict[tuple[str, str | None], str] = {}  # (upstream, account) -> its bucket's key
        self._new_id = RandomIds()
        self._successes: dict[int, Outcome] = {}  # per status: outcomes are immutable, made once

    def _success(self, status: int) -> Outcome:
        outcome = self._successes.get(status)
        if outcome is None:
            outcome = self._successes[status] = Outcome(None, status)
        return outcome

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(scope, receive, send, "", self.rt.clock())
        exchange.request_id = usable_request_id(exchange.headers.get(b"x-request-id")) or self._new_id()
        try:
            await self._handle(exchange)
        except ClientDisconnected:
            answered = scope.get("extensions", {}).get(ANSWERED_EXTENSION)
            if answered is not None:
                outcome, exchange.request_id = answered
                exchange.status, exchange.error_class = outcome.status, outcome.error_class
            else:
                exchange.status = exchange.status or 499
        except Exception:  # a bug in the gateway must still answer, and never as an upstream fault
            log.exception("unhandled error in request %s", exchange.request_id)
            await self._answer_gateway_fault(exchange)
        except asyncio.CancelledError:  # uvicorn cancels what outlasts shutdown_grace_s; its own answer is a bare text 500
            await self._answer_gateway_fault(exchange, SHUTDOWN_CUT)
            raise
        finally:
            if exchange.disconnect_watch is not None:
                exchange.disconnect_watch.cancel()
            self._account(exchange)

    async def _handle(self, exchange: Exchange) -> None:
        if header_bytes(exchange.scope["headers"]) > self.rt.max_header_bytes:
            outcome = Outcome(ErrorClass.CLIENT_ERROR, 431, "gateway.headers_too_large", f"request headers exceed {self.rt.max_header_bytes} bytes", made_by_gateway=True)
            return await self._respond_gateway(exchange, None, outcome)
        found = self.rt.router.match(_raw_path(exchange.scope))
        if found is None:
            return await self._respond_gateway(exchange, None, NO_ROUTE)
        plan = self.rt.plans[found.route.upstream]
        exchange.plan = plan
        if isinstance(found, RefusedCapture):
            return await self._respond_bad_request(exchange, found.reason)
        exchange.match = found
        declared = _declared_length(exchange.headers)
        if declared is not None and declared > self.rt.max_body_bytes:
            return await self._respond_too_large(exchange)
        account, problem = self._account_of(exchange.headers, found, plan)
        if problem:
            return await self._respond_bad_request(exchange, problem)
        exchange.account = account
        if plan.config.rate_limited and not await self._take_token(exchange, plan):
            return
        try:
            body = await self._read_body(exchange)
        except BodyTooLarge:
            return await self._respond_too_large(exchange)
        if await self.rt.dedupe.serve(self, exchange, body):
            return
        try:
            answer = await self.forward(exchange, body)
        except BodyTooLarge:  # a streamed body went over the limit: the upstream got a truncated request
            return await self._respond_too_large(exchange)
        await self.respond(exchange, answer)

    # --- stage 4: account and token bucket -------------------------------------------------

    def _account_of(self, headers: dict[bytes, bytes], found: RouteMatch, plan: UpstreamPlan) -> tuple[str | None, str | None]:
        account = found.account
        if account is None and plan.account_header is not None:
            raw = headers.get(plan.account_header)
            if raw is not None:
                account = raw.decode("latin-1")
                reason = capture_problem(account, account)
                if reason:
                    return None, f"account header {reason}"
        if account is None and plan.dialect == "lambda":
            account = sigv4_access_key(headers.get(b"authorization"))
        if account is not None and not validate_account_id(account):
            return None, "account id is not acceptable"
        return account, None

    async def _take_token(self, exchange: Exchange, plan: UpstreamPlan) -> bool:
        policy = self.rt.bucket_policy(exchange.account)
        decision: Decision = await self.rt.limiter.take(self._bucket_key(plan.name, exchange.account), policy)
        metrics = self.rt.metrics
        metrics.child(metrics.ratelimit, plan.name, "allowed" if decision.allowed else "refused", decision.source).inc()
        if decision.source == "unavailable":
            # Retry-After: the outage cool-down left, when the next request may find Redis again
            outcome = Outcome(ErrorClass.GATEWAY_ERROR, 503, "gateway.ratelimit_unavailable", "rate-limit state is unreachable", decision.retry_after_s, made_by_gateway=True)
            await self._respond_gateway(exchange, plan.dialect, outcome)
            return False
        exchange.extra_headers.extend(self._rate_limit_headers(decision))
        if decision.allowed:
            return True
        outcome = Outcome(ErrorClass.RATE_LIMITED, 429, "gateway.rate_limited", f"account over its limit of {policy.rate:g} per {policy.per_s:g} s", decision.retry_after_s, made_by_gateway=True)
        await self._respond_gateway(exchange, plan.dialect, outcome)
        return False

    def _bucket_key(self, upstream: str, account: str | None) -> str:
        """`bucket_key`, kept for the accounts seen lately (it validates both ids each time)."""
        keys = self._bucket_keys
        key = keys.get((upstream, account))
        if key is None:
            if len(keys) >= RECENT_BUCKETS:
                keys.clear()
            key = keys[(upstream, account)] = bucket_key(upstream, account)
        return key

    def _rate_limit_headers(self, decision: Decision) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
        """RateLimit-Policy and RateLimit (what `rate_limit_headers` says), the policy's part made once."""
        policy = decision.policy
        fixed = self._policy_headers.get(id(policy))
        if fixed is None or fixed[0] is not policy:
            fixed = self._policy_headers[id(policy)] = (policy, policy_header(policy).encode(), quote_sf_string(policy.name))
        return (b"ratelimit-policy", fixed[1]), (b"ratelimit", limit_header(decision, fixed[2]).encode())

    # --- stage 5: body ----------------------------------------------------------------------

    async def _read_body(self, exchange: Exchange) -> RequestBody:
        """Buffer up to the replay limit; past it, hand on a stream that enforces the size limit."""
        chunks: list[bytes] = []
        size = 0
        more = True
        plan = exchange.plan
        signed = plan is not None and plan.config.auth == "aws_sigv4"  # SigV4 signs the body's hash: it must be whole
        buffer_max = self.rt.max_body_bytes if signed else self.rt.replay_max_bytes
        while more:
            chunk, more = await self._receive_chunk(exchange, size)
            size += len(chunk)
            chunks.append(chunk)
            if size > buffer_max:  # even when it all came at once: over the limit is never replayed
                return RequestBody(None, self._rest_of_body(exchange, chunks, size, more))
        return RequestBody(b"".join(chunks))

    async def _receive_chunk(self, exchange: Exchange, size_so_far: int) -> tuple[bytes, bool]:
        """The next piece of the request body and whether more follows; enforces max_body_bytes."""
        message = await exchange.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        if size_so_far + len(chunk) > self.rt.max_body_bytes:
            raise BodyTooLarge()
        return chunk, message.get("more_body", False)

    async def _rest_of_body(self, exchange: Exchange, head: list[bytes], size: int, more: bool) -> AsyncIterator[bytes]:
        for chunk in head:
            yield chunk
        try:
            while more:
                chunk, more = await self._receive_chunk(exchange, size)
                size += len(chunk)
                yield chunk
        except (BodyTooLarge, ClientDisconnected) as exc:
            exchange.body_failure = exc
            raise

    # --- stage 7: attempts ------------------------------------------------------------------

    async def forward(self, exchange: Exchange, body: RequestBody) -> "Answer":
        """Attempts until an answer is final. Returns the answer; does not write it."""
        plan = exchange.plan
        assert plan is not None and exchange.match is not None
        budget = self.rt.budget(plan)
        budget.record_first_attempt()
        deadline = exchange.started + plan.config.timeouts.total_s
        last: Answer | None = None
        while True:
            admission = self.rt.breakers.admit(plan.name, exchange.match.function, plan.breaker)
            if isinstance(admission, Refusal):
                return last or Answer.of_gateway(_circuit_open(admission))
            if last is not None:
                last.discard()
            last = await self._attempt(exchange, plan, body, admission, deadline)
            if last.final_success or not body.replayable:
                return last
            decision = decide_retry(plan.retry, last.outcome, exchange.attempts, self.rt.clock() - exchange.started, plan.config.timeouts.total_s, self.rt.random)
            if not decision.retry:
                self._note_stop(plan, decision.reason, last.outcome)
                return last
            if not budget.try_spend():
                self._note_stop(plan, "budget", last.outcome)
                return last
            exchange.watch_disconnect()
            if not await self._pause(exchange, decision.delay_s):
                raise ClientDisconnected()
            self.rt.metrics.retries.labels(plan.name).inc()

    def _note_stop(self, plan: UpstreamPlan, reason: str, outcome: Outcome) -> None:
        if outcome.error_class is not None and traits_of(outcome.error_class).retryable:
            self.rt.metrics.retry_stops.labels(plan.name, reason).inc()

    async def _pause(self, exchange: Exchange, delay_s: float) -> bool:
        """Sleep before the next attempt; False when the client went away meanwhile."""
        watch = exchange.disconnect_watch
        assert watch is not None
        if watch.done():
            return False
        done, _ = await asyncio.wait({watch}, timeout=delay_s)
        return not done

    async def _attempt(self, exchange: Exchange, plan: UpstreamPlan, body: RequestBody, admission: Admission, deadline: float) -> "Answer":
        remaining = deadline - self.rt.clock()
        if remaining <= 0:
            admission.release()
            return Answer.of_gateway(Outcome(ErrorClass.UPSTREAM_TIMEOUT, 504, "gateway.upstream_timeout", "the request's total deadline passed", made_by_gateway=True))
        exchange.attempts += 1
        request = self._upstream_request(exchange, plan, body)
        started = self.rt.clock()
        if body.replayable:
            exchange.watch_disconnect()  # the body is read: a client leaving mid-call can be heard
        try:
            answer = await _unless_client_leaves(exchange, self._call(plan, request, remaining, deadline))
            if exchange.body_failure is not None:  # the caller's fault, not the upstream's: no breaker record
                answer.discard()
                raise exchange.body_failure
        except BaseException:
            admission.release()  # a cancelled or abandoned request is not a failure
            raise
        metrics = self.rt.metrics
        metrics.child(metrics.upstream_latency, plan.name).observe(self.rt.clock() - started)
        metrics.child(metrics.attempts, plan.name, answer.outcome.error_class.value if answer.outcome.error_class else "success").inc()
        _record(admission, answer.outcome)
        return answer

    async def _call(self, plan: UpstreamPlan, request: UpstreamRequest, remaining: float, deadline: float) -> "Answer":
        result = await self.rt.upstream.send(request, plan.config.timeouts.connect_s, min(plan.config.timeouts.per_try_s, remaining))
        return await self._evaluate(plan, result, deadline)

    def _upstream_request(self, exchange: Exchange, plan: UpstreamPlan, body: RequestBody) -> UpstreamRequest:
        scope = exchange.scope
        headers = forwarded_headers(scope, exchange.headers, exchange.request_id, exchange.attempts)
        query = scope.get("query_string", b"")
        url = plan.base_url + _raw_path(scope) + ("?" + query.decode("latin-1") if query else "")
        payload = body.buffered if body.buffered is not None else body.stream
        assert payload is not None
        declared = _declared_length(exchange.headers)
        if body.buffered is None and declared is not None:
            headers.append(("Content-Length", str(declared)))  # else a streamed body goes chunked, which some upstreams refuse
        if plan.authorization is not None:
            headers = [(k, v) for k, v in headers if k.lower() != "authorization"] + [("Authorization", plan.authorization)]
        if self.rt.signer is not None and plan.config.auth == "aws_sigv4" and body.buffered is not None:
            headers = self.rt.signer.sign(scope["method"], url, headers, body.buffered)
        return UpstreamRequest(scope["method"], url, headers, payload)

    async def _evaluate(self, plan: UpstreamPlan, result: UpstreamReply | AttemptFailure, deadline: float) -> "Answer":
        if isinstance(result, AttemptFailure):
            return Answer.of_gateway(classify_transport(result.failure, result.detail))
        if not needs_inspection(plan.pack, result.status, result.headers):
            return Answer(self._success(result.status), result, None, None)
        headers = result.header_map()
        try:
            async with asyncio.timeout(max(0.001, deadline - self.rt.clock())):
                raw, complete = await result.read_bounded(ERROR_BODY_LIMIT)
        except TimeoutError:
            raw, complete = b"", False
        result.release() if complete else result.close()
        raw = decode_error_body(raw, headers.get("content-encoding")) if complete else raw
        parsed = parse_error_body(raw) if complete else None
        outcome = classify_response(plan.pack, result.status, headers, parsed, raw, self.rt.wall_clock())
        return Answer(outcome, None, result.headers, parsed if complete else None)

    # --- stage 8: answering ----------------------------------------------------------------

    async def respond(self, exchange: Exchange, answer: "Answer") -> None:
        if answer.reply is not None:
            return await self._stream_success(exchange, answer.reply)
        plan = exchange.plan
        assert plan is not None
        outcome = answer.outcome
        if answer.upstream_headers is None:
            return await self._respond_gateway(exchange, plan.dialect, outcome)
        rendered = render_upstream_error(plan.dialect, outcome, answer.upstream_headers, answer.body, exchange.problem_context(self.rt.type_base))
        await self._write(exchange, rendered, outcome)

    async def _stream_success(self, exchange: Exchange, reply: UpstreamReply) -> None:
        exchange.status = reply.status
        headers = [*reply.headers, *exchange.extra_headers, (b"x-request-id", exchange.request_id.encode())]
        await exchange.send({"type": "http.response.start", "status": reply.status, "headers": headers})
        declared = reply.declared_length
        if declared is not None and declared <= SMALL_BODY_BYTES:
            return await self._send_small_body(exchange, reply)
        sent = 0
        try:
            async for chunk in reply.iter_body():
                await exchange.send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
                if sent > STREAM_WATCH_BYTES:
                    exchange.watch_disconnect()
                    if exchange.client_gone():
                        reply.close()
                        raise ClientDisconnected()
        except UpstreamBodyError:
            reply.close()
            exchange.error_class = ErrorClass.UPSTREAM_UNAVAILABLE  # logged and counted as the upstream's failure, not a success
            raise ClientDisconnected() from None  # headers are out: the only honest signal is to cut the response
        reply.release()
        await exchange.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_small_body(self, exchange: Exchange, reply: UpstreamReply) -> None:
        """A body of small declared length goes out in one message (no per-chunk loop, no empty last message)."""
        try:
            body = await reply.read_whole()
        except UpstreamBodyError:
            reply.close()
            exchange.error_class = ErrorClass.UPSTREAM_UNAVAILABLE  # logged and counted as the upstream's failure, not a success
            raise ClientDisconnected() from None  # headers are out: the only honest signal is to cut the response
        reply.release()
        await exchange.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _respond_gateway(self, exchange: Exchange, dialect: str | None, outcome: Outcome) -> None:
        extra = [retry_after_header(outcome.retry_after_s)] if outcome.retry_after_s is not None else []
        rendered = render_gateway_error(dialect, outcome, exchange.problem_context(self.rt.type_base), extra)
        await self._write(exchange, rendered, outcome)

    async def _respond_bad_request(self, exchange: Exchange, reason: str) -> None:
        dialect = exchange.plan.dialect if exchange.plan else None
        await self._respond_gateway(exchange, dialect, Outcome(ErrorClass.CLIENT_ERROR, 400, "gateway.bad_request", reason, made_by_gateway=True))

    async def _respond_too_large(self, exchange: Exchange) -> None:
        dialect = exchange.plan.dialect if exchange.plan else None
        detail = f"request body exceeds {self.rt.max_body_bytes} bytes"
        await self._respond_gateway(exchange, dialect, Outcome(ErrorClass.CLIENT_ERROR, 413, "gateway.body_too_large", detail, made_by_gateway=True))

    async def _answer_gateway_fault(self, exchange: Exchange, outcome: Outcome = INTERNAL_FAULT) -> None:
        if exchange.status:
            return  # the response had started: nothing sane can be added
        dialect = exchange.plan.dialect if exchange.plan else None
        try:
            await self._respond_gateway(exchange, dialect, outcome)
        except Exception:
            log.exception("could not answer request %s", exchange.request_id)

    async def _write(self, exchange: Exchange, rendered: Rendered, outcome: Outcome) -> None:
        exchange.status = rendered.status
        exchange.error_class = outcome.error_class
        headers = [
            *rendered.headers,
            *exchange.extra_headers,
            (b"content-length", str(len(rendered.body)).encode()),
            (b"x-request-id", exchange.request_id.encode()),
        ]
        await exchange.send({"type": "http.response.start", "status": rendered.status, "headers": headers})
        await exchange.send({"type": "http.response.body", "body": rendered.body, "more_body": False})

    def _account(self, exchange: Exchange) -> None:
        plan = exchange.plan
        duration = self.rt.clock() - exchange.started
        upstream = plan.name if plan else "-"
        self.rt.metrics.count_request(upstream, _class_label(exchange), exchange.status, duration)
        match = exchange.match
        self.rt.access_log.write(
            AccessRecord(
                request_id=exchange.request_id,
                method=exchange.scope.get("method", "-"),
                route=match.route.template if match else None,
                account=exchange.account,
                upstream=plan.name if plan else None,
                function=match.function if match else None,
                status=exchange.status,
                error_class=exchange.error_class.value if exchange.error_class else None,
                attempts=exchange.attempts,
                duration_s=duration,
                replayed=exchange.replayed,
            )
        )


def _class_label(exchange: Exchange) -> str:
    """The metric label: the error class, `success`, or `client_closed` when the client left (499)."""
    if exchange.error_class is not None:
        return exchange.error_class.value
    return "client_closed" if exchange.status == 499 else "success"


@dataclass(slots=True)
class Answer:
    """The outcome of the last attempt and what is needed to write it.

    `reply` is set for a success whose body has not been read; `upstream_headers`/`body` for an
    upstream error (body read, bounded, connection released); neither for a gateway error.
    """

    outcome: Outcome
    reply: UpstreamReply | None
    upstream_headers: list[tuple[bytes, bytes]] | None
    body: Any

    @classmethod
    def of_gateway(cls, outcome: Outcome) -> "Answer":
        return cls(outcome, None, None, None)

    @property
    def final_success(self) -> bool:
        return self.reply is not None

    def discard(self) -> None:
        if self.reply is not None:
            self.reply.close()


class RuntimeView:
    """What the pipeline reads from the running gateway; implemented by `gateway.app.Runtime`."""

    router: Any
    plans: dict[str, UpstreamPlan]
    limiter: Any
    breakers: BreakerRegistry
    upstream: UpstreamClient
    metrics: Metrics
    access_log: AccessLog
    signer: Any
    clock: Callable[[], float]
    wall_clock: Callable[[], float]
    random: Callable[[], float]
    max_body_bytes: int
    max_header_bytes: int
    replay_max_bytes: int
    type_base: str
    dedupe: Any  # gateway.dedupe.DedupeGate: answers duplicates from one invocation

    def bucket_policy(self, account: str | None) -> BucketPolicy: ...

    def budget(self, plan: UpstreamPlan) -> RetryBudget: ...


async def _unless_client_leaves(exchange: Exchange, call: Coroutine[Any, Any, "Answer"]) -> "Answer":
    """Await `call`; if the client disconnects first, cancel it and raise ClientDisconnected.

    uvicorn does not cancel a request whose client left: without this, the attempt would run
    on and its outcome (a slow failure, a per-try timeout) would be held against the breaker.
    The call runs in the request's own task (a task per attempt cost a tenth of the pipeline's
    instructions): the client leaving cancels this task, and that one cancellation comes out of
    here as ClientDisconnected, while any other (a shutdown) stays a cancellation.
    """
    watch = exchange.disconnect_watch
    if watch is None or exchange.shared:
        return await call
    if watch.done():
        call.close()
        raise ClientDisconnected()
    task = asyncio.current_task(watch.get_loop())  # with its loop given, no getpid system call (Python 3.11)
    assert task is not None
    leaving = _CancelOnLeave(task)
    # a done-callback rather than asyncio.wait: this runs on every attempt, and wait() builds a
    # future, a set and two callbacks each time
    watch.add_done_callback(leaving)
    try:
        answer = await call
    except asyncio.CancelledError:
        if leaving.fired and task.uncancel() == 0:
            raise ClientDisconnected() from None
        raise
    finally:
        leaving.armed = False  # a callback already scheduled must not cancel what comes next
        watch.remove_done_callback(leaving)
    if watch.done():
        answer.discard()  # it finished as the client left: nobody wants the answer
        raise ClientDisconnected()
    return answer


class _CancelOnLeave:
    """The done-callback on the disconnect future: cancels the task while it awaits the call."""

    __slots__ = ("task", "armed", "fired")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.armed = True
        self.fired = False

    def __call__(self, _: asyncio.Future[Any]) -> None:
        if self.armed:
            self.fired = True
            self.task.cancel()


def _record(admission: Admission, outcome: Outcome) -> None:
    """SPEC.md: failures are upstream_unavailable/timeout and server_error; a throttle changes nothing."""
    if outcome.error_class is ErrorClass.RATE_LIMITED:
        admission.release()
    elif outcome.error_class is not None and traits_of(outcome.error_class).breaker_failure:
        admission.record_failure()
    else:
        admission.record_success()


def _circuit_open(refusal: Refusal) -> Outcome:
    detail = f"circuit open for {refusal.key.upstream}/{refusal.key.function}"
    return Outcome(ErrorClass.CIRCUIT_OPEN, 503, "gateway.circuit_open", detail, max(1.0, refusal.retry_after_s), made_by_gateway=True)


def request_id_of(scope: Scope) -> str:
    """The caller's X-Request-ID when it is 1-200 visible ASCII characters, else a new one."""
    return usable_request_id(_header(scope, b"x-request-id")) or os.urandom(16).hex()


def usable_request_id(value: bytes | None) -> str | None:
    """An X-Request-ID value the gateway can pass on (1-200 visible ASCII characters), else None."""
    if value is not None and _USABLE_REQUEST_ID.fullmatch(value):
        return value.decode("ascii")
    return None


def first_values(headers: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Each header name's first value (ASGI names are lower-case)."""
    return dict(reversed(list(headers)))


def header_bytes(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The size of a header block: names, values, and ": " and CRLF for each line."""
    pairs = list(headers)
    return sum(map(len, chain.from_iterable(pairs))) + 4 * len(pairs)


class RandomIds:
    """New request ids: 128 random bits in hex, as uuid4().hex, without a system call for each.

    os.urandom is a getrandom system call; this draws 256 ids' worth at once. One per pipeline,
    so each worker process draws its own.
    """

    __slots__ = ("_pool", "_next")

    def __init__(self) -> None:
        self._pool = b""
        self._next = 0

    def __call__(self) -> str:
        start = self._next
        if start >= len(self._pool):
            self._pool, start = os.urandom(4096), 0
        self._next = start + 16
        return self._pool[start : start + 16].hex()


def forwarded_headers(scope: Scope, first: dict[bytes, bytes], request_id: str, attempt: int) -> list[tuple[str, str]]:
    """The caller's headers minus hop-by-hop ones, plus X-Forwarded-*, the request id and attempt.

    `first` is `first_values(scope["headers"])`.
    """
    raw = scope["headers"]
    drop = hop_by_hop_names([v for n, v in raw if n == b"connection"], _REQUEST_DROP) if b"connection" in first else _REQUEST_DROP
    headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw if n not in drop]
    client = scope.get("client")
    prior = first.get(b"x-forwarded-for")
    peer = client[0] if client else "unknown"
    headers.append(("X-Forwarded-For", f"{prior.decode('latin-1')}, {peer}" if prior else peer))
    headers.append(("X-Forwarded-Proto", scope.get("scheme", "http")))
    host = first.get(b"host")
    if host is not None:
        headers.append(("X-Forwarded-Host", host.decode("latin-1")))
    headers.append(("X-Request-ID", request_id))
    headers.append((ATTEMPT_HEADER, str(attempt)))
    return headers


def sigv4_access_key(authorization: bytes | None) -> str | None:
    """The access key id of `AWS4-HMAC-SHA256 Credential=<AKID>/...`, or None."""
    if not authorization or not authorization.startswith(b"AWS4-HMAC-SHA256 "):
        return None
    marker = authorization.find(b"Credential=")
    if marker < 0:
        return None
    credential = authorization[marker + 11 :].split(b",", 1)[0]
    akid = credential.split(b"/", 1)[0].strip()
    return akid.decode("latin-1") if akid else None


def decode_error_body(raw: bytes, encoding: str | None) -> bytes:
    """Undo gzip/deflate on a bounded error body so it can be classified; else keep the bytes."""
    if not encoding or encoding.strip().lower() not in ("gzip", "deflate", "x-gzip"):
        return raw
    try:
        decompressor = zlib.decompressobj(wbits=47)  # auto-detects gzip and zlib headers
        text = decompressor.decompress(raw, ERROR_BODY_LIMIT + 1)
    except zlib.error:
        return raw
    return text


def _raw_path(scope: Scope) -> str:
    raw = scope.get("raw_path")
    if raw:
        return raw.split(b"?", 1)[0].decode("latin-1")
    return scope["path"]


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _declared_length(headers: dict[bytes, bytes]) -> int | None:
    value = headers.get(b"content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None
