"""The `mcp-gateway` command: check, build and serve registries.

    mcp-gateway validate FILE
    mcp-gateway serve [--registry FILE] [--bind HOST:PORT] [--workers N]
    mcp-gateway templates [--registry FILE] [--json]
    mcp-gateway registry from-template NAME --id ID [--instances N] [--transport T] [--config KEY=VALUE ...]
    mcp-gateway registry import FILE
    mcp-gateway servers [--registry FILE]
    mcp-gateway status [--url URL] [--token TOKEN] [--json]
    mcp-gateway call SERVER METHOD [PARAMS_JSON] [--url URL] [--token TOKEN] [--protocol P]
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

from . import errors, mcpservers, protocol, registry, sse, templates

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

    servers = commands.add_parser("servers", help="list the servers of a registry")
    servers.add_argument("--registry", help=f"registry file (default: ${registry.REGISTRY_ENV} or {registry.DEFAULT_PATH})")

    status = commands.add_parser("status", help="ask a running gateway how its servers are")
    _remote_options(status)
    status.add_argument("--json", action="store_true", help="print the status JSON as it is")

    call = commands.add_parser("call", help="send one JSON-RPC request and print the answer (SSE events as they come)")
    call.add_argument("server")
    call.add_argument("method", help="e.g. tools/list or tools/call")
    call.add_argument("params", nargs="?", default="{}", help="params as JSON (default {})")
    call.add_argument("--protocol", choices=("2026-07-28", "legacy"), default="2026-07-28",
                      help="send 2026-07-28 headers and _meta (default) or a plain handshake-era request")
    _remote_options(call)

    args = parser.parse_args(argv)
    if args.command == "servers":
        return list_servers(args.registry)
    if args.command == "status":
        return show_status(args)
    if args.command == "call":
        return call_server(args)
    if args.command == "validate":
        return validate(args.file)
    if args.command == "serve":
        return serve_forever(args.registry, args.bind, args.workers)
    if args.command == "templates":
        return list_templates(args.registry, args.json)
    if args.action == "from-template":
        return from_template(args)
    return import_mcp_servers(args.file, args.format)


def _remote_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--url", help="the gateway (default: $MCP_GATEWAY_URL, else the registry's host and port)")
    command.add_argument("--token", default=os.environ.get("MCP_GATEWAY_TOKEN"),
                         help="bearer token (default: $MCP_GATEWAY_TOKEN)")


def _gateway_url(given: str | None) -> str:
    if given or os.environ.get("MCP_GATEWAY_URL"):
        return (given or os.environ["MCP_GATEWAY_URL"]).rstrip("/")
    settings = registry.load().gateway
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}"


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def list_servers(registry_file: str | None) -> int:
    try:
        loaded = registry.load(registry_file)
    except errors.RegistryError as exc:
        print(exc, file=sys.stderr)
        return 1
    for server_id, entry in loaded.servers.items():
        if entry.stdio is not None:
            how = f"stdio  pool {entry.stdio.pool_min}-{entry.stdio.pool_size}  {' '.join(entry.stdio.command)}"
        elif entry.http is not None:
            how = f"http   {entry.http.load_balancing}  {', '.join(i.endpoint for i in entry.http.instances)}"
        else:
            how = f"http   {entry.instances} local instance(s)"
        template = f"  (template {entry.template})" if entry.template else ""
        print(f"{server_id}  {how}{template}")
    return 0


def show_status(args: argparse.Namespace) -> int:
    import requests

    url = _gateway_url(args.url)
    try:
        response = requests.get(f"{url}/status", headers=_auth(args.token), timeout=30)
    except requests.RequestException as exc:
        print(f"cannot reach the gateway at {url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"{url}/status answered {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    status = response.json()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    registry = status["registry"]
    versions = {worker["registry_digest"] for worker in status["workers"]}
    print(f"gateway {url}: {len(status['workers'])} workers, registry {registry['source']} ({registry['digest']}, "
          f"loaded {registry['loaded']}){'' if len(versions) == 1 else ' - workers disagree, a reload is under way'}")
    for server_id, server in status["servers"].items():
        state = "healthy" if server.get("healthy") else "FAILING"
        if server["type"] == "stdio":
            detail = (f"{server['alive']} alive, {server['busy']} busy, {server['waiting']} waiting, "
                      f"{server['restarts']} restarts")
        else:
            detail = f"{server['routable']}/{len(server['instances'])} instances routable, {server['retries']} retries"
        error = server.get("last_error") or {}
        print(f"  {server_id}  {server['type']}  {state}  {detail}"
              + (f"  last error: {error['message']}" if error.get("message") and not server.get("healthy") else ""))
    return 0


def call_server(args: argparse.Namespace) -> int:
    import requests

    try:
        params = json.loads(args.params)
    except ValueError as exc:
        print(f"params are not JSON: {exc}", file=sys.stderr)
        return 1
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": args.method}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **_auth(args.token)}
    if args.protocol == "2026-07-28":
        message = protocol.to_modern_request({**message, "params": params})
        headers.update(protocol.request_headers(message))
    elif params:
        message["params"] = params
    url = f"{_gateway_url(args.url)}/{args.server}/mcp"
    try:
        with requests.post(url, data=json.dumps(message), headers=headers, stream=True, timeout=(10, 600)) as response:
            if response.headers.get("Content-Type", "").startswith("text/event-stream"):
                final: dict[str, Any] = {}
                for data in sse.events(response.iter_content(chunk_size=None)):
                    event = json.loads(data)
                    print(json.dumps(event), flush=True)  # notifications as they arrive
                    final = event
            else:
                final = response.json() if response.content else {}
                print(json.dumps(final, indent=2))
    except (requests.RequestException, ValueError) as exc:
        print(f"call to {url} failed: {exc}", file=sys.stderr)
        return 1
    return 0 if "result" in final else 1


def validate(path: str) -> int:
    try:
        loaded = registry.load(path)
    except errors.RegistryError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{path}: valid ({len(loaded.servers)} servers: {', '.join(loaded.servers) or 'none'})")
    return 0


def serve_forever(registry_file: str | None, bind: str | None, workers: int | None) -> int:
    if registry_file:
        os.environ[registry.REGISTRY_ENV] = str(Path(registry_file).resolve())
    try:
        registry.load()
    except errors.RegistryError as exc:
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


def _template_settings(registry_file: str | None) -> tuple[dict[str, Any], Path]:
    """The `gateway` section naming user template folders, and the folder they are relative to."""
    if not registry_file:
        return {}, Path(".")
    path = Path(registry_file)
    data = yaml.safe_load(path.read_text("utf-8"))
    dirs = ((data.get("gateway") or {}) if isinstance(data, dict) else {}).get("template_dirs") or []
    return {"template_dirs": dirs}, path.parent


def _catalog(registry_file: str | None) -> dict[str, templates.Template]:
    gateway, base = _template_settings(registry_file)
    return registry.template_catalog({"gateway": gateway}, base)


def list_templates(registry_file: str | None, as_json: bool) -> int:
    try:
        known = _catalog(registry_file)
    except errors.TemplateError as exc:
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
    gateway, base = _template_settings(args.registry)
    problems = registry.validate({**document, "gateway": gateway}, base)
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
