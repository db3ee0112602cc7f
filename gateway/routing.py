"""Request path -> (upstream, account, function), from path templates compiled once.

Templates are made of `/`-separated segments; a segment is a literal, `{account}`,
`{function}` or `{*}` (one segment, not captured). Where two templates could match the same
path, the literal segment wins at the first position where they differ (so
`/api/account/le-1/lambdas/{function}/invoke` can send one account elsewhere); two templates
of the same shape are ambiguous and refused by the loader. Matching runs on the raw, still
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
    # (position, name) of {account} and {function}, found once so a match looks only there
    captures: tuple[tuple[int, str], ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        found = tuple((i, s[1:-1]) for i, s in enumerate(self.segments) if s in ("{account}", "{function}"))
        object.__setattr__(self, "captures", found)

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
    capture: "_Node | None" = None
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


def templates_ambiguous(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when neither template is more specific: captures and literals in the same places."""
    if len(a) != len(b):
        return False
    return all((x.startswith("{") and y.startswith("{")) or x == y for x, y in zip(a, b))


RECENT_PATHS = 4096  # paths whose match is kept; a client calls the same functions again and again
RECENT_PATH_MAX_LENGTH = 512  # longer paths are matched each time: the map stays within a few MiB


class Router:
    def __init__(self, routes: list[Route]) -> None:
        self._root = _Node()
        for route in routes:
            self._insert(route)
        # raw path -> its match (immutable, a pure function of the path and the routes)
        self._recent: dict[str, RouteMatch | RefusedCapture | None] = {}

    def _insert(self, route: Route) -> None:
        node = self._root
        for segment in route.segments:
            if segment.startswith("{"):
                if node.capture is None:
                    node.capture = _Node()
                node = node.capture
            else:
                node = node.literals.setdefault(segment, _Node())
        node.route = route

    def match(self, raw_path: str) -> RouteMatch | RefusedCapture | None:
        recent = self._recent
        try:
            return recent[raw_path]
        except KeyError:
            pass
        found = self._match(raw_path)
        if len(raw_path) <= RECENT_PATH_MAX_LENGTH:
            if len(recent) >= RECENT_PATHS:
                recent.clear()  # bounded: many distinct paths cost a walk each, never memory
            recent[raw_path] = found
        return found

    def _match(self, raw_path: str) -> RouteMatch | RefusedCapture | None:
        if not raw_path.startswith("/"):
            return None
        segments = raw_path[1:].split("/")
        route = _walk(self._root, segments, 0)
        return None if route is None else _accept(route, segments)


def _walk(node: _Node, segments: list[str], index: int) -> Route | None:
    """Depth-first, literal before capture, so the more specific template wins."""
    if index == len(segments):
        return node.route
    child = node.literals.get(segments[index])
    if child is not None:
        found = _walk(child, segments, index + 1)
        if found is not None:
            return found
    return _walk(node.capture, segments, index + 1) if node.capture is not None else None


def _accept(route: Route, segments: list[str]) -> RouteMatch | RefusedCapture:
    account = function = None
    for index, name in route.captures:
        raw = segments[index]
        value = unquote(raw)
        reason = capture_problem(raw, value)
        if reason:
            return RefusedCapture(route, f"{{{name}}} {reason}")
        if name == "account":
            account = value
        else:
            function = value
    return RouteMatch(route, account, route.template if function is None else function)


def capture_problem(raw: str, value: str) -> str | None:
    """Why a captured value is refused (SPEC.md), or None when it is acceptable."""
    if value in ("", ".", ".."):
        return "is empty or a dot segment"
    if "/" in value or "\\" in value or ("%" in raw and ("%2f" in raw.lower() or "%5c" in raw.lower())):
        return "contains a slash or backslash"
    if _CONTROL.search(value):
        return "contains control characters"
    if len(value) > MAX_CAPTURE_LENGTH:
        return f"is longer than {MAX_CAPTURE_LENGTH} characters"
    return None
