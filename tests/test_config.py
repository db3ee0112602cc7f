"""Configuration loading: one fixture file per kind of error, each with its exact message.

Every problem is reported as `FILE:LINE: key.path: message`; the table below holds the exact
lines `load_settings` (the loader `serve`, `check` and reload share) must produce for each
file in tests/fixtures/config_errors/. The rest checks defaults, overrides and freezing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pydantic
import pytest

from gateway.config import (
    BreakerPolicyConfig,
    DedupeConfig,
    GatewayConfig,
    RetryPolicyConfig,
    ServerConfig,
    StateConfig,
    Timeouts,
    read_config_text,
)
from gateway.settings import load_settings
from gateway.yamlsource import ConfigError, Problem

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "config_errors"
LP_ROUTE = "/api/account/{account}/lambdas/{function}/invoke"

# fixture file -> [(line, key path, message)], in the order they are reported
ERRORS: dict[str, list[tuple[int, str, str]]] = {
    "unknown_key_top.yaml": [(8, "rate_limit", "unknown key")],
    "unknown_key_nested.yaml": [(8, "upstreams.lp.timeouts.per_try_ms", "unknown key")],
    "wrong_type.yaml": [(3, "server.max_body_bytes", "Input should be a valid integer, unable to parse string as an integer")],
    "out_of_range.yaml": [(3, "server.port", "Input should be less than or equal to 65535")],
    "duplicate_key.yaml": [(8, "upstreams.lp.dialect", "duplicate key (first defined on line 5)")],
    "unknown_dialect.yaml": [(5, "upstreams.ow.dialect", "must be one of 'liveperson', 'lambda', 'yuanrong' or 'http' (got 'openwhisk')")],
    "unknown_capture.yaml": [(8, "upstreams.lp.routes[1]", "unknown capture {tenant}: use {account}, {function} or {*}")],
    "partial_capture.yaml": [(7, "upstreams.web.routes[0]", "a capture must be a whole segment: 'fn-{function}'")],
    "overlapping_routes.yaml": [(9, "upstreams.lp.routes[2]", f"is ambiguous with route '{LP_ROUTE}' (line 7): same shape, so neither is more specific")],
    "overlapping_routes_across_upstreams.yaml": [(13, "upstreams.web.routes[1]", f"is ambiguous with route '{LP_ROUTE}' (line 7): same shape, so neither is more specific")],
    "unknown_retry_policy.yaml": [(6, "upstreams.lp.retry", "unknown retry policy 'aggressive' (known: careful, default, none, patient)")],
    "unknown_breaker_policy.yaml": [(6, "upstreams.lp.breaker", "unknown breaker policy 'twitchy' (known: default, per_upstream, sensitive)")],
    "malformed_yaml.yaml": [(6, "(syntax)", "invalid YAML: expected ',' or ']', but got '{'")],
    "per_try_exceeds_total.yaml": [(8, "upstreams.lp.timeouts.per_try_s", "must not exceed timeouts.total_s")],
    "admin_route.yaml": [(8, "upstreams.web.routes[1]", "/admin is reserved for the gateway's own endpoints")],
    "invalid_url.yaml": [(4, "upstreams.lp.url", "must be an absolute http:// or https:// URL without query or fragment")],
    "missing_url.yaml": [(3, "upstreams.lp.url", "required key is missing")],
    "missing_routes.yaml": [(3, "upstreams.lp.routes", "required key is missing")],
    "empty_routes.yaml": [(6, "upstreams.lp.routes", "Tuple should have at least 1 item after validation, not 0")],
    "missing_upstreams.yaml": [(2, "upstreams", "required key is missing")],
    "yes_is_not_a_boolean.yaml": [(8, "dedupe.enabled", "must be true or false (got 'yes')")],
    "on_is_not_a_boolean.yaml": [(6, "upstreams.web.rate_limited", "must be true or false (got 'off')")],
    "base_delay_over_max.yaml": [(11, "retry_policies.slow_start.base_delay_s", "must not exceed max_delay_s")],
    "sigv4_not_lambda.yaml": [(6, "upstreams.lp.auth", "aws_sigv4 applies to lambda upstreams only")],
    "bad_header_name.yaml": [(6, "upstreams.yr.account_header", "not a header name: 'X Tenant'")],
    "bad_upstream_name.yaml": [(2, "upstreams", "upstream name 'live person' must be 1-64 letters, digits, '_', '.', '-'")],
    "not_a_mapping.yaml": [(2, "(top)", "the configuration must be a mapping")],
    "missing_policies_folder.yaml": [(2, "policies", f"policies folder {FIXTURES / 'no_such_policies'} does not exist")],
    "dialect_not_in_policies.yaml": [(6, "upstreams.lp.dialect", "no dialect pack 'liveperson' in the policies folder")],
    "several_problems.yaml": [
        (3, "server.port", "Input should be a valid integer, unable to parse string as an integer"),
        (4, "server.max_body_byte", "unknown key"),
        (11, "dedupe.enabled", "must be true or false (got 'yes')"),
    ],
    "several_reference_problems.yaml": [
        (6, "upstreams.lp.retry", "unknown retry policy 'aggressive' (known: default, none, patient)"),
        (7, "upstreams.lp.breaker", "unknown breaker policy 'twitchy' (known: default, per_upstream, sensitive)"),
        (10, "upstreams.lp.routes[1]", "unknown capture {acct}: use {account}, {function} or {*}"),
        (15, "upstreams.web.routes[0]", f"is ambiguous with route '{LP_ROUTE}' (line 9): same shape, so neither is more specific"),
    ],
}
# problems reported against another file than the configuration (a policy file)
OTHER_FILE_ERRORS: dict[str, list[tuple[Path, int, str, str]]] = {
    "broken_policy_file.yaml": [(FIXTURES / "policies_broken" / "http.yaml", 7, "rules[1].headers.X-Upstream-Failed.present", "must be true or false (got 'yes')")],
}


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == "\n".join(str(p) for p in caught.value.problems)
    return [str(p) for p in caught.value.problems]


def test_every_fixture_has_expectations() -> None:
    on_disk = {p.name for p in FIXTURES.glob("*.yaml")}
    assert on_disk == set(ERRORS) | set(OTHER_FILE_ERRORS)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_error_fixture_reports_exact_line_and_key_path(name: str) -> None:
    path = FIXTURES / name
    assert problems_of(path) == [f"{path}:{line}: {key}: {message}" for line, key, message in ERRORS[name]]


@pytest.mark.parametrize("name", sorted(OTHER_FILE_ERRORS))
def test_policy_file_errors_name_the_policy_file(name: str) -> None:
    expected = [f"{file}:{line}: {key}: {message}" for file, line, key, message in OTHER_FILE_ERRORS[name]]
    assert problems_of(FIXTURES / name) == expected


def test_the_line_points_at_the_offending_key() -> None:
    """The reported line is where the key (or list item) is written, not where its parent starts."""
    for name, expected in ERRORS.items():
        lines = (FIXTURES / name).read_text().splitlines()
        for line, key, message in expected:
            if key.startswith("(") or message == "required key is missing":
                continue
            text = lines[line - 1].strip()
            if key.endswith("]"):
                assert text.startswith("- "), (name, line, text)
            else:
                assert key.rsplit(".", 1)[-1] in text, (name, line, text)


def test_missing_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:1: (file): cannot read: ")


def test_empty_file_needs_upstreams(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert problems_of(path) == [f"{path}:1: upstreams: required key is missing"]


def test_duplicate_keys_at_every_depth_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "dups.yaml"
    path.write_text("server:\n  port: 1\n  port: 2\nserver: {}\nupstreams: {}\n")
    assert problems_of(path) == [
        f"{path}:3: server.port: duplicate key (first defined on line 2)",
        f"{path}:4: server: duplicate key (first defined on line 1)",
    ]


MINIMAL = f"upstreams:\n  lp:\n    url: http://127.0.0.1:9001/\n    dialect: liveperson\n    routes:\n      - {LP_ROUTE}\n"


def test_defaults_of_a_minimal_configuration(tmp_path: Path) -> None:
    path = tmp_path / "minimal.yaml"
    path.write_text(MINIMAL)
    settings = load_settings(path)
    config = settings.config
    assert config.server == ServerConfig(host="127.0.0.1", port=8080, max_body_bytes=6291456, replay_max_bytes=1048576, max_header_bytes=32768, error_type_base="urn:gateway:error:", shutdown_grace_s=10.0)
    assert config.state == StateConfig(redis_url=None, on_redis_error="local", redis_timeout_s=0.05, redis_max_connections=64)
    assert config.admin.token_env == "GATEWAY_ADMIN_TOKEN"
    upstream = config.upstreams["lp"]
    assert upstream.url == "http://127.0.0.1:9001"  # a trailing slash is dropped: the path is appended as sent
    assert (upstream.retry, upstream.breaker, upstream.auth, upstream.rate_limited) == ("default", "default", "passthrough", True)
    assert upstream.timeouts == Timeouts(connect_s=1.0, per_try_s=10.0, total_s=30.0)
    assert (upstream.account_header, upstream.dedupe, upstream.max_connections) == (None, None, 256)
    assert config.dedupe == DedupeConfig(enabled=True, ttl_s=30.0, max_body_bytes=65536, id_headers=("Idempotency-Key", "X-Request-ID", "amz-sdk-invocation-id"), max_entries=10000)
    assert (config.rate_limits.default.rate, config.rate_limits.default.per_s, config.rate_limits.default.burst) == (100, 1, 200)
    assert settings.policies_dir == str(REPO / "policies")
    assert set(settings.packs) == {"liveperson", "lambda", "yuanrong", "http"}


def test_a_named_policy_replaces_the_shipped_one_and_omitted_keys_take_defaults(tmp_path: Path) -> None:
    path = tmp_path / "override.yaml"
    path.write_text(MINIMAL + "retry_policies:\n  patient: {max_attempts: 7}\nbreaker_policies:\n  mine: {fail_max: 2}\n")
    settings = load_settings(path)
    assert settings.retry_policies["patient"] == RetryPolicyConfig(max_attempts=7)
    assert settings.retry_policies["patient"].base_delay_s == 0.05  # the documented default, not the shipped 0.2
    assert settings.retry_policies["none"].max_attempts == 1
    assert settings.breaker_policies["mine"] == BreakerPolicyConfig(fail_max=2, reset_timeout_s=30.0, scope="function")
    assert set(settings.breaker_policies) == {"default", "per_upstream", "sensitive", "mine"}


def test_policies_folder_is_relative_to_the_configuration_file(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    path = folder / "gateway.yaml"
    path.write_text(MINIMAL + "policies: ../pol\n")
    (tmp_path / "pol").mkdir()
    for name in ("liveperson.yaml", "default.yaml"):
        (tmp_path / "pol" / name).write_text((REPO / "policies" / name).read_text())
    settings = load_settings(path)
    assert settings.policies_dir == str((tmp_path / "pol").resolve())
    assert set(settings.packs) == {"liveperson"}


BOOLEANS = [("true", True), ("false", False), ("True", True), ("FALSE", False)]


@pytest.mark.parametrize(("text", "value"), BOOLEANS)
def test_only_true_and_false_are_booleans(tmp_path: Path, text: str, value: bool) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(MINIMAL + f"    rate_limited: {text}\ndedupe: {{enabled: {text}}}\n")
    config = load_settings(path).config
    assert config.upstreams["lp"].rate_limited is value
    assert config.dedupe.enabled is value


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "y", "n", "1", "0"])
def test_yaml_11_words_are_not_booleans(tmp_path: Path, word: str) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(MINIMAL + f"    rate_limited: {word}\n")
    shown = repr(int(word)) if word.isdigit() else repr(word)
    assert problems_of(path) == [f"{path}:7: upstreams.lp.rate_limited: must be true or false (got {shown})"]


def test_on_and_off_stay_strings_where_a_string_is_expected() -> None:
    config, _ = read_config_text(MINIMAL + "state: {on_redis_error: deny}\nrate_limits:\n  accounts:\n    on: {rate: 1, burst: 1}\n", "x.yaml")
    assert config.state.on_redis_error == "deny"
    assert "on" in config.rate_limits.accounts


def test_configuration_is_frozen(tmp_path: Path) -> None:
    path = tmp_path / "minimal.yaml"
    path.write_text(MINIMAL)
    config = load_settings(path).config
    with pytest.raises(pydantic.ValidationError):
        config.server.port = 1  # type: ignore[misc]
    assert isinstance(config, GatewayConfig)


def test_per_try_equal_to_total_is_allowed(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(MINIMAL + "    timeouts: {per_try_s: 30, total_s: 30}\n")
    assert load_settings(path).config.upstreams["lp"].timeouts.per_try_s == 30


def test_summary_names_upstreams_and_masks_redis_credentials(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(MINIMAL + "state: {redis_url: 'redis://user:hunter2@redis.internal:6379/0'}\n")
    summary = load_settings(path).summary()
    assert summary.splitlines()[0] == f"{path}: OK"
    assert "upstream lp: liveperson -> http://127.0.0.1:9001 (1 routes, retry=default, breaker=default)" in summary
    assert "hunter2" not in summary and "redis://***@redis.internal:6379/0" in summary


def test_problem_format() -> None:
    assert str(Problem("g.yaml", 12, "upstreams.lp.url", "required key is missing")) == "g.yaml:12: upstreams.lp.url: required key is missing"


@pytest.mark.parametrize("name", ["local.yaml", "production.yaml"])
def test_shipped_configurations_load(name: str) -> None:
    settings = load_settings(REPO / "config" / name)
    assert settings.routes


def test_production_sigv4_example_is_valid_once_uncommented(tmp_path: Path) -> None:
    text = (REPO / "config" / "production.yaml").read_text()
    uncommented = re.sub(r"^    # (auth: aws_sigv4|aws_region: .*)$", r"    \1", text, flags=re.MULTILINE)
    assert uncommented != text
    path = tmp_path / "production.yaml"
    path.write_text(uncommented)
    upstream = load_settings(path).config.upstreams["aws"]
    assert (upstream.auth, upstream.aws_region) == ("aws_sigv4", "us-east-1")


def _model_keys(model: type[pydantic.BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, info in model.model_fields.items():
        keys.add(name)
        annotation = info.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, pydantic.BaseModel):
                keys |= _model_keys(candidate)
    return keys


def test_docs_describe_every_configuration_key() -> None:
    docs = (REPO / "docs" / "configuration.md").read_text()
    missing = sorted(k for k in _model_keys(GatewayConfig) if not re.search(rf"`([a-z_]+\.)*{k}`", docs))
    assert not missing, f"docs/configuration.md does not mention: {missing}"


def test_docs_yaml_examples_are_valid(tmp_path: Path) -> None:
    """Every complete YAML example in docs/configuration.md loads (fragments join a minimal file)."""
    from gateway.policies import load_policy_folder

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "docs" / "configuration.md").read_text(), re.DOTALL)
    checked = 0
    for index, block in enumerate(blocks):
        if block.startswith(" ") or "# ..." in block:
            continue  # an indented fragment or one with an elision
        folder = tmp_path / str(index)
        folder.mkdir()
        if block.startswith("kind:"):
            (folder / "pack.yaml").write_text(block)
            load_policy_folder(folder)
        else:
            text = block if block.startswith("upstreams:") else MINIMAL + block
            load_settings(write_config_file(folder, text))
        checked += 1
    assert checked >= 6


def write_config_file(folder: Path, text: str) -> Path:
    path = folder / "gateway.yaml"
    path.write_text(text)
    return path
