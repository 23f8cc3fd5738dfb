"""The `mcp-gateway` command: validate a registry, or serve one with gunicorn."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import registry

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcp-gateway", description="One HTTP endpoint in front of many MCP servers.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("validate", help="check a registry file against the schema; exit 0 if valid, 1 if not")
    check.add_argument("file", help="registry file (.yaml, .yml or .json)")
    serve = commands.add_parser("serve", help="run the gateway under gunicorn")
    serve.add_argument("--registry", help=f"registry file (default: ${registry.REGISTRY_ENV} or {registry.DEFAULT_PATH})")
    serve.add_argument("--bind", help="HOST:PORT to listen on (default: the registry's gateway.host/port)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes")
    args = parser.parse_args(argv)
    if args.command == "validate":
        return validate(args.file)
    return serve_forever(args.registry, args.bind, args.workers)


def validate(path: str) -> int:
    try:
        loaded = registry.load(path)
    except registry.RegistryError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{path}: valid ({len(loaded.servers)} servers: {', '.join(loaded.servers) or 'none'})")
    return 0


def serve_forever(registry_file: str | None, bind: str | None, workers: int | None) -> int:
    if registry_file:
        os.environ[registry.REGISTRY_ENV] = str(Path(registry_file).resolve())
    try:
        registry.load()
    except registry.RegistryError as exc:
        print(exc, file=sys.stderr)
        return 1
    argv = [sys.executable, "-m", "gunicorn", "--config", str(CONF_DIR / "gunicorn.conf.py")]
    if bind:
        argv += ["--bind", bind]
    if workers:
        argv += ["--workers", str(workers)]
    argv.append("wsgi:app")
    os.chdir(CONF_DIR.parent)  # wsgi.py lives at the project root
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    sys.exit(main())
