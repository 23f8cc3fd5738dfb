"""One access line per request: request id, client, caller, server, MCP method, upstream, status, time.

The client is the peer address, or, when the peer is a trusted proxy, the
nearest untrusted address in its X-Forwarded-For (werkzeug's ProxyFix idea,
limited to the proxies the registry names). The request id (exchange.py) is
the client's `X-Request-Id` when it is sane, else a new one; it is returned
in the response and passed to HTTP upstreams. The line
is written when the response is closed, so a streamed (SSE) answer is timed
to its end. Plain `key=value` text by default, JSON lines with
`gateway.log_format: json`. Header values other than the id are never logged.
Every value is escaped and bounded (logtext.py), so a client's CR/LF or
control characters in a path or method cannot write a second line.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from flask import Flask

from .logtext import bound, clean

if TYPE_CHECKING:
    from .exchange import Exchange

log = logging.getLogger("gateway.access")


def client_address(peer: str | None, forwarded_for: str | None, trusted: frozenset[str]) -> str | None:
    """Who called: X-Forwarded-For is believed only as far as trusted proxies added to it."""
    if peer not in trusted or not forwarded_for:
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if hop not in trusted:
            return hop
    return hops[0] if hops else peer


EXTENSION_KEY = "mcp_gateway_access_log"


def configure(app: Flask, log_format: str = "text", trusted_proxies: tuple[str, ...] = ()) -> None:
    """Set (or, on a registry reload, change) the line's format and the proxies believed."""
    app.extensions[EXTENSION_KEY] = (log_format, frozenset(trusted_proxies))


def write(app: Flask, exchange: Exchange, status: int) -> None:
    """The line of a finished exchange (exchange.py calls this when its response closes)."""
    if not log.isEnabledFor(logging.INFO):
        return
    log_format, trusted = app.extensions[EXTENSION_KEY]
    fields = {
        "request_id": exchange.request_id,
        "client": client_address(exchange.peer, exchange.headers.get("X-Forwarded-For"), trusted),
        "http": f"{exchange.method} {exchange.path}",
        "server": exchange.server_id,
        "principal": exchange.principal,
        "mcp_method": exchange.mcp_method,
        "upstream": exchange.upstream,
        "owner": exchange.owner,
        "status": status,
        "duration_ms": round((time.perf_counter() - exchange.started) * 1000, 2),
    }
    if log_format == "json":
        # json.dumps escapes every control and non-ASCII character (U+2028 and
        # U+0085 included) but DEL; values are only bounded first.
        line = json.dumps({key: bound(value) if isinstance(value, str) else value for key, value in fields.items()})
        log.info(line.replace("\x7f", "\\u007f") if "\x7f" in line else line)
    else:
        log.info(" ".join(f"{key}={_text(value)}" for key, value in fields.items()))


def _text(value: object) -> str:
    """A value as one shell-style word: `-` for none, escaped and bounded, quoted when it has spaces."""
    if value is None:
        return "-"
    text = clean(value if isinstance(value, str) else str(value))
    return json.dumps(text, ensure_ascii=False) if (" " in text or '"' in text) else text
