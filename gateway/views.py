"""The HTTP face of the gateway: the MCP routes and the operator endpoints.

`/<server-id>` and `/<server-id>/<path>` speak Streamable HTTP to clients of
both MCP eras. The gateway answers the handshake-era lifecycle itself
(initialize, sessions, ping, DELETE) and `server/discover`, and hands every
other request to the server's upstream. GET, DELETE and the operator
endpoints are Flask routes of the blueprint; POST, every MCP message, is
`post` here, called by post.py without Flask's request machinery (the hot
path; see README, Performance). Every error a client can get leaves here as
a JSON-RPC error object, mapped from the exception in one function.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterator
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import errors, jsonrpc, metrics, protocol, rundir, sse
from . import status as status_module
from .exchange import Exchange
from .exchange import current as current_exchange
from .jsonrpc import Reply
from .logtext import clean, quoted
from .protocol import ClientContext
from .runtime import Gateway, current_gateway
from .sessions import Session
from .upstreams import MessageUpstream
from .upstreams.http import HttpUpstream, ProxyRequest

log = logging.getLogger(__name__)

bp = Blueprint("mcp", __name__)

SESSION_HEADER = "Mcp-Session-Id"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OPERATOR_ENDPOINTS = frozenset({"mcp.status", "mcp.metrics"})
# Open to probes, whatever Host they send (kubelet sends the pod's address): it tells a page nothing.
LIVENESS_ENDPOINT = "mcp.healthz"
# Answered on a pooled stdio server this way would pin a process for hours.
LONG_LIVED = {"subscriptions/listen"}


# --- who may call ----------------------------------------------------------------


@bp.before_app_request
def guard() -> None:
    """Host and Origin on every request (/healthz: Origin only); a token where the registry asks for one."""
    gateway = current_gateway()
    gateway.rebinding.check(request.headers, host=request.endpoint != LIVENESS_ENDPOINT)
    auth = gateway.auth
    if request.endpoint in OPERATOR_ENDPOINTS:
        auth.check_operator(request.headers)
    elif request.view_args and "server_id" in request.view_args:
        current_exchange().principal = auth.check_server(request.view_args["server_id"], request.headers)


# --- operator endpoints ------------------------------------------------------


@bp.get("/healthz")
def healthz() -> Response:
    return _json({"status": "ok", "pid": os.getpid()})


@bp.get("/status")
def status() -> Response:
    """The whole gateway: every worker's view, combined (see status.py)."""
    return _json(_gateway_status())


@bp.get("/metrics", endpoint="metrics")
def metrics_page() -> Response:
    return metrics.render(_gateway_status())


def _gateway_status() -> dict[str, Any]:
    return status_module.combine(current_gateway().worker_status(), rundir.sibling_statuses())


# --- MCP routes --------------------------------------------------------------


def post(gateway: Gateway, exchange: Exchange, path: str, query: bytes, body: bytes) -> Response:
    """POST /<server-id>[/<path>]: one JSON-RPC message (served by post.py, without Flask's request machinery)."""
    server_id = exchange.server_id or ""
    if server_id not in gateway.upstreams:
        gateway.checkout(server_id, exchange)  # UnknownServer, whatever the body is
    exchange.served = True  # counted under the server's id, whatever the body is
    message = jsonrpc.parse(body, server_id, gateway.registry.gateway.max_json_depth)
    exchange.rpc_id = message.get("id")
    exchange.mcp_method = method = message.get("method")
    # After parsing: a refusal (bulkhead full) carries the request's id.
    upstream = gateway.checkout(server_id, exchange)
    session = _session(gateway, exchange, server_id)
    client = protocol.client_context(exchange.headers, message, session.protocol_version if session else None)
    if isinstance(upstream, HttpUpstream) and not upstream.bridges(client, session, message):
        return _proxy(gateway, exchange, upstream, path, query, body, message, session)
    # From here the gateway ends MCP HTTP itself: a stdio server, or an HTTP
    # server of the other protocol era than the client's.
    if not jsonrpc.is_request(message):
        # Notifications (initialized, cancelled) and responses to server->client
        # requests have nowhere to go: a pooled or bridged server never asks the client.
        return Response(status=202)
    if client.era == protocol.LEGACY:
        if method == "initialize":
            return _initialize(gateway, exchange, upstream, message)
        if method == "ping":
            return _json(jsonrpc.result(message["id"], {}))
    elif method == "server/discover":
        return _json(jsonrpc.result(message["id"], protocol.discover_result(upstream.hello())))
    if method in LONG_LIVED:
        raise errors.NotSupported(f"server '{server_id}': {method} is not supported through the gateway yet")
    return _forward(exchange, upstream, message, body, client)


@bp.get("/<server_id>", defaults={"path": ""})
@bp.get("/<server_id>/<path:path>")
def get(server_id: str, path: str) -> Response:
    gateway, current = current_gateway(), current_exchange()
    upstream = gateway.checkout(server_id, current)
    session = _session(gateway, current, server_id)
    if isinstance(upstream, HttpUpstream) and not _bridged(session):
        return _proxy(gateway, current, upstream, path, request.query_string, b"", None, session)
    raise errors.MethodNotAllowed(
        f"server '{server_id}': the gateway offers no server-to-client SSE stream; use POST"
    )


@bp.delete("/<server_id>", defaults={"path": ""})
@bp.delete("/<server_id>/<path:path>")
def delete(server_id: str, path: str) -> Response:
    gateway, current = current_gateway(), current_exchange()
    upstream = gateway.checkout(server_id, current)
    session = _session(gateway, current, server_id)
    if isinstance(upstream, HttpUpstream) and not _bridged(session):
        response = _proxy(gateway, current, upstream, path, request.query_string, b"", None, session)
        if session is not None and 200 <= response.status_code < 300:
            gateway.signer.revoke(session)  # the instance ended it; no worker of ours passes it on again
        return response
    if session is None:
        raise errors.ClientError(f"server '{server_id}': DELETE needs the {SESSION_HEADER} header of the session to end")
    # The id is self-contained, so every worker would take it again: it is revoked
    # for the whole host (sessions.Revocations) until it would have expired anyway.
    gateway.signer.revoke(session)
    return Response(status=204)


def _session(gateway: Gateway, exchange: Exchange, server_id: str) -> Session | None:
    """The session the request names, opened for the caller; SessionNotFound if not theirs or not valid."""
    headers = exchange.headers
    token = headers.get(SESSION_HEADER)
    if token is None or headers.get("MCP-Protocol-Version") in protocol.MODERN_VERSIONS:
        return None  # 2026-07-28 has no sessions: a stray id is ignored, as the spec says
    return gateway.signer.verify(token, server_id, exchange.principal)


def _proxy(gateway: Gateway, exchange: Exchange, upstream: HttpUpstream, path: str, query: bytes, body: bytes,
           message: dict[str, Any] | None, session: Session | None) -> Response:
    """Pass the request to an instance and its answer back, re-signing any session it starts."""
    headers = exchange.headers
    instance = session.instance if session else None
    retry = gateway.states.retry(message, upstream.server_id, exchange.principal, upstream.available)
    if retry is not None:  # an MRTR retry goes to the instance that asked, with its own requestState back
        message, instance = retry
        body = jsonrpc.encode(message)
    try:
        answer = upstream.forward(ProxyRequest(
            method=exchange.method, path=f"/{path}" if path else "", query=query, headers=headers,
            body=body, message=message, instance=instance,
            upstream_session=session.upstream_session if session else None, request_id=exchange.request_id,
            credential_headers=gateway.auth.hook_credential_headers,
        ))
    except errors.UpstreamUnreachable as exc:
        if retry is None:
            raise
        raise errors.RequestStateInvalid(f"{exc.message}; it asked for this input, so start the call again "
                                         "without requestState") from None
    exchange.upstream = answer.instance
    if message is not None and jsonrpc.is_request(message) and headers.get("MCP-Protocol-Version") in protocol.MODERN_VERSIONS:
        # Its answer may ask for input: the requestState must lead the retry back here.
        answer.body = gateway.states.wrap_answer(answer.body, answer.instance, upstream.server_id, exchange.principal)
    response = Response(answer.body, status=answer.status, headers=answer.headers)
    if answer.streaming:
        response.headers["X-Accel-Buffering"] = "no"
    if answer.upstream_session and (session is None or answer.upstream_session != session.upstream_session):
        params = (message or {}).get("params") or {}
        version = params.get("protocolVersion") or (session.protocol_version if session else protocol.DEFAULT_LEGACY)
        response.headers[SESSION_HEADER] = gateway.signer.mint(
            upstream.server_id, str(version), instance=answer.instance, upstream_session=answer.upstream_session,
            principal=exchange.principal,
        )
    elif session is not None:
        response.headers[SESSION_HEADER] = headers[SESSION_HEADER]
    return response


def _bridged(session: Session | None) -> bool:
    """A session the gateway minted itself (no instance holds it), for an era-bridged HTTP server."""
    return session is not None and session.instance is None


def _initialize(gateway: Gateway, exchange: Exchange, upstream: MessageUpstream | HttpUpstream,
                message: dict[str, Any]) -> Response:
    params = message.get("params") or {}
    result = protocol.initialize_result(upstream.hello(), params.get("protocolVersion"))
    token = gateway.signer.mint(upstream.server_id, result["protocolVersion"], principal=exchange.principal)
    response = _json(jsonrpc.result(message["id"], result))
    response.headers[SESSION_HEADER] = token
    return response


def _forward(exchange: Exchange, upstream: MessageUpstream | HttpUpstream, message: dict[str, Any], body: bytes,
             client: ClientContext) -> Response:
    replies = upstream.call(message, body, client, exchange.request_id)
    first = next(replies)  # errors before the first message become plain HTTP errors
    exchange.upstream = first.origin
    if not first.final and "text/event-stream" in exchange.headers.get("Accept", ""):
        # The stream owns `replies` now, and closes it when the client is done.
        return Response(_sse(first, replies, message["id"]), mimetype="text/event-stream", headers=SSE_HEADERS)
    try:
        # A JSON-only client gets just the final response; notifications are dropped.
        final = first if first.final else next(reply for reply in replies if reply.final)
    except StopIteration:
        raise errors.UpstreamError(f"server '{upstream.server_id}' ended the exchange without a response") from None
    finally:
        replies.close()
    exchange.rpc_error = "error" in final.message
    return Response(final.encoded(), mimetype="application/json")


def _sse(first: Reply, replies: Generator[Reply, None, None], request_id: Any) -> Iterator[bytes]:
    try:
        yield sse.event(first.encoded())
        for reply in replies:
            yield sse.event(reply.encoded())
    except errors.GatewayError as exc:
        # Headers are gone already; the failure travels as the final event.
        yield sse.event(jsonrpc.encode(jsonrpc.error(request_id, exc.code, exc.message, exc.data)))
    except Exception as exc:  # a bug must still end the stream with an answer
        log.exception("unhandled error while streaming an answer")
        yield sse.event(jsonrpc.encode(jsonrpc.error(request_id, errors.INTERNAL_ERROR,
                                                     f"internal gateway error: {type(exc).__name__}")))
    finally:
        replies.close()


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(jsonrpc.encode(payload), status=status, mimetype="application/json")


# --- errors ------------------------------------------------------------------


@bp.app_errorhandler(Exception)
def flask_error(exc: Exception) -> Response:
    return error_response(current_gateway(), current_exchange(), exc)


def error_response(gateway: Gateway, exchange: Exchange, exc: Exception) -> Response:
    """The JSON-RPC error answering whatever was raised while serving `exchange`."""
    where = f"server {quoted(exchange.server_id)}: " if exchange.server_id else ""
    if isinstance(exc, errors.GatewayError):
        if exc.http_status >= 500:
            log.warning("%s %s -> %s: %s", exchange.method, exchange.path, exc.http_status, exc.message)
        rpc_id = exchange.rpc_id if exc.rpc_id is None else exc.rpc_id
        response = _json(jsonrpc.error(rpc_id, exc.code, exc.message, exc.data), exc.http_status)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        if isinstance(exc, errors.MethodNotAllowed):
            response.headers["Allow"] = "POST, DELETE"
        if exc.http_status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="mcp-gateway"'
        return response
    if isinstance(exc, HTTPException):
        if isinstance(exc, RequestEntityTooLarge):
            message = f"{where}request body is over the gateway's limit of {gateway.registry.gateway.max_body_bytes} bytes"
        else:
            message = f"{where}{exc.name}: {exchange.method} {clean(exchange.path)} is not served here"
        code = exc.code or 500
        response = _json(jsonrpc.error(None, errors.INVALID_REQUEST, message), code)
        if code == 405:
            response.headers["Allow"] = ", ".join(exc.valid_methods or []) if hasattr(exc, "valid_methods") else "POST"
        return response
    log.exception("unhandled error on %s %s", exchange.method, exchange.path)
    serving = f" serving server {exchange.server_id!r}" if exchange.server_id else ""
    return _json(jsonrpc.error(exchange.rpc_id, errors.INTERNAL_ERROR, f"internal gateway error{serving}: {type(exc).__name__}"), 500)
