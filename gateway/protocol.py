"""MCP protocol eras: which one a client speaks, and translating between them.

Two eras are alive: the legacy handshake era (initialize, sessions; versions
2024-11-05 to 2025-11-25) and the stateless 2026-07-28 era (request metadata
in headers and in `params._meta`). This module decides the era of an incoming
HTTP request, enforces the 2026-07-28 header rules, and rewrites a request
or result so that a server of the other era understands it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from . import errors, jsonrpc
from .logtext import bound, clean, quoted

MODERN_VERSIONS: tuple[str, ...] = ("2026-07-28",)
LEGACY_VERSIONS: tuple[str, ...] = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
SUPPORTED_VERSIONS: tuple[str, ...] = MODERN_VERSIONS + LEGACY_VERSIONS
LATEST_MODERN = MODERN_VERSIONS[0]
LATEST_LEGACY = LEGACY_VERSIONS[0]
# A legacy request without MCP-Protocol-Version is 2025-03-26 (spec, 2025-06-18 on).
DEFAULT_LEGACY = "2025-03-26"

META_PROTOCOL_VERSION = "io.modelcontextprotocol/protocolVersion"
META_CLIENT_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
META_CLIENT_INFO = "io.modelcontextprotocol/clientInfo"
META_SERVER_INFO = "io.modelcontextprotocol/serverInfo"
# The level a 2026-07-28 request asks the server to log at for it (server/utilities/logging, SEP-2575).
META_LOG_LEVEL = "io.modelcontextprotocol/logLevel"
_META_PREFIX = "io.modelcontextprotocol/"

# Methods whose Mcp-Name header mirrors a body field (2026-07-28).
NAMED_PARAM = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

# Results that carry ttlMs/cacheScope in 2026-07-28.
CACHEABLE_METHODS = frozenset(
    {"server/discover", "tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read"}
)

# Methods that change nothing by protocol: safe to send again after a failure.
READ_ONLY_METHODS = frozenset(
    {"tools/list", "resources/list", "resources/templates/list", "resources/read", "prompts/list", "prompts/get",
     "server/discover", "ping"}
)

MODERN = "2026-07-28"
LEGACY = "legacy"

GATEWAY_INFO = {"name": "mcp-gateway", "version": "0.1.0"}


class Headers(Protocol):
    """Case-insensitive header lookup (werkzeug's Headers, or a dict in tests)."""

    def get(self, key: str) -> str | None: ...


@dataclass(frozen=True)
class ClientContext:
    """What the gateway knows about the caller of one HTTP request."""

    era: str  # MODERN or LEGACY
    version: str
    # The level a handshake-era session set with logging/setLevel (log_levels.py), where it set one.
    log_level: str | None = None


@dataclass(frozen=True)
class ServerHello:
    """What a server told us about itself at its handshake, era-neutral."""

    era: str
    protocol_version: str
    capabilities: Mapping[str, Any]
    server_info: Mapping[str, Any]
    instructions: str | None = None


def decode_header_value(value: str) -> str:
    """Undo the `=?base64?...?=` sentinel encoding of Mcp-Name / Mcp-Param-*."""
    if value.startswith("=?base64?") and value.endswith("?=") and len(value) >= 11:
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise errors.HeaderMismatch(f"header value {quoted(value)} is not valid base64-encoded UTF-8") from None
    return value


def encode_header_value(value: str) -> str:
    """A header-safe form of `value`: itself, or the `=?base64?...?=` sentinel form."""
    safe = value.isascii() and value.isprintable() and value == value.strip()
    if safe and not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    return "=?base64?" + base64.b64encode(value.encode("utf-8")).decode("ascii") + "?="


def request_headers(message: Mapping[str, Any]) -> dict[str, str]:
    """The 2026-07-28 request metadata headers that mirror `message`."""
    method = str(message.get("method"))
    headers = {"MCP-Protocol-Version": LATEST_MODERN, "Mcp-Method": method}
    field = NAMED_PARAM.get(method)
    if field is not None:
        headers["Mcp-Name"] = encode_header_value(str((message.get("params") or {}).get(field, "")))
    return headers


def client_context(headers: Headers, message: Mapping[str, Any], session_version: str | None) -> ClientContext:
    """Decide the era of a request and enforce the 2026-07-28 header rules."""
    header_version = headers.get("MCP-Protocol-Version")
    params = message.get("params")
    body_version = _envelope_version(params["_meta"]) if isinstance(params, dict) and "_meta" in params else None
    if header_version is None:
        if body_version is not None:
            raise errors.HeaderMismatch(
                f"the MCP-Protocol-Version header is missing but the body's _meta says {quoted(body_version)}"
            )
        return ClientContext(LEGACY, session_version or DEFAULT_LEGACY)
    if header_version in MODERN_VERSIONS:
        _check_modern_headers(headers, message, header_version, body_version)
        return ClientContext(MODERN, header_version)
    if header_version in LEGACY_VERSIONS:
        return ClientContext(LEGACY, header_version)
    raise errors.UnsupportedProtocolVersion(
        f"protocol version {quoted(header_version)} is not supported",
        data={"supported": list(SUPPORTED_VERSIONS), "requested": bound(header_version)},
    )


def _envelope_version(meta: Any) -> Any:
    """The protocol version `params._meta` names; InvalidParams if it, or an envelope key, has the wrong type.

    Checked here, for every request of either era before it goes anywhere,
    so that translation (to_modern_request / to_legacy_request) can rely on
    the shapes, and a server of either era never sees what it cannot read.
    """
    if not isinstance(meta, dict):
        raise errors.InvalidParams(f"params._meta must be an object, not {_json_type(meta)}")
    for key, kind in _ENVELOPE_TYPES:
        value = meta.get(key)
        if value is not None and not isinstance(value, kind):
            raise errors.InvalidParams(
                f"params._meta[{key!r}] must be {_JSON_TYPES[kind]}, not {_json_type(value)}"
            )
    return meta.get(META_PROTOCOL_VERSION)


_ENVELOPE_TYPES = ((META_PROTOCOL_VERSION, str), (META_CLIENT_CAPABILITIES, dict), (META_CLIENT_INFO, dict))
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _check_modern_headers(
    headers: Headers, message: Mapping[str, Any], version: str, body_version: Any
) -> None:
    method = message.get("method")
    if method is None:
        return  # responses carry no request metadata
    if body_version != version:
        raise errors.HeaderMismatch(
            f"Header mismatch: MCP-Protocol-Version header {quoted(version)} does not match "
            f"params._meta[{META_PROTOCOL_VERSION!r}] {quoted(body_version)}"
        )
    header_method = headers.get("Mcp-Method")
    if header_method is None:
        raise errors.HeaderMismatch("Header mismatch: the Mcp-Method header is required")
    if header_method != method:
        raise errors.HeaderMismatch(
            f"Header mismatch: Mcp-Method header value {quoted(header_method)} does not match body value {quoted(method)}"
        )
    field = NAMED_PARAM.get(method)
    if field is None:
        return
    params = message.get("params")
    body_name = params.get(field) if isinstance(params, dict) else None
    header_name = headers.get("Mcp-Name")
    if header_name is None:
        raise errors.HeaderMismatch(f"Header mismatch: the Mcp-Name header is required for {clean(method)}")
    decoded = decode_header_value(header_name)
    if decoded != body_name:
        raise errors.HeaderMismatch(
            f"Header mismatch: Mcp-Name header value {quoted(decoded)} does not match body value {quoted(body_name)}"
        )


def to_modern_request(message: dict[str, Any], log_level: str | None = None) -> dict[str, Any]:
    """Give a legacy client's request the `_meta` envelope a 2026-07-28 server needs.

    `log_level`: the level the client's session set (logging/setLevel), which
    2026-07-28 carries on each request instead.
    """
    params = dict(message.get("params") or {})
    meta = dict(params.get("_meta") or {})
    meta[META_PROTOCOL_VERSION] = LATEST_MODERN
    if log_level is not None:
        meta[META_LOG_LEVEL] = log_level
    meta.setdefault(META_CLIENT_CAPABILITIES, {})
    meta.setdefault(META_CLIENT_INFO, GATEWAY_INFO)
    params["_meta"] = meta
    return {**message, "params": params}


def to_legacy_request(message: dict[str, Any]) -> dict[str, Any]:
    """Strip the 2026-07-28 envelope keys that a handshake-era server does not know."""
    params = message.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("_meta"), dict):
        return message
    meta = {k: v for k, v in params["_meta"].items() if not k.startswith(_META_PREFIX)}
    params = {k: v for k, v in params.items() if k != "_meta"}
    if meta:
        params["_meta"] = meta
    return {**message, "params": params}


def to_modern_result(method: str, result: dict[str, Any]) -> dict[str, Any]:
    """Add what 2026-07-28 requires of a result that a handshake-era server made."""
    modern = {"resultType": "complete", **result}
    if method in CACHEABLE_METHODS:
        # Required on the 2026-07-28 wire; "immediately stale, private" promises nothing.
        modern.setdefault("ttlMs", 0)
        modern.setdefault("cacheScope", "private")
    return modern


def request_for_server(message: dict[str, Any], client_era: str, server_era: str,
                       log_level: str | None = None) -> dict[str, Any]:
    """The client's request as a server of `server_era` expects it (`log_level`: its session's, see ClientContext)."""
    if client_era == server_era:
        return message
    if server_era == MODERN:
        return to_modern_request(message, log_level)
    return to_legacy_request(message)


def reply_for_client(reply: dict[str, Any], method: str, client_era: str, server_era: str, server_id: str) -> dict[str, Any]:
    """The server's reply as a client of `client_era` expects it."""
    result = reply.get("result")
    if client_era == server_era or not isinstance(result, dict):
        return reply
    if client_era == MODERN:
        return {**reply, "result": to_modern_result(method, result)}
    if result.get("resultType") == "input_required":
        requests = result.get("inputRequests")
        wanted = sorted({str(r.get("method")) for r in (requests.values() if isinstance(requests, dict) else ())
                         if isinstance(r, dict)})
        return jsonrpc.error(
            reply.get("id"), errors.INTERNAL_ERROR,
            f"server '{server_id}' needs input from the client ({', '.join(wanted) or 'input'}), which a "
            f"handshake-era session cannot provide through the gateway; use protocol version {LATEST_MODERN}",
        )
    return reply


def discover_request(request_id: str) -> dict[str, Any]:
    """The gateway's own `server/discover`, as it asks a server which era it speaks."""
    return to_modern_request({"jsonrpc": "2.0", "id": request_id, "method": "server/discover"})


def initialize_request(request_id: str) -> dict[str, Any]:
    """The gateway's own `initialize` of a handshake-era server (it declares no capabilities)."""
    return {"jsonrpc": "2.0", "id": request_id, "method": "initialize",
            "params": {"protocolVersion": LATEST_LEGACY, "capabilities": {}, "clientInfo": GATEWAY_INFO}}


def hello_from_discover(result: Any) -> ServerHello | None:
    """What a `server/discover` result says, or None unless it offers 2026-07-28."""
    if not isinstance(result, dict) or LATEST_MODERN not in (result.get("supportedVersions") or ()):
        return None
    return ServerHello(MODERN, LATEST_MODERN, result.get("capabilities") or {},
                       (result.get("_meta") or {}).get(META_SERVER_INFO) or {}, result.get("instructions"))


def hello_from_initialize(result: Mapping[str, Any]) -> ServerHello:
    """What an `initialize` result says."""
    return ServerHello(LEGACY, str(result.get("protocolVersion", LATEST_LEGACY)), result.get("capabilities") or {},
                       result.get("serverInfo") or {}, result.get("instructions"))


# Server capabilities whose promise is a notification or stream the gateway cannot deliver
# to a client it answers itself (a pooled process, a bridged server): no client subscribed
# to the shared process, it offers no GET stream, and refuses subscriptions/listen.
_UNDELIVERABLE = {"tools": ("listChanged",), "prompts": ("listChanged",), "resources": ("listChanged", "subscribe")}


def deliverable_capabilities(capabilities: Mapping[str, Any]) -> dict[str, Any]:
    """The server's capabilities less what the gateway cannot deliver (_UNDELIVERABLE)."""
    offered = dict(capabilities)
    for name, flags in _UNDELIVERABLE.items():
        value = offered.get(name)
        if isinstance(value, dict) and any(flag in value for flag in flags):
            offered[name] = {k: v for k, v in value.items() if k not in flags}
    return offered


def initialize_result(hello: ServerHello, requested: Any) -> dict[str, Any]:
    """The gateway's own answer to a legacy client's `initialize`: only what it can deliver."""
    version = requested if requested in LEGACY_VERSIONS else LATEST_LEGACY
    # `logging` whatever the server said: the gateway itself answers a handshake-era
    # session's logging/setLevel and carries the level to the server, or filters by it
    # (log_levels.py, scope.py), so the method works; a server that never logs sends nothing.
    result: dict[str, Any] = {
        "protocolVersion": version,
        "capabilities": {**deliverable_capabilities(hello.capabilities), "logging": {}},
        "serverInfo": dict(hello.server_info or GATEWAY_INFO),
    }
    if hello.instructions:
        result["instructions"] = hello.instructions
    return result


def discover_result(hello: ServerHello) -> dict[str, Any]:
    """The gateway's own answer to `server/discover` (2026-07-28): only what it can deliver."""
    return {
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
        "supportedVersions": list(MODERN_VERSIONS),
        "capabilities": deliverable_capabilities(hello.capabilities),
        **({"instructions": hello.instructions} if hello.instructions else {}),
        "_meta": {META_SERVER_INFO: dict(hello.server_info or GATEWAY_INFO)},
    }

