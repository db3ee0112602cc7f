"""The commands as a user runs them: `python -m gateway`, `gateway check`, `gateway serve`, `gateway demo`.

Each test starts the real command as a subprocess and stops it; `check` must print exactly
the `FILE:LINE: key.path: message` lines that the loader produces (see test_config.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import free_port, stop_process
from tests.test_config import ERRORS

REPO = Path(__file__).resolve().parent.parent
GATEWAY = Path(sys.executable).parent / "gateway"
FIXTURES = Path("tests/fixtures/config_errors")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "GATEWAY_LOG_LEVEL": "WARNING"}


def run(*args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout_s)


def test_python_m_gateway_and_the_console_script_agree_on_help() -> None:
    module = run("--help")
    script = subprocess.run([str(GATEWAY), "--help"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30)
    assert module.returncode == script.returncode == 0
    assert module.stdout.replace("__main__.py", "gateway") == script.stdout
    for command in ("serve", "check", "demo"):
        assert command in module.stdout


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_check_passes_on_every_shipped_configuration(name: str) -> None:
    result = run("check", "--config", f"config/{name}")
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0] == f"config/{name}: OK"
    assert any(line.startswith("  upstream ") for line in lines)
    assert any(line.startswith("  state: ") for line in lines)


@pytest.mark.parametrize("name", ["several_problems.yaml", "several_reference_problems.yaml", "duplicate_key.yaml", "malformed_yaml.yaml", "yes_is_not_a_boolean.yaml"])
def test_check_lists_every_problem_and_exits_2(name: str) -> None:
    path = FIXTURES / name
    result = run("check", "--config", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [f"{path}:{line}: {key}: {message}" for line, key, message in ERRORS[name]]


def test_check_on_a_missing_file() -> None:
    result = run("check", "--config", "no/such/file.yaml")
    assert result.returncode == 2
    assert result.stderr.startswith("no/such/file.yaml:1: (file): cannot read: ")


def test_check_needs_a_config() -> None:
    result = run("check")
    assert result.returncode == 2
    assert "--config" in result.stderr


def test_serve_refuses_an_invalid_configuration_with_the_same_messages() -> None:
    path = FIXTURES / "several_reference_problems.yaml"
    result = run("serve", "--config", str(path), "--port", str(free_port()))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{path}:{line}: {key}: {message}" for line, key, message in ERRORS[path.name]]


def test_serve_refuses_several_workers_with_state_in_memory() -> None:
    result = run("serve", "--config", "config/local.yaml", "--workers", "2", "--port", str(free_port()))
    assert result.returncode == 2
    assert "state.redis_url" in result.stderr


# --- gateway demo ------------------------------------------------------------------------------


@contextlib.contextmanager
def demo_process(port: int) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(port)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield process, wait_for_examples(process)
    finally:
        stop_process(process)  # type: ignore[arg-type]
        if process.stdout is not None:
            process.stdout.close()


def wait_for_examples(process: subprocess.Popen[str], timeout_s: float = 20.0) -> str:
    """Everything the demo printed up to its last line, `Press Ctrl+C to stop.`."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("demo exited early:\n" + "".join(lines))
        lines.append(line)
        if line.startswith("Press Ctrl+C"):
            return "".join(lines)
    raise TimeoutError("demo printed no examples:\n" + "".join(lines))


def wait_until_answering(url: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=0.5).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer")


def printed_example(output: str, what: str) -> str:
    """The command printed under the comment line that starts with `what`."""
    match = re.search(r"^  # " + re.escape(what) + r".*\n  (curl .*)$", output, re.MULTILINE)
    assert match, f"no example for {what!r} in:\n{output}"
    return match.group(1)


def run_example(command: str) -> tuple[int, dict[str, str], str]:
    """Run a printed `curl -si` command as a user would paste it; status, headers, body."""
    result = subprocess.run(["bash", "-c", command], capture_output=True, timeout=20)
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.decode().partition("\r\n\r\n")
    status_line, *fields = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    return int(status_line.split()[1]), headers, body


def test_demo_starts_and_its_printed_examples_work() -> None:
    port = free_port()
    with demo_process(port) as (_, output):
        base = f"http://127.0.0.1:{port}"
        assert f"listening on {base}" in output
        wait_until_answering(base)
        success = run_example(printed_example(output, "success"))
        function_error = run_example(printed_example(output, "LivePerson 901"))
        unknown = run_example(printed_example(output, "an unknown route"))
    status, headers, body = success
    assert (status, headers["content-type"]) == (200, "application/json")
    assert '"payload":{"hi":1}' in body and "problem" not in body
    status, headers, body = function_error
    assert status == 901
    assert '"errorCode":"com.liveperson.faas.handler.custom-failure"' in body and '"class":"function_error"' in body
    status, headers, body = unknown
    assert (status, headers["content-type"]) == (404, "application/problem+json")
    assert '"code":"gateway.no_route"' in body
    assert all(h.get("x-request-id") for h in (success[1], function_error[1], unknown[1]))
