"""py-spy on a running gateway under load: collapsed stacks -> where the CPU goes (self and inclusive)."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

_LOCATION = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def start_py_spy(pid: int, seconds: float, core: int, out: Path, rate: int = 200) -> subprocess.Popen[bytes]:
    """py-spy record in raw (collapsed) format, pinned to the load core so it does not steal the proxy's."""
    py_spy = Path(__import__("sys").executable).with_name("py-spy")
    argv = ["taskset", "-c", str(core), str(py_spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate), "-f", "raw", "-o", str(out), "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def short_frame(frame: str) -> str:
    """`func (path/to/module.py:12)` -> `module.py:func` (line numbers dropped so lines of one function add up)."""
    found = _LOCATION.match(frame.strip())
    if not found:
        return frame.strip()
    path = found["file"]
    parts = path.split("/")
    if not path.startswith("/"):
        pass  # py-spy already made it relative to sys.path: uvicorn/protocols/http/...
    elif "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    elif "gateway" in parts:
        parts = parts[parts.index("gateway") :]
    else:
        parts = parts[-2:]
    return f"{'/'.join(parts)}:{found['func']}"


def parse_collapsed(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    stacks = []
    for line in lines:
        line = line.rstrip()
        if not line:
            continue
        frames, _, count = line.rpartition(" ")
        stacks.append(([short_frame(f) for f in frames.split(";")], int(count)))
    return stacks


def aggregate(stacks: list[tuple[list[str], int]]) -> dict[str, Counter[str]]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    for frames, count in stacks:
        if not frames:
            continue
        own[frames[-1]] += count
        by_package[package_of(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    return {"self": own, "inclusive": inclusive, "package": by_package}


def package_of(frame: str) -> str:
    head = frame.split(":", 1)[0]
    return head.split("/", 1)[0] if "/" in head else head


def profile_markdown(stacks: list[tuple[list[str], int]], top: int = 25) -> str:
    total = sum(count for _, count in stacks) or 1
    parts = aggregate(stacks)
    out = [f"{total} samples (busy only; idle waits in the event loop are not sampled).", ""]
    for title, key in (("Self time by package/module", "package"), ("Self time by function", "self"), ("Inclusive time by function", "inclusive")):
        out += [f"#### {title}", "", "| share | frame |", "| ---: | --- |"]
        out += [f"| {count / total:.1%} | `{frame}` |" for frame, count in parts[key].most_common(top)]
        out.append("")
    return "\n".join(out)
