"""The only module that talks to Redis: shared state for every gateway replica.

Supported ``state.redis_url`` forms:

- ``redis://[user:password@]host[:port][/db]`` - a standalone server over TCP;
- ``rediss://…`` - the same over TLS;
- ``unix://[user:password@]/path/to/redis.sock[?db=N]`` - a standalone server on a Unix socket;
- ``redis+sentinel://[user:password@]host:port[,host:port…]/service_name[/db]`` - the master
  of ``service_name`` as named by the listed Sentinels (``rediss+sentinel://`` for TLS to the
  data nodes); the credentials are for the data nodes, the Sentinels are asked without;
- ``redis+cluster://[user:password@]host:port[,host:port…]`` - a Redis Cluster discovered from
  the listed seed nodes (``rediss+cluster://`` for TLS).

Redis is a dependency the gateway must survive losing, so every call is short and
fails fast: a connect timeout of ``timeout_s`` (tens of milliseconds), a deadline per
operation, no client-side retries, a bounded connection pool, and an outage breaker. After a
failure the store does not touch Redis for ``cooldown_s`` (calls raise
:class:`StoreUnavailable` at once); then one caller at a time probes, and the first success
resumes normal use. Every redis-py error and timeout becomes :class:`StoreUnavailable` here,
so no other module imports ``redis``.

Commands on keys are batched: the token takes (EVALSHA), SETs, GETs and DELs asked for
during one turn of the event loop go to Redis in one write, in one round trip. Outside a
cluster they all travel on one multiplexed connection (`gateway.resp`: replies matched in
order, parsed by hiredis, about a third of redis-py's instructions per command), opened by
redis-py and then carried by the gateway; a cluster's go through redis-py's pipeline, which
routes them by slot. On the open channel a batch is written with no task in between, and each
reply resolves its caller's future as it is read: the caller resumes in the next loop turn. A caller waits ``timeout_s`` from when its batch is sent, plus two loop turns (then it
gets :class:`StoreUnavailable` and goes on without Redis); the batch itself runs on to its
deadline of four timeouts. The outage breaker opens when a batch fails, or reaches that
deadline while Redis answered no batch sent after it. A reply that is late because the
gateway's own event loop is saturated (the reply sits unread while the loop works through
other requests) thus costs the requests that waited for it, not a cool-down of every request.
There is no per-read socket timeout (redis-py's costs an asyncio timeout on every read): the
deadlines above bound every call instead.

Token buckets are kept as GCRA "theoretical arrival times" (the instant the bucket will be
full again) by one Lua script run with EVALSHA, on the server's clock, with a TTL equal to
the time until the bucket is full: an idle account costs no memory. The arithmetic mirrors
:func:`gateway.ratelimit.step_bucket`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from hiredis import ReplyError
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # redis-py before 7 has no maintenance notifications to turn off
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]

from gateway.resp import RespChannel

log = logging.getLogger(__name__)

T = TypeVar("T")
Client = aioredis.Redis | RedisCluster

TOKEN_BUCKET_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local per_s = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local interval = per_s / rate
local capacity = burst * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
tat = math.min(math.max(tat, now), now + capacity)
local new_tat = tat + interval
if new_tat - now > capacity + 1e-6 then
  return {0, 0, string.format('%.6f', new_tat - now - capacity), string.format('%.6f', tat - now)}
end
local reset = new_tat - now
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.ceil(reset * 1000) + 1)
local remaining = math.floor((capacity - reset) / interval + 1e-6)
return {1, remaining, '0', string.format('%.6f', reset)}
"""
TOKEN_BUCKET_SHA = hashlib.sha1(TOKEN_BUCKET_LUA.encode()).hexdigest()

STORE_ERRORS: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    TimeoutError,
)


OFF_PATH_DEADLINE_FLOOR_S = 1.0

# A timeout alone does not tell a dead Redis from a slow reader: see RedisStore._run_batch.
TIMEOUTS: tuple[type[BaseException], ...] = (TimeoutError, RedisTimeoutError)


class StoreUnavailable(Exception):
    """Redis could not answer in time (down, slow, cooling down after an outage)."""


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """How hard the store tries: per-socket timeout, pool bound, outage cool-down."""

    timeout_s: float = 0.05
    max_connections: int = 64
    cooldown_s: float = 1.0
    resubscribe_s: float = 1.0


class PendingCommand(NamedTuple):
    """A command waiting for its batch (e.g. ``("SET", key, value, "PX", 500)``) and its answer."""

    args: tuple[Any, ...]
    answer: asyncio.Future[Any]


@dataclass(slots=True)
class ChannelBatch:
    """A batch written on the channel: what settling it (last reply, loss or deadline) needs."""

    batch: list[PendingCommand]
    channel: RespChannel
    ticket: Literal["closed", "probe"]
    sent_at: float
    expiry: asyncio.TimerHandle
    deadline: asyncio.TimerHandle
    settled: bool = False


def bucket_args(rate: float, per_s: float, burst: int) -> tuple[str, str, str]:
    return repr(float(rate)), repr(float(per_s)), str(int(burst))


def fail_commands(batch: list[PendingCommand], error: StoreUnavailable) -> None:
    for command in batch:
        if not command.answer.done():
            command.answer.set_exception(error)


def expire_commands(batch: list[PendingCommand], timeout_s: float, hops: int = 2) -> None:
    """The callers' wait is over: they go on without Redis; the batch itself runs on.

    Timers fire before the loop reads its sockets (uvloop runs them first in each turn; asyncio
    runs them in the same turn as the read, before the reading task resumes). On a loop saturated
    for longer than the timeout, an answer Redis sent long ago would thus be declared missing.
    Two hops through the ready queue let one more read and the batch's resumption happen first:
    the wait is ``timeout_s`` plus two turns of the loop, which on an idle loop is microseconds.
    """
    if hops > 0:
        asyncio.get_running_loop().call_soon(expire_commands, batch, timeout_s, hops - 1)
        return
    fail_commands(batch, StoreUnavailable(f"redis did not answer within {timeout_s:g} s"))


class OutageBreaker:
    """Keeps callers off Redis for a cool-down after a failure, then lets one probe through."""

    def __init__(self, clock: Callable[[], float], cooldown_s: float) -> None:
        self._clock = clock
        self._cooldown_s = cooldown_s
        self._open_until: float | None = None
        self._probing = False

    @property
    def healthy(self) -> bool:
        return self._open_until is None

    def admit(self) -> Literal["closed", "probe"] | None:
        """Whether a call may go to Redis now, and as what; None means stay away."""
        if self._open_until is None:
            return "closed"
        if self._probing or self._clock() < self._open_until:
            return None
        self._probing = True
        return "probe"

    def blocked(self) -> bool:
        """Whether `admit` would refuse now (without claiming the probe)."""
        return self._open_until is not None and (self._probing or self._clock() < self._open_until)

    def succeed(self, ticket: Literal["closed", "probe"]) -> None:
        # Only the probe closes the breaker: a slow call admitted before the outage began
        # must not reopen the floodgates.
        if ticket == "probe":
            self._open_until = None
            self._probing = False

    def fail(self) -> None:
        self._open_until = self._clock() + self._cooldown_s
        self._probing = False

    def abandon(self, ticket: Literal["closed", "probe"]) -> None:
        """A call was cancelled by its caller: it proved nothing either way."""
        if ticket == "probe":
            self._probing = False

    def seconds_left(self) -> float:
        if self._open_until is None:
            return 0.0
        return max(0.0, self._open_until - self._clock())


class RedisStore:
    """Short, fail-fast Redis operations behind an outage breaker."""

    def __init__(
        self,
        client: Client,
        pubsub_client: Client,
        *,
        clock: Callable[[], float],
        options: StoreOptions,
    ) -> None:
        self._client = client
        self._pubsub_client = pubsub_client
        self._options = options
        self._breaker = OutageBreaker(clock, options.cooldown_s)
        # Room for a connect, the command, and a NOSCRIPT reload (two more round trips).
        self._batch_deadline_s = options.timeout_s * 4
        # Off the request path (readiness ping, breaker replication): room for a connect and the
        # command, and never under a second, so that a stall of this process's own event loop
        # (start-up, a burst of work) is not taken for a Redis outage.
        self._deadline_s = max(options.timeout_s * 2, OFF_PATH_DEADLINE_FLOOR_S)
        self._pending: list[PendingCommand] = []
        self._pending_needs_task = False  # a command in `_pending` takes the full path (`_run_batch`)
        self._last_answer_at = float("-inf")  # loop time of the last batch Redis answered
        self._batches: set[asyncio.Task[None]] = set()
        # Key commands go over one multiplexed connection of our own (gateway.resp), except on
        # a cluster, whose commands redis-py routes by slot.
        self._uses_channel = isinstance(client, aioredis.Redis)
        self._channel: RespChannel | None = None
        self._channel_lock = asyncio.Lock()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = 0.05,
        max_connections: int = 64,
        cooldown_s: float = 1.0,
        clock: Callable[[], float],
    ) -> RedisStore:
        """Build a store for any supported URL; nothing connects until the first call."""
        options = StoreOptions(
            timeout_s=timeout_s, max_connections=max_connections, cooldown_s=cooldown_s
        )
        client = build_client(url, options)
        pubsub_client = build_client(url, options)  # its own pool: subscriptions hold a connection
        return cls(client, pubsub_client, clock=clock, options=options)

    @property
    def healthy(self) -> bool:
        """False while the store is in its outage cool-down."""
        return self._breaker.healthy

    def cooldown_left_s(self) -> float:
        return self._breaker.seconds_left()

    async def take_token(
        self, key: str, rate: float, per_s: float, burst: int
    ) -> tuple[bool, int, float, float]:
        """Take one token: (allowed, remaining, retry_after_s, reset_s), on the server clock."""
        reply = await self._batched("EVALSHA", TOKEN_BUCKET_SHA, 1, key, *bucket_args(rate, per_s, burst))
        allowed, remaining, retry_after, reset = reply
        return bool(allowed), int(remaining), float(retry_after), float(reset)

    async def _batched(self, *args: Any) -> Any:
        """One command, sent with the others of this loop turn; its reply or StoreUnavailable.

        Raises at once during an outage cool-down, and after ``timeout_s`` without an answer.
        """
        if self._breaker.blocked():
            raise StoreUnavailable("redis is cooling down after an outage")
        loop = asyncio.get_running_loop()
        try:
            reply = await self._queued(loop, args, needs_task=False)
            if type(reply) is ReplyError:  # only the channel's direct path hands error replies back
                if not (_error_reply(reply, "NOSCRIPT") or _error_reply(reply, "READONLY")):
                    raise StoreUnavailable(f"redis: ReplyError: {reply}")
                # The command did not run. The full path reloads a lost script, or drops the
                # connection to a demoted master, and sends it again.
                reply = await self._queued(loop, args, needs_task=True)
        except ConnectionError as error:  # the channel was lost under the direct path
            raise StoreUnavailable(f"redis: {error}") from None
        return reply

    def _queued(self, loop: asyncio.AbstractEventLoop, args: tuple[Any, ...], needs_task: bool) -> asyncio.Future[Any]:
        answer: asyncio.Future[Any] = loop.create_future()
        self._pending.append(PendingCommand(args, answer))
        self._pending_needs_task = self._pending_needs_task or needs_task
        if len(self._pending) == 1:
            loop.call_soon(self._send_batch, loop)
        return answer

    def _send_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending, []
        needs_task, self._pending_needs_task = self._pending_needs_task, False
        channel = self._channel
        if channel is not None and not channel.closed and not needs_task:
            self._send_on_channel(loop, channel, batch)
            return
        task = loop.create_task(self._run_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    def _send_on_channel(self, loop: asyncio.AbstractEventLoop, channel: RespChannel, batch: list[PendingCommand]) -> None:
        """The batch on the open channel, with no task: each reply resolves its caller's answer
        in the loop turn that reads it. A task per batch cost two more turns before a caller
        resumed, and in a burst each turn is the whole burst's work (docs/performance.md).
        The rules are `_run_batch`'s: the callers' wait, the batch deadline, the outage breaker.
        """
        ticket = self._breaker.admit()
        if ticket is None:
            fail_commands(batch, StoreUnavailable("redis is cooling down after an outage"))
            return
        expiry = loop.call_later(self._options.timeout_s, expire_commands, batch, self._options.timeout_s)
        deadline = loop.call_later(self._batch_deadline_s, lambda: self._channel_batch_overdue(state))
        state = ChannelBatch(batch, channel, ticket, loop.time(), expiry, deadline)
        try:
            channel.send([command.args for command in batch], [command.answer for command in batch], partial(self._channel_batch_ended, state))
        except ConnectionError as error:
            self._channel_batch_ended(state, error)

    def _channel_batch_ended(self, state: ChannelBatch, error: Exception | None) -> None:
        """Its last reply was read (error None), or the connection was lost first."""
        if state.settled:
            return
        state.settled = True
        state.expiry.cancel()
        state.deadline.cancel()
        if error is None:
            self._batch_answered(state.ticket, state.channel.last_reply_at)
        else:
            self._batch_failed(state.batch, state.ticket, state.sent_at, error)

    def _channel_batch_overdue(self, state: ChannelBatch) -> None:
        """The batch deadline passed without its last reply."""
        if state.settled:
            return
        state.settled = True
        state.expiry.cancel()
        self._batch_failed(state.batch, state.ticket, state.sent_at, TimeoutError(f"no answer within {self._batch_deadline_s:g} s"))

    def _batch_answered(self, ticket: Literal["closed", "probe"], at: float) -> None:
        self._last_answer_at = at
        self._breaker.succeed(ticket)

    def _batch_failed(self, batch: list[PendingCommand], ticket: Literal["closed", "probe"], sent_at: float, error: BaseException) -> None:
        """A batch that got no answer (both paths): the outage breaker's verdict, its callers told."""
        timed_out = isinstance(error, TIMEOUTS)
        if timed_out:
            self._drop_silent_channel(sent_at)
        if timed_out and self._last_answer_at > sent_at:
            # Other batches got their answers meanwhile: Redis is up and this process's own
            # loop is slow (overloaded). Its callers go on without Redis; nobody else does.
            self._breaker.abandon(ticket)
        else:
            self._breaker.fail()
        fail_commands(batch, StoreUnavailable(f"redis: {type(error).__name__}: {error}"))

    async def _run_batch(self, batch: list[PendingCommand]) -> None:
        """One batch's round trip under the outage breaker and the batch deadline."""
        ticket = self._breaker.admit()
        if ticket is None:
            fail_commands(batch, StoreUnavailable("redis is cooling down after an outage"))
            return
        # The callers' wait starts now, when the batch goes out, not when it was queued: a busy
        # loop that is slow to send it is not a slow Redis either.
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        expiry = loop.call_later(self._options.timeout_s, expire_commands, batch, self._options.timeout_s)
        try:
            async with asyncio.timeout(self._batch_deadline_s):
                replies = await self._execute(batch)
        except STORE_ERRORS as error:
            self._batch_failed(batch, ticket, sent_at, error)
            return
        except BaseException:
            self._breaker.abandon(ticket)
            fail_commands(batch, StoreUnavailable("redis store is closing"))
            raise
        finally:
            expiry.cancel()
        self._batch_answered(ticket, loop.time())
        for command, reply in zip(batch, replies, strict=True):
            if command.answer.done():
                continue  # its caller gave up (timeout) or left
            if isinstance(reply, BaseException):
                command.answer.set_exception(StoreUnavailable(f"redis: {type(reply).__name__}: {reply}"))
            else:
                command.answer.set_result(reply)

    async def _execute(self, batch: list[PendingCommand]) -> list[Any]:
        """Each command's reply (or its own error), loading the script once if Redis lost it."""
        if self._uses_channel:
            return await self._on_channel([command.args for command in batch])
        if len(batch) == 1:  # a pipeline of one costs more than the plain command
            args = batch[0].args
            try:
                return [await self._client.execute_command(*args)]
            except NoScriptError:
                await self._client.script_load(TOKEN_BUCKET_LUA)
                return [await self._client.execute_command(*args)]
        commands = [command.args for command in batch]
        replies = await self._pipelined(commands)
        return await resend_lost_scripts(commands, replies, lambda reply: isinstance(reply, NoScriptError), lambda: self._client.script_load(TOKEN_BUCKET_LUA), self._pipelined)

    async def _on_channel(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        channel = await self._open_channel()
        replies = await channel.execute(commands)
        replies = await resend_lost_scripts(commands, replies, lambda reply: _error_reply(reply, "NOSCRIPT"), lambda: channel.execute([("SCRIPT", "LOAD", TOKEN_BUCKET_LUA)]), channel.execute)
        if any(_error_reply(reply, "READONLY") for reply in replies):
            channel.abort()  # a master demoted by a failover: reconnecting asks the Sentinels again
        return replies

    async def _open_channel(self) -> RespChannel:
        channel = self._channel
        if channel is not None and not channel.closed:
            return channel
        async with self._channel_lock:  # one connect, however many batches are waiting for it
            channel = self._channel
            if channel is None or channel.closed:
                pool = self._client.connection_pool  # type: ignore[union-attr]
                channel = self._channel = await RespChannel.take_over(pool.make_connection())
        return channel

    def _drop_silent_channel(self, sent_at: float) -> None:
        """After a batch's deadline: a connection that has answered nothing since it was sent is
        dropped (a frozen or unreachable server), so the next probe connects afresh."""
        channel = self._channel
        if channel is not None and channel.last_reply_at < sent_at:
            channel.abort()

    async def _pipelined(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for args in commands:
                pipe.execute_command(*args)
            return list(await pipe.execute(raise_on_error=False))

    async def prepare(self, deadline_s: float = 2.0) -> bool:
        """Connect, learn a cluster's slot map and load the token script on every primary.

        Called once at start-up, so that the first requests pay none of it: on a cluster that
        first round takes tens of milliseconds, most of a request's ``timeout_s``. Returns False
        when Redis does not answer; the store then starts in its outage cool-down, as after any
        failed call, and requests go on without Redis until a probe succeeds.
        """
        try:
            async with asyncio.timeout(deadline_s):
                if self._uses_channel:
                    [loaded] = await (await self._open_channel()).execute([("SCRIPT", "LOAD", TOKEN_BUCKET_LUA)])
                    if isinstance(loaded, ReplyError):
                        raise RedisError(str(loaded))
                else:
                    await self._client.script_load(TOKEN_BUCKET_LUA)
        except STORE_ERRORS as error:
            log.warning("redis is not answering at start-up: %s: %s", type(error).__name__, error)
            self._breaker.fail()
            return False
        return True

    async def ping(self) -> bool:
        """Whether Redis answers now (False during the cool-down, without asking it)."""
        try:
            return bool(await self._guarded(self._client.ping))
        except StoreUnavailable:
            return False

    async def set_value(
        self, key: str, value: bytes, ttl_s: float, only_if_absent: bool = False
    ) -> bool:
        """SET with a TTL; with ``only_if_absent`` returns False when the key already exists."""
        ttl_ms = max(1, round(ttl_s * 1000))
        condition = ("NX",) if only_if_absent else ()
        return bool(await self._batched("SET", key, value, "PX", ttl_ms, *condition))

    async def get_value(self, key: str) -> bytes | None:
        return await self._batched("GET", key)

    async def delete(self, key: str) -> None:
        await self._batched("DEL", key)

    async def publish(self, channel: str, message: bytes) -> None:
        await self._guarded(lambda: self._client.publish(channel, message))

    async def add_until(self, key: str, member: bytes, until: float, now: float) -> None:
        """Keep `member` in the sorted set `key` until `until` (epoch s); drop members past `now`."""

        async def add() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zadd(key, {member: until})
                pipe.zremrangebyscore(key, "-inf", now)
                await pipe.execute()

        await self._guarded(add)

    async def members_after(self, key: str, now: float, limit: int) -> list[bytes]:
        """Up to `limit` members of the sorted set `key` kept until after `now`."""
        return list(await self._guarded(lambda: self._client.zrangebyscore(key, f"({now!r}", "+inf", start=0, num=limit)))

    async def remove_members(self, key: str, members: list[bytes]) -> None:
        if members:
            await self._guarded(lambda: self._client.zrem(key, *members))

    async def subscribe(self, channel: str) -> AsyncIterator[bytes]:
        """Messages on ``channel`` for as long as the caller iterates, across Redis outages."""
        while True:
            try:
                async for message in self._listen(channel):
                    yield message
            except STORE_ERRORS as error:
                log.warning("redis subscription to %s lost: %s", channel, error)
            await asyncio.sleep(self._options.resubscribe_s)

    async def aclose(self) -> None:
        for task in list(self._batches):
            task.cancel()
        await asyncio.gather(*self._batches, return_exceptions=True)
        if self._channel is not None:
            self._channel.close()
        for client in (self._client, self._pubsub_client):
            with contextlib.suppress(*STORE_ERRORS):
                await client.aclose()

    async def _listen(self, channel: str) -> AsyncIterator[bytes]:
        if isinstance(self._pubsub_client, RedisCluster):
            await self._pubsub_client.initialize()  # a cluster pub/sub needs the slot map first
        pubsub = self._pubsub_client.pubsub()
        try:
            await pubsub.subscribe(channel)
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None and message["type"] == "message":
                    yield message["data"]
        finally:
            with contextlib.suppress(*STORE_ERRORS):
                await pubsub.aclose()

    async def _guarded(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation under the breaker and deadline; translate every failure."""
        ticket = self._breaker.admit()
        if ticket is None:
            raise StoreUnavailable("redis is cooling down after an outage")
        try:
            async with asyncio.timeout(self._deadline_s):
                result = await operation()
        except STORE_ERRORS as error:
            self._breaker.fail()
            raise StoreUnavailable(f"redis: {type(error).__name__}: {error}") from error
        except BaseException:
            self._breaker.abandon(ticket)
            raise
        self._breaker.succeed(ticket)
        return result


async def resend_lost_scripts(
    commands: list[tuple[Any, ...]],
    replies: list[Any],
    lost: Callable[[Any], bool],
    load_script: Callable[[], Awaitable[Any]],
    run: Callable[[list[tuple[Any, ...]]], Awaitable[list[Any]]],
) -> list[Any]:
    """The replies, with the commands whose script Redis had lost (NOSCRIPT) loaded and run again.

    Only those commands: a SET NX of the same batch that succeeded must not be sent a second time.
    """
    indexes = [index for index, reply in enumerate(replies) if lost(reply)]
    if indexes:
        await load_script()
        for index, reply in zip(indexes, await run([commands[i] for i in indexes]), strict=True):
            replies[index] = reply
    return replies


def _error_reply(reply: Any, code: str) -> bool:
    return isinstance(reply, ReplyError) and str(reply).startswith(code)


def build_client(url: str, options: StoreOptions) -> Client:
    """A redis-py asyncio client for ``url``."""
    scheme = url.split("://", 1)[0].lower()
    kwargs = connection_kwargs(options)
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return build_sentinel_client(url, kwargs)
    if scheme in ("redis+cluster", "rediss+cluster"):
        return build_cluster_client(url, kwargs)
    if scheme in ("redis", "rediss", "unix"):
        return build_standalone_client(url, kwargs, options)
    raise ValueError(
        "redis_url must start with redis://, rediss://, unix://, redis+sentinel:// "
        "or redis+cluster://"
    )


def connection_kwargs(options: StoreOptions) -> dict[str, Any]:
    # No per-read timeout: the store's deadlines bound every command (a pub/sub connection
    # waits for messages as long as it likes); connecting still fails fast.
    return {
        "socket_timeout": None,
        "socket_connect_timeout": options.timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": options.max_connections,
        **without_maintenance_notifications(),
    }


def without_maintenance_notifications() -> dict[str, Any]:
    """Turn off redis-py's maintenance notifications (default "auto" since redis-py 7).

    While they are on, the pool skips its check for connections the server has closed, so
    after an outage each stale pooled connection fails one call and reopens the outage
    breaker (recovery flaps for several cool-downs); they may also relax socket timeouts to
    10 s during a server's maintenance. Neither suits a store that must fail fast.
    """
    if MaintNotificationsConfig is None:
        return {}
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


def build_standalone_client(
    url: str, kwargs: dict[str, Any], options: StoreOptions
) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(url, timeout=options.timeout_s, **kwargs)
    return aioredis.Redis.from_pool(pool)


def build_sentinel_client(url: str, kwargs: dict[str, Any]) -> aioredis.Redis:
    parts = parse_multi_host_url(url)
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2:
        raise ValueError("redis+sentinel URL needs /service_name[/db]")
    db = int(path[1]) if len(path) == 2 else 0
    # Sentinels are only asked where the master is: always short timeouts, never retries.
    sentinel_kwargs = {
        "socket_timeout": kwargs["socket_connect_timeout"],
        "socket_connect_timeout": kwargs["socket_connect_timeout"],
        "retry": Retry(NoBackoff(), 0),
        **without_maintenance_notifications(),
    }
    sentinel = Sentinel(
        list(parts.hosts), sentinel_kwargs=sentinel_kwargs, **kwargs, **parts.credentials
    )
    return sentinel.master_for(unquote(path[0]), db=db, ssl=parts.tls)


def build_cluster_client(url: str, kwargs: dict[str, Any]) -> RedisCluster:
    parts = parse_multi_host_url(url)
    nodes = [ClusterNode(host, port) for host, port in parts.hosts]
    return RedisCluster(startup_nodes=nodes, ssl=parts.tls, **kwargs, **parts.credentials)


@dataclass(frozen=True, slots=True)
class MultiHostUrl:
    hosts: tuple[tuple[str, int], ...]
    path: str
    credentials: dict[str, str]
    tls: bool


def parse_multi_host_url(url: str) -> MultiHostUrl:
    """Split ``scheme://[user:pass@]h:p[,h:p…]/path`` (urlsplit rejects the comma list)."""
    scheme, rest = url.split("://", 1)
    netloc, _, path = rest.partition("/")
    userinfo, _, hostlist = netloc.rpartition("@")
    hosts = tuple(parse_host_port(item) for item in hostlist.split(",") if item)
    if not hosts:
        raise ValueError(f"{scheme} URL names no host")
    return MultiHostUrl(hosts, path, parse_credentials(userinfo), scheme.startswith("rediss"))


def parse_host_port(item: str) -> tuple[str, int]:
    parsed = urlsplit(f"//{item}")
    if not parsed.hostname:
        raise ValueError(f"bad host in redis URL: {item!r}")
    return parsed.hostname, parsed.port or 6379


def parse_credentials(userinfo: str) -> dict[str, str]:
    if not userinfo:
        return {}
    user, has_password, password = userinfo.partition(":")
    credentials = {"password": unquote(password)} if has_password else {}
    if user:
        credentials["username"] = unquote(user)
    return credentials
