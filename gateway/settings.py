"""Everything `serve`, `check` and reload need, loaded and cross-checked in one call.

`load_settings` reads the configuration file, the policies folder (the shipped one when the
configuration names none), merges named policies, compiles routes and checks every reference.
It collects every problem it can before raising one ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.classify import CompiledPack, compile_pack
from gateway.config import BreakerPolicyConfig, GatewayConfig, RetryPolicyConfig, read_config_file
from gateway.policies import PolicyLibrary, load_policy_folder, shipped_policies_dir
from gateway.routing import Route, Router, TemplateError, split_template, templates_ambiguous
from gateway.yamlsource import ConfigError, Problem, SourceDocument


@dataclass(frozen=True, slots=True)
class Settings:
    config: GatewayConfig
    source: str
    policies_dir: str
    packs: dict[str, CompiledPack]
    retry_policies: dict[str, RetryPolicyConfig]
    breaker_policies: dict[str, BreakerPolicyConfig]
    routes: tuple[Route, ...]
    router: Router

    def summary(self) -> str:
        lines = [f"{self.source}: OK", f"  policies: {self.policies_dir} (dialects: {', '.join(sorted(self.packs))})"]
        for name, upstream in self.config.upstreams.items():
            lines.append(f"  upstream {name}: {upstream.dialect} -> {upstream.url} ({len(upstream.routes)} routes, retry={upstream.retry}, breaker={upstream.breaker})")
        state = self.config.state.redis_url or "in process memory"
        lines.append(f"  state: {_mask_url(state)}; rate limit default {self.config.rate_limits.default.rate:g}/{self.config.rate_limits.default.per_s:g}s burst {self.config.rate_limits.default.burst}, {len(self.config.rate_limits.accounts)} account overrides")
        return "\n".join(lines)


def _mask_url(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def load_settings(path: Path) -> Settings:
    config, document = read_config_file(path)
    policies_dir = _policies_dir(config, path)
    library = _load_library(policies_dir, document)
    problems: list[Problem] = []
    retry = {**library.retry_policies, **config.retry_policies}
    breakers = {**library.breaker_policies, **config.breaker_policies}
    problems += _check_references(config, document, library, retry, breakers)
    routes, route_problems = _compile_routes(config, document)
    problems += route_problems
    if problems:
        raise ConfigError(problems)
    packs = {name: compile_pack(pack) for name, pack in library.packs.items()}
    return Settings(config, str(path), str(policies_dir), packs, retry, breakers, tuple(routes), Router(routes))


def _policies_dir(config: GatewayConfig, config_path: Path) -> Path:
    if config.policies is None:
        return shipped_policies_dir()
    folder = Path(config.policies)
    return folder if folder.is_absolute() else (config_path.parent / folder).resolve()


def _load_library(folder: Path, document: SourceDocument) -> PolicyLibrary:
    if not folder.is_dir():
        raise ConfigError([document.problem(("policies",), f"policies folder {folder} does not exist")])
    return load_policy_folder(folder)


def _check_references(
    config: GatewayConfig,
    document: SourceDocument,
    library: PolicyLibrary,
    retry: dict[str, RetryPolicyConfig],
    breakers: dict[str, BreakerPolicyConfig],
) -> list[Problem]:
    problems = []
    for name, upstream in config.upstreams.items():
        here = ("upstreams", name)
        if upstream.dialect not in library.packs:
            problems.append(document.problem((*here, "dialect"), f"no dialect pack {upstream.dialect!r} in the policies folder"))
        if upstream.retry not in retry:
            problems.append(document.problem((*here, "retry"), f"unknown retry policy {upstream.retry!r} (known: {', '.join(sorted(retry))})"))
        if upstream.breaker not in breakers:
            problems.append(document.problem((*here, "breaker"), f"unknown breaker policy {upstream.breaker!r} (known: {', '.join(sorted(breakers))})"))
        if upstream.timeouts.per_try_s > upstream.timeouts.total_s:
            problems.append(document.problem((*here, "timeouts", "per_try_s"), "must not exceed timeouts.total_s"))
        if upstream.auth == "aws_sigv4" and upstream.dialect != "lambda":
            problems.append(document.problem((*here, "auth"), "aws_sigv4 applies to lambda upstreams only"))
    for name, policy in retry.items():
        if policy.base_delay_s > policy.max_delay_s:
            problems.append(document.problem(("retry_policies", name, "base_delay_s"), "must not exceed max_delay_s"))
    return problems


def _compile_routes(config: GatewayConfig, document: SourceDocument) -> tuple[list[Route], list[Problem]]:
    routes: list[Route] = []
    problems: list[Problem] = []
    where: dict[str, tuple[str | int, ...]] = {}
    for name, upstream in config.upstreams.items():
        for index, template in enumerate(upstream.routes):
            path = ("upstreams", name, "routes", index)
            try:
                route = Route(name, template, split_template(template))
            except TemplateError as exc:
                problems.append(document.problem(path, str(exc)))
                continue
            clash = next((r for r in routes if templates_ambiguous(r.segments, route.segments)), None)
            if clash is not None:
                problems.append(document.problem(path, f"is ambiguous with route {clash.template!r} (line {document.line_of(where[clash.template])}): same shape, so neither is more specific"))
                continue
            where[template] = path
            routes.append(route)
    return routes, problems
