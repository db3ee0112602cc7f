"""Validate problem objects against the repo's JSON Schema (gateway/schemas/problem.schema.json).

Every test that sees an error envelope checks it here, so the schema and the gateway cannot
drift apart silently:

    from tests.problem_schema import assert_problem, problem_of
    problem = problem_of(response.headers.get("content-type"), response.content)
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "gateway" / "schemas" / "problem.schema.json"
PROBLEM_JSON = "application/problem+json"


@lru_cache(maxsize=1)
def problem_validator() -> jsonschema.protocols.Validator:
    """The schema, checked itself, with format checking on."""
    schema = json.loads(SCHEMA_PATH.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)


def schema_errors(problem: Any) -> list[str]:
    """Every way `problem` breaks the schema, as readable lines (empty when it is valid)."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in problem_validator().iter_errors(problem)]


def assert_problem(problem: Any) -> dict[str, Any]:
    """Fail the test unless `problem` is a valid problem object; return it for further checks."""
    errors = schema_errors(problem)
    assert not errors, f"problem object breaks the schema: {errors}\n{problem!r}"
    return problem


def problem_of(content_type: str | None, body: bytes) -> dict[str, Any]:
    """The problem object of an error response: the body itself (problem+json) or its `problem` member."""
    document = json.loads(body)
    media = (content_type or "").split(";", 1)[0].strip().lower()
    problem = document if media == PROBLEM_JSON else document.get("problem")
    return assert_problem(problem)


def without_problem(document: Any) -> Any:
    """A dialect body minus the gateway's `problem` member (what the platform's client compares)."""
    if isinstance(document, dict):
        return {k: v for k, v in document.items() if k != "problem"}
    return document
