"""Whether a WebSocket upgrade request may become an MCP connection: the checks a POST gets, before the upgrade.

Two routes upgrade: `GET /<server-id>/ws`, and a GET carrying `Upgrade:
websocket` on a server's MCP path (`/<server-id>[/<path>]`), as the
WebSocket SEP draft (SEP-1288) allows the same endpoint to serve both. The
checks are those of post.py, in its order and with its guards and errors:
Host and Origin (rebinding.py: 421, 403), the token (auth.py: 401, 403),
the server id (404); then what makes it a WebSocket upgrade (RFC 6455: 400,
or 426 for a plain GET on the ws route or another WebSocket version) and
the `mcp` subprotocol the SDKs' WebSocket transports offer (400 without it).
A refusal is an HTTP response with a JSON-RPC error body, as over HTTP, sent
before any upgrade. Sans-IO: the caller has read the request head.
"""

from __future__ import annotations

import base64
import binascii
import http
import json
import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import errors, jsonrpc
from .auth import Authenticator
from .logtext import quoted
from .protocol import Headers
from .rebinding import RebindingGuard

SUBPROTOCOL = "mcp"
WEBSOCKET_VERSION = "13"
# What post.py's ROUTE matches: `/<server-id>` and `/<server-id>/<path>`.
ROUTE = re.compile(r"/([^/]+)(?:/(.+))?")
WS_PATH = "ws"


@dataclass(frozen=True)
class Accepted:
    """The upgrade may go ahead: for this server, this caller, with this subprotocol."""

    server_id: str
    principal: str | None
    subprotocol: str


@dataclass(frozen=True)
class Refused:
    """The HTTP answer sent instead of the upgrade; the connection is closed after it."""

    status: int
    message: dict[str, Any]  # a JSON-RPC error object, as over HTTP
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, exc: errors.GatewayError, status: int | None = None,
           headers: Iterable[tuple[str, str]] = ()) -> Refused:
        """The answer to `exc`, with the extra headers views.error_response gives it."""
        extra = list(headers)
        status = status or exc.http_status
        if status == 401:
            extra.append(("WWW-Authenticate", 'Bearer realm="mcp-gateway"'))
        if exc.retry_after is not None:
            extra.append(("Retry-After", str(max(1, round(exc.retry_after)))))
        return cls(status, jsonrpc.error(exc.rpc_id, exc.code, exc.message, exc.data), tuple(extra))

    def encode(self) -> bytes:
        """The whole HTTP/1.1 response."""
        body = json.dumps(self.message, separators=(",", ":")).encode()
        try:
            phrase = http.HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Error"
        lines = [f"HTTP/1.1 {self.status} {phrase}", "Content-Type: application/json",
                 f"Content-Length: {len(body)}", "Connection: close",
                 *(f"{name}: {value}" for name, value in self.headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RequestHeaders:
    """Case-insensitive headers of a request head; a repeated header's values joined with ", " (RFC 9110)."""

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]]):
        self._values: dict[str, str] = {}
        for name, value in pairs:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            self._values[key] = f"{self._values[key]}, {text}" if key in self._values else text

    @classmethod
    def of(cls, mapping: Mapping[str, str]) -> RequestHeaders:
        return cls((name.encode("latin-1"), value.encode("latin-1")) for name, value in mapping.items())

    def get(self, key: str) -> str | None:
        return self._values.get(key.lower())


def tokens(value: str | None, *, lower: bool = True) -> list[str]:
    """A comma-separated header's items, lowercased unless they are case-sensitive (subprotocols)."""
    return [item.strip().lower() if lower else item.strip() for item in (value or "").split(",") if item.strip()]


def route(path: str) -> tuple[str, bool] | None:
    """(server id, whether it is the ws route) of a request target, or None for no server route."""
    match = ROUTE.fullmatch(path.partition("?")[0])
    if match is None:
        return None
    return match[1], match[2] == WS_PATH


def is_websocket_request(method: str, path: str, headers: Headers) -> bool:
    """Whether this request is for the WebSocket side: any GET on the ws route, an Upgrade: websocket on a server route."""
    where = route(path)
    if where is None or method != "GET":
        return False
    return where[1] or "websocket" in tokens(headers.get("Upgrade"))


class UpgradeChecks:
    """The checks of one registry: `checks(method, path, headers)` is Accepted or Refused."""

    def __init__(self, rebinding: RebindingGuard, auth: Authenticator, servers: Container[str]):
        self.rebinding = rebinding
        self.auth = auth
        self.servers = servers

    def __call__(self, method: str, path: str, headers: Headers) -> Accepted | Refused:
        where = route(path)
        if where is None:
            return Refused.of(errors.ClientError(f"{quoted(path)} is no MCP server's route (/<server-id>/ws)"), 404)
        server_id, ws_route = where
        try:
            self.rebinding.check(headers)
            principal = self.auth.check_server(server_id, headers)
            if server_id not in self.servers:
                raise errors.UnknownServer(f"no MCP server {quoted(server_id)} in this gateway's registry")
        except errors.GatewayError as exc:
            return Refused.of(exc)
        return _upgrade(method, server_id, ws_route, headers) or Accepted(server_id, principal, SUBPROTOCOL)


def _upgrade(method: str, server_id: str, ws_route: bool, headers: Headers) -> Refused | None:
    """What keeps this request from being a WebSocket upgrade offering `mcp`, if anything (RFC 6455 4.2.1)."""
    where = f"server {quoted(server_id)}: "
    if "websocket" not in tokens(headers.get("Upgrade")):
        if ws_route and method == "GET":
            return Refused.of(errors.ClientError(
                f"{where}this is the WebSocket endpoint: send a WebSocket upgrade (Upgrade: websocket) "
                f"with subprotocol {SUBPROTOCOL}, or POST MCP messages to /{server_id}"),
                426, (("Upgrade", "websocket"), ("Connection", "Upgrade")))
        return Refused.of(errors.ClientError(f"{where}not a WebSocket upgrade (Upgrade: websocket is missing)"))
    if method != "GET":
        return Refused.of(errors.ClientError(f"{where}a WebSocket upgrade is a GET, not {quoted(method)}"))
    if "upgrade" not in tokens(headers.get("Connection")):
        return Refused.of(errors.ClientError(f"{where}not a WebSocket upgrade (Connection: Upgrade is missing)"))
    if headers.get("Sec-WebSocket-Version") != WEBSOCKET_VERSION:
        return Refused.of(errors.ClientError(
            f"{where}WebSocket version {quoted(headers.get('Sec-WebSocket-Version'))} is not supported; "
            f"use {WEBSOCKET_VERSION}"), 426, (("Sec-WebSocket-Version", WEBSOCKET_VERSION),))
    if not _valid_key(headers.get("Sec-WebSocket-Key")):
        return Refused.of(errors.ClientError(
            f"{where}Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455), not {quoted(headers.get('Sec-WebSocket-Key'))}"))
    if SUBPROTOCOL not in tokens(headers.get("Sec-WebSocket-Protocol"), lower=False):
        return Refused.of(errors.ClientError(
            f"{where}the WebSocket subprotocol {SUBPROTOCOL} is required (Sec-WebSocket-Protocol: {SUBPROTOCOL}); "
            f"offered: {quoted(headers.get('Sec-WebSocket-Protocol'))}"))
    return None


def _valid_key(key: str | None) -> bool:
    try:
        return key is not None and len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False
