"""Health, readiness, metrics and the admin API (bearer token from `admin.token_env`)."""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.yamlsource import ConfigError

if TYPE_CHECKING:
    from gateway.app import Gateway

SECRET_WORDS = ("token", "secret", "password", "key", "credential")


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


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


def authorize(gateway: "Gateway", request: Request) -> Response | None:
    """404 while no token is configured (the admin API does not exist), 401 for a bad token."""
    token = admin_token(gateway)
    if token is None:
        return json_response({"detail": "not found"}, 404)
    offered = request.headers.get("authorization", "")
    scheme, _, value = offered.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        return Response(orjson.dumps({"detail": "missing or wrong bearer token"}), 401, {"WWW-Authenticate": 'Bearer realm="gateway-admin"'}, "application/json")
    return None


def admin_routes(gateway: "Gateway") -> list[Route]:
    def guarded(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            refusal = authorize(gateway, request)
            return refusal if refusal is not None else await handler(request)

        return endpoint

    async def breakers(_: Request) -> Response:
        assert gateway.services is not None
        return json_response({"breakers": gateway.services.breakers.snapshot()})

    async def reset_breaker(request: Request) -> Response:
        assert gateway.services is not None
        found = gateway.services.breakers.reset(request.path_params["upstream"], request.path_params["function"])
        return json_response({"reset": found}, 200 if found else 404)

    async def reload(_: Request) -> Response:
        try:
            settings = await gateway.reload_from(Path(gateway.settings.source))
        except ConfigError as exc:
            return json_response({"reloaded": False, "problems": [str(p) for p in exc.problems]}, 400)
        return json_response({"reloaded": True, "summary": settings.summary()})

    async def config(_: Request) -> Response:
        return json_response(mask_secrets(gateway.settings.config.model_dump(mode="json")))

    async def not_found(_: Request) -> Response:
        return json_response({"detail": "not found"}, 404)

    return [
        Route("/admin/breakers", guarded(breakers), methods=["GET"]),
        Route("/admin/breakers/{upstream}/{function:path}/reset", guarded(reset_breaker), methods=["POST"]),
        Route("/admin/reload", guarded(reload), methods=["POST"]),
        Route("/admin/config", guarded(config), methods=["GET"]),
        Route("/admin/{rest:path}", guarded(not_found)),
    ]


def mask_secrets(value: Any, key: str = "") -> Any:
    """Mask values whose key names a secret, and passwords inside URLs."""
    if isinstance(value, dict):
        return {k: mask_secrets(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v, key) for v in value]
    if isinstance(value, str):
        if any(word in key.lower() for word in SECRET_WORDS) and not key.lower().endswith("_env"):
            return "***"
        if "://" in value and "@" in value:
            scheme, rest = value.split("://", 1)
            return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return value
