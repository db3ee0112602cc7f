"""The only module that talks to upstreams: one connection pool, errors translated.

`send` returns an `UpstreamReply` once the status line and headers have arrived, or an
`AttemptFailure` saying whether the request can have reached the upstream. The wire layer's
exceptions (`gateway.http1`) never leave this module. Bodies pass through as bytes: no
decompression, no re-quoting of the path, no headers added but `Host` (unless a signer set it) and the body's framing.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote, urlsplit, urlunsplit

from gateway.classify import TransportFailure
from gateway.http1 import ConnectionPool, Http1Connection, Origin, UpstreamConnectionError

RawHeaders = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
# RFC 9110 §9.3: methods whose request content has a defined meaning send a length even when empty
_METHODS_WITH_CONTENT = frozenset({"POST", "PUT", "PATCH"})
_UNSAFE_IN_HEAD = re.compile(r"[\r\n\x00]")
_AUTHORITY_END = re.compile(r"[/?#]")


class UpstreamRequest(NamedTuple):
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes | AsyncIterable[bytes]


@dataclass(frozen=True, slots=True)
class AttemptFailure:
    failure: TransportFailure
    detail: str


class UpstreamReply:
    """An upstream answer whose body has not been read yet. Always `release()` or `close()` it."""

    __slots__ = ("_connection", "_read_timeout_s", "status", "headers")

    def __init__(self, connection: Http1Connection, status: int, headers: RawHeaders, read_timeout_s: float) -> None:
        self._connection = connection
        self._read_timeout_s = read_timeout_s
        self.status = status
        self.headers: RawHeaders = strip_hop_by_hop(headers, connection.connection_values)

    def header_map(self) -> dict[str, str]:
        """Names -> first value, for classification (names are lower-cased, as ASGI wants)."""
        found: dict[str, str] = {}
        for name, value in self.headers:
            found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        return found

    async def read_bounded(self, limit: int) -> tuple[bytes, bool]:
        """Up to `limit` bytes of the body, and whether the whole body fitted."""
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := await self._connection.read_some(self._read_timeout_s):
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    return b"".join(chunks)[:limit], False
        except (UpstreamConnectionError, TimeoutError):
            return b"".join(chunks), False
        return b"".join(chunks), True

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises UpstreamBodyError when the upstream breaks off."""
        while True:
            try:
                chunk = await self._connection.read_some(self._read_timeout_s)
            except TimeoutError:
                raise UpstreamBodyError(f"no body data within {self._read_timeout_s:.3g} s") from None
            except UpstreamConnectionError as exc:
                raise UpstreamBodyError(str(exc)) from None
            if not chunk:
                return
            yield chunk

    @property
    def declared_length(self) -> int | None:
        """The upstream's Content-Length, when it sent one."""
        return self._connection.content_length

    async def read_whole(self) -> bytes:
        """The whole body at once (for a small declared length); raises UpstreamBodyError."""
        try:
            return await self._connection.read_all(self._read_timeout_s)
        except TimeoutError:
            raise UpstreamBodyError(f"no body data within {self._read_timeout_s:.3g} s") from None
        except UpstreamConnectionError as exc:
            raise UpstreamBodyError(str(exc)) from None

    def release(self) -> None:
        """Done with the answer: its connection is kept for the next request when it can be."""
        self._connection.release()

    def close(self) -> None:
        """Drop the connection (the body was not read to the end)."""
        self._connection.close()


class UpstreamBodyError(Exception):
    """The upstream broke off while its body was being relayed."""


def strip_hop_by_hop(headers: RawHeaders, connection_values: list[bytes] | None = None) -> RawHeaders:
    """RFC 9110 §7.6.1: drop hop-by-hop fields and every field the Connection header names (lower-case names).

    `connection_values` are the Connection headers' values when the caller has them already.
    """
    if connection_values is None:
        connection_values = [value for name, value in headers if name == b"connection"]
    drop = hop_by_hop_names(connection_values, HOP_BY_HOP)
    return [(n, v) for n, v in headers if n not in drop]


def hop_by_hop_names(connection_values: list[bytes], dropped: frozenset[bytes]) -> frozenset[bytes]:
    """`dropped` plus the fields the Connection header values name (RFC 9110 §7.6.1)."""
    named = {token.strip().lower() for value in connection_values for token in value.split(b",")}
    return dropped if named <= dropped else dropped | named


def split_credentials(url: str) -> tuple[str, str | None]:
    """An upstream URL without its user:password, and the Basic Authorization they stand for.

    Resolved once per configuration: the credentials replace a caller's Authorization on every
    attempt (as `aws_sigv4` replaces a caller's signature).
    """
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    netloc = parts.netloc.rsplit("@", 1)[1]
    credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode("latin-1")
    return urlunsplit(parts._replace(netloc=netloc)), "Basic " + base64.b64encode(credentials).decode("ascii")


def request_head(method: str, target: str, origin: Origin, headers: list[tuple[str, str]], framing: bytes) -> bytes:
    """The request line and header block, ending with the blank line."""
    block = "".join([f"{name}: {value}\r\n" for name, value in headers])
    separators = len(headers)
    if block.count("\n") != separators or block.count("\r") != separators or "\x00" in block or _UNSAFE_IN_HEAD.search(method + target):
        raise ValueError("a request line or header carries CR, LF or NUL")
    lowered = block.lower()
    given = lowered.startswith("host:") or "\nhost:" in lowered  # a signer may have set it
    host = b"" if given else b"Host: %s\r\n" % origin.host_header
    return b"%s %s HTTP/1.1\r\n%s%s%s\r\n" % (method.encode("ascii"), target.encode("latin-1"), host, block.encode("latin-1"), framing)


def body_framing(method: str, headers: list[tuple[str, str]], body: bytes | AsyncIterable[bytes]) -> tuple[bytes, bool]:
    """The framing header the body needs, and whether it goes chunked."""
    if isinstance(body, bytes):
        if body or method in _METHODS_WITH_CONTENT:
            return b"Content-Length: %d\r\n" % len(body), False
        return b"", False
    if any(name.lower() == "content-length" for name, _ in headers):
        return b"", False
    return b"Transfer-Encoding: chunked\r\n", True


class UpstreamClient:
    """One connection pool for the process; started in the app's lifespan, closed there."""

    def __init__(
        self, max_connections: int = 512, read_bufsize: int = 64 * 1024, idle_timeout_s: float = 30.0, tls_context: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        self._max_connections = max_connections
        self._read_bufsize = read_bufsize
        self._idle_timeout_s = idle_timeout_s
        self._tls_context = tls_context  # None: the system's trust store, certificate and host name verified
        self._pool: ConnectionPool | None = None
        self._origins: dict[str, Origin] = {}

    async def start(self) -> None:
        tls = self._tls_context
        self._pool = ConnectionPool(
            max_connections=self._max_connections, idle_timeout_s=self._idle_timeout_s, read_limit=self._read_bufsize,
            ssl_context=ssl.create_default_context if tls is None else lambda: tls,
        )  # fmt: skip

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    def _split(self, url: str) -> tuple[Origin, str]:
        """The origin (parsed once per scheme and authority) and the request target, as given."""
        scheme, _, rest = url.partition("://")
        authority_end = _AUTHORITY_END.search(rest)
        end = len(rest) if authority_end is None else authority_end.start()
        key = url[: len(url) - len(rest) + end]
        origin = self._origins.get(key)
        if origin is None:
            origin = Origin.of(scheme.lower(), rest[:end])
            if len(self._origins) < 1024:
                self._origins[key] = origin
        target = rest[end:].partition("#")[0]
        return origin, target if target.startswith("/") else "/" + target

    async def send(self, request: UpstreamRequest, connect_s: float, per_try_s: float) -> UpstreamReply | AttemptFailure:
        """One attempt; `per_try_s` bounds the time until the response headers arrive."""
        pool = self._pool
        assert pool is not None, "UpstreamClient.start() was not awaited"
        origin, target = self._split(request.url)
        framing, chunked = body_framing(request.method, request.headers, request.body)
        head = request_head(request.method, target, origin, request.headers, framing)
        started = pool.loop.time()
        connection = pool.take_idle(origin)
        if connection is None:
            connect_bound = min(connect_s, per_try_s)
            try:
                async with asyncio.timeout(connect_bound):
                    connection = await pool.connect(origin)
            except TimeoutError:
                if connect_s <= per_try_s:
                    return AttemptFailure(TransportFailure.REFUSED, f"could not connect within {connect_s:g} s")
                return AttemptFailure(TransportFailure.TIMEOUT, f"no answer within {per_try_s:.3g} s")
            except OSError as exc:
                return AttemptFailure(TransportFailure.REFUSED, f"connection failed: {exc.strerror or exc}")
            except UpstreamConnectionError as exc:
                return AttemptFailure(TransportFailure.REFUSED, f"connection failed: {exc}")
        try:
            connection.send_request(head, request.body, chunked, expect_body=request.method != "HEAD")
            status, headers = await connection.response_head(max(0.0, per_try_s - (pool.loop.time() - started)))
        except TimeoutError:
            connection.close()
            return AttemptFailure(TransportFailure.TIMEOUT, f"no answer within {per_try_s:.3g} s")
        except (UpstreamConnectionError, OSError) as exc:
            connection.close()
            return AttemptFailure(TransportFailure.RESET, f"connection broken: {exc}")
        except BaseException:
            connection.close()
            raise
        return UpstreamReply(connection, status, headers, per_try_s)
