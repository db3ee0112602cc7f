"""Drive the official LivePerson Functions Node client from Python tests.

`run_lp_client(command)` runs `lp/driver.js` once in a fresh Node process (so the client's
in-process caches, e.g. isImplemented's 60 s cache, never carry over between calls) and
returns its one JSON result. The command and result formats are documented in driver.js.
Install: `npm ci --prefix tests/clients/lp` (ensure_installed() does it when needed).

Observed behaviour of liveperson-functions-client 2.2.0 (HTTP via got 11.8.6), measured by
tests/test_lp_client_harness.py against a simulated upstream:

Mode. V2 iff the CSDS domain contains "fninvocations" or "functions". The driver answers CSDS
with `host` for v1 and with `fninvocations.lp-harness.test` (resolved to `host` inside the
driver) for v2, so the Host header differs between the modes. No port can be given: port 80.

Requests.
- V1 invoke: POST /api/account/{acc}/lambdas/{uuid}/invoke?v=1&skillId=&externalSystem=unknown
  (events: /events/{id}/invoke; externalSystem = lpEventSource or externalSystem or "unknown").
- V2 invoke: same paths; query only `skillId` when given; header LP-EventSource (default "Unknown").
- Headers: Content-Type: application/json, Accept: application/json, User-Agent:
  faas-client-js@2.0.0 (hard-coded, not the package version), X-Request-ID (given requestId or
  a random GUID), Authorization (the driver's authStrategy: "Bearer x").
- Body: {"timestamp": <ms>, "headers": [{"key", "value"}], "payload": {...}}.
- Client retries resend the identical request: same X-Request-ID, same body and timestamp.
- isImplemented: GET /api/account/{acc}/events/{id}/isImplemented
  ?v=1&skillId=&externalSystem=Unknown (V2: no v/externalSystem); resolves body["implemented"];
  any error throws FaaSIsImplementedError (cause FaasIsImplementedParseError when
  failOnErrorStatusCode=false).
- getLambdas: GET /api/account/{acc}/lambdas/?...&v=1, V2: GET /api/account/{acc}/functions?...

invoke outcome per upstream reply ("resolve" = default failOnErrorStatusCode=false,
"throw" = true; resolved values are {url, headers, body, ok, status, statusText[, retryCount]}):

  upstream reply                          resolve                     throw              attempts
  200 / 202 JSON                          ok=true, status, body       same as resolve    1
  200 body not JSON                       ok=false, status 200, text  FaaSInvokeError    1
  901 V1 body, errorCode handler.*        ok=false, status 901        FaaSLambdaError    1
  901 body without errorCode/errorMsg     ok=false, status 901        FaaSInvokeError    1
  500 V1 body, errorCode handler.*        ok=false, status 500        FaaSLambdaError    4
  404 es.missinglambda                    ok=false, status 404        FaaSInvokeError    1
  408, 429, 500, 502, 503, 504            ok=false, retryCount=3      FaaSInvokeError    4
  413 without Retry-After                 ok=false, status 413        FaaSInvokeError    1
  retryable status (or 413) + Retry-After ≤ timeout                   FaaSInvokeError    4
  retryable status + Retry-After > timeout (default 35 s)             FaaSInvokeError    1
  v2 mode: 901 {"code": threw-error}      ok=false, status 901        FaaSLambdaError    1
  v1 mode: 901 {"code": threw-error}                                  FaaSInvokeError    1
  v2 mode: 901 V1 handler body                                        FaaSInvokeError    1
  v2 mode: 404 function.not-found                                     FaaSInvokeError    1
  no answer within `timeout`              ok=false, status/body null  FaaSInvokeError    4
  connection reset                        ok=false, status null       FaaSInvokeError    4
  connection refused                      ok=false, status null, retryCount 0  FaaSInvokeError  1

- The error name depends only on the body (errorCode starting com.liveperson.faas.handler in
  v1 mode, code starting com.customer.faas.function.threw-error in v2 mode), never on the
  status: 901 is not special, a handler code on a 500 is still FaaSLambdaError.
- Retry-After never changes the delay (always attempt × 350 ms: 350, 700, 1050), but a value
  above the client's `timeout` (ms) cancels the retries; a 413 is retried only with a
  Retry-After. Each attempt gets the full `timeout`, so the worst case is 4 × timeout + 2.1 s.
- v2 mode with v1CompError=true rewrites a V2 error body into V1 fields in what it returns.
- Thrown errors are VErrors: FaaSLambdaError/FaaSInvokeError -> FaaSRequestError ->
  HttpRequestError; the driver reports `status` and `body` from the merged VError info
  (`info.response`), plus `causes` and the full `info` (response, requestOptions).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

LP_DIR = Path(__file__).resolve().parent / "lp"
DRIVER = LP_DIR / "driver.js"
CLIENT_PACKAGE = "liveperson-functions-client"
CANDIDATE_HOSTS = tuple(f"127.0.0.{last}" for last in range(7, 255))
NPM_CI_TIMEOUT_S = 300.0


class LpHarnessError(RuntimeError):
    """The harness itself failed: node/npm missing, install failed, driver crashed or hung."""


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LpHarnessError(
            f"`{name}` is not on PATH: the LivePerson client harness needs Node.js >= 18 and npm "
            f"(install them, then run `npm ci --prefix {LP_DIR}`)"
        )
    return path


def _pinned_version() -> str:
    manifest = json.loads((LP_DIR / "package.json").read_text())
    return manifest["dependencies"][CLIENT_PACKAGE]


def installed_version() -> str | None:
    """The client version under node_modules, or None when it is not installed."""
    manifest = LP_DIR / "node_modules" / CLIENT_PACKAGE / "package.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text())["version"]


def ensure_installed() -> None:
    """Run `npm ci` unless the pinned client version is already installed; fail loudly."""
    _require_tool("node")
    if installed_version() == _pinned_version():
        return
    npm = _require_tool("npm")
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=LP_DIR,
        capture_output=True,
        text=True,
        timeout=NPM_CI_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0 or installed_version() != _pinned_version():
        raise LpHarnessError(f"`npm ci` in {LP_DIR} failed:\n{done.stdout}\n{done.stderr}")


def can_bind_port80(host: str) -> bool:
    """True when a listening socket could be bound to host:80 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Same option asyncio servers use, so a port in TIME_WAIT still counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, 80))
        except OSError:
            return False
    return True


def pick_port80_host(candidates: Iterable[str] = CANDIDATE_HOSTS) -> str:
    """First loopback address whose port 80 is free (the client cannot be given a port)."""
    for host in candidates:
        if can_bind_port80(host):
            return host
    raise LpHarnessError("no 127.0.0.x address has port 80 free (is a server bound to 0.0.0.0:80?)")


def _driver_argv() -> list[str]:
    return [_require_tool("node"), str(DRIVER)]


def parse_driver_output(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    """The driver's one JSON result line, or LpHarnessError when it did not produce one."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = None
    if returncode != 0 or not isinstance(result, dict) or result.get("outcome") == "driver_error":
        raise LpHarnessError(
            f"driver failed (exit {returncode}):\nstdout: {stdout}\nstderr: {stderr}"
        )
    return result


def run_lp_client(command: dict[str, Any], timeout_s: float = 30) -> dict[str, Any]:
    """Run one client call (see driver.js for the command format); blocks the calling thread."""
    ensure_installed()
    try:
        done = subprocess.run(
            _driver_argv(),
            input=json.dumps(command),
            cwd=LP_DIR,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        raise LpHarnessError(f"driver did not finish within {timeout_s} s: {command}") from expired
    return parse_driver_output(done.returncode, done.stdout, done.stderr)


async def run_lp_client_async(command: dict[str, Any], timeout_s: float = 30) -> dict[str, Any]:
    """Like run_lp_client, without blocking the event loop (for servers in the same loop)."""
    ensure_installed()
    process = await asyncio.create_subprocess_exec(
        *_driver_argv(),
        cwd=LP_DIR,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(
            process.communicate(json.dumps(command).encode()), timeout_s
        )
    except asyncio.TimeoutError as expired:
        process.kill()
        await process.wait()
        raise LpHarnessError(f"driver did not finish within {timeout_s} s: {command}") from expired
    return parse_driver_output(process.returncode or 0, stdout.decode(), stderr.decode())
