"""The real LivePerson Node client sees through the gateway what it sees without it.

The client (npm `liveperson-functions-client`, driven by tests/clients/lp_client.py) cannot be
given a port, so the simulated LivePerson upstream listens on port 80 of one loopback address
(A) and the gateway on port 80 of another (B), with `http://A:80` as its upstream. Every case
runs directly against A and through B, in v1 and v2 mode, with `failOnErrorStatusCode` true
(the client throws) and false (it resolves `{ok: false, ...}`). The resolved value or the
error's name, the status and the body must match; only the `problem` member differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.simulators import Reply, SimulatedUpstream, behaviour_of
from tests.clients.lp_client import CANDIDATE_HOSTS, can_bind_port80, run_lp_client_async
from tests.harness import running_gateway, upstream_config, write_config
from tests.problem_schema import assert_problem, without_problem

ROUTES = [
    "/api/account/{account}/lambdas/{function}/invoke",
    "/api/account/{account}/events/{function}/invoke",
]
# The client's own retries times the gateway's would trip the default breaker on the crash case;
# the breaker is not what these tests compare, so it is set out of reach.
POLICIES = (
    "retry_policies:\n  quick: {max_attempts: 2, base_delay_s: 0.01, max_delay_s: 0.02, retry_after_max_s: 0.5}\n"
    "breaker_policies:\n  lenient: {fail_max: 100, reset_timeout_s: 30}\n"
)
BEHAVIOURS = ("ok", "fail", "timeout", "missing", "badinput", "throttle", "crash")
CLIENT_RETRIED = {"throttle", "crash"}  # statuses the client retries by itself (429, 5xx)

# V2 bodies ({"code", "message"}, DIALECTS.md) for the v2-mode upstream.
V2_REPLIES = {
    "fail": Reply.json(901, {"code": "com.customer.faas.function.threw-error", "message": "whoops"}),
    "timeout": Reply.json(901, {"code": "com.customer.faas.function.execution-exceeded", "message": "Function exceeded its execution time"}),
    "missing": Reply.json(404, {"code": "com.liveperson.faas.function.not-found", "message": "Function does not exist"}),
    "badinput": Reply.json(400, {"code": "com.liveperson.faas.es.badinput", "message": "Payload was in the wrong format"}),
    "throttle": Reply.json(429, {"code": "com.liveperson.faas.es.ratelimit", "message": "Too many requests for this account"}),
    "crash": Reply.json(500, {"code": "com.liveperson.faas.es.general", "message": "General error"}),
}

# (mode, behaviour) -> the error the client throws with failOnErrorStatusCode (None: it resolves ok)
THROWN: dict[tuple[str, str], str | None] = {
    ("v1", "ok"): None,
    ("v1", "fail"): "FaaSLambdaError",
    ("v1", "timeout"): "FaaSLambdaError",  # errorCode com.liveperson.faas.handler.*
    ("v1", "missing"): "FaaSInvokeError",
    ("v1", "badinput"): "FaaSInvokeError",
    ("v1", "throttle"): "FaaSInvokeError",
    ("v1", "crash"): "FaaSInvokeError",
    ("v2", "ok"): None,
    ("v2", "fail"): "FaaSLambdaError",  # code com.customer.faas.function.threw-error
    ("v2", "timeout"): "FaaSInvokeError",  # the client only recognises threw-error
    ("v2", "missing"): "FaaSInvokeError",
    ("v2", "badinput"): "FaaSInvokeError",
    ("v2", "throttle"): "FaaSInvokeError",
    ("v2", "crash"): "FaaSInvokeError",
}
COMPARED_HEADERS = ("content-type",)


class LivePersonV2Upstream(SimulatedUpstream):
    """The shared LivePerson simulator, answering errors with V2 bodies."""

    def _canned(self, request: web.Request, body: bytes) -> Reply:
        return V2_REPLIES.get(behaviour_of(request.path)) or super()._canned(request, body)


def port80_hosts(count: int) -> list[str]:
    """Loopback addresses with port 80 free, in random order (other tests use the low ones)."""
    candidates = list(CANDIDATE_HOSTS[13:])
    random.shuffle(candidates)
    hosts = [h for h in candidates[:40] if can_bind_port80(h)][:count]
    assert len(hosts) == count, "not enough 127.0.0.x addresses with port 80 free"
    return hosts


@dataclass
class Pair:
    upstream: SimulatedUpstream
    direct_host: str
    gateway_host: str


@contextlib.asynccontextmanager
async def lp_pair(tmp_path: Path, mode: str) -> AsyncIterator[Pair]:
    upstream_host, gateway_host = port80_hosts(2)
    kind = LivePersonV2Upstream if mode == "v2" else SimulatedUpstream
    upstream = await kind("liveperson", host=upstream_host, port=80).start()
    try:
        text = POLICIES + "upstreams:\n" + upstream_config("lp", f"http://{upstream_host}:80", "liveperson", ROUTES, retry="quick", breaker="lenient")
        async with running_gateway(write_config(tmp_path, text), host=gateway_host, port=80):
            yield Pair(upstream, upstream_host, gateway_host)
    finally:
        await upstream.stop()


def command(host: str, mode: str, uuid: str, throw: bool, client_retries: bool) -> dict[str, Any]:
    cmd: dict[str, Any] = {"host": host, "version": mode, "lambdaUuid": uuid, "payload": {"order": 42}, "failOnErrorStatusCode": throw, "timeout": 10000}
    if not client_retries:
        cmd["retries"] = False
    return cmd


def comparable(result: dict[str, Any], host: str, uuid: str) -> dict[str, Any]:
    """What the caller's code can see, minus the address and id it called and the gateway's `problem`."""
    if result["outcome"] == "thrown":
        return {
            "outcome": "thrown",
            "name": result["name"],
            "status": result["status"],
            "body": without_problem(result["body"]),
            "causes": [c["name"] for c in result["causes"]],
        }
    value = result["value"]
    return {
        "outcome": "resolved",
        "ok": value["ok"],
        "status": value["status"],
        "statusText": value.get("statusText"),
        "retryCount": value.get("retryCount"),
        "url": value["url"].replace(f"//{host}/", "//HOST/").replace(f"/{uuid}/", "/UUID/"),
        "body": without_problem(value["body"]),
        "headers": {k: value["headers"].get(k) for k in COMPARED_HEADERS},
    }


def body_of(result: dict[str, Any]) -> Any:
    return result["body"] if result["outcome"] == "thrown" else result["value"]["body"]


def case_uuid(behaviour: str, throw: bool, client_retries: bool, route: str) -> str:
    """The lambda UUID of one run: the simulator's behaviour first, the run's label after it."""
    return f"{behaviour}-{'throw' if throw else 'resolve'}-{'retries' if client_retries else 'once'}-{route}"


async def run_case(pair: Pair, mode: str, behaviour: str, throw: bool, client_retries: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    return await asyncio.gather(
        run_lp_client_async(command(pair.direct_host, mode, case_uuid(behaviour, throw, client_retries, "direct"), throw, client_retries)),
        run_lp_client_async(command(pair.gateway_host, mode, case_uuid(behaviour, throw, client_retries, "gateway"), throw, client_retries)),
    )


def check_same(pair: Pair, mode: str, behaviour: str, throw: bool, retries: bool, direct: dict[str, Any], through: dict[str, Any]) -> None:
    direct_view = comparable(direct, pair.direct_host, case_uuid(behaviour, throw, retries, "direct"))
    gateway_view = comparable(through, pair.gateway_host, case_uuid(behaviour, throw, retries, "gateway"))
    assert gateway_view == direct_view
    expected = THROWN[(mode, behaviour)]
    if expected is None:
        assert direct["outcome"] == "resolved" and direct["value"]["ok"] is True
        assert "problem" not in body_of(through)
        return
    if throw:
        assert direct["name"] == expected
    else:
        assert direct["outcome"] == "resolved" and direct["value"]["ok"] is False
    problem = assert_problem(body_of(through)["problem"])
    assert problem["status"] == (through["status"] if throw else through["value"]["status"])
    assert problem["upstream"] == "lp"


@pytest.mark.parametrize("mode", ["v1", "v2"])
@pytest.mark.parametrize("behaviour", BEHAVIOURS)
async def test_lp_client_sees_the_same(tmp_path: Path, mode: str, behaviour: str) -> None:
    async with lp_pair(tmp_path, mode) as pair:
        cases = [(throw, False) for throw in (True, False)]
        results = await asyncio.gather(*(run_case(pair, mode, behaviour, throw, retries) for throw, retries in cases))
        calls = {c.path.split("/")[-2] for c in pair.upstream.calls}
    for (throw, retries), (direct, through) in zip(cases, results):
        check_same(pair, mode, behaviour, throw, retries, direct, through)
    assert {f"{behaviour}-throw-once-direct", f"{behaviour}-throw-once-gateway"} <= calls


@pytest.mark.parametrize("mode", ["v1", "v2"])
async def test_client_retries_see_the_same(tmp_path: Path, mode: str) -> None:
    """With the client's own retries on, a 5xx is retried 3 times either way (retryCount 3)."""
    async with lp_pair(tmp_path, mode) as pair:
        direct, through = await run_case(pair, mode, "crash", False, True)
        direct_calls = pair.upstream.count("crash-resolve-retries-direct")
        gateway_calls = pair.upstream.count("crash-resolve-retries-gateway")
    check_same(pair, mode, "crash", False, True, direct, through)
    assert direct["value"]["retryCount"] == 3 and direct_calls == 4
    assert gateway_calls == 4 * through["value"]["body"]["problem"]["attempts"]
