"""An HTTP/1.1 upstream that answers every request after a fixed delay (default 20 ms).

nginx cannot delay a reply by itself, so this stands in for a function that takes 20 ms. It is
an asyncio Protocol on uvloop: no framework, no per-request task, one timer per request, so a
single core sustains thousands of concurrent slow requests. The harness measures it directly
("direct" target) to show it is not the bottleneck.

    python bench/slow_upstream.py --port 9002 --delay-ms 20 --body-file body.json
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import uvloop

HEADER_END = b"\r\n\r\n"


def response_bytes(body: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    return head + body


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


class DelayedReply(asyncio.Protocol):
    """Keep-alive connection: each complete request is answered `delay_s` after it arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay_s: float, reply: bytes) -> None:
        self._loop = loop
        self._delay_s = delay_s
        self._reply = reply
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(HEADER_END)
            if end < 0:
                return
            total = end + 4 + content_length(self._buffer[:end])
            if len(self._buffer) < total:
                return
            self._buffer = self._buffer[total:]
            self._loop.call_later(self._delay_s, self._answer)

    def _answer(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._reply)


async def serve(host: str, port: int, delay_s: float, body: bytes) -> None:
    loop = asyncio.get_running_loop()
    reply = response_bytes(body)
    server = await loop.create_server(lambda: DelayedReply(loop, delay_s, reply), host, port, backlog=4096, reuse_address=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    async with server:
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--body-file", type=Path, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.delay_ms / 1000, args.body_file.read_bytes()))


if __name__ == "__main__":
    main()
