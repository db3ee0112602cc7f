"""YAML read with line numbers, strict keys and no YAML 1.1 surprises.

Every problem found in a file is reported as `FILE:LINE: key.path: message`, so the loader
remembers the line of every mapping key and sequence item. Duplicate keys are an error (PyYAML
would silently keep the last one) and `on`/`off`/`yes`/`no` stay strings: only `true` and
`false` are booleans.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KeyPath = tuple[str | int, ...]

_BOOL_PATTERN = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: {self.message}"


class ConfigError(Exception):
    """One or more problems in a configuration or policy file."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(slots=True)
class SourceDocument:
    """A parsed YAML document plus the line of every key path in it."""

    file: str
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line_of(self, path: KeyPath) -> int:
        """Line of the deepest prefix of `path` that exists in the file."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return 1

    def problem(self, path: KeyPath, message: str) -> Problem:
        return Problem(self.file, self.line_of(path), format_path(path), message)


def format_path(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top)"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-style booleans."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL_PATTERN, list("tTfF"))


def load_yaml(path: Path) -> SourceDocument:
    """Parse one YAML file; raises ConfigError with FILE:LINE for syntax or duplicate keys."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(name, 1, "(file)", f"cannot read: {exc}")]) from None
    return parse_yaml(text, name)


def parse_yaml(text: str, name: str) -> SourceDocument:
    try:
        node = yaml.compose(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem(name, line, "(syntax)", f"invalid YAML: {reason}")]) from None
    document = SourceDocument(name, None)
    if node is None:
        document.data = {}
        return document
    problems: list[Problem] = []
    document.data = _build(node, (), document, problems)
    if problems:
        raise ConfigError(problems)
    return document


def _build(node: yaml.Node, path: KeyPath, doc: SourceDocument, problems: list[Problem]) -> Any:
    doc.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        return _build_mapping(node, path, doc, problems)
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), doc, problems) for i, item in enumerate(node.value)]
    return _StrictLoader("").construct_object(node, deep=True)


def _build_mapping(
    node: yaml.MappingNode, path: KeyPath, doc: SourceDocument, problems: list[Problem]
) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            problems.append(Problem(doc.file, key_node.start_mark.line + 1, format_path(path), "keys must be plain scalars"))
            continue
        key = _StrictLoader("").construct_object(key_node)
        key = str(key) if not isinstance(key, str) else key
        child = (*path, key)
        if key in result:
            first = doc.lines.get(child, 0)
            problems.append(
                Problem(doc.file, key_node.start_mark.line + 1, format_path(child), f"duplicate key (first defined on line {first})")
            )
            continue
        doc.lines[child] = key_node.start_mark.line + 1
        result[key] = _build(value_node, child, doc, problems)
    return result
