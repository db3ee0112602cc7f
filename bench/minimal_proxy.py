"""The floor for a Python proxy on this stack: a bare ASGI callable + one HTTP client, no features.

No routing table, no classification, no breaker, no rate limit, no logs, no metrics: the
request is forwarded to `--fast`/`--slow` + path and the answer relayed. Served like the gateway
(uvicorn, one worker, uvloop, httptools). The gap between this and the gateway is what the
gateway's features cost; the gap between this and nginx is what the stack costs.

`--client aiohttp` relays through one aiohttp `ClientSession` on uvicorn's httptools protocol (the
floor the issue's reference figures name); `--client gateway` through the gateway's own upstream
client (`gateway.upstream.UpstreamClient`) on the gateway's own server protocol
(`gateway.http_protocol`), so that the gap to the gateway is its features alone.

    python bench/minimal_proxy.py --port 8000 --fast http://127.0.0.1:9001 --slow http://127.0.0.1:9002 [--client gateway]
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn
import yarl

from gateway.http_protocol import GatewayHttpProtocol
from gateway.upstream import UpstreamClient, UpstreamReply, UpstreamRequest

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade", b"proxy-authorization", b"proxy-authenticate"})


class MinimalProxy:
    def __init__(self, upstreams: dict[str, str], client: str) -> None:
        self._upstreams = upstreams
        self._client = client
        self._session: aiohttp.ClientSession | None = None
        self._gateway_client: UpstreamClient | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        path = scope["raw_path"].decode("latin-1")
        base = self._upstreams[path.split("/", 2)[1]]
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in HOP_BY_HOP and k != b"host" and k != b"content-length"]
        if self._gateway_client is not None:
            reply = await self._gateway_client.send(UpstreamRequest(scope["method"], base + path, headers, body), 5.0, 30.0)
            assert isinstance(reply, UpstreamReply), reply
            content = await reply.read_whole()
            reply.release()
            await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
            await send({"type": "http.response.body", "body": content})
            return
        assert self._session is not None
        async with self._session.request(scope["method"], yarl.URL(base + path, encoded=True), headers=headers, data=body) as response:
            content = await response.read()
            out = [(k.lower(), v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            await send({"type": "http.response.body", "body": content})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self._client == "gateway":
                    self._gateway_client = UpstreamClient(max_connections=1024)
                    await self._gateway_client.start()
                else:
                    connector = aiohttp.TCPConnector(limit=1024)
                    self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._session is not None:
                    await self._session.close()
                if self._gateway_client is not None:
                    await self._gateway_client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fast", required=True)
    parser.add_argument("--slow", required=True)
    parser.add_argument("--client", choices=("aiohttp", "gateway"), default="aiohttp")
    args = parser.parse_args()
    app = MinimalProxy({"fast": args.fast, "slow": args.slow}, args.client)
    # the gateway's floor runs on the gateway's own server protocol too; the reference one on uvicorn's
    protocol: Any = GatewayHttpProtocol if args.client == "gateway" else "httptools"
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http=protocol, lifespan="on", access_log=False, log_level="warning", server_header=False, date_header=False)


if __name__ == "__main__":
    main()
