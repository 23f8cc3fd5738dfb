"""Who may call the gateway: tokens, per-server allow-lists, a custom hook, Origin.

Tokens come from the registry (gateway-wide under `gateway.auth.tokens`,
per-server under `auth_tokens`, values usually `${VAR}` references) and are
presented as `Authorization: Bearer <token>` or `X-API-Key: <token>`. Every
configured token is compared in constant time, all of them every time, so
timing tells nothing. A server's `allow` names the gateway-wide tokens that
may reach it. A hook (`module:callable`) may decide instead; the headers it
reads are named by its `credential_headers` attribute. Whatever header can
carry a credential (Authorization, X-API-Key, the hook's) is never forwarded
upstream (the MCP spec forbids token passthrough), and token values are never
logged. With any token configured, /status and /metrics need a gateway-wide
token unless `protect_operator_endpoints: false` opens them. Host and Origin
(the DNS-rebinding defence) are rebinding.py's. It takes the settings it needs
(`gateway.auth`, and each server's `auth_tokens` and `allow`), not the registry,
and loads the hook through hooks.py, so it and registry.py import neither other.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any, Protocol

from . import errors
from .hooks import Hook, load_hook
from .protocol import Headers

# The headers a caller's credential travels in, whatever auth is configured.
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})


class ServerAccess(Protocol):
    """What auth reads of a server's settings (registry.ServerEntry has them)."""

    @property
    def auth_tokens(self) -> Mapping[str, str]: ...

    @property
    def allow(self) -> tuple[str, ...] | None: ...


class Authenticator:
    def __init__(self, settings: Mapping[str, Any], servers: Mapping[str, ServerAccess]):
        """`settings`: the registry's `gateway.auth`; `servers`: every server by id."""
        self.tokens: dict[str, bytes] = {name: value.encode() for name, value in (settings.get("tokens") or {}).items()}
        self.hook: Hook | None = load_hook(settings["hook"]) if settings.get("hook") else None
        self.servers = servers
        self.server_tokens = {sid: {name: value.encode() for name, value in entry.auth_tokens.items()}
                              for sid, entry in servers.items()}
        any_token = bool(self.tokens or self.hook or any(self.server_tokens.values()))
        # Secure by default: once anything asks for a token, so do the operator endpoints.
        self.protect_operator = bool(settings.get("protect_operator_endpoints", any_token))
        # Lower-cased names of the headers the hook reads credentials from: never forwarded,
        # like CREDENTIAL_HEADERS (which upstreams/transport.NOT_FORWARDED holds already).
        self.hook_credential_headers = frozenset(
            str(name).lower() for name in getattr(self.hook, "credential_headers", ())
        ) - CREDENTIAL_HEADERS

    # --- tokens --------------------------------------------------------------------

    def check_operator(self, headers: Headers) -> None:
        if self.protect_operator and self._match(presented(headers), self.tokens) is None:
            raise errors.Unauthorized("this endpoint needs a gateway token (or gateway.auth.protect_operator_endpoints: false)")

    def check_server(self, server_id: str, headers: Headers) -> str | None:
        """The principal calling `server_id`, or Unauthorized / Forbidden."""
        entry = self.servers.get(server_id)
        if entry is None:
            # Unknown ids need a token too, so the registry cannot be probed without one.
            if (self.tokens or self.hook) and self._match(presented(headers), self.tokens) is None:
                raise errors.Unauthorized("a valid token is required (Authorization: Bearer <token>)")
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
                raise errors.Forbidden(f"server '{server_id}': this token may not reach this server")
            return name
        if self.hook is not None:
            principal = self.hook(server_id, headers)
            if principal:
                return str(principal)
        raise errors.Unauthorized(f"server '{server_id}': a valid token is required (Authorization: Bearer <token>)")

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

