"""Coalescing end to end: the real gateway on uvicorn, a counting simulated upstream, real sockets.

Every test counts the calls that reached the upstream. Scripted replies differ from one call to
the next, so a second invocation would also show in the answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.dedupe import request_key
from gateway.simulators import Reply, SimulatedUpstream
from gateway.store import RedisStore
from tests.clients.lp_client import pick_port80_host, run_lp_client_async
from tests.harness import RunningGateway, gateway_process, running_gateway, simulated, upstream_config, write_config
from tests.redis_servers import RedisProcess

pytestmark = pytest.mark.timeout(60)

ROUTES = {"http": "/fn/{function}", "liveperson": "/api/account/{account}/lambdas/{function}/invoke"}
PATHS = {"http": "/fn/f", "liveperson": "/api/account/le-1/lambdas/f/invoke"}
REPLAY = "x-gateway-replayed"
SLOW_S = 0.5


def text(body: bytes, delay_s: float = 0.0, status: int = 200) -> Reply:
    return Reply(status, body, (("Content-Type", "text/plain"),), delay_s)


def gateway_yaml(url: str, dialect: str = "http", *, dedupe: str = "", upstream_dedupe: str | None = None, max_attempts: int = 1, redis_url: str | None = None, total_s: float = 10) -> str:
    extra = {"dedupe": upstream_dedupe} if upstream_dedupe else {}
    entry = upstream_config(
        "up", url, dialect, [ROUTES[dialect]], retry="under_test", breaker="lenient", rate_limited="false",
        timeouts=f"{{connect_s: 1, per_try_s: {total_s}, total_s: {total_s}}}", **extra,
    )
    state = f"state:\n  redis_url: {redis_url}\n" if redis_url else ""
    return (
        f"{state}upstreams:\n{entry}"
        f"retry_policies:\n  under_test: {{max_attempts: {max_attempts}, base_delay_s: 0.01, max_delay_s: 0.02}}\n"
        "breaker_policies:\n  lenient: {fail_max: 1000, reset_timeout_s: 1}\n"
        + (f"dedupe: {dedupe}\n" if dedupe else "")
    )


@contextlib.asynccontextmanager
async def gateway_for(tmp_path: Path, upstream: SimulatedUpstream, dialect: str = "http", **options: Any) -> AsyncIterator[RunningGateway]:
    async with running_gateway(write_config(tmp_path, gateway_yaml(upstream.url, dialect, **options))) as gateway:
        yield gateway


async def post(client: httpx.AsyncClient, request_id: str | None, body: bytes = b'{"n": 1}', *, after_s: float = 0.0, path: str = PATHS["http"], **kwargs: Any) -> httpx.Response:
    await asyncio.sleep(after_s)
    headers = {"X-Request-ID": request_id} if request_id else {}
    return await client.post(path, content=body, headers=headers, **kwargs)


def without_replay(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in response.headers.raw if k.lower() != REPLAY.encode()]


def dedupe_counts(gateway: RunningGateway) -> dict[str, float]:
    """gateway_dedupe_total per kind (read while the gateway runs: its metrics go with it)."""
    assert gateway.app.services is not None
    registry = gateway.app.services.metrics.registry
    return {kind: registry.get_sample_value("gateway_dedupe_total", {"upstream": "up", "kind": kind}) or 0.0 for kind in ("coalesced", "replayed")}


def problem_of(response: httpx.Response) -> dict[str, Any]:
    return orjson.loads(response.content)["problem"]


# --- in flight --------------------------------------------------------------------------------


async def test_concurrent_duplicates_make_one_upstream_call_and_get_identical_answers(tmp_path: Path) -> None:
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream) as gateway:
        upstream.script(text(b"the one answer", SLOW_S), text(b"a second invocation"))
        async with gateway.client() as client:
            first, second = await asyncio.gather(post(client, "same-1"), post(client, "same-1", after_s=0.1))
        counts = dedupe_counts(gateway)
    assert upstream.count() == 1
    assert (first.status_code, first.content) == (second.status_code, second.content) == (200, b"the one answer")
    assert without_replay(first) == without_replay(second)
    assert REPLAY not in first.headers and second.headers[REPLAY] == "true"
    assert counts == {"coalesced": 1, "replayed": 0}


async def test_first_caller_leaving_does_not_stop_the_invocation(tmp_path: Path) -> None:
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream) as gateway:
        upstream.script(text(b"finished anyway", 2 * SLOW_S), text(b"a second invocation"))
        async with gateway.client() as client:
            with pytest.raises(httpx.ReadTimeout):
                await post(client, "leaver-1", timeout=0.2)
            joined = await post(client, "leaver-1")
    assert upstream.count() == 1
    assert (joined.status_code, joined.content, joined.headers[REPLAY]) == (200, b"finished anyway", "true")


async def test_an_attempt_under_way_finishes_for_a_retry_that_comes_after_it(tmp_path: Path) -> None:
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream) as gateway:
        upstream.script(text(b"stored for the retry", SLOW_S), text(b"a second invocation"))
        async with gateway.client() as client:
            with pytest.raises(httpx.ReadTimeout):
                await post(client, "leaver-2", timeout=0.1)
            await asyncio.sleep(SLOW_S + 0.2)  # nobody waits while the attempt completes
            retry = await post(client, "leaver-2")
        counts = dedupe_counts(gateway)
    assert upstream.count() == 1
    assert (retry.status_code, retry.content, retry.headers[REPLAY]) == (200, b"stored for the retry", "true")
    assert counts == {"coalesced": 0, "replayed": 1}


async def test_a_response_over_the_size_limit_is_not_shared(tmp_path: Path) -> None:
    big_a, big_b, big_c = b"a" * 5000, b"b" * 5000, b"c" * 5000
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream, dedupe="{max_body_bytes: 1000}") as gateway:
        upstream.script(text(big_a, SLOW_S), text(big_b), text(big_c))
        async with gateway.client() as client:
            first, second = await asyncio.gather(post(client, "big-1"), post(client, "big-1", after_s=0.1))
            third = await post(client, "big-1")
    assert upstream.count() == 3  # the waiter went on its own once the response outgrew the limit; nothing was stored
    assert [first.content, second.content, third.content] == [big_a, big_b, big_c]
    assert not any(REPLAY in r.headers for r in (first, second, third))


# --- just finished ----------------------------------------------------------------------------


async def test_a_repeat_within_ttl_is_replayed_and_after_ttl_goes_upstream(tmp_path: Path) -> None:
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream, dedupe="{ttl_s: 0.5}") as gateway:
        upstream.script(text(b"first run"), text(b"second run"))
        async with gateway.client() as client:
            original = await post(client, "ttl-1")
            repeat = await post(client, "ttl-1")
            assert upstream.count() == 1
            await asyncio.sleep(0.6)
            later = await post(client, "ttl-1")
        counts = dedupe_counts(gateway)
    assert (repeat.status_code, repeat.content, repeat.headers[REPLAY]) == (original.status_code, original.content, "true")
    assert without_replay(repeat) == without_replay(original)
    assert upstream.count() == 2
    assert (later.content, REPLAY in later.headers) == (b"second run", False)
    assert counts == {"coalesced": 0, "replayed": 1}


async def test_a_replayed_function_error_reports_the_original_attempts(tmp_path: Path) -> None:
    failure = {"errorCode": "com.liveperson.faas.handler.custom-failure", "errorMsg": "whoops"}
    async with simulated("liveperson") as upstream, gateway_for(tmp_path, upstream, "liveperson", max_attempts=3) as gateway:
        upstream.script(Reply.json(503, {"errorCode": "com.liveperson.faas.es.unavailable"}), Reply.json(901, failure), Reply.json(200, {"ran": "again"}))
        async with gateway.client() as client:
            original = await post(client, "fn-error-1", path=PATHS["liveperson"])
            repeat = await post(client, "fn-error-1", path=PATHS["liveperson"])
    assert upstream.count() == 2
    assert (original.status_code, problem_of(original)["class"], problem_of(original)["attempts"]) == (901, "function_error", 2)
    assert (repeat.status_code, repeat.content, repeat.headers[REPLAY]) == (901, original.content, "true")
    assert problem_of(repeat)["attempts"] == 2


async def test_a_retryable_failure_is_not_stored(tmp_path: Path) -> None:
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream) as gateway:
        upstream.script(text(b"busy", status=503), text(b"fresh try"))
        async with gateway.client() as client:
            failed = await post(client, "busy-1")
            retried = await post(client, "busy-1")
    assert upstream.count() == 2
    assert (failed.status_code, retried.status_code, retried.content) == (503, 200, b"fresh try")
    assert REPLAY not in retried.headers


# --- what is one request ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(("id-a", b"{}"), ("id-b", b"{}"), id="different ids"),
        pytest.param((None, b"{}"), (None, b"{}"), id="no id"),
        pytest.param(("id-c", b'{"n": 1}'), ("id-c", b'{"n": 2}'), id="same id, different body"),
    ],
)
async def test_requests_that_differ_are_not_coalesced(tmp_path: Path, first: tuple[str | None, bytes], second: tuple[str | None, bytes]) -> None:
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream) as gateway:
        upstream.script(text(b"one", SLOW_S), text(b"two", SLOW_S))
        async with gateway.client() as client:
            answers = await asyncio.gather(post(client, first[0], first[1]), post(client, second[0], second[1], after_s=0.1))
            repeat = await post(client, None, first[1])
        counts = dedupe_counts(gateway)
    assert upstream.count() == 3
    assert sorted(a.content for a in answers) == [b"one", b"two"]
    assert not any(REPLAY in r.headers for r in (*answers, repeat))
    assert counts == {"coalesced": 0, "replayed": 0}


async def test_an_upstream_can_turn_coalescing_off(tmp_path: Path) -> None:
    async with simulated("http") as upstream, gateway_for(tmp_path, upstream, upstream_dedupe="{enabled: false}") as gateway:
        upstream.script(text(b"one", SLOW_S), text(b"two"), text(b"three"))
        async with gateway.client() as client:
            answers = await asyncio.gather(post(client, "off-1"), post(client, "off-1", after_s=0.1))
            repeat = await post(client, "off-1")
    assert upstream.count() == 3
    assert [a.content for a in (*answers, repeat)] == [b"one", b"two", b"three"]


# --- the real LivePerson client ---------------------------------------------------------------


async def test_lp_client_retries_after_its_own_timeout_run_the_function_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    host = pick_port80_host()
    answer = {"answer": 42}
    async with simulated("liveperson") as upstream:
        upstream.script(Reply.json(200, answer, delay_s=1.0), Reply.json(200, {"answer": "a second invocation"}))
        config = write_config(tmp_path, gateway_yaml(upstream.url, "liveperson"))
        async with running_gateway(config, host=host, port=80):
            command = {"host": host, "accountId": "le-1234", "lambdaUuid": "slow-fn", "timeout": 300, "requestId": "lp-dedupe-1", "payload": {"n": 1}}
            result = await run_lp_client_async(command, timeout_s=30)
    assert upstream.count() == 1
    assert result["outcome"] == "resolved"
    value = result["value"]
    assert (value["ok"], value["status"], value["body"]) == (True, 200, answer)
    assert value["headers"][REPLAY] == "true"
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    mine = [line for line in lines if line["request_id"] == "lp-dedupe-1"]
    assert len(mine) >= 2  # the client did retry through the gateway
    assert (mine[-1]["status"], mine[-1].get("replayed")) == (200, True)


# --- across replicas --------------------------------------------------------------------------


async def test_two_gateway_processes_sharing_redis_make_one_upstream_call(tmp_path: Path, redis_server: RedisProcess) -> None:
    async with simulated("http") as upstream:
        upstream.script(text(b"once across replicas", SLOW_S), text(b"a second invocation"), text(b"a third invocation"))
        config = write_config(tmp_path, gateway_yaml(upstream.url, redis_url=redis_server.url))
        with gateway_process(config) as one, gateway_process(config) as two:
            async with httpx.AsyncClient(timeout=10) as client:
                answers = await asyncio.gather(
                    client.post(one.url + PATHS["http"], content=b"{}", headers={"X-Request-ID": "replicas-1"}),
                    client.post(two.url + PATHS["http"], content=b"{}", headers={"X-Request-ID": "replicas-1"}),
                )
                later = await client.post(two.url + PATHS["http"], content=b"{}", headers={"X-Request-ID": "replicas-1"})
    assert upstream.count() == 1
    assert [(a.status_code, a.content) for a in (*answers, later)] == [(200, b"once across replicas")] * 3
    assert sorted(REPLAY in a.headers for a in answers) == [False, True]
    assert later.headers[REPLAY] == "true"


def key_of(request_id: str, body: bytes) -> str:
    """The key the gateway computes for POST /fn/f with this id and body."""
    request = {"method": "POST", "path": PATHS["http"], "raw_path": PATHS["http"].encode(), "query_string": b"", "headers": [(b"x-request-id", request_id.encode())]}
    found = request_key(request, "up", None, "f", body, (b"x-request-id",))
    assert found is not None
    return found


@contextlib.asynccontextmanager
async def redis_store(server: RedisProcess) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(server.url, timeout_s=0.5, clock=time.monotonic)
    try:
        yield store
    finally:
        await store.aclose()


async def test_a_request_in_flight_on_a_live_replica_is_not_run_again(tmp_path: Path, redis_server: RedisProcess) -> None:
    async with simulated("http") as upstream, redis_store(redis_server) as store:
        await store.set_value(key_of("elsewhere-1", b"{}"), b"Fanother-replica", 30)
        async with gateway_for(tmp_path, upstream, redis_url=redis_server.url, total_s=1.0) as gateway, gateway.client() as client:
            answer = await post(client, "elsewhere-1", b"{}")
    assert upstream.count() == 0
    assert answer.status_code == 504
    assert orjson.loads(answer.content)["code"] == "gateway.upstream_timeout"


async def test_a_dead_replicas_mark_lapses_and_the_request_runs_here(tmp_path: Path, redis_server: RedisProcess) -> None:
    key = key_of("orphan-1", b"{}")
    async with simulated("http") as upstream, redis_store(redis_server) as store:
        upstream.script(text(b"ran here"))
        await store.set_value(key, b"Fdead-replica", 0.4)  # nobody renews it
        async with gateway_for(tmp_path, upstream, redis_url=redis_server.url) as gateway, gateway.client() as client:
            answer = await post(client, "orphan-1", b"{}")
        stored = await store.get_value(key)
    assert (upstream.count(), answer.status_code, answer.content) == (1, 200, b"ran here")
    assert stored is not None and stored.startswith(b"D")
