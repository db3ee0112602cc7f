"""A raw asyncio HTTP/1.1 upstream that misbehaves on command, and a raw-socket client.

`FaultyUpstream` listens on loopback. Each accepted connection takes the next `Behaviour` from
its script (`script(...)`), else `default`, and acts it out on the bare socket: answer, reset
before or after reading the request, hold or dribble the response head, stall or truncate the
body. Every response says `Connection: close`, so one gateway attempt is one connection and a
script entry is one attempt. `go_down()` closes the listening socket (connections are refused)
and `come_back()` listens again on the same port. It records what arrived: `connections`
(accepted sockets) and `received` (requests read whole).

`exchange(url, request)` sends bytes on a fresh socket and reads until the server closes;
`parse_responses` then counts how many responses came back and whether each was complete, so a
test can tell "no answer", "one answer", "a cut answer" and "two answers" apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["answer", "reset_on_accept", "reset_after_request", "close_after_request", "hold_head", "dribble_head", "stall_body", "truncate_body"]
READ_LIMIT_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Behaviour:
    """What one connection does. `body` is the payload; `sent_bytes` how much of it goes out
    before a stall or a close; `hold_s` how long a stall lasts; `interval_s` the dribble pace."""

    kind: Kind = "answer"
    status: int = 200
    body: bytes = b'{"ok": true}'
    content_type: str = "application/json"
    delay_s: float = 0.0
    sent_bytes: int = 0
    hold_s: float = 0.0
    interval_s: float = 0.0


ANSWER = Behaviour()


@dataclass(frozen=True, slots=True)
class Received:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names, last value wins
    body: bytes
    raw_headers: tuple[tuple[str, str], ...] = ()  # as they arrived: names as sent, repeats kept


@dataclass
class FaultyUpstream:
    host: str = "127.0.0.1"
    port: int = 0
    default: Behaviour = ANSWER
    connections: int = 0
    received: list[Received] = field(default_factory=list)
    _script: deque[Behaviour] = field(default_factory=deque)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def script(self, *behaviours: Behaviour) -> None:
        """The next connections act these out, in order; then `default` again."""
        self._script.extend(behaviours)

    def attempts_of(self, request_id: str) -> list[int]:
        """The X-Gateway-Attempt numbers that arrived with this X-Request-ID."""
        return [int(r.headers.get("x-gateway-attempt", "0")) for r in self.received if r.headers.get("x-request-id") == request_id]

    async def start(self) -> FaultyUpstream:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def go_down(self) -> None:
        """Stop listening (new connections are refused) and drop every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def come_back(self) -> None:
        await self.start()

    async def stop(self) -> None:
        await self.go_down()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        behaviour = self._script.popleft() if self._script else self.default
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await ACTS[behaviour.kind](self, behaviour, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # go_down(): asyncio's stream callback would log a cancelled handler as an error
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _read_request(self, reader: asyncio.StreamReader) -> Received:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        raw = tuple((name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines[1:] if line))
        headers = {name.lower(): value for name, value in raw}
        body = await read_body(reader, headers)
        request = Received(method, target, headers, body, raw)
        self.received.append(request)
        return request


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        return b"".join(chunks)
    return await reader.readexactly(int(headers.get("content-length", "0")))


def response_head(behaviour: Behaviour, declared_bytes: int) -> bytes:
    return (
        f"HTTP/1.1 {behaviour.status} X\r\nContent-Type: {behaviour.content_type}\r\n"
        f"Content-Length: {declared_bytes}\r\nConnection: close\r\n\r\n"
    ).encode()


async def close_cleanly(writer: asyncio.StreamWriter) -> None:
    """FIN after everything written has left (abort() would drop what is still buffered)."""
    await writer.drain()
    writer.close()
    await writer.wait_closed()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN: what a crashed peer looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def act_answer(upstream: FaultyUpstream, b: Behaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await upstream._read_request(reader)
    await asyncio.sleep(b.delay_s)
    writer.write(response_head(b, len(b.body)) + b.body)
    await close_cleanly(writer)


async def act_reset_on_accept(upstream: FaultyUpstream, b: Behaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    reset(writer)


async def act_reset_after_request(upstream: FaultyUpstream, b: Behaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await upstream._read_request(reader)
    await asyncio.sleep(b.delay_s)
    reset(writer)


async def act_close_after_request(upstream: FaultyUpstream, b: Behaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await upstream._read_request(reader)
    await close_cleanly(writer)


async def act_hold_head(upstream: FaultyUpstream, b: Behaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await upstream._read_request(reader)
    await asyncio.sleep(b.hold_s)


async def act_dribble_head(upstream: FaultyUpstream, b: Behaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One byte of the status line and headers every `interval_s`: each read is quick, the whole is not."""
    await upstream._read_request(reader)
    for byte in response_head(b, len(b.body)):
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(b.interval_s)
    writer.write(b.body)
    await close_cleanly(writer)


async def act_stall_body(upstream: FaultyUpstream, b: Behaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await upstream._read_request(reader)
    writer.write(response_head(b, len(b.body)) + b.body[: b.sent_bytes])
    await writer.drain()
    await asyncio.sleep(b.hold_s)


async def act_truncate_body(upstream: FaultyUpstream, b: Behaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Declare the whole body, send part of it, close cleanly (FIN)."""
    await upstream._read_request(reader)
    writer.write(response_head(b, len(b.body)) + b.body[: b.sent_bytes])
    await close_cleanly(writer)


Act = Callable[[FaultyUpstream, Behaviour, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ACTS: dict[str, Act] = {
    "answer": act_answer,
    "reset_on_accept": act_reset_on_accept,
    "reset_after_request": act_reset_after_request,
    "close_after_request": act_close_after_request,
    "hold_head": act_hold_head,
    "dribble_head": act_dribble_head,
    "stall_body": act_stall_body,
    "truncate_body": act_truncate_body,
}


@contextlib.asynccontextmanager
async def faulty_upstream(default: Behaviour = ANSWER) -> AsyncIterator[FaultyUpstream]:
    upstream = await FaultyUpstream(default=default).start()
    try:
        yield upstream
    finally:
        await upstream.stop()


# --- the raw-socket client -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names, last value wins
    body: bytes
    complete: bool  # the whole declared body arrived


@dataclass(frozen=True, slots=True)
class Exchanged:
    responses: list[RawResponse]
    closed: bool  # the server closed the connection (False: the read bound ran out first)
    elapsed_s: float

    @property
    def only(self) -> RawResponse:
        assert len(self.responses) == 1, f"expected exactly one response, got {len(self.responses)}"
        return self.responses[0]


def request_bytes(method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 request that asks the server to close after answering."""
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def exchange(url: str, request: bytes, bound_s: float) -> Exchanged:
    """Send `request` on a fresh connection, read until the server closes or `bound_s` passes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, int(port))
    data = bytearray()
    closed = False
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(bound_s):
            while chunk := await reader.read(65536):
                data += chunk
        closed = True
    except TimeoutError:
        pass
    except ConnectionError:
        closed = True
    finally:
        writer.transport.abort()
    return Exchanged(parse_responses(bytes(data)), closed, time.monotonic() - started)


def exchange_blocking(url: str, request: bytes, bound_s: float) -> Exchanged:
    """`exchange` for code outside an event loop (hypothesis examples against a gateway in a thread)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    started = time.monotonic()
    data = bytearray()
    closed = False
    with socket.create_connection((host, int(port)), timeout=bound_s) as conn:
        try:
            conn.sendall(request)
            while time.monotonic() - started < bound_s:
                conn.settimeout(max(0.01, bound_s - (time.monotonic() - started)))
                chunk = conn.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
        except TimeoutError:
            pass
        except ConnectionError:
            closed = True
    return Exchanged(parse_responses(bytes(data)), closed, time.monotonic() - started)


def parse_responses(data: bytes) -> list[RawResponse]:
    """Every HTTP/1.1 response in `data`, in order, framed by Content-Length or chunking."""
    responses = []
    while data:
        head, separator, rest = data.partition(b"\r\n\r\n")
        if not separator:
            break
        lines = head.decode("latin-1").split("\r\n")
        headers = {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines[1:])}
        status = int(lines[0].split(" ")[1])
        body, complete, data = frame_body(rest, headers, status)
        responses.append(RawResponse(status, headers, body, complete))
    return responses


def final_responses(responses: list[RawResponse]) -> list[RawResponse]:
    """Without interim 1xx answers (100 Continue precedes the real one)."""
    return [r for r in responses if r.status >= 200]


def frame_body(rest: bytes, headers: dict[str, str], status: int) -> tuple[bytes, bool, bytes]:
    """(body, complete, what follows) for one response body at the start of `rest`."""
    if status < 200 or status in (204, 304):
        return b"", True, rest
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return unchunk(rest)
    if "content-length" in headers:
        size = int(headers["content-length"])
        return rest[:size], len(rest) >= size, rest[size:]
    return rest, True, b""  # delimited by the close


def unchunk(rest: bytes) -> tuple[bytes, bool, bytes]:
    body = bytearray()
    while True:
        size_line, separator, after = rest.partition(b"\r\n")
        if not separator:
            return bytes(body), False, b""
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(body), after.startswith(b"\r\n"), after[2:]
        if len(after) < size + 2:
            return bytes(body + after[:size]), False, b""
        body += after[:size]
        rest = after[size + 2 :]
