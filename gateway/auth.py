"""Who may call the gateway: tokens, per-server allow-lists, a custom hook, Origin.

Tokens come from the registry (gateway-wide under `gateway.auth.tokens`,
per-server under `auth_tokens`, values usually `${VAR}` references) and are
presented as `Authorization: Bearer <token>` or `X-API-Key: <token>`. Every
configured token is compared in constant time, all of them every time, so
timing tells nothing. A server's `allow` names the gateway-wide tokens that
may reach it. A hook (`module:callable`) may decide instead. Origin follows
the MCP spec's DNS-rebinding defence: a browser Origin that is not loopback,
not the gateway's own and not allowed gets 403. Token values are never logged.
"""

from __future__ import annotations

import hmac
import importlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from . import errors
from .protocol import Headers
from .registry import Registry

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})

Hook = Callable[[str, Headers], "str | None"]


class Unauthorized(errors.ClientError):
    """No valid credentials (HTTP 401, with WWW-Authenticate: Bearer)."""

    http_status = 401
    code = errors.UNAUTHORIZED


class Forbidden(errors.ClientError):
    """Valid credentials, or an Origin, that may not reach this server (HTTP 403)."""

    http_status = 403
    code = errors.UNAUTHORIZED


class Authenticator:
    def __init__(self, registry: Registry):
        settings = registry.gateway.auth
        self.tokens: dict[str, bytes] = {name: value.encode() for name, value in (settings.get("tokens") or {}).items()}
        self.protect_operator = bool(settings.get("protect_operator_endpoints"))
        self.hook: Hook | None = load_hook(settings["hook"]) if settings.get("hook") else None
        self.servers = registry.servers
        self.server_tokens = {sid: {name: value.encode() for name, value in entry.auth_tokens.items()}
                              for sid, entry in registry.servers.items()}
        self.allowed_origins = frozenset(registry.gateway.allowed_origins)

    # --- Origin --------------------------------------------------------------------

    def check_origin(self, headers: Headers) -> None:
        origin = headers.get("Origin")
        if origin is None or "*" in self.allowed_origins or origin in self.allowed_origins:
            return
        parts = urlsplit(origin)
        host = (parts.hostname or "").lower()
        if host in LOOPBACK_HOSTS or (parts.netloc and parts.netloc == headers.get("Host")):
            return
        raise Forbidden(f"Origin {origin!r} is not allowed to call this gateway")

    # --- tokens --------------------------------------------------------------------

    def check_operator(self, headers: Headers) -> None:
        if self.protect_operator and self._match(presented(headers), self.tokens) is None:
            raise Unauthorized("this endpoint needs a gateway token")

    def check_server(self, server_id: str, headers: Headers) -> str | None:
        """The principal calling `server_id`, or Unauthorized / Forbidden."""
        entry = self.servers.get(server_id)
        if entry is None:
            # Unknown ids need a token too, so the registry cannot be probed without one.
            if (self.tokens or self.hook) and self._match(presented(headers), self.tokens) is None:
                raise Unauthorized("a valid token is required (Authorization: Bearer <token>)")
            return None
        own_tokens = self.server_tokens[server_id]
        if not (self.tokens or self.hook or own_tokens):
            return None  # nothing asks for a token here
        token = presented(headers)
        own = self._match(token, own_tokens)
        if own is not None:
            return own
        name = self._match(token, self.tokens)
        if name is not None:
            if entry.allow is not None and name not in entry.allow:
                raise Forbidden(f"server '{server_id}': this token may not reach this server")
            return name
        if self.hook is not None:
            principal = self.hook(server_id, headers)
            if principal:
                return str(principal)
        raise Unauthorized(f"server '{server_id}': a valid token is required (Authorization: Bearer <token>)")

    @staticmethod
    def _match(token: bytes | None, candidates: Mapping[str, bytes]) -> str | None:
        found = None
        for name, value in candidates.items():
            # Compare with all of them, always: no early exit to time.
            if hmac.compare_digest(token or b"\0", value) and token is not None:
                found = name
        return found


def presented(headers: Headers) -> bytes | None:
    authorization = headers.get("Authorization") or ""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip().encode()
    api_key = headers.get("X-API-Key")
    return api_key.encode() if api_key else None


def load_hook(path: str) -> Hook:
    """`package.module:function` (or `package.module.function`) -> the callable."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    hook: Any = getattr(importlib.import_module(module_name), attribute)
    if not callable(hook):
        raise TypeError(f"auth hook {path!r} is not callable")
    result: Hook = hook
    return result
