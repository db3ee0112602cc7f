"""`gateway serve | check | demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.yamlsource import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="Resilient invocation gateway for serverless functions")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, type=Path)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1)
    check = commands.add_parser("check", help="validate a configuration and its policies")
    check.add_argument("--config", required=True, type=Path)
    demo = commands.add_parser("demo", help="simulated upstreams of every dialect with the gateway in front")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    if args.command == "check":
        return run_check(args.config)
    if args.command == "serve":
        return run_serve(args)
    from gateway.demo import run_demo

    return run_demo(args.host, args.port)


def run_check(path: Path) -> int:
    from gateway.settings import load_settings

    try:
        settings = load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    print(settings.summary())
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from gateway.server import serve
    from gateway.settings import load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    server = settings.config.server
    if args.workers > 1 and settings.config.state.redis_url is None:
        print("gateway: --workers > 1 with state in process memory would multiply every rate limit; configure state.redis_url", file=sys.stderr)
        return 2
    serve(args.config, args.host or server.host, args.port if args.port is not None else server.port, args.workers, server.shutdown_grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
