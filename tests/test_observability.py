"""Metrics and logs after scripted traffic: what /metrics says, what the access log says, what no log says.

The traffic is a fixed script against a simulated LivePerson upstream; every expected number
below is derived from that script (and the retry and breaker policies in the config), so a
change in what the pipeline counts shows up as a precise difference.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability import AccessLog, AccessRecord, JsonEventFormatter, LineHandler, format_time
from tests.harness import running_gateway, simulated, upstream_config, write_config
from tests.redis_servers import RedisProcess

pytestmark = pytest.mark.timeout(60)

ROUTE = "/api/account/{account}/lambdas/{function}/invoke"
POLICIES = """\
rate_limits:
  default: {rate: 1, per_s: 3600, burst: 100}
  accounts:
    limited: {rate: 1, per_s: 3600, burst: 2}
retry_policies:
  quick: {max_attempts: 3, base_delay_s: 0.001, max_delay_s: 0.002, budget_ratio: 10, budget_min_per_s: 100}
breaker_policies:
  quick: {fail_max: 3, reset_timeout_s: 60}
"""


def gateway_yaml(url: str, extra: str = "") -> str:
    return "upstreams:\n" + upstream_config("lp", url, "liveperson", [ROUTE], retry="quick", breaker="quick") + POLICIES + extra


def invoke(account: str, function: str) -> str:
    return f"/api/account/{account}/lambdas/{function}/invoke"


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by (sample name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]


# (account, function, expected status, expected class, expected upstream attempts)
SCRIPT = [
    ("acc1", "ok", 200, None, 1),
    ("acc1", "ok", 200, None, 1),
    ("acc1", "flaky", 200, None, 3),  # 502, 502, then success
    ("limited", "ok", 200, None, 1),
    ("limited", "ok", 200, None, 1),
    ("limited", "ok", 429, "rate_limited", 0),  # burst 2
    ("acc1", "down", 503, "upstream_unavailable", 3),  # the third failure opens the breaker
    ("acc1", "down", 503, "circuit_open", 0),
    ("acc1", "missing", 404, "not_found", 1),
]


async def test_metrics_and_access_log_after_scripted_traffic(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with simulated("liveperson") as sim:
        config = write_config(tmp_path, gateway_yaml(sim.url))
        async with running_gateway(config) as gw, gw.client() as client:
            ids = []
            for account, function, status, _, _ in SCRIPT:
                response = await client.post(invoke(account, function), json={"payload": 1})
                assert response.status_code == status, (function, response.text)
                ids.append(response.headers["x-request-id"])
            unrouted = await client.get("/no/such/route")
            assert unrouted.status_code == 404
            metrics = await client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    samples = scrape(metrics.text)

    expected_requests: dict[tuple[str, str, str], int] = {}
    for _, _, status, cls, _ in SCRIPT:
        key = ("lp", cls or "success", str(status))
        expected_requests[key] = expected_requests.get(key, 0) + 1
    expected_requests[("-", "not_found", "404")] = 1
    for (upstream, cls, status), count in expected_requests.items():
        assert sample(samples, "gateway_requests_total", upstream=upstream, **{"class": cls}, status=status) == count, (upstream, cls, status)

    # Upstream attempts by class: ok x4 + flaky's last = 5 successes; flaky's 2 + down's 3 = 5 unavailable.
    assert sample(samples, "gateway_upstream_attempts_total", upstream="lp", **{"class": "success"}) == 5
    assert sample(samples, "gateway_upstream_attempts_total", upstream="lp", **{"class": "upstream_unavailable"}) == 5
    assert sample(samples, "gateway_upstream_attempts_total", upstream="lp", **{"class": "not_found"}) == 1
    assert sample(samples, "gateway_upstream_retries_total", upstream="lp") == 4
    assert sample(samples, "gateway_upstream_latency_seconds_count", upstream="lp") == sum(s[4] for s in SCRIPT)
    assert sum(v for (name, _), v in samples.items() if name == "gateway_retry_stops_total") == 1  # down: attempts exhausted

    admitted = sum(1 for s in SCRIPT if s[3] != "rate_limited")
    assert sample(samples, "gateway_ratelimit_decisions_total", upstream="lp", decision="allowed", source="memory") == admitted
    assert sample(samples, "gateway_ratelimit_decisions_total", upstream="lp", decision="refused", source="memory") == 1

    assert sample(samples, "gateway_breaker_transitions_total", upstream="lp", to="open") == 1
    assert sample(samples, "gateway_breaker_state", upstream="lp", function="down", state="open") == 1
    assert sample(samples, "gateway_breaker_state", upstream="lp", function="down", state="closed") == 0
    assert sample(samples, "gateway_breaker_state", upstream="lp", function="ok", state="closed") == 1
    assert 0 < sample(samples, "gateway_breaker_open_remaining_seconds", upstream="lp", function="down") <= 60
    assert ("gateway_redis_up", frozenset()) not in samples  # no Redis configured: no Redis series

    lines = access_lines(caplog)
    assert len(lines) == len(SCRIPT) + 1
    for line, request_id, (account, function, status, cls, attempts) in zip(lines, ids, SCRIPT, strict=False):
        assert line["request_id"] == request_id
        assert (line["method"], line["route"], line["upstream"]) == ("POST", ROUTE, "lp")
        assert (line["account"], line["function"], line["status"], line["class"], line["attempts"]) == (account, function, status, cls, attempts)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
        assert line["duration_ms"] >= 0
    assert lines[-1]["route"] is None and lines[-1]["upstream"] is None and lines[-1]["status"] == 404


SECRETS = {
    "authorization": "Bearer SECRET-AUTHZ-71",
    "cookie": "session=SECRET-COOKIE-72; other=SECRET-COOKIE-73",
    "x-api-key": "SECRET-APIKEY-74",
    "proxy-authorization": "Basic SECRET-PROXY-75",
}
QUERY_SECRET = "SECRET-QUERY-76"
BODY_SECRET = "SECRET-BODY-77"
ADMIN_TOKEN = "SECRET-ADMIN-78"
WRONG_TOKEN = "SECRET-WRONG-79"
TEST_CLIENT_LOGGERS = ("httpx", "httpcore")  # the test's own client logs the URLs it requests


async def test_no_secret_reaches_any_log(tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials sent on every kind of request path never appear in any log record or output."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    caplog.set_level(logging.DEBUG)
    async with simulated("liveperson") as sim:
        config = write_config(tmp_path, gateway_yaml(sim.url))
        async with running_gateway(config) as gw, gw.client(headers=SECRETS) as client:
            for path in (invoke("acc1", "ok"), invoke("acc1", "down"), invoke("acc1", "missing"), invoke("limited", "fail"), "/nowhere", invoke("..", "ok")):
                await client.post(f"{path}?token={QUERY_SECRET}", content=BODY_SECRET.encode())
            for _ in range(3):
                await client.post(invoke("limited", "ok"), content=BODY_SECRET.encode())  # the third is refused
            await client.get("/admin/breakers", headers={"authorization": f"Bearer {WRONG_TOKEN}"})
            await client.post("/admin/login", data={"token": WRONG_TOKEN})
            await client.post("/admin/login", data={"token": ADMIN_TOKEN})
            await client.get("/admin/config", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert sim.calls and sim.calls[0].headers["Authorization"] == SECRETS["authorization"]  # they were really sent
    captured = capfd.readouterr()
    server_side = [r for r in caplog.records if not r.name.startswith(TEST_CLIENT_LOGGERS)]
    assert {"gateway.access", "gateway.app"} <= {r.name for r in server_side}
    formatter = logging.Formatter("%(name)s %(message)s")
    everything = "\n".join([captured.out, captured.err, *(formatter.format(r) for r in server_side), *(repr(r.args) for r in server_side)])
    for secret in (*SECRETS.values(), QUERY_SECRET, BODY_SECRET, ADMIN_TOKEN, WRONG_TOKEN):
        for part in re.findall(r"SECRET-[A-Z]+-\d+", secret):
            assert part not in everything, f"{part} leaked into the logs"


async def test_redis_health_fallback_and_errors_at_scrape_time(tmp_path: Path, redis_server: RedisProcess) -> None:
    extra = f"state: {{redis_url: '{redis_server.url}', on_redis_error: local}}\n"
    async with simulated("liveperson") as sim:
        config = write_config(tmp_path, gateway_yaml(sim.url, extra))
        async with running_gateway(config) as gw, gw.client() as client:
            assert (await client.post(invoke("acc2", "ok"))).status_code == 200
            healthy = scrape((await client.get("/metrics")).text)
            redis_server.kill()
            during_outage = 3
            for _ in range(during_outage):
                assert (await client.post(invoke("acc2", "ok"))).status_code == 200  # local buckets take over
            outage = scrape((await client.get("/metrics")).text)
            ready = await client.get("/readyz")
    assert sample(healthy, "gateway_redis_up") == 1
    assert sample(healthy, "gateway_ratelimit_fallback", mode="local") == 0
    assert sample(healthy, "gateway_ratelimit_decisions_total", upstream="lp", decision="allowed", source="redis") == 1
    assert sample(outage, "gateway_redis_up") == 0
    assert sample(outage, "gateway_ratelimit_fallback", mode="local") == 1
    assert sample(outage, "gateway_redis_errors_total", operation="take_token") == during_outage
    assert sample(outage, "gateway_ratelimit_decisions_total", upstream="lp", decision="allowed", source="fallback-local") == during_outage
    assert ready.status_code == 503 and ready.json()["redis"] == "unreachable"


async def test_reload_results_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with simulated("liveperson") as sim:
        config = write_config(tmp_path, gateway_yaml(sim.url))
        async with running_gateway(config) as gw, gw.client() as client:
            assert (await client.post("/admin/reload", headers=auth)).status_code == 200
            config.write_text("upstreams: {}\n")
            assert (await client.post("/admin/reload", headers=auth)).status_code == 400
            samples = scrape((await client.get("/metrics")).text)
    assert sample(samples, "gateway_config_reloads_total", result="accepted") == 1
    assert sample(samples, "gateway_config_reloads_total", result="rejected") == 1


def test_access_line_fields_and_time_format() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.access.unit")
    logger.handlers[:] = [Keep()]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    AccessLog(logger, wall_clock=lambda: 1_700_000_000.25).write(AccessRecord("rid", "GET", "/t/{function}", "a", "up", "f", 901, "function_error", 1, 0.0123456))
    line = orjson.loads(records[0].getMessage())
    assert line["time"] == "2023-11-14T22:13:20.250Z"
    assert line["duration_ms"] == 12.346 and line["status"] == 901 and line["class"] == "function_error"
    assert set(line) == {"time", "request_id", "method", "route", "account", "upstream", "function", "status", "class", "attempts", "duration_ms", "pid"}
    assert format_time(0.999) == "1970-01-01T00:00:00.999Z"


class CountingStream(io.BytesIO):
    """A binary stream that counts its writes (a write is a system call on a real stderr)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


class TextStream(io.TextIOWrapper):
    def __init__(self, binary: CountingStream) -> None:
        super().__init__(binary, encoding="utf-8")


def access_logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def record(request_id: str) -> AccessRecord:
    return AccessRecord(request_id, "POST", "/t/{function}", "a", "up", "f", 200, None, 1, 0.001)


async def test_access_lines_of_one_loop_turn_are_written_together() -> None:
    binary = CountingStream()
    handler = LineHandler(TextStream(binary))
    log = AccessLog(access_logger("test.access.batched", handler), wall_clock=lambda: 1_700_000_000.0)
    for n in range(5):
        log.write(record(f"r{n}"))
    assert binary.getvalue() == b""  # held until the end of this loop turn
    await asyncio.sleep(0)
    lines = [orjson.loads(line) for line in binary.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == [f"r{n}" for n in range(5)]
    assert binary.writes == 1
    log.write(record("r5"))
    await asyncio.sleep(0)
    assert binary.writes == 2 and orjson.loads(binary.getvalue().splitlines()[-1])["request_id"] == "r5"


def test_access_lines_outside_a_loop_and_other_records_are_written_at_once() -> None:
    binary = CountingStream()
    handler = LineHandler(TextStream(binary))
    log = AccessLog(access_logger("test.access.direct", handler), wall_clock=lambda: 1_700_000_000.0)
    log.write(record("now"))
    assert orjson.loads(binary.getvalue())["request_id"] == "now"
    logging.getLogger("test.access.direct").warning("plain %s", "record")
    assert binary.getvalue().splitlines()[-1] == b"plain record"


async def test_pending_access_lines_are_flushed_on_shutdown_and_when_large() -> None:
    binary = CountingStream()
    handler = LineHandler(TextStream(binary))
    log = AccessLog(access_logger("test.access.flush", handler), wall_clock=lambda: 1_700_000_000.0)
    log.write(record("pending"))
    logging.shutdown([lambda: handler])  # what the interpreter's exit does for every handler
    assert orjson.loads(binary.getvalue())["request_id"] == "pending"
    many = LineHandler.MAX_PENDING_BYTES // len(orjson.dumps(log.line(record("x")))) + 1
    for n in range(many):
        log.write(record(f"m{n}"))
    assert binary.writes >= 2  # the buffer's bound wrote without waiting for the loop turn
    await asyncio.sleep(0)
    assert len(binary.getvalue().splitlines()) == many + 1


def test_one_handler_serves_successive_loops_and_plain_threads() -> None:
    """It remembers the running loop; a loop that stopped, or another thread, must not be used."""
    binary = CountingStream()
    handler = LineHandler(TextStream(binary))
    log = AccessLog(access_logger("test.access.loops", handler), wall_clock=lambda: 1_700_000_000.0)

    async def write_then_turn(request_id: str) -> None:
        log.write(record(request_id))
        await asyncio.sleep(0)

    asyncio.run(write_then_turn("first-loop"))
    asyncio.run(write_then_turn("second-loop"))  # the remembered loop has stopped
    log.write(record("no-loop"))  # written at once: nothing would run a scheduled flush

    async def from_a_thread() -> None:
        await asyncio.to_thread(log.write, record("other-thread"))  # while this loop runs

    asyncio.run(from_a_thread())
    written = [orjson.loads(line)["request_id"] for line in binary.getvalue().splitlines()]
    assert written == ["first-loop", "second-loop", "no-loop", "other-thread"]


def test_a_broken_stream_does_not_fail_the_request() -> None:
    stream = TextStream(CountingStream())
    stream.close()
    log = AccessLog(access_logger("test.access.closed", LineHandler(stream)), wall_clock=lambda: 1_700_000_000.0)
    log.write(record("lost"))  # no exception reaches the pipeline


def test_event_log_lines_are_json_with_exceptions() -> None:
    try:
        raise ValueError('with "quotes"\nand a newline')
    except ValueError:
        record = logging.LogRecord("gateway.x", logging.ERROR, __file__, 1, "failed %s", ("here",), exc_info=__import__("sys").exc_info())
    line = orjson.loads(JsonEventFormatter().format(record))
    assert line["message"] == "failed here" and line["level"] == "ERROR" and "ValueError" in line["exception"]


async def test_metrics_endpoint_is_not_rate_limited_or_forwarded(tmp_path: Path) -> None:
    async with simulated("liveperson") as sim:
        config = write_config(tmp_path, gateway_yaml(sim.url).replace("burst: 100", "burst: 1"))
        async with running_gateway(config) as gw, gw.client() as client:
            for _ in range(5):
                assert (await client.get("/metrics")).status_code == 200
                assert (await client.get("/healthz")).status_code == 200
    assert sim.calls == []


def test_exposition_parses() -> None:
    """The text format stays parseable with the custom collector (no duplicate or malformed families)."""
    from gateway.breakers import BreakerPolicy, BreakerRegistry
    from gateway.observability import Metrics

    metrics = Metrics()
    breakers = BreakerRegistry(lambda: 1000.0)
    breakers.admit("u", 'we"ird\\fn', BreakerPolicy())
    metrics.watch_state(breakers, None, "local")
    names = {family.name for family in text_string_to_metric_families(metrics.exposition().decode())}
    assert {"gateway_breaker_state", "gateway_breaker_open_remaining_seconds", "gateway_requests"} <= names


# --- tracing (OpenTelemetry SDK, in-memory exporter) ---------------------------------------------

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


async def test_a_span_per_request_and_per_attempt_when_a_provider_is_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    import gateway.tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(gateway.tracing, "configured_provider", lambda: provider)
    async with simulated("liveperson") as sim:
        config = write_config(tmp_path, gateway_yaml(sim.url))
        async with running_gateway(config) as gw, gw.client() as client:
            response = await client.post(invoke("acc1", "flaky"), headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    assert response.status_code == 200
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    attempts = sorted((s for s in spans if s.kind == SpanKind.CLIENT), key=lambda s: s.attributes["gateway.attempt"])
    assert server.name == f"POST {ROUTE}"
    assert format(server.context.trace_id, "032x") == CALLER_TRACE and format(server.parent.span_id, "016x") == CALLER_SPAN
    assert server.attributes["gateway.upstream"] == "lp" and server.attributes["gateway.function"] == "flaky"
    assert server.attributes["gateway.attempts"] == 3 and server.attributes["http.response.status_code"] == 200
    assert [s.attributes["gateway.attempt"] for s in attempts] == [1, 2, 3]
    assert [s.attributes["http.response.status_code"] for s in attempts] == [502, 502, 200]
    assert all(s.parent.span_id == server.context.span_id for s in attempts)
    sent = [c.headers["traceparent"] for c in sim.calls]
    assert sent == [f"00-{CALLER_TRACE}-{format(s.context.span_id, '016x')}-01" for s in attempts]


async def test_without_a_provider_nothing_changes(tmp_path: Path) -> None:
    from gateway.tracing import configured_provider

    assert configured_provider() is None  # the API is installed here, but nothing configured it
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    async with simulated("liveperson") as sim:
        config = write_config(tmp_path, gateway_yaml(sim.url))
        async with running_gateway(config) as gw, gw.client() as client:
            assert gw.app.services is not None and gw.app.services.tracing is None
            assert (await client.post(invoke("acc1", "ok"), headers={"traceparent": traceparent})).status_code == 200
    assert sim.calls[0].headers["traceparent"] == traceparent  # passed through untouched


def test_without_opentelemetry_installed_tracing_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from gateway.tracing import configured_provider, tracing_from_environment

    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # makes `import opentelemetry` fail
    assert configured_provider() is None and tracing_from_environment() is None
