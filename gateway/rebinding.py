"""The DNS-rebinding defence: which `Host` and `Origin` values may reach the gateway.

A web page whose name resolves to 127.0.0.1 makes the user's browser send the
page's own name as both Host and Origin, so neither may be trusted because it
matches the other (the MCP spec's Streamable HTTP "Security Warning"; the
official SDKs' TransportSecuritySettings). A Host is served when it is a
loopback name or address, the address the gateway binds, or listed in
`gateway.allowed_hosts`; anything else is 421. An Origin is accepted when it
is absent (not a browser, or same-origin navigation), loopback, or listed in
`gateway.allowed_origins`; anything else, malformed ones included, is 403.

Patterns: `name` (any port), `name:port`, `*.example.com` (subdomains) and
`*` (everything) for hosts; `scheme://name[:port]`, `scheme://name:*` and `*`
for origins. Names compare case-insensitively, without a trailing dot, and
an origin's default port (80, 443) is the same as none.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from . import errors
from .logtext import quoted
from .protocol import Headers

LOOPBACK_NAMES = frozenset({"localhost", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})
DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
# Allowed values are few; hostile ones are many, so only answers for these are kept.
_CACHE_LIMIT = 64


def split_authority(value: str) -> tuple[str, str | None] | None:
    """`host[:port]` (or `[v6]:port`) as (lowercased host, port), or None when malformed."""
    if not value or not value.isascii() or not value.isprintable() or any(c in value for c in " /?#@\\"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:] if rest else None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            host, port_text = value, ""
        elif ":" in host:
            return None  # an IPv6 address must be bracketed
        port = port_text if sep else None
    if port is not None and not (port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
        return None
    host = host.lower().rstrip(".")
    return (host, port) if host else None


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostPattern:
    """One `gateway.allowed_hosts` entry."""

    def __init__(self, text: str):
        self.any = text == "*"
        parts = None if self.any else split_authority(text.removeprefix("*.") if text.startswith("*.") else text)
        if not self.any and parts is None:
            raise ValueError(f"{text!r} is not a host name, host:port, *.domain or *")
        self.suffix = text.startswith("*.")
        self.host, self.port = parts or ("", None)

    def matches(self, host: str, port: str | None) -> bool:
        if self.any:
            return True
        if self.port not in (None, "*") and port != self.port:
            return False
        return host.endswith("." + self.host) if self.suffix else host == self.host


class OriginPattern:
    """One `gateway.allowed_origins` entry."""

    def __init__(self, text: str):
        self.any = text == "*"
        parsed = None if self.any else parse_origin(text)
        if not self.any and parsed is None:
            raise ValueError(f"{text!r} is not an origin (scheme://host[:port], scheme://host:* or *)")
        self.scheme, self.host, self.port = parsed or ("", "", None)

    def matches(self, scheme: str, host: str, port: str | None) -> bool:
        if self.any:
            return True
        return (scheme, host) == (self.scheme, self.host) and (self.port == "*" or port == self.port)


def parse_origin(origin: str) -> tuple[str, str, str | None] | None:
    """`scheme://host[:port]` as (scheme, host, port), the default port as None; None when malformed."""
    scheme, sep, authority = origin.partition("://")
    if not sep or not scheme.isascii() or not scheme.isalpha():
        return None
    parts = split_authority(authority)
    if parts is None:
        return None
    scheme = scheme.lower()
    host, port = parts
    if port == DEFAULT_PORTS.get(scheme):
        port = None
    return scheme, host, port


class RebindingGuard:
    """Checks one request's Host and Origin; built once per registry."""

    def __init__(self, allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
                 bind_hosts: Iterable[str] = ()):
        self.hosts = [HostPattern(text) for text in allowed_hosts]
        for bound in bind_hosts:
            if bound.lower() not in WILDCARD_BINDS:
                self.hosts.append(HostPattern(bound if ":" not in bound or bound.startswith("[") else f"[{bound}]"))
        self.origins = [OriginPattern(text) for text in allowed_origins]
        self._allowed_hosts: set[str] = set()
        self._allowed_origins: set[str] = set()

    def check(self, headers: Headers, *, host: bool = True) -> None:
        """HostNotAllowed (421) or OriginNotAllowed (403), or nothing; `host=False` checks Origin only."""
        if host:
            value = headers.get("Host")
            if value is not None and value not in self._allowed_hosts:
                self._check_host(value)
        origin = headers.get("Origin")
        if origin is not None and origin not in self._allowed_origins:
            self._check_origin(origin)

    def _check_host(self, value: str) -> None:
        parts = split_authority(value)
        if parts is None or not (is_loopback(parts[0]) or any(p.matches(*parts) for p in self.hosts)):
            raise errors.HostNotAllowed(
                f"Host {quoted(value)} is not allowed: this gateway answers to loopback names and "
                "gateway.allowed_hosts (DNS-rebinding protection)"
            )
        if len(self._allowed_hosts) < _CACHE_LIMIT:
            self._allowed_hosts.add(value)

    def _check_origin(self, origin: str) -> None:
        parsed = parse_origin(origin)
        if parsed is None:
            raise errors.OriginNotAllowed(f"Origin {quoted(origin)} is not a valid origin (scheme://host[:port])")
        if not (is_loopback(parsed[1]) or any(p.matches(*parsed) for p in self.origins)):
            raise errors.OriginNotAllowed(
                f"Origin {quoted(origin)} is not allowed to call this gateway (see gateway.allowed_origins)"
            )
        if len(self._allowed_origins) < _CACHE_LIMIT:
            self._allowed_origins.add(origin)
