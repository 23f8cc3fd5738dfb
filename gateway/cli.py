"""The `mcp-gateway` command: check, build and serve registries.

    mcp-gateway validate FILE
    mcp-gateway serve [--registry FILE] [--bind HOST:PORT] [--workers N]
    mcp-gateway templates [--registry FILE] [--json]
    mcp-gateway registry from-template NAME --id ID [--instances N] [--transport T] [--config KEY=VALUE ...]
    mcp-gateway registry import FILE
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from . import mcpservers, registry, templates

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcp-gateway", description="One HTTP endpoint in front of many MCP servers.")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("validate", help="check a registry file; exit 0 if valid, 1 if not")
    check.add_argument("file", help="registry file (.yaml, .yml or .json; an mcpServers file works too)")

    serve = commands.add_parser("serve", help="run the gateway under gunicorn with conf/gunicorn.conf.py")
    serve.add_argument("--registry", help=f"registry file (default: ${registry.REGISTRY_ENV} or {registry.DEFAULT_PATH})")
    serve.add_argument("--bind", help="HOST:PORT to listen on (default: the registry's gateway.host/port)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes")

    listing = commands.add_parser("templates", help="list server templates with their config keys and defaults")
    listing.add_argument("--registry", help="also list the user templates this registry names")
    listing.add_argument("--json", action="store_true", help="print JSON")

    registry_commands = commands.add_parser("registry", help="write registry entries").add_subparsers(dest="action", required=True)
    make = registry_commands.add_parser("from-template", help="print a registry entry for a template")
    make.add_argument("template")
    make.add_argument("--id", required=True, help="the server id (its route is /<id>/...)")
    make.add_argument("--instances", type=int, default=1)
    make.add_argument("--transport", choices=("stdio", "http"))
    make.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                      help="a config value (JSON values such as 3 or true are typed)")
    make.add_argument("--format", choices=("yaml", "json"), default="yaml")
    make.add_argument("--registry", help="use the user templates this registry names")
    convert = registry_commands.add_parser("import", help="turn an mcpServers JSON file into a registry")
    convert.add_argument("file")
    convert.add_argument("--format", choices=("yaml", "json"), default="yaml")

    args = parser.parse_args(argv)
    if args.command == "validate":
        return validate(args.file)
    if args.command == "serve":
        return serve_forever(args.registry, args.bind, args.workers)
    if args.command == "templates":
        return list_templates(args.registry, args.json)
    if args.action == "from-template":
        return from_template(args)
    return import_mcp_servers(args.file, args.format)


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


def _catalog(registry_file: str | None) -> dict[str, templates.Template]:
    if not registry_file:
        return templates.catalog()
    path = Path(registry_file)
    data = yaml.safe_load(path.read_text("utf-8"))
    return registry.template_catalog(data if isinstance(data, dict) else {}, path.parent)


def list_templates(registry_file: str | None, as_json: bool) -> int:
    try:
        known = _catalog(registry_file)
    except templates.TemplateError as exc:
        print(exc, file=sys.stderr)
        return 1
    described = [t.describe() for t in known.values()]
    if as_json:
        print(json.dumps(described, indent=2))
        return 0
    for item in described:
        print(f"{item['name']}: {item['description']}")
        print(f"  transports: {', '.join(item['transports'])} (default {item['default_transport']}); from {item['source']}")
        for key, spec in item["config"].items():
            print(f"  config {key} = {json.dumps(spec['default'])}  ({spec['reaches_server_as']}) {spec['description']}")
    return 0


def from_template(args: argparse.Namespace) -> int:
    config: dict[str, Any] = {}
    for pair in args.config:
        key, sep, value = pair.partition("=")
        if not sep:
            print(f"--config {pair!r}: expected KEY=VALUE", file=sys.stderr)
            return 1
        try:
            config[key] = json.loads(value)
        except ValueError:
            config[key] = value
    entry: dict[str, Any] = {"type": "template", "template_name": args.template, "instances": args.instances}
    if args.transport:
        entry["transport"] = args.transport
    if config:
        entry["config"] = config
    document = {"servers": {args.id: entry}}
    base = Path(args.registry).parent if args.registry else Path(".")
    data = document if not args.registry else {**document, "gateway": {
        "template_dirs": ((yaml.safe_load(Path(args.registry).read_text("utf-8")) or {}).get("gateway") or {}).get(
            "template_dirs", [])}}
    problems = registry.validate(data, base)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(_dump(document, args.format), end="")
    return 0


def import_mcp_servers(path: str, form: str) -> int:
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        print(f"{path}: cannot read an mcpServers JSON file: {exc}", file=sys.stderr)
        return 1
    document, problems = mcpservers.to_registry(data if isinstance(data, dict) else {})
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    print(_dump(document, form), end="")
    return 1 if problems else 0


def _dump(document: dict[str, Any], form: str) -> str:
    if form == "json":
        return json.dumps(document, indent=2) + "\n"
    return yaml.safe_dump(document, sort_keys=False)


if __name__ == "__main__":
    sys.exit(main())
