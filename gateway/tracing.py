"""OpenTelemetry spans: one per proxied request (SERVER), one per upstream attempt (CLIENT).

Tracing is on only when the `opentelemetry` API is importable *and* a tracer provider has
been configured for the process (by `opentelemetry-instrument`, or by the program that
embeds the gateway); `tracing_from_environment` returns None otherwise and nothing in the
request path changes, not even the headers sent upstream.

When it is on:
- the request span continues the caller's `traceparent` and is named `METHOD route-template`
  once the route is known; its attributes are those of the access-log line (the access log
  hands each record to `annotate`), never headers, bodies or query strings;
- each upstream attempt is a child span, and the attempt carries that span's `traceparent`
  (replacing the caller's), so upstream traces hang under the attempt that caused them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gateway.upstream import AttemptFailure, UpstreamClient, UpstreamReply, UpstreamRequest

if TYPE_CHECKING:
    from gateway.observability import AccessRecord

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
INSTRUMENTATION = "gateway"


def configured_provider() -> Any | None:
    """The process's tracer provider when one was configured, else None (also without OTel)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider


def tracing_from_environment() -> Tracing | None:
    provider = configured_provider()
    return None if provider is None else Tracing(provider)


class Tracing:
    """Span factory bound to one tracer provider."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate, trace

        self._trace = trace
        self._propagate = propagate
        self._tracer = provider.get_tracer(INSTRUMENTATION)

    async def traced(self, app: ASGIApp, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Run one request under a SERVER span that continues the caller's trace."""
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", ()) if name.decode("latin-1") in TRACE_HEADERS}
        parent = self._propagate.extract(carrier)
        method = scope.get("method", "-")
        attributes = {"http.request.method": method, "url.path": scope.get("path", ""), "url.scheme": scope.get("scheme", "http")}
        with self._tracer.start_as_current_span(method, context=parent, kind=self._trace.SpanKind.SERVER, attributes=attributes):
            await app(scope, receive, send)

    def annotate(self, record: AccessRecord) -> None:
        """Copy an access-log record onto the current request span."""
        span = self._trace.get_current_span()
        if not span.is_recording():
            return
        if record.route:
            span.update_name(f"{record.method} {record.route}")
            span.set_attribute("http.route", record.route)
        span.set_attribute("http.response.status_code", record.status)
        span.set_attribute("gateway.request_id", record.request_id)
        span.set_attribute("gateway.attempts", record.attempts)
        for key, value in (("gateway.upstream", record.upstream), ("gateway.function", record.function), ("gateway.account", record.account), ("gateway.class", record.error_class)):
            if value is not None:
                span.set_attribute(key, value)
        if record.status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, record.error_class or str(record.status)))

    def wrap_upstream(self, client: UpstreamClient) -> TracedUpstream:
        return TracedUpstream(client, self)

    def attempt_span(self, request: UpstreamRequest) -> Any:
        target = urlsplit(request.url)
        attributes = {
            "http.request.method": request.method,
            "server.address": target.hostname or "",
            "server.port": target.port or (443 if target.scheme == "https" else 80),
            "url.path": target.path,
            "gateway.attempt": int(_header(request.headers, "x-gateway-attempt") or 0),
        }
        return self._tracer.start_as_current_span(request.method, kind=self._trace.SpanKind.CLIENT, attributes=attributes)

    def propagation_headers(self) -> list[tuple[str, str]]:
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier)
        return list(carrier.items())

    def record_result(self, span: Any, result: UpstreamReply | AttemptFailure) -> None:
        if isinstance(result, AttemptFailure):
            span.set_attribute("error.type", result.failure.value)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, result.failure.value))
            return
        span.set_attribute("http.response.status_code", result.status)
        if result.status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(result.status)))


class TracedUpstream:
    """The upstream client with one CLIENT span per attempt and its traceparent on the wire."""

    def __init__(self, client: UpstreamClient, tracing: Tracing) -> None:
        self._client = client
        self._tracing = tracing

    async def send(self, request: UpstreamRequest, connect_s: float, per_try_s: float) -> UpstreamReply | AttemptFailure:
        with self._tracing.attempt_span(request) as span:
            headers = [(k, v) for k, v in request.headers if k.lower() not in TRACE_HEADERS]
            traced = request._replace(headers=headers + self._tracing.propagation_headers())
            result = await self._client.send(traced, connect_s, per_try_s)
            self._tracing.record_result(span, result)
            return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((value for key, value in headers if key.lower() == name), None)
