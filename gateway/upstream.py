"""The only module that talks to upstreams: one pooled aiohttp session, errors translated.

`send` returns an `UpstreamReply` once the status line and headers have arrived, or an
`AttemptFailure` saying whether the request can have reached the upstream. aiohttp's own
exceptions never leave this module. Bodies pass through as bytes: no decompression, no
re-quoting of the path, no headers added that the caller did not send.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import aiohttp
import yarl

from gateway.classify import TransportFailure

RawHeaders = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes | AsyncIterable[bytes]


@dataclass(frozen=True, slots=True)
class AttemptFailure:
    failure: TransportFailure
    detail: str


class UpstreamReply:
    """An upstream answer whose body has not been read yet. Always `release()` it."""

    __slots__ = ("_response", "status", "headers")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: RawHeaders = strip_hop_by_hop([(n.lower(), v) for n, v in response.raw_headers])

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
            async for chunk in self._response.content.iter_any():
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    return b"".join(chunks)[:limit], False
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return b"".join(chunks), False
        return b"".join(chunks), True

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises UpstreamBodyError when the upstream breaks off."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamBodyError(str(exc) or type(exc).__name__) from None

    @property
    def declared_length(self) -> int | None:
        """The upstream's Content-Length, when it sent one."""
        return self._response.content_length

    async def read_whole(self) -> bytes:
        """The whole body at once (for a small declared length); raises UpstreamBodyError."""
        try:
            return await self._response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamBodyError(str(exc) or type(exc).__name__) from None

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        """Drop the connection (the body was not read to the end)."""
        self._response.close()


class UpstreamBodyError(Exception):
    """The upstream broke off while its body was being relayed."""


def strip_hop_by_hop(headers: RawHeaders) -> RawHeaders:
    """RFC 9110 §7.6.1: drop hop-by-hop fields and every field the Connection header names (lower-case names)."""
    named = {token.strip().lower() for name, value in headers if name == b"connection" for token in value.split(b",")}
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named]


def split_credentials(url: str) -> tuple[str, str | None]:
    """An upstream URL without its user:password, and the Basic Authorization they stand for.

    Resolved once per configuration: the credentials replace a caller's Authorization on every
    attempt (as `aws_sigv4` replaces a caller's signature); aiohttp refuses a request carrying both.
    """
    parsed = yarl.URL(url, encoded=True)
    if parsed.user is None:
        return url, None
    return str(parsed.with_user(None)), aiohttp.BasicAuth.from_url(parsed).encode()


class UpstreamClient:
    """One connection pool for the process; built in the app's lifespan, closed there."""

    def __init__(self, max_connections: int = 512, read_bufsize: int = 64 * 1024) -> None:
        self._max_connections = max_connections
        self._read_bufsize = read_bufsize
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
            read_bufsize=self._read_bufsize,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        # aiohttp silently resends GET/PUT/DELETE once on a reset; every resend must be a counted,
        # budgeted attempt of ours (there is no public switch: aiohttp's own test client does this)
        self._session._retry_connection = False

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _timeout(self, connect_s: float, per_try_s: float) -> aiohttp.ClientTimeout:
        """ClientTimeout objects are reused: a first attempt always asks for the same pair."""
        found = self._timeouts.get((connect_s, per_try_s))
        if found is None:
            found = aiohttp.ClientTimeout(total=None, connect=connect_s, sock_read=per_try_s)
            if len(self._timeouts) < 256:  # retries ask for what is left of a deadline: not worth keeping
                self._timeouts[(connect_s, per_try_s)] = found
        return found

    async def send(self, request: UpstreamRequest, connect_s: float, per_try_s: float) -> UpstreamReply | AttemptFailure:
        """One attempt; `per_try_s` bounds the time until the response headers arrive."""
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        timeout = self._timeout(connect_s, per_try_s)
        try:
            async with asyncio.timeout(per_try_s):
                response = await self._session.request(
                    request.method,
                    yarl.URL(request.url, encoded=True),
                    headers=request.headers,
                    data=request.body,
                    timeout=timeout,
                    allow_redirects=False,
                    compress=None,
                    chunked=None,
                )
        except aiohttp.ConnectionTimeoutError:
            return AttemptFailure(TransportFailure.REFUSED, f"could not connect within {connect_s:g} s")
        except TimeoutError:  # asyncio.timeout and aiohttp's socket read timeout alike
            return AttemptFailure(TransportFailure.TIMEOUT, f"no answer within {per_try_s:.3g} s")
        except aiohttp.ClientConnectorError as exc:
            return AttemptFailure(TransportFailure.REFUSED, f"connection failed: {exc.os_error.strerror or exc.os_error}")
        except (aiohttp.ClientError, OSError) as exc:
            return AttemptFailure(TransportFailure.RESET, f"connection broken: {type(exc).__name__}: {exc}".rstrip(": "))
        return UpstreamReply(response)
