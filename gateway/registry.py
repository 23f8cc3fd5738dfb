"""The registry: which MCP servers the gateway fronts, loaded and validated.

Owns reading the file (JSON or YAML by extension), expanding `${VAR}` from the
environment, validating against the JSON Schema shipped in gateway/schema/,
and turning the result into immutable settings objects with defaults filled
in. Every problem is reported as `file: path.inside.it: problem`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import jsonschema
import yaml

from . import mcpservers, rebinding, templates
from .errors import RegistryError, TemplateError
from .hooks import load_hook
from .sessions import split_secrets
from .settings import (
    COMMON,
    GATEWAY,
    HTTP,
    HTTP_INSTANCE,
    SESSION_SETTINGS,
    STDIO,
    TEMPLATE,
)
from .templates import Launch

DEFAULT_PATH = "conf/registry.yaml"
REGISTRY_ENV = "MCP_GATEWAY_REGISTRY"

# Route prefixes the gateway itself answers; a server may not take these ids.
RESERVED_IDS = frozenset({"healthz", "livez", "readyz", "status", "metrics", "static", "-"})

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class StdioSettings:
    """How one stdio server's processes are started and pooled (per worker)."""

    command: tuple[str, ...]
    working_dir: str | None = STDIO.default("working_dir")
    env_vars: Mapping[str, str] = field(default_factory=dict)
    inherit_env: tuple[str, ...] = STDIO.default("inherit_env")
    pool_size: int = STDIO.default("pool_size")
    pool_min: int = STDIO.default("pool_min")
    idle_timeout: float = STDIO.default("idle_timeout")
    max_waiting: int = STDIO.default("max_waiting")
    wait_timeout: float = STDIO.default("wait_timeout")
    request_timeout: float = STDIO.default("request_timeout")
    startup_timeout: float = STDIO.default("startup_timeout")
    max_line_bytes: int = STDIO.default("max_line_bytes")
    session_mode: str = STDIO.default("session_mode")  # pooled, or dedicated (gateway/dedicated.py)
    session_idle_timeout: float = STDIO.default("session_idle_timeout")
    max_sessions: int = STDIO.default("max_sessions")


@dataclass(frozen=True)
class HttpInstanceSettings:
    endpoint: str  # never with user:pass@: that became `authorization`, so the endpoint can be shown
    weight: int = HTTP_INSTANCE.default("weight")
    authorization: str | None = None  # HTTP Basic, from the endpoint's userinfo (not a setting of its own)


@dataclass(frozen=True)
class HttpSettings:
    """How one HTTP server's instances are reached, balanced and checked."""

    instances: tuple[HttpInstanceSettings, ...]
    load_balancing: str = HTTP.default("load_balancing")
    health_check: str | None = HTTP.default("health_check")
    headers: Mapping[str, str] = field(default_factory=dict)
    mcp_path: str = HTTP.default("mcp_path")
    connect_timeout: float = HTTP.default("connect_timeout")
    read_timeout: float = HTTP.default("read_timeout")
    request_timeout: float = HTTP.default("request_timeout")
    max_connections: int = HTTP.default("max_connections")
    sticky_header: str | None = HTTP.default("sticky_header")
    max_fails: int = HTTP.default("max_fails")
    ejection_time: float = HTTP.default("ejection_time")
    health_check_rise: int = HTTP.default("health_check_rise")
    health_check_fall: int = HTTP.default("health_check_fall")


@dataclass(frozen=True)
class ServerEntry:
    """One registry entry: its id, its type and its type's raw settings."""

    id: str
    type: str
    description: str
    raw: Mapping[str, Any]
    stdio: StdioSettings | None = None
    http: HttpSettings | None = None
    auth_tokens: Mapping[str, str] = field(default_factory=dict)  # valid for this server only
    allow: tuple[str, ...] | None = COMMON.default("allow")  # gateway-wide token names that may reach it (None: all)
    template: str | None = None  # the template it was made from
    launch: Launch | None = None  # for an http template: what the gateway starts, `instances` times
    instances: int = TEMPLATE.default("instances")
    shown: Mapping[str, Any] = field(default_factory=dict)  # for /status: secrets masked (see masked())
    # Its share of each worker's threads (gateway/bulkhead.py); None: half the threads, and the rest to queue.
    max_concurrent: int | None = COMMON.default("max_concurrent")
    max_queued: int | None = COMMON.default("max_queued")
    # Like a stdio pool's wait_timeout; a queued request gives its thread up sooner when another server needs it.
    queue_timeout: float = COMMON.default("queue_timeout")


@dataclass(frozen=True)
class GatewaySettings:
    host: str = GATEWAY.default("host")
    port: int = GATEWAY.default("port")
    reload_registry: bool = GATEWAY.default("reload_registry")
    health_check_interval: float = GATEWAY.default("health_check_interval")
    max_body_bytes: int = GATEWAY.default("max_body_bytes")
    max_json_depth: int = GATEWAY.default("max_json_depth")  # deeper bodies are refused before a server parses them
    # A string or a list in the file; the first seals.
    session_secret: tuple[str, ...] | None = GATEWAY.default("session_secret")
    session_ttl: float = GATEWAY.default("session_ttl")
    template_dirs: tuple[str, ...] = GATEWAY.default("template_dirs")
    auth: Mapping[str, Any] = field(default_factory=dict)
    allowed_hosts: tuple[str, ...] = GATEWAY.default("allowed_hosts")
    allowed_origins: tuple[str, ...] = GATEWAY.default("allowed_origins")
    log_format: str = GATEWAY.default("log_format")
    trusted_proxies: tuple[str, ...] = GATEWAY.default("trusted_proxies")
    # How long a client may take to send a request, and to take each write of the answer (gateway/worker.py).
    header_timeout: float = GATEWAY.default("header_timeout")
    body_timeout: float = GATEWAY.default("body_timeout")
    send_timeout: float = GATEWAY.default("send_timeout")
    # WebSocket keep-alive (gateway/websocket.py).
    ws_ping_interval: float = GATEWAY.default("ws_ping_interval")
    ws_dead_peer_timeout: float = GATEWAY.default("ws_dead_peer_timeout")
    stream_buffer_bytes: int = GATEWAY.default("stream_buffer_bytes")
    sse_keepalive_interval: float = GATEWAY.default("sse_keepalive_interval")
    max_streams: int = GATEWAY.default("max_streams")
    advertise_url: str | None = GATEWAY.default("advertise_url")  # where other replicas reach this one (owners.py)


@dataclass(frozen=True)
class Registry:
    source: str
    servers: Mapping[str, ServerEntry]
    gateway: GatewaySettings
    digest: str = ""  # of the text it was read from: which version a worker serves


@cache
def schema() -> dict[str, Any]:
    text = resources.files("gateway").joinpath("schema/registry.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def registry_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    return Path(explicit or os.environ.get(REGISTRY_ENV) or DEFAULT_PATH)


def load(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Registry:
    """Read, expand, validate and build the registry at `path`."""
    source = str(registry_path(path))
    return parse(read(source), source, environ)


def read(source: str) -> str:
    try:
        return Path(source).read_text("utf-8")
    except OSError as exc:
        raise RegistryError(source, [f"cannot read: {exc.strerror or exc}"]) from None


def parse(text: str, source: str, environ: Mapping[str, str] | None = None) -> Registry:
    try:
        if source.endswith((".yaml", ".yml")):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise RegistryError(source, [f"not valid {'YAML' if source.endswith(('.yaml', '.yml')) else 'JSON'}: {exc}"]) from None
    problems: list[str] = []
    if mcpservers.is_mcp_servers(data):
        # A desktop client's config file works as a registry as it is.
        data, problems = mcpservers.to_registry(data)
    substituted: dict[str, str] = {}
    data = _expand(data, environ if environ is not None else os.environ, (), problems, substituted)
    # A value from the environment may be a secret: problems quote it by its name instead.
    problems.extend(masked(problem, substituted) for problem in validate(data, Path(source).parent))
    if problems:
        raise RegistryError(source, problems)
    return replace(_build(data, source, substituted), digest=text_digest(text))


def text_digest(text: str) -> str:
    """Short and stable: tells which version of a registry file a worker serves."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def template_catalog(data: Mapping[str, Any], base: Path) -> dict[str, templates.Template]:
    dirs = (data.get("gateway") or {}).get("template_dirs") or ()
    return templates.catalog(base / folder for folder in dirs)


def validate(data: Any, base: Path = Path(".")) -> list[str]:
    """Schema and cross-field problems of already-expanded registry data."""
    validator = jsonschema.Draft202012Validator(schema())
    problems = []
    for error in sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]):
        problems.append(f"{_dotted(error.absolute_path)}: {error.message}")
    if not isinstance(data, dict) or not isinstance(data.get("servers"), dict):
        return problems
    problems.extend(_template_problems(data, base))
    auth_settings = (data.get("gateway") or {}).get("auth") or {}
    if isinstance(auth_settings, dict) and isinstance(auth_settings.get("hook"), str):
        try:
            load_hook(auth_settings["hook"])
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            problems.append(f"gateway.auth.hook: cannot use {auth_settings['hook']!r}: {exc}")
    problems.extend(_rebinding_problems(data.get("gateway") or {}))
    problems.extend(_secret_problems(data.get("gateway")))
    names = set(auth_settings.get("tokens") or {}) if isinstance(auth_settings, dict) else set()
    for server_id, entry in data["servers"].items():
        for name in (entry.get("allow") or []) if isinstance(entry, dict) else []:
            if name not in names:
                problems.append(f"servers.{server_id}.allow: '{name}' is not a token in gateway.auth.tokens")
        if server_id.lower() in RESERVED_IDS:
            problems.append(f"servers.{server_id}: the id '{server_id}' is reserved for the gateway's own routes")
        if isinstance(entry, dict) and entry.get("type") == "http" and isinstance(entry.get("instances"), list):
            seen: dict[str, int] = {}
            for index, instance in enumerate(entry["instances"]):
                endpoint = str(instance.get("endpoint", "")).rstrip("/") if isinstance(instance, dict) else ""
                if endpoint and endpoint in seen:
                    # Sessions are pinned to an instance by its endpoint, so endpoints must differ.
                    problems.append(f"servers.{server_id}.instances.{index}.endpoint: same as instance {seen[endpoint]}")
                seen.setdefault(endpoint, index)
        if isinstance(entry, dict) and entry.get("type") == "stdio" and "pool_min" in entry:
            size, low = entry.get("pool_size", StdioSettings.pool_size), entry["pool_min"]
            if isinstance(size, int) and isinstance(low, int) and 1 <= size < low:
                problems.append(f"servers.{server_id}.pool_min: {low} is more than pool_size {size}")
    return problems


def _rebinding_problems(gateway: Any) -> list[str]:
    problems = []
    for key, pattern in (("allowed_hosts", rebinding.HostPattern), ("allowed_origins", rebinding.OriginPattern)):
        values = gateway.get(key) if isinstance(gateway, dict) else None
        for index, text in enumerate(values if isinstance(values, list) else []):
            try:
                pattern(str(text))
            except ValueError as exc:
                problems.append(f"gateway.{key}.{index}: {exc}")
    return problems


def _secret_problems(settings: Any) -> list[str]:
    """Each of several secrets in one string ("new,old", as an environment variable holds them) is checked too."""
    secret = settings.get("session_secret") if isinstance(settings, dict) else None
    given = [secret] if isinstance(secret, str) else [s for s in secret if isinstance(s, str)] if isinstance(secret, list) else []
    if any(len(item) < 16 for item in split_secrets(given)):
        return ["gateway.session_secret: each secret (a comma separates several) must be at least 16 characters"]
    return []


def _template_problems(data: dict[str, Any], base: Path) -> list[str]:
    entries = {sid: e for sid, e in data["servers"].items() if isinstance(e, dict) and e.get("type") == "template"}
    if not entries:
        return []
    try:
        known = template_catalog(data, base)
    except TemplateError as exc:
        return [f"gateway.template_dirs: {problem}" for problem in exc.problems]
    problems = []
    for server_id, entry in entries.items():
        template = known.get(str(entry.get("template_name")))
        if template is None:
            problems.append(f"servers.{server_id}.template_name: no template '{entry.get('template_name')}' "
                            f"(known: {', '.join(sorted(known))})")
            continue
        transport = entry.get("transport", template.transport)
        if transport not in template.run:
            problems.append(f"servers.{server_id}.transport: template '{template.name}' has no '{transport}' run")
        problems.extend(template.config_problems(entry.get("config", {}), f"servers.{server_id}.config"))
    return problems


def _dotted(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _expand(value: Any, environ: Mapping[str, str], path: tuple[Any, ...], problems: list[str],
            substituted: dict[str, str]) -> Any:
    """Replace ${VAR} (and ${VAR:-default}) in every string; `$$` is a literal `$`.

    Each value taken from the environment is noted in `substituted` (value -> name):
    such values are where secrets live, and masked() hides them again for display.
    """
    if isinstance(value, str):
        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name in environ:
                if environ[name]:
                    substituted[environ[name]] = name
                return environ[name]
            if default is not None:
                return default
            problems.append(f"{_dotted(path)}: environment variable {name} is not set")
            return ""
        return _VAR.sub(substitute, value) if "$" in value else value
    if isinstance(value, dict):
        return {k: _expand(v, environ, (*path, k), problems, substituted) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, environ, (*path, i), problems, substituted) for i, v in enumerate(value)]
    return value


def masked(text: str, substituted: Mapping[str, str]) -> str:
    """`text` with every value that came from the environment shown as `${NAME}` again.

    Values under four characters are masked only where they are the whole text,
    so a variable holding `1` does not mask every digit.
    """
    for value, name in sorted(substituted.items(), key=lambda item: -len(item[0])):
        if text == value:
            return f"${{{name}}}"
        if len(value) >= 4 and value in text:
            text = text.replace(value, f"${{{name}}}")
    return text


def split_userinfo(endpoint: str) -> tuple[str, str | None]:
    """`http://user:pass@host/...` -> (`http://host/...`, the HTTP Basic Authorization value)."""
    parts = urlsplit(endpoint)
    if parts.username is None and parts.password is None:
        return endpoint, None
    credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return bare, "Basic " + base64.b64encode(credentials.encode()).decode()


def _instance(entry: Mapping[str, Any]) -> HttpInstanceSettings:
    endpoint, authorization = split_userinfo(entry["endpoint"].rstrip("/"))
    return HttpInstanceSettings(endpoint, entry.get("weight", HTTP_INSTANCE.default("weight")), authorization)


def _stdio_shown(settings: StdioSettings, substituted: Mapping[str, str]) -> dict[str, Any]:
    """What /status shows of a stdio server: its argv masked, its environment by name only."""
    return {"command": [masked(part, substituted) for part in settings.command], "env_vars": sorted(settings.env_vars)}


_SESSION_KEYS = tuple(setting.name for setting in SESSION_SETTINGS)


def _build(data: dict[str, Any], source: str, substituted: Mapping[str, str]) -> Registry:
    servers = {}
    catalog = template_catalog(data, Path(source).parent) if any(
        e["type"] == "template" for e in data["servers"].values()) else {}
    for server_id, entry in data["servers"].items():
        # Who may reach it and its share of the threads: the keys every server type takes.
        access = {name: entry[name] for name in COMMON.names if name in entry and name != "description"}
        if "allow" in access:
            access["allow"] = tuple(access["allow"])
        if entry["type"] == "template":
            made = _from_template(server_id, entry, catalog[entry["template_name"]])
            shown = _stdio_shown(made.stdio, substituted) if made.stdio else {}
            servers[server_id] = replace(made, shown=shown, **access)
            continue
        stdio = http = None
        if entry["type"] == "http":
            known = {k: v for k, v in entry.items() if k in HttpSettings.__dataclass_fields__}
            known["instances"] = tuple(_instance(i) for i in entry["instances"])
            http = HttpSettings(**known)
        if entry["type"] == "stdio":
            known = {k: v for k, v in entry.items() if k in StdioSettings.__dataclass_fields__}
            known["command"] = tuple(entry["command"])
            known["inherit_env"] = tuple(entry.get("inherit_env", ()))
            if "pool_min" not in entry:
                known["pool_min"] = min(StdioSettings.pool_min, known.get("pool_size", StdioSettings.pool_size))
            stdio = StdioSettings(**known)
        servers[server_id] = ServerEntry(
            id=server_id, type=entry["type"], description=entry.get("description", COMMON.default("description")), raw=entry, stdio=stdio, http=http,
            shown=_stdio_shown(stdio, substituted) if stdio else {}, **access,
        )
    gateway = dict(data.get("gateway", {}))
    gateway["template_dirs"] = tuple(gateway.get("template_dirs", ()))
    gateway["allowed_hosts"] = tuple(gateway.get("allowed_hosts", ()))
    gateway["allowed_origins"] = tuple(gateway.get("allowed_origins", ()))
    gateway["trusted_proxies"] = tuple(gateway.get("trusted_proxies", ()))
    if gateway.get("session_secret") is not None:
        gateway["session_secret"] = tuple(split_secrets(gateway["session_secret"])) or None
    return Registry(source=source, servers=servers, gateway=GatewaySettings(**gateway))


def _from_template(server_id: str, entry: dict[str, Any], template: templates.Template) -> ServerEntry:
    launch = template.launch(entry.get("config", {}), entry.get("transport"))
    instances = entry.get("instances", TEMPLATE.default("instances"))
    description = entry.get("description", template.description)
    if launch.transport == "stdio":
        stdio = StdioSettings(command=launch.command, env_vars=launch.env, working_dir=launch.working_dir,
                              pool_size=instances, pool_min=min(StdioSettings.pool_min, instances),
                              **{name: entry[name] for name in _SESSION_KEYS if name in entry})
        return ServerEntry(id=server_id, type="stdio", description=description, raw=entry, stdio=stdio,
                           template=template.name, instances=instances)
    return ServerEntry(id=server_id, type="http", description=description, raw=entry, template=template.name,
                       launch=launch, instances=instances)
