"""One access line per request: request id, client, caller, server, MCP method, upstream, status, time.

The client is the peer address, or, when the peer is a trusted proxy, the
nearest untrusted address in its X-Forwarded-For (werkzeug's ProxyFix idea,
limited to the proxies the registry names). The request id is the client's
`X-Request-Id` when it is sane, else a new
one; it is returned in the response and passed to HTTP upstreams. The line
is written when the response is closed, so a streamed (SSE) answer is timed
to its end. Plain `key=value` text by default, JSON lines with
`gateway.log_format: json`. Header values other than the id are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

from flask import Flask, Response, g, request

log = logging.getLogger("gateway.access")

REQUEST_ID_HEADER = "X-Request-Id"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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


def init_app(app: Flask) -> None:
    """Write the line for every request; text with no proxies believed until `configure` says otherwise."""
    configure(app)

    def start() -> None:
        g.started = time.perf_counter()
        given = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = given if _SANE_ID.match(given) else os.urandom(16).hex()  # as unique as uuid4, cheaper

    def finish(response: Response) -> Response:
        response.headers[REQUEST_ID_HEADER] = g.request_id
        log_format, trusted = app.extensions[EXTENSION_KEY]
        fields = {
            "request_id": g.request_id,
            "client": client_address(request.remote_addr, request.headers.get("X-Forwarded-For"), trusted),
            "http": f"{request.method} {request.path}",
            "server": (request.view_args or {}).get("server_id"),
            "principal": g.get("principal"),  # the token's name, never its value
            "mcp_method": g.get("mcp_method"),
            "upstream": g.get("upstream"),
            "status": response.status_code,
        }
        started = g.started

        def write() -> None:
            fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 2)
            if log_format == "json":
                log.info(json.dumps(fields))
            else:
                log.info(" ".join(f"{key}={_text(value)}" for key, value in fields.items()))

        response.call_on_close(write)
        return response

    app.before_request(start)
    app.after_request(finish)


def _text(value: object) -> str:
    """A value as one shell-style word: `-` for none, quoted when it has spaces."""
    if value is None:
        return "-"
    text = str(value)
    return json.dumps(text) if (" " in text or '"' in text) else text


def request_id() -> str:
    value: str = g.request_id
    return value
