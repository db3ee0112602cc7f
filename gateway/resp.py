"""One multiplexed Redis connection for the request path's commands (`RespChannel`).

redis-py's asyncio client costs about 100 µs of CPU per command on this project's machines
(the pool's checkout and release, its encoder, a stream reader per reply); the same command
written on a protocol and parsed by hiredis costs about 35 µs, system calls included
(docs/performance.md). The store therefore sends its batched key commands (token takes, the
dedupe marks) here: every batch is written on one connection in one `write`, and the replies,
which Redis sends in order, resolve the callers' futures in order as hiredis parses them.

Connecting stays redis-py's: a connection from the client's own pool class is opened (TCP,
TLS, a Unix socket, the master a Sentinel names; AUTH and SELECT done), then its socket is
taken over by this protocol. Cluster clients keep redis-py's pipelines, which route by slot.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis

_INCOMPLETE = object()  # what the reader returns while a reply is not whole yet


class RespChannel(asyncio.Protocol):
    """Commands in, replies out, in order; an error reply is returned as a `hiredis.ReplyError`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: Any = None) -> None:
        self._loop = loop
        self._owner = owner  # the redis-py connection that opened the socket: kept, never used again
        self._reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self._waiting: deque[asyncio.Future[Any]] = deque()
        # (replies read when a batch is whole, what to call then): see `send`
        self._batch_ends: deque[tuple[int, Callable[[Exception | None], None]]] = deque()
        self._replies_owed = 0  # replies asked for since the connection opened
        self._replies_read = 0
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.last_reply_at = float("-inf")  # loop time of the last reply read

    @classmethod
    async def take_over(cls, connection: Any) -> RespChannel:
        """Connect a redis-py connection (its handshake included), then carry its socket."""
        await connection.connect()
        writer = getattr(connection, "_writer", None)
        if writer is None:  # a redis-py whose connections keep their socket elsewhere
            raise ConnectionError("this redis-py connection does not expose its transport")
        channel = cls(asyncio.get_running_loop(), connection)
        transport = writer.transport
        transport.set_protocol(channel)
        channel.connection_made(transport)
        return channel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, commands: Sequence[Sequence[Any]], answers: Sequence[asyncio.Future[Any]], on_end: Callable[[Exception | None], None] | None = None) -> None:
        """Write `commands` in one `write`; each reply becomes its answer's result as it is read.

        The answers are resolved from `data_received` itself, so whoever awaits one resumes in
        the loop turn that reads its reply (no task in between). An error reply is a result
        (a `hiredis.ReplyError`), a lost connection a `ConnectionError` on every answer waiting.
        `on_end` is called once: with None when the last reply is in, else with the error.
        """
        if self.closed or self._transport is None:
            raise ConnectionError("redis connection closed")
        self._waiting.extend(answers)
        self._replies_owed += len(answers)
        if on_end is not None:
            self._batch_ends.append((self._replies_owed, on_end))
        self._transport.write(b"".join([hiredis.pack_command(tuple(command)) for command in commands]))

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Each command's reply, in order; raises ConnectionError when the connection is lost."""
        create = self._loop.create_future
        answers = [create() for _ in commands]
        self.send(commands, answers)
        # Replies come in order: once the last is in, so are the others. A cancelled wait (a
        # deadline) leaves its futures in the queue, where their replies are read and dropped.
        try:
            await answers[-1]
        except BaseException:
            for answer in answers:  # their errors are this one; mark them seen
                if answer.done() and not answer.cancelled():
                    answer.exception()
            raise
        return [answer.result() for answer in answers]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not _INCOMPLETE:
                answer = self._waiting.popleft()
                self._replies_read += 1
                if not answer.done():
                    answer.set_result(reply)
        except (hiredis.ProtocolError, IndexError):  # garbage, or a reply nobody asked for
            self.abort()
            return
        self.last_reply_at = self._loop.time()
        ends = self._batch_ends
        while ends and ends[0][0] <= self._replies_read:
            ends.popleft()[1](None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_waiting(f"redis connection lost: {exc}" if exc else "redis closed the connection")

    def eof_received(self) -> None:
        return None  # close: a half-closed Redis connection answers nothing more

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._fail_waiting("redis connection closed")

    def abort(self) -> None:
        """Drop the connection now (a silent server, a protocol error); the next use reconnects."""
        if self._transport is not None:
            self._transport.abort()
        self._fail_waiting("redis connection dropped")

    def _fail_waiting(self, reason: str) -> None:
        self.closed = True
        waiting, self._waiting = self._waiting, deque()
        for answer in waiting:
            if not answer.done():
                answer.set_exception(ConnectionError(reason))
        ends, self._batch_ends = self._batch_ends, deque()
        for _, on_end in ends:
            on_end(ConnectionError(reason))
