"""Clients that send too much or too slowly cannot make the gateway hold them.

uvicorn (with httptools) buffers a request head without limit and waits for it, and for a
request body, forever. The gateway's protocol bounds both: a head past twice
`max_header_bytes` gets 431 while it is still arriving, a head incomplete after
`client_header_timeout_s` or a body stalled for `client_body_timeout_s` gets 408, a connection
that never sends a byte is closed. Nothing partial reaches the upstream. Over raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.simulators import SimulatedUpstream
from tests.harness import RunningGateway, running_gateway, simulated, upstream_config, write_config
from tests.problem_schema import assert_problem

pytestmark = pytest.mark.timeout(60)

ROUTE = "/api/account/{account}/lambdas/{function}/invoke"
PATH = "/api/account/a/lambdas/ok/invoke"
TIMEOUT_S = 0.5
BOUND_S = 10.0


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[RunningGateway, SimulatedUpstream]]:
    server = f"server: {{max_header_bytes: 8192, client_header_timeout_s: {TIMEOUT_S}, client_body_timeout_s: {TIMEOUT_S}}}\n"
    async with simulated("liveperson") as upstream:
        text = server + "upstreams:\n" + upstream_config("lp", upstream.url, "liveperson", [ROUTE])
        async with running_gateway(write_config(tmp_path, text)) as running:
            yield running, upstream


async def connect(gw: RunningGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = gw.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the gateway closes the connection (bounded)."""
    chunks = []
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), BOUND_S):
            chunks.append(chunk)
    return b"".join(chunks)


async def exchange(gw: RunningGateway, request: bytes) -> bytes:
    """Send `request` on a new connection; everything the gateway answers until it closes."""
    reader, writer = await connect(gw)
    writer.write(request)
    await writer.drain()
    response = await read_all(reader)
    writer.close()
    return response


async def send_until_answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, piece: bytes, pause_s: float, most: int) -> int:
    """Keep sending `piece` (every `pause_s`) until the gateway answers or closes, at most `most` bytes; how many were sent."""
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < most and not reader.at_eof() and not reader._buffer:  # type: ignore[attr-defined]
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
            await asyncio.sleep(pause_s)
    return sent


def problem_in(response: bytes, status: int) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), response[:300]
    return assert_problem(orjson.loads(body))


def rss_mib() -> float:
    """This process's resident memory: the gateway under test runs in it."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024


async def test_an_endless_header_gets_431_while_it_arrives(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, upstream):
        reader, writer = await connect(gw)
        before_mib = rss_mib()
        writer.write(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nX-Endless: ".encode())
        sent = await send_until_answered(reader, writer, b"a" * 65536, 0, 48 * 1024 * 1024)
        grown_mib = rss_mib() - before_mib
        response = await read_all(reader)
        writer.close()
    print(f"an endless header: answered 431 with {sent / 1024:.0f} KiB sent (socket buffers included); memory grew {grown_mib:.1f} MiB")
    problem = problem_in(response, 431)
    assert problem["code"] == "gateway.headers_too_large"
    assert grown_mib < 16  # held nothing like what was sent (uvicorn alone buffers it all)
    assert upstream.calls == []


async def test_a_large_head_sent_at_once_still_reads_its_431(tmp_path: Path) -> None:
    """The client sent everything before reading anything, far past the limit: it still reads its answer."""
    async with gateway(tmp_path) as (gw, upstream):
        response = await exchange(gw, f"POST {PATH} HTTP/1.1\r\nHost: x\r\nCookie: {'c' * 3_000_000}\r\n\r\n".encode())
    assert problem_in(response, 431)["code"] == "gateway.headers_too_large"
    assert upstream.calls == []


async def test_a_head_that_trickles_in_gets_408(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, upstream):
        reader, writer = await connect(gw)
        writer.write(f"POST {PATH} HTTP/1.1\r\nHost: x\r\n".encode())
        await send_until_answered(reader, writer, b"X", 0.1, int(BOUND_S / 0.1))  # a byte every 100 ms: never idle, never done
        response = await read_all(reader)
        writer.close()
    problem = problem_in(response, 408)
    assert problem["code"] == "gateway.request_timeout" and "headers" in problem["detail"]
    assert upstream.calls == []


async def test_a_stalled_body_gets_408_and_nothing_is_forwarded(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, upstream):
        response = await exchange(gw, f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-ID: stalled-1\r\nContent-Length: 100\r\n\r\n{{\"partial\":".encode())
        async with gw.client() as client:  # the gateway goes on serving
            assert (await client.post(PATH, json={})).status_code == 200
    problem = problem_in(response, 408)
    assert problem["code"] == "gateway.request_timeout" and "body" in problem["detail"]
    assert problem["request_id"] == "stalled-1"  # the caller's id, as the pipeline would have used
    assert len(upstream.calls) == 1  # only the request after it


async def test_a_slow_but_moving_body_is_not_cut(tmp_path: Path) -> None:
    """The body timeout is between two pieces, not for the whole body."""
    body = orjson.dumps({"payload": "x" * 60})
    pieces = [body[i : i + 10] for i in range(0, len(body), 10)]
    async with gateway(tmp_path) as (gw, upstream):
        reader, writer = await connect(gw)
        writer.write(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        for piece in pieces:  # in all well over the timeout, each pause well under it
            await asyncio.sleep(TIMEOUT_S / 5)
            writer.write(piece)
            await writer.drain()
        response = await read_all(reader)
        writer.close()
    assert response.startswith(b"HTTP/1.1 200 "), response[:300]
    assert len(pieces) * TIMEOUT_S / 5 > TIMEOUT_S
    assert [call.body for call in upstream.calls] == [body]


async def test_a_connection_that_never_speaks_is_closed(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, _):
        response = await exchange(gw, b"")
    assert response == b""  # closed, no answer: there was no request to answer


async def test_an_idle_keep_alive_connection_is_not_the_header_timeout(tmp_path: Path) -> None:
    """Between requests uvicorn's keep-alive timeout applies; the head timeout starts at a request's first byte."""
    async with gateway(tmp_path) as (gw, upstream):
        reader, writer = await connect(gw)
        request = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
        statuses = []
        for _ in range(2):
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            await asyncio.wait_for(reader.readexactly(length), BOUND_S)
            statuses.append(int(head.split(b" ")[1]))
            await asyncio.sleep(TIMEOUT_S * 3)
        writer.close()
    assert statuses == [200, 200] and len(upstream.calls) == 2


async def test_the_limits_follow_a_reload(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, _):
        text = gw.config_path.read_text().replace(f"client_header_timeout_s: {TIMEOUT_S}", "client_header_timeout_s: 30")
        gw.config_path.write_text(text)
        await gw.app.reload_from(gw.config_path)
        reader, writer = await connect(gw)
        writer.write(f"POST {PATH} HTTP/1.1\r\nHost: x\r\n".encode())
        await writer.drain()
        with pytest.raises(asyncio.TimeoutError):  # still waiting for the head well past the old limit
            await asyncio.wait_for(reader.read(1), TIMEOUT_S * 4)
        writer.close()


async def test_what_the_protocol_answers_itself_is_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with gateway(tmp_path) as (gw, _):
        for request in [
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000,  # 431 while the head is still arriving
            b"POST /x HTTP/1.1\r\nHost: x\r\n",  # 408: the head never ends
            f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{{".encode(),  # 408: the body stalls
            b"BREW /pot HTCPCP/1.0\r\n\r\n",  # 400: not HTTP
        ]:
            await exchange(gw, request)
        async with gw.client() as client:
            metrics = (await client.get("/metrics")).text
    counted = {
        (sample.labels["upstream"], sample.labels["status"], sample.value)
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "gateway_requests_total" and sample.labels["class"] == "client_error"
    }
    assert counted == {("-", "431", 1.0), ("-", "408", 1.0), ("lp", "408", 1.0), ("-", "400", 1.0)}
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert sorted((line["status"], line["method"], line["route"]) for line in lines) == [
        (400, "-", None), (408, "-", None), (408, "POST", ROUTE), (431, "-", None),
    ]  # fmt: skip
    assert all(line["class"] == "client_error" and line["request_id"] for line in lines)
