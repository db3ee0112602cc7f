"""Request path -> (upstream, account, function), from path templates compiled once.

Templates are made of `/`-separated segments; a segment is a literal, `{account}`,
`{function}` or `{*}` (one segment, not captured). Matching runs on the raw, still
percent-encoded path, so an encoded slash can never move a capture across segments; captured
values are then decoded and refused when SPEC.md says so. A template without `{function}`
names its function itself (LivePerson's listing call).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

CAPTURES = ("account", "function", "*")
RESERVED_FIRST_SEGMENTS = frozenset({"admin", "healthz", "readyz", "metrics"})
MAX_CAPTURE_LENGTH = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CAPTURE = re.compile(r"^\{([^{}]*)\}$")


@dataclass(frozen=True, slots=True)
class Route:
    upstream: str
    template: str
    segments: tuple[str, ...]

    @property
    def names_function(self) -> bool:
        return "{function}" in self.segments


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    account: str | None
    function: str


@dataclass(frozen=True, slots=True)
class RefusedCapture:
    """The path fits a template but a captured value is not acceptable."""

    route: Route
    reason: str


@dataclass(slots=True)
class _Node:
    literals: dict[str, "_Node"] = field(default_factory=dict)
    capture: tuple[str, "_Node"] | None = None
    route: Route | None = None


class TemplateError(ValueError):
    pass


def split_template(template: str) -> tuple[str, ...]:
    """Validate one template and return its segments; raises TemplateError with a reason."""
    if not template.startswith("/"):
        raise TemplateError("a route must start with '/'")
    if "?" in template or "#" in template:
        raise TemplateError("a route is a path: no query or fragment")
    segments = tuple(template[1:].split("/"))
    for segment in segments:
        _check_segment(segment)
    if segments[0] in RESERVED_FIRST_SEGMENTS:
        raise TemplateError(f"/{segments[0]} is reserved for the gateway's own endpoints")
    if sum(s == "{account}" for s in segments) > 1 or sum(s == "{function}" for s in segments) > 1:
        raise TemplateError("a capture may appear only once")
    return segments


def _check_segment(segment: str) -> None:
    match = _CAPTURE.match(segment)
    if match:
        if match.group(1) not in CAPTURES:
            raise TemplateError(f"unknown capture {{{match.group(1)}}}: use {{account}}, {{function}} or {{*}}")
    elif "{" in segment or "}" in segment:
        raise TemplateError(f"a capture must be a whole segment: {segment!r}")


def templates_overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when some path would match both templates."""
    if len(a) != len(b):
        return False
    return all(x == y or x.startswith("{") or y.startswith("{") for x, y in zip(a, b))


class Router:
    def __init__(self, routes: list[Route]) -> None:
        self._root = _Node()
        for route in routes:
            self._insert(route)

    def _insert(self, route: Route) -> None:
        node = self._root
        for segment in route.segments:
            if segment.startswith("{"):
                if node.capture is None:
                    node.capture = (segment[1:-1], _Node())
                node = node.capture[1]
            else:
                node = node.literals.setdefault(segment, _Node())
        node.route = route

    def match(self, raw_path: str) -> RouteMatch | RefusedCapture | None:
        if not raw_path.startswith("/"):
            return None
        found = _walk(self._root, raw_path[1:].split("/"), 0, {})
        if found is None:
            return None
        route, captured = found
        return _accept(route, captured)


def _walk(node: _Node, segments: list[str], index: int, captured: dict[str, str]) -> tuple[Route, dict[str, str]] | None:
    if index == len(segments):
        return (node.route, captured) if node.route else None
    segment = segments[index]
    child = node.literals.get(segment)
    if child is not None:
        found = _walk(child, segments, index + 1, captured)
        if found:
            return found
    if node.capture is not None:
        name, child = node.capture
        return _walk(child, segments, index + 1, {**captured, name: segment})
    return None


def _accept(route: Route, captured: dict[str, str]) -> RouteMatch | RefusedCapture:
    values: dict[str, str] = {}
    for name in ("account", "function"):
        if name in captured:
            value = unquote(captured[name])
            reason = capture_problem(captured[name], value)
            if reason:
                return RefusedCapture(route, f"{{{name}}} {reason}")
            values[name] = value
    function = values.get("function", route.template)
    return RouteMatch(route, values.get("account"), function)


def capture_problem(raw: str, value: str) -> str | None:
    """Why a captured value is refused (SPEC.md), or None when it is acceptable."""
    if value in ("", ".", ".."):
        return "is empty or a dot segment"
    if "/" in value or "\\" in value or "%2f" in raw.lower() or "%5c" in raw.lower():
        return "contains a slash or backslash"
    if _CONTROL.search(value):
        return "contains control characters"
    if len(value) > MAX_CAPTURE_LENGTH:
        return f"is longer than {MAX_CAPTURE_LENGTH} characters"
    return None
