"""Every registry setting, declared once: its name, JSON Schema, default and one line of doc.

One table per section of the registry file: the keys every server type takes
(COMMON), each server type (STDIO, HTTP and its INSTANCE, TEMPLATE), the
gateway's own (GATEWAY) and its `auth` (AUTH). Everything else is derived:
- the sections of gateway/schema/registry.schema.json (`schema()`; the
  shipped file is generated, `python -m gateway.settings --write-schema`),
- the field defaults of registry.py's settings objects and of their copies
  (health.HealthPolicy, the HTTP upstream's check interval, templates' mcp_path),
- the settings reference in README.md's "The registry"
  (`python -m gateway.settings --write-readme`).
tests/test_settings.py fails when any of these differs from the tables.
This module imports nothing of the gateway, so every module may import it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()  # the default of a setting the file must give


@dataclass(frozen=True)
class Setting:
    name: str
    schema: Mapping[str, Any]  # JSON Schema of its value, without description and default
    default: Any  # REQUIRED, None (absent: `default_doc` says what happens), or the value
    doc: str
    default_doc: str | None = None  # when the default is worked out rather than one value

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Section:
    name: str  # its key in the schema's $defs
    title: str  # its heading in the README's reference
    settings: tuple[Setting, ...]
    server_type: str | None = None  # for a server section: its `type`, and it takes COMMON too

    def __iter__(self) -> Iterator[Setting]:
        return iter(self.settings)

    def __getitem__(self, name: str) -> Setting:
        for setting in self.settings:
            if setting.name == name:
                return setting
        raise KeyError(f"{self.name} has no setting {name!r}")

    def default(self, name: str) -> Any:
        """The default of `name`, for a settings object's field (a KeyError at import if misspelt)."""
        return self[name].default

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(setting.name for setting in self.settings)


# --- schema pieces -------------------------------------------------------------------

SECONDS: Final = {"$ref": "#/$defs/seconds"}
BOOLEAN: Final = {"type": "boolean"}
ENV_NAME: Final = "^[A-Za-z_][A-Za-z0-9_]*$"
PATH: Final = {"type": "string", "pattern": "^/"}


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{name}"}


def integer(minimum: int | None = None, maximum: int | None = None) -> dict[str, Any]:
    bounds = {"minimum": minimum, "maximum": maximum}
    return {"type": "integer", **{k: v for k, v in bounds.items() if v is not None}}


def string(pattern: str | None = None, min_length: int | None = None) -> dict[str, Any]:
    limits = {"pattern": pattern, "minLength": min_length}
    return {"type": "string", **{k: v for k, v in limits.items() if v is not None}}


def one_of(*values: str) -> dict[str, Any]:
    return {"enum": list(values)}


def list_of(items: Mapping[str, Any], min_items: int | None = None) -> dict[str, Any]:
    return {"type": "array", **({"minItems": min_items} if min_items is not None else {}), "items": dict(items)}


MIB: Final = 1024 * 1024


# --- the tables ------------------------------------------------------------------------

COMMON = Section("common", "Every server type", (
    Setting("description", string(), "", "one line saying what the server is for, shown by /status",
            default_doc="for a template server, the template's own"),
    Setting("auth_tokens", ref("tokens"), {}, "tokens valid for this server only"),
    Setting("allow", list_of(string()), None, "names of gateway-wide tokens that may reach this server",
            default_doc="all of them"),
    Setting("max_concurrent", integer(1), None, "requests to this server one gunicorn worker serves at once",
            default_doc="half the worker's threads"),
    Setting("max_queued", integer(0), None, "requests that may wait for one of those, per worker",
            default_doc="the other half of its threads"),
    Setting("queue_timeout", SECONDS, 10.0, "seconds a request may wait for one before it gets 503"),
))

# How a stdio server's processes serve handshake-era sessions (stdio servers and stdio templates).
SESSION_SETTINGS: Final = (
    Setting("session_mode", one_of("pooled", "dedicated"), "pooled",
            "pooled: any process serves any request; dedicated: one process per handshake-era client session "
            "(started at initialize, ended by DELETE)"),
    Setting("session_idle_timeout", SECONDS, 600.0,
            "seconds a dedicated session may go without a request before its process is stopped"),
    Setting("max_sessions", integer(1, 4096), 32,
            "most dedicated sessions per gunicorn worker; past it the oldest idle one is ended, else 503"),
)

STDIO = Section("stdio", "A stdio server (`type: stdio`)", (
    Setting("command", list_of(string(min_length=1), min_items=1), REQUIRED, "argv list; never run through a shell"),
    Setting("working_dir", string(min_length=1), None, "directory the processes start in",
            default_doc="the gateway's"),
    Setting("env_vars", ref("env"), {}, "added to a minimal environment (PATH, HOME, LANG, TZ, ...)"),
    Setting("inherit_env", list_of(string(ENV_NAME)), (),
            "names of gateway environment variables passed to the process on top of the minimal allowlist"),
    Setting("pool_size", integer(1, 256), 4, "most processes per gunicorn worker (so workers x pool_size in all)"),
    Setting("pool_min", integer(0, 256), 1, "processes kept warm per gunicorn worker (at most pool_size)"),
    Setting("idle_timeout", SECONDS, 300.0, "seconds before an extra idle process is stopped"),
    Setting("max_waiting", integer(0), 64, "requests that may queue when every process is busy"),
    Setting("wait_timeout", SECONDS, 10.0, "seconds a request may queue for a process before it gets 503"),
    Setting("request_timeout", SECONDS, 60.0,
            "seconds for an answer, from the write to a process (start-up not counted)"),
    Setting("startup_timeout", SECONDS, 20.0, "seconds for a new process to start and complete its handshake"),
    Setting("max_line_bytes", integer(1024), 16 * MIB, "a longer line on a process's stdout kills the process"),
    *SESSION_SETTINGS,
), server_type="stdio")

HTTP_INSTANCE = Section("http_instance", "Each of an HTTP server's `instances`", (
    Setting("endpoint", string(r"^https?://[^\s/]+"), REQUIRED,
            "base URL of the instance; a user:pass@ in it is sent as HTTP Basic authorization"),
    Setting("weight", integer(1), 1, "its share of the requests under least_connections and weighted"),
))

HTTP = Section("http", "An HTTP server (`type: http`, MCP Streamable HTTP instances the gateway balances over)", (
    Setting("instances", list_of(ref(HTTP_INSTANCE.name), min_items=1), REQUIRED, "the instances balanced over (their keys are below)"),
    Setting("load_balancing", one_of("round_robin", "least_connections", "weighted"), "round_robin",
            "how an instance is chosen for a request"),
    Setting("health_check", PATH, None, "path of an active GET check on each instance; 2xx is healthy",
            default_doc="an MCP probe at mcp_path"),
    Setting("headers", {"type": "object", "propertyNames": {"pattern": "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"},
                        "additionalProperties": {"type": "string"}}, {},
            "added to every request to this server; use ${VAR} for secrets (the client's own are not passed on)"),
    Setting("mcp_path", PATH, "/mcp",
            "path of the MCP endpoint on each instance, for probes and bridged requests (client paths pass as they are)"),
    Setting("connect_timeout", SECONDS, 5.0, "seconds to connect to an instance"),
    Setting("read_timeout", SECONDS, 300.0, "seconds between bytes of an answer"),
    Setting("request_timeout", SECONDS, 300.0, "one deadline in seconds covering every try of a request"),
    Setting("max_connections", integer(1, 1024), 16, "pooled keep-alive connections per instance and gunicorn worker"),
    Setting("sticky_header", string(min_length=1), None,
            "client header whose value pins stateless requests to one instance, on every worker"),
    Setting("max_fails", integer(1), 3, "consecutive failures of real traffic that eject an instance"),
    Setting("ejection_time", SECONDS, 30.0,
            "seconds an ejected instance stays out, times the number of times it was ejected (at most x10)"),
    Setting("health_check_rise", integer(1), 2, "good checks in a row that bring a down instance back"),
    Setting("health_check_fall", integer(1), 3, "failed checks in a row that take an instance down"),
), server_type="http")

TEMPLATE = Section("template", "A template server (`type: template`; `mcp-gateway templates` lists them)", (
    Setting("template_name", string("^[A-Za-z0-9][A-Za-z0-9_.-]*$"), REQUIRED,
            "a built-in template, or one from a folder in gateway.template_dirs"),
    Setting("instances", integer(1), 1, "processes serving it (for stdio: most per gunicorn worker)"),
    Setting("config", {"type": "object"}, {}, "the template's settings, checked against its own JSON Schema"),
    Setting("transport", one_of("stdio", "http"), None, "how the gateway runs and reaches it",
            default_doc="the template's own"),
    *SESSION_SETTINGS,
), server_type="template")

AUTH = Section("auth", "The gateway's `auth`", (
    Setting("tokens", ref("tokens"), {}, "gateway-wide named tokens, valid for every server a server's allow lets in"),
    Setting("hook", string("^[A-Za-z_][A-Za-z0-9_.]*[:.][A-Za-z_][A-Za-z0-9_]*$"), None,
            "dotted path module:callable(server_id, headers) -> principal name or None"),
    Setting("protect_operator_endpoints", BOOLEAN, None,
            "/status and /metrics need a gateway-wide token (/healthz stays open)",
            default_doc="true when any token or hook is configured"),
))

GATEWAY = Section("gateway", "The gateway (`gateway:`)", (
    Setting("host", string(min_length=1), "127.0.0.1", "address gunicorn binds (MCP_GATEWAY_BIND wins)"),
    Setting("port", integer(1, 65535), 8000, "port gunicorn binds"),
    Setting("reload_registry", BOOLEAN, False, "apply changes to this file live (see \"Reloading the registry\")"),
    Setting("health_check_interval", SECONDS, 30.0,
            "seconds between active checks of each HTTP instance, per worker, with +-20% jitter"),
    Setting("max_body_bytes", integer(1024), 4 * MIB, "largest request body; a larger one is refused with 413"),
    Setting("max_json_depth", integer(8, 512), 64,
            "most levels of nested arrays and objects a request body may have (the message itself is one)"),
    Setting("session_secret", {"type": ["string", "array"], "minLength": 16, "minItems": 1,
                               "items": {"type": "string", "minLength": 16}}, None,
            "the secret that seals session ids, or a list of them: the first seals, all open (key rotation)",
            default_doc="MCP_GATEWAY_SESSION_SECRET, else one made once per host"),
    Setting("session_ttl", SECONDS, 24 * 3600.0, "seconds a session id stays valid"),
    Setting("template_dirs", list_of(string(min_length=1)), (),
            "folders of user templates, relative to the registry file; a user template wins over a built-in of the same name"),
    Setting("auth", ref(AUTH.name), {}, "who may call (its keys are below; see \"Who may call\")"),
    Setting("allowed_hosts", list_of(string(min_length=1)), (),
            "Host values the gateway answers to besides loopback and the bind address (DNS-rebinding protection): "
            "name, name:port, *.domain or '*'"),
    Setting("allowed_origins", list_of(string(min_length=1)), (),
            "Origin values browsers may call from besides loopback: scheme://host[:port], scheme://host:* or '*'"),
    Setting("log_format", one_of("text", "json"), "text", "access lines as plain key=value text or JSON lines"),
    Setting("trusted_proxies", list_of(string(min_length=1)), (),
            "addresses of proxies (nginx) whose X-Forwarded-For is believed"),
    Setting("header_timeout", SECONDS, 10.0,
            "seconds a client may take to send a request's headers (from its first byte, or the connection)"),
    Setting("body_timeout", SECONDS, 30.0, "seconds a client may take to send a request's body, after its headers"),
    Setting("send_timeout", SECONDS, 30.0, "seconds each write of an answer may wait for the client to read"),
    Setting("ws_ping_interval", SECONDS, 20.0, "seconds a WebSocket connection may be quiet before the gateway pings it"),
    Setting("ws_dead_peer_timeout", SECONDS, 60.0,
            "seconds without a byte from a WebSocket client (pongs included) before its connection is closed"),
    Setting("stream_buffer_bytes", integer(4096), MIB,
            "most bytes of a long-lived stream a client may leave unread; past it the stream is ended and logged"),
    Setting("sse_keepalive_interval", {"type": "number", "minimum": 0}, 15.0,
            "seconds a stream may stay silent before the gateway sends an SSE comment (0: never)"),
    Setting("max_streams", integer(1), 2000,
            "most long-lived streams one worker holds; past it a new stream gets 503 with Retry-After"),
    Setting("advertise_url", string(pattern="^https?://[^/?#]+$"), None,
            "the http URL (scheme://host:port) other replicas reach this one at: requests of a session this replica "
            "holds are relayed here (see \"Sessions routed to their owner\")",
            default_doc="none: sessions are routed between this host's workers only"),
))

SERVER_SECTIONS: Final = (HTTP, STDIO, TEMPLATE)
# In the order the README lists them.
SECTIONS: Final = (COMMON, STDIO, HTTP, HTTP_INSTANCE, TEMPLATE, GATEWAY, AUTH)

SERVER_ID: Final = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

# The parts of the schema that are not settings: the top level, the dispatch on a server's
# `type`, and the value types settings refer to.
_STRUCTURE: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://mcp-gateway.invalid/registry.schema.json",
    "title": "MCP gateway registry",
    "type": "object",
    "additionalProperties": False,
    "required": ["servers"],
    "properties": {
        "servers": {"description": "the MCP servers the gateway fronts, by id (each is served under /<id>/)",
                    "type": "object", "propertyNames": {"pattern": SERVER_ID}, "additionalProperties": ref("server")},
        "gateway": {"description": "the gateway's own settings", **ref(GATEWAY.name)},
    },
}
_VALUE_TYPES: Final[dict[str, Any]] = {
    "seconds": {"type": "number", "exclusiveMinimum": 0},
    "env": {"type": "object", "propertyNames": {"pattern": ENV_NAME}, "additionalProperties": {"type": "string"}},
    "tokens": {
        "description": "named tokens; use ${VAR} so the secrets stay out of the file",
        "type": "object",
        "propertyNames": {"pattern": "^[A-Za-z0-9_.-]+$"},
        "additionalProperties": {"type": "string", "minLength": 16},
    },
}


# --- what is derived ---------------------------------------------------------------------

def _property(setting: Setting) -> dict[str, Any]:
    doc = f"{setting.doc} (default: {setting.default_doc})" if setting.default_doc else setting.doc
    prop: dict[str, Any] = {"description": doc, **setting.schema}
    if setting.default is not REQUIRED and setting.default is not None:
        prop["default"] = setting.default
    return prop


def section_schema(section: Section) -> dict[str, Any]:
    settings = section.settings
    properties: dict[str, Any] = {}
    if section.server_type is not None:
        settings = (*settings, *COMMON.settings)
        properties["type"] = {"description": "what kind of server this is", "const": section.server_type}
    properties.update((setting.name, _property(setting)) for setting in settings)
    required = [*(["type"] if section.server_type else []), *(s.name for s in settings if s.required)]
    return {"type": "object", "additionalProperties": False, **({"required": required} if required else {}),
            "properties": properties}


def schema() -> dict[str, Any]:
    """The registry's JSON Schema, as gateway/schema/registry.schema.json ships it."""
    types = [section.server_type for section in SERVER_SECTIONS]
    dispatch = {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"description": "what kind of server this is", "enum": sorted(t for t in types if t)}},
        "allOf": [{"if": {"properties": {"type": {"const": t}}}, "then": ref(str(t))} for t in types],
    }
    sections = {section.name: section_schema(section) for section in SECTIONS if section is not COMMON}
    return {**_STRUCTURE, "$defs": {**_VALUE_TYPES, "server": dispatch, **sections}}


def schema_text() -> str:
    return json.dumps(schema(), indent=2, ensure_ascii=False) + "\n"


# The README's reference lives between these two lines.
README_BEGIN: Final = "<!-- settings:begin -->"
README_END: Final = "<!-- settings:end -->"


def type_text(schema: Mapping[str, Any]) -> str:
    """A value's JSON Schema in a few words, for the README."""
    if "$ref" in schema:
        return {"seconds": "seconds (> 0)", "env": "map of variable name to string",
                "tokens": "map of name to token (16+ characters)"}.get(schema["$ref"].rpartition("/")[2], "object")
    if "enum" in schema:
        return " or ".join(f"`{value}`" for value in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(type_text({"type": each}) if each != "array" else type_text({**schema, "type": each})
                           for each in kind)
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        return "integer" + (f" {low}-{high}" if low is not None and high is not None
                            else f" >= {low}" if low is not None else "")
    if kind == "string":
        return f"string matching `{schema['pattern']}`" if "pattern" in schema else "string"
    if kind == "array":
        first, _, rest = type_text(schema.get("items", {})).partition(" ")
        return " ".join(filter(None, ["list of", f"{first}s", rest, "(at least one)" if schema.get("minItems") else ""]))
    if kind == "object" and "additionalProperties" in schema:
        return "map of name to string"
    return str(kind)


def default_text(setting: Setting) -> str:
    if setting.required:
        return "required"
    if setting.default is None:
        return setting.default_doc or "none"
    value = setting.default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = f"`{json.dumps(value)}`" if isinstance(value, (bool, dict, tuple, list)) or value == "" else f"`{value}`"
    return f"{text}; {setting.default_doc}" if setting.default_doc else text


def readme_block() -> str:
    """The README's settings reference: one table per section."""
    lines = [README_BEGIN, "<!-- generated from gateway/settings.py: python -m gateway.settings --write-readme -->"]
    for section in SECTIONS:
        lines += ["", f"{section.title}:", "", "| key | type | default | what |", "|---|---|---|---|"]
        for setting in section:
            cells = [f"`{setting.name}`", type_text(setting.schema), default_text(setting), setting.doc]
            if any("|" in cell for cell in cells):
                raise ValueError(f"{section.name}.{setting.name}: a '|' would break the README's table")
            lines.append(f"| {' | '.join(cells)} |")
    lines += ["", README_END]
    return "\n".join(lines)


def readme_with_block(readme: str) -> str:
    """`readme` with its block between the markers replaced by readme_block()."""
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.DOTALL)
    if len(pattern.findall(readme)) != 1:
        raise ValueError("the README needs exactly one settings block between its markers")
    return pattern.sub(lambda _: readme_block(), readme)


def readme_block_in(readme: str) -> str:
    """The block as it stands in `readme`."""
    start, end = readme.index(README_BEGIN), readme.index(README_END) + len(README_END)
    return readme[start:end]


SCHEMA_FILE: Final = Path(__file__).parent / "schema" / "registry.schema.json"
README_FILE: Final = Path(__file__).parent.parent / "README.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.settings", description="Write what the settings tables generate.")
    parser.add_argument("--write-schema", action="store_true", help=f"rewrite {SCHEMA_FILE}")
    parser.add_argument("--write-readme", action="store_true", help=f"rewrite the settings block of {README_FILE}")
    args = parser.parse_args(argv)
    if args.write_schema:
        SCHEMA_FILE.write_text(schema_text(), "utf-8")
    if args.write_readme:
        README_FILE.write_text(readme_with_block(README_FILE.read_text("utf-8")), "utf-8")
    if not (args.write_schema or args.write_readme):
        print(readme_block())
    return 0


if __name__ == "__main__":
    sys.exit(main())
