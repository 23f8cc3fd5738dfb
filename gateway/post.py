"""The MCP POST route, `POST /<server-id>[/<path>]`, served without Flask's request machinery.

Every MCP message a client sends is such a POST, so this is the gateway's hot
path. Flask's request and app contexts, URL map, hooks and proxies cost a
stdio call about as much CPU as the rest of the gateway's work (README,
Performance). This route is WSGI middleware in front of the Flask app: it
does what the Flask hooks and error handlers do for the other routes (the
same Exchange, Origin and token checks, body limit, JSON-RPC errors), parses
the message, asks serving.decide how to serve it and has carry_out.py do
that; anything else goes on to Flask.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response
from werkzeug.wsgi import get_content_length, get_input_stream, get_path_info

from . import errors, jsonrpc, protocol, serving, upstreams
from .carry_out import Served, carry_out, session_of
from .exchange import Exchange
from .owners import holder, relay_to_owner
from .runtime import EXTENSION_KEY, Gateway
from .views import error_response

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# What the blueprint's `/<server_id>` and `/<server_id>/<path:path>` rules match.
ROUTE = re.compile(r"/([^/]+)(?:/(.+))?")


class McpPostRoute:
    """`app.wsgi_app = McpPostRoute(app, app.wsgi_app)`."""

    def __init__(self, app: Flask, rest: WSGIApp):
        self.app = app
        self.rest = rest

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] != "POST":
            return self.rest(environ, start_response)
        path = get_path_info(environ)
        match = ROUTE.fullmatch(path)
        if match is None:
            return self.rest(environ, start_response)
        gateway: Gateway = self.app.extensions[EXTENSION_KEY]
        exchange = Exchange.begin(environ, server_id=match[1], path=path)
        try:
            gateway.start()
            gateway.rebinding.check(exchange.headers)
            exchange.principal = gateway.auth.check_server(match[1], exchange.headers)
            body = read_body(environ, gateway.registry.gateway.max_body_bytes, match[1])
            response = serve(gateway, exchange, body, match[2] or "", environ.get("QUERY_STRING", "").encode("latin-1"))
        except Exception as exc:  # noqa: BLE001  # every failure becomes a JSON-RPC error, as Flask's handler does
            response = error_response(gateway, exchange, exc)
        return exchange.respond(self.app, response)(environ, start_response)


def serve(gateway: Gateway, exchange: Exchange, body: bytes, path: str, query: bytes) -> Response:
    """One JSON-RPC message: parsed, its server's upstream held, its session opened, decided, carried out."""
    server_id = exchange.server_id or ""
    if server_id not in gateway.upstreams:
        gateway.checkout(server_id, exchange)  # UnknownServer, whatever the body is
    exchange.served = True  # counted under the server's id, whatever the body is
    message = jsonrpc.parse(body, server_id, gateway.registry.gateway.max_json_depth)
    exchange.rpc_id = message.get("id")
    exchange.mcp_method = message.get("method")
    # After parsing: a refusal (bulkhead full) carries the request's id.
    upstream = gateway.checkout(server_id, exchange)
    session = session_of(gateway, exchange, server_id)
    owner = holder(gateway, exchange, session)
    if owner is not None:
        return relay_to_owner(gateway, exchange, owner, body, query)
    client = protocol.client_context(exchange.headers, message, session.protocol_version if session else None)
    instances = upstreams.instances(upstream)
    plan = serving.decide("POST", upstream, instances is not None, session, client, message)
    return carry_out(Served(gateway, exchange, upstream, instances, session, client, message, body, path, query), plan)


def read_body(environ: dict[str, Any], limit: int, server_id: str) -> bytes:
    """The request body; BodyTooLarge past `limit` bytes, declared (Content-Length) or not (chunked).

    Not werkzeug's max_content_length, which ends a chunked body at the
    limit without a word: the truncated JSON became a parse error. What is
    left unread of a body over the limit, the worker discards after the
    answer (gateway/worker.py), so that the client can read the 413.
    """
    declared = get_content_length(environ)
    if declared is not None and declared > limit:
        raise _too_large(server_id, limit)
    stream = get_input_stream(environ)
    body = bytearray()
    try:
        while len(body) <= limit:
            chunk = stream.read(limit + 1 - len(body))
            if not chunk:
                return bytes(body)
            body += chunk
    except Exception as exc:  # noqa: BLE001
        # Whatever the server's body reader raises (gunicorn: InvalidChunkSize, ChunkMissingTerminator,
        # NoMoreData when the client stops mid-body) means the client's body is malformed or cut short.
        raise errors.ClientError(f"server '{server_id}': the request body could not be read: {exc}") from None
    raise _too_large(server_id, limit)


def _too_large(server_id: str, limit: int) -> errors.BodyTooLarge:
    return errors.BodyTooLarge(f"server '{server_id}': request body is over the gateway's limit of {limit} bytes")
