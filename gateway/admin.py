"""Health, readiness, metrics and the admin API (bearer token from `admin.token_env`).

Every `/admin` path answers 404 while the token variable is unset: the admin API does not
exist then. With it set, a request needs `Authorization: Bearer <token>` (compared in
constant time), else 401. A browser cannot send that header when it navigates, so the
status page and its JSON also accept a session cookie, set by the page's login form: an
HMAC of the token (so every worker and replica can check it without shared state, and
changing the token logs everyone out), HttpOnly and SameSite=Strict. Only those two read-only
paths take the cookie; everything that changes state needs the bearer token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from gateway.breakers import key_for
from gateway.envelope import render_unrouted
from gateway.outcomes import NO_ROUTE, ErrorClass, Outcome
from gateway.pipeline import INTERNAL_FAULT, request_id_of
from gateway.status_page import collect_stats, login_page, static_asset, status_page
from gateway.yamlsource import ConfigError

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)

SECRET_WORDS = ("token", "secret", "password", "passwd", "key", "credential", "auth")
NOT_SECRET_KEYS = frozenset({"auth", "account_header", "token_env"})
SESSION_COOKIE = "gw_admin"
MAX_LOGIN_BODY_BYTES = 4096
Handler = Callable[[Request], Awaitable[Response]]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


def ops_routes(gateway: "Gateway") -> list[Route]:
    async def healthz(_: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(_: Request) -> Response:
        ready, detail = await gateway.ready()
        return json_response({"status": "ready" if ready else "not ready", **detail}, 200 if ready else 503)

    async def metrics(_: Request) -> Response:
        services = gateway.services
        body = services.metrics.exposition() if services else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)]


def admin_token(gateway: "Gateway") -> str | None:
    return os.environ.get(gateway.settings.config.admin.token_env) or None


def session_value(token: str) -> str:
    """The cookie that proves a login with `token`; never the token itself."""
    return hmac.new(token.encode(), b"gateway-admin-session:v1", hashlib.sha256).hexdigest()


def has_bearer(request: Request, token: str) -> bool:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def has_session(request: Request, token: str) -> bool:
    offered = request.cookies.get(SESSION_COOKIE, "")
    return hmac.compare_digest(offered.encode(), session_value(token).encode())


def problem_response(gateway: "Gateway", request: Request, outcome: Outcome, headers: dict[str, str] | None = None) -> Response:
    """The same problem object as the proxy's own errors, for the operational and admin paths."""
    rendered = render_unrouted(outcome, request_id_of(request.scope), gateway.settings.config.server.error_type_base)
    response = Response(rendered.body, status_code=rendered.status, headers=headers)
    response.raw_headers.extend(rendered.headers)
    return response


def refused(gateway: "Gateway", request: Request) -> Response:
    outcome = Outcome(ErrorClass.AUTH_ERROR, 401, "gateway.unauthorized", "missing or wrong bearer token", made_by_gateway=True)
    return problem_response(gateway, request, outcome, {"WWW-Authenticate": 'Bearer realm="gateway-admin"'})


def not_found(gateway: "Gateway", request: Request) -> Response:
    return problem_response(gateway, request, NO_ROUTE)


def ops_exception_handlers(gateway: "Gateway") -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """Starlette's own refusals (405) and faults (500) as problem objects, not plain text."""

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        if error.status_code == 405:
            outcome = Outcome(ErrorClass.CLIENT_ERROR, 405, "gateway.method_not_allowed", f"{request.method} is not allowed here", made_by_gateway=True)
        elif error.status_code == 404:
            outcome = NO_ROUTE
        else:
            outcome = Outcome(ErrorClass.CLIENT_ERROR, error.status_code, "gateway.bad_request", str(error.detail), made_by_gateway=True)
        headers = dict(error.headers or {})
        if "Allow" in headers:  # joined from a set (here and by Starlette): make the order stable
            headers["Allow"] = ", ".join(sorted(method.strip() for method in headers["Allow"].split(",")))
        return problem_response(gateway, request, outcome, headers)

    async def fault(request: Request, error: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
        return problem_response(gateway, request, INTERNAL_FAULT)

    return {HTTPException: http_error, Exception: fault}


def authorize(gateway: "Gateway", request: Request, *, cookie_ok: bool = False) -> Response | None:
    """None when the request may proceed; else 404 (no token configured) or 401."""
    token = admin_token(gateway)
    if token is None:
        return not_found(gateway, request)
    if has_bearer(request, token) or (cookie_ok and has_session(request, token)):
        return None
    return refused(gateway, request)


def admin_routes(gateway: "Gateway") -> list[Route]:
    def guarded(handler: Handler, *, cookie_ok: bool = False) -> Handler:
        async def endpoint(request: Request) -> Response:
            refusal = authorize(gateway, request, cookie_ok=cookie_ok)
            return refusal if refusal is not None else await handler(request)

        return endpoint

    def exists(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            return not_found(gateway, request) if admin_token(gateway) is None else await handler(request)

        return endpoint

    async def breakers(_: Request) -> Response:
        assert gateway.services is not None
        return json_response({"breakers": gateway.services.breakers.snapshot()})

    async def reset_breaker(request: Request) -> Response:
        services, runtime = gateway.services, gateway.runtime
        assert services is not None and runtime is not None
        upstream, function = request.path_params["upstream"], request.path_params["function"]
        if services.breakers.reset(upstream, function):
            return json_response({"reset": True})
        plan = runtime.plans.get(upstream)
        if plan is None or services.replicator is None:
            return json_response({"reset": False}, 404)
        # Never seen here, but it may be open on another replica: the reset goes to all of them.
        services.breakers.announce_reset(key_for(upstream, function, plan.breaker))
        return json_response({"reset": True, "known_here": False})

    async def reload(_: Request) -> Response:
        try:
            settings = await gateway.reload_everywhere()
        except ConfigError as exc:
            return json_response({"reloaded": False, "problems": [str(p) for p in exc.problems]}, 400)
        return json_response({"reloaded": True, "summary": settings.summary()})

    async def config(_: Request) -> Response:
        return json_response(mask_secrets(gateway.settings.config.model_dump(mode="json")))

    async def stats(_: Request) -> Response:
        return json_response(collect_stats(gateway), headers={"Cache-Control": "no-store"})

    async def status(request: Request) -> Response:
        token = admin_token(gateway)
        assert token is not None
        if has_bearer(request, token) or has_session(request, token):
            return status_page()
        return login_page(401)

    async def login(request: Request) -> Response:
        return await log_in(gateway, request)

    async def static(request: Request) -> Response:
        return static_asset(request.path_params["name"])

    async def unknown(request: Request) -> Response:
        allowed = {method for route in known for method in route.methods or () if route.matches(request.scope)[0] is Match.PARTIAL}
        if allowed:
            raise HTTPException(405, headers={"Allow": ", ".join(allowed)})  # sorted by http_error
        return not_found(gateway, request)

    known = [
        Route("/admin/breakers", guarded(breakers), methods=["GET"]),
        Route("/admin/breakers/{upstream}/{function:path}/reset", guarded(reset_breaker), methods=["POST"]),
        Route("/admin/reload", guarded(reload), methods=["POST"]),
        Route("/admin/config", guarded(config), methods=["GET"]),
        Route("/admin/stats", guarded(stats, cookie_ok=True), methods=["GET"]),
        Route("/admin/status", exists(status), methods=["GET"]),
        Route("/admin/login", exists(login), methods=["POST"]),
        Route("/admin/static/{name}", exists(static), methods=["GET"]),
    ]
    return [*known, Route("/admin/{rest:path}", guarded(unknown))]


async def log_in(gateway: "Gateway", request: Request) -> Response:
    """The status page's login form: a right token sets the session cookie and goes to the page."""
    token = admin_token(gateway)
    assert token is not None
    body = await read_bounded(request, MAX_LOGIN_BODY_BYTES)
    offered = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
    if not hmac.compare_digest(offered.encode(), token.encode()):
        return login_page(401, "wrong token")
    secure = "; Secure" if request.url.scheme == "https" else ""
    cookie = f"{SESSION_COOKIE}={session_value(token)}; Path=/admin; HttpOnly; SameSite=Strict{secure}"
    return Response(status_code=303, headers={"Location": "/admin/status", "Set-Cookie": cookie, "Cache-Control": "no-store"})


async def read_bounded(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def mask_secrets(value: Any, key: str = "") -> Any:
    """Mask values whose key names a secret, and credentials inside URLs."""
    if isinstance(value, dict):
        return {k: mask_secrets(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v, key) for v in value]
    if isinstance(value, str):
        return "***" if is_secret_key(key) else mask_url(value)
    return value


def is_secret_key(key: str) -> bool:
    lowered = key.lower()
    if lowered in NOT_SECRET_KEYS or lowered.endswith("_env"):
        return False
    return any(word in lowered for word in SECRET_WORDS)


def mask_url(value: str) -> str:
    """`scheme://user:***@host/path?password=***`; anything that is not a URL is kept."""
    if "://" not in value:
        return value
    scheme, rest = value.split("://", 1)
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    masked = f"{scheme}://{netloc}{slash}{tail}"
    if "?" not in masked:
        return masked
    return mask_query(masked)


def mask_query(url: str) -> str:
    parts = urlsplit(url)
    pairs = [pair.partition("=") for pair in parts.query.split("&")]
    query = "&".join(f"{name}{eq}{'***' if is_secret_key(name) else val}" for name, eq, val in pairs)
    return urlunsplit(parts._replace(query=query))
