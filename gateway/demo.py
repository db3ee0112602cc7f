"""`gateway demo`: one simulated upstream per dialect on loopback, the gateway in front.

State stays in process memory; the configuration is written to a temporary file so that
`/admin/reload` and the FILE:LINE messages work exactly as with a real one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import uvicorn

from gateway.app import create_app
from gateway.observability import configure_logging
from gateway.http_protocol import KEEP_ALIVE_S, GatewayHttpProtocol
from gateway.settings import load_settings
from gateway.simulators import SimulatedUpstream

DEMO_CONFIG = """\
# Written by `gateway demo`: four simulated platforms on loopback, the gateway in front.
server:
  host: {host}
  port: {port}
upstreams:
  lp:
    url: {liveperson}
    dialect: liveperson
    routes:
      - /api/account/{{account}}/lambdas/{{function}}/invoke
      - /api/account/{{account}}/events/{{function}}/invoke
      - /api/account/{{account}}/events/{{function}}/isImplemented
      - /api/account/{{account}}/lambdas/
      - /api/account/{{account}}/functions
  aws:
    url: {lambda_}
    dialect: lambda
    routes:
      - /2015-03-31/functions/{{function}}/invocations
      - /2021-11-16/functions/{{function}}/invocations
  yr:
    url: {yuanrong}
    dialect: yuanrong
    account_header: X-Tenant-ID
    routes:
      - /serverless/v1/functions/{{function}}/invocations
  web:
    url: {http}
    dialect: http
    timeouts: {{connect_s: 1.0, per_try_s: 1.0, total_s: 3.0}}
    routes:
      - /web/{{function}}
rate_limits:
  default: {{rate: 5, per_s: 1, burst: 10}}
breaker_policies:
  default: {{fail_max: 5, reset_timeout_s: 15.0}}
"""


def demo_examples(base: str) -> list[tuple[str, str]]:
    lp = f"{base}/api/account/le-1234"
    return [
        ("success, passed through untouched", f"curl -si -X POST {lp}/lambdas/ok/invoke -H 'Content-Type: application/json' -d '{{\"payload\":{{\"hi\":1}}}}'"),
        ("LivePerson 901 function error: one attempt, native errorCode/errorMsg kept, `problem` added", f"curl -si -X POST {lp}/lambdas/fail/invoke -d '{{}}'"),
        ("a flaky upstream (502, 502, 200): the gateway retries, you get the 200", f"curl -si -X POST {lp}/lambdas/flaky/invoke -d '{{}}'"),
        ("Lambda function error: 200 + X-Amz-Function-Error, never retried", f"curl -si -X POST {base}/2015-03-31/functions/fail/invocations -d '{{}}'"),
        ("openYuanrong throttle (500 + code 1005): retried, then answered with `problem`", f"curl -si -X POST {base}/serverless/v1/functions/throttle/invocations -H 'X-Tenant-ID: t1' -d '{{}}'"),
        ("a slow plain-HTTP upstream: per-try timeout, retries, then 504 problem+json", f"curl -si {base}/web/slow?delay=5"),
        ("11 quick calls from one account: the 11th gets 429 with Retry-After and RateLimit headers", f"for i in $(seq 11); do curl -s -o /dev/null -w '%{{http_code}} ' -X POST {lp}/lambdas/ok/invoke -d '{{}}'; done; echo"),
        ("an unknown route: 404 problem+json, nothing forwarded", f"curl -si {base}/nowhere"),
        ("metrics", f"curl -s {base}/metrics | grep gateway_requests_total"),
    ]


async def _run(host: str, port: int) -> None:
    simulators = {d: await SimulatedUpstream(d).start() for d in ("liveperson", "lambda", "yuanrong", "http")}
    folder = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    config_path = folder / "demo.yaml"
    config_path.write_text(
        DEMO_CONFIG.format(host=host, port=port, liveperson=simulators["liveperson"].url, lambda_=simulators["lambda"].url, yuanrong=simulators["yuanrong"].url, http=simulators["http"].url)
    )
    app = create_app(load_settings(config_path))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, loop="none", http=GatewayHttpProtocol, lifespan="on", server_header=False, date_header=False, proxy_headers=False, timeout_keep_alive=KEEP_ALIVE_S, log_level="warning"))
    base = f"http://{host}:{port}"
    print(f"gateway demo: listening on {base} (configuration: {config_path})\n")
    for name, dialect in (("lp", "liveperson"), ("aws", "lambda"), ("yr", "yuanrong"), ("web", "http")):
        print(f"  upstream {name:4} {dialect:10} simulated at {simulators[dialect].url}")
    print("\nTry:\n")
    for what, command in demo_examples(base):
        print(f"  # {what}\n  {command}\n")
    print("Press Ctrl+C to stop.", flush=True)
    try:
        await server.serve()
    finally:
        for simulator in simulators.values():
            await simulator.stop()
        shutil.rmtree(folder, ignore_errors=True)


def run_demo(host: str, port: int) -> int:
    configure_logging(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    try:
        import uvloop

        uvloop.run(_run(host, port))
    except KeyboardInterrupt:
        pass
    return 0
