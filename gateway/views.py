"""The Flask face of the gateway: who may call, GET and DELETE on the MCP routes, the operator endpoints.

`/<server-id>` and `/<server-id>/<path>` speak Streamable HTTP to clients of
both MCP eras. POST, every MCP message, is served by post.py without Flask's
request machinery (the hot path; see README, Performance); GET and DELETE
are Flask routes here. Either way serving.py decides how a request is served
and carry_out.py does it. Every error a client can get leaves here as a
JSON-RPC error object, mapped from the exception in one function
(`error_response`, which post.py uses too).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import errors, jsonrpc, metrics, rundir, serving, upstreams
from . import status as status_module
from .carry_out import Served, carry_out, json_response, session_of
from .exchange import Exchange
from .exchange import current as current_exchange
from .logtext import clean, quoted
from .owners import elsewhere, relay_to_owner
from .runtime import Gateway, current_gateway

log = logging.getLogger(__name__)

bp = Blueprint("mcp", __name__)

OPERATOR_ENDPOINTS = frozenset({"mcp.status", "mcp.metrics"})
# Open to probes, whatever Host they send (kubelet sends the pod's address): it tells a page nothing.
LIVENESS_ENDPOINT = "mcp.healthz"


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
    return json_response({"status": "ok", "pid": os.getpid()})


@bp.get("/status")
def status() -> Response:
    """The whole gateway: every worker's view, combined (see status.py)."""
    return json_response(_gateway_status())


@bp.get("/metrics", endpoint="metrics")
def metrics_page() -> Response:
    return metrics.render(_gateway_status())


def _gateway_status() -> dict[str, Any]:
    return status_module.combine(current_gateway().worker_status(), rundir.sibling_statuses())


# --- MCP routes --------------------------------------------------------------
# POST, every MCP message, is post.py's (without Flask); GET and DELETE are here.


@bp.get("/<server_id>", defaults={"path": ""})
@bp.get("/<server_id>/<path:path>")
def get(server_id: str, path: str) -> Response:
    """A server-to-client stream: passed through to an instance, or refused."""
    return _stream_or_end("GET", server_id, path)


@bp.delete("/<server_id>", defaults={"path": ""})
@bp.delete("/<server_id>/<path:path>")
def delete(server_id: str, path: str) -> Response:
    """The end of a session: passed through to the instance holding it, or the gateway's own revoked."""
    return _stream_or_end("DELETE", server_id, path)


def _stream_or_end(method: str, server_id: str, path: str) -> Response:
    gateway, current = current_gateway(), current_exchange()
    upstream = gateway.checkout(server_id, current)
    session = session_of(gateway, current, server_id)
    owner = elsewhere(gateway, session)
    if owner is not None:
        return relay_to_owner(gateway, current, owner, b"", request.query_string)
    instances = upstreams.instances(upstream)
    plan = serving.decide(method, upstream, instances is not None, session)
    return carry_out(Served(gateway, current, upstream, instances, session, client=None, message=None, body=b"",
                            path=path, query=request.query_string), plan)


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
        response = json_response(jsonrpc.error(rpc_id, exc.code, exc.message, exc.data), exc.http_status)
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
        response = json_response(jsonrpc.error(None, errors.INVALID_REQUEST, message), code)
        if code == 405:
            response.headers["Allow"] = ", ".join(exc.valid_methods or []) if hasattr(exc, "valid_methods") else "POST"
        return response
    log.exception("unhandled error on %s %s", exchange.method, exchange.path)
    serving_what = f" serving server {exchange.server_id!r}" if exchange.server_id else ""
    return json_response(jsonrpc.error(exchange.rpc_id, errors.INTERNAL_ERROR, f"internal gateway error{serving_what}: {type(exc).__name__}"), 500)
