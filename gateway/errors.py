"""The gateway's exceptions: every failure a client can see, under one root, and what stops a start or reload.

Each class carries the HTTP status and JSON-RPC error code it maps to, and says
whether the request that failed may be sent to another process or instance
(`retry_safe`): True only when the request never reached an upstream. Upstream
failures also name their `kind`, the label they are counted under in /metrics. The one
error handler in views.py turns any of them into a JSON-RPC error response.

ConfigurationError is the other root: a registry, template, secret or
folder the gateway cannot use. It is raised while starting or reloading,
never while answering a request: a start stops with its message, a reload is
refused and the running registry goes on.
"""

from __future__ import annotations

from typing import Any

# JSON-RPC 2.0 and MCP error codes used by the gateway.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020  # MCP 2026-07-28: headers disagree with the body
UNSUPPORTED_PROTOCOL_VERSION = -32022  # MCP 2026-07-28
# Implementation-defined server errors (-32000..-32099) for gateway faults.
UPSTREAM_ERROR = -32001
OVERLOADED = -32002
SESSION_NOT_FOUND = -32003
UNAUTHORIZED = -32004
REQUEST_CANCELLED = -32005


class GatewayError(Exception):
    """Root of everything the gateway raises on purpose."""

    http_status = 500
    code = INTERNAL_ERROR
    retry_safe = False

    def __init__(self, message: str, *, data: Any = None, retry_after: float | None = None, rpc_id: Any = None):
        super().__init__(message)
        self.message = message
        self.data = data
        self.retry_after = retry_after
        # The id of the request refused, when it was read before the problem was found.
        self.rpc_id = rpc_id


# --- the client sent something we cannot use ---------------------------------


class ClientError(GatewayError):
    """The request itself is wrong; retrying it unchanged fails the same way."""

    http_status = 400
    code = INVALID_REQUEST


class ParseError(ClientError):
    """The body is not JSON."""

    code = PARSE_ERROR


class InvalidRequest(ClientError):
    """The body is JSON but not a JSON-RPC 2.0 message."""


class InvalidParams(ClientError):
    """The message is a request, but its params cannot be used (e.g. `_meta` not an object)."""

    code = INVALID_PARAMS


class BodyTooLarge(ClientError):
    """The body is over `gateway.max_body_bytes` (post.py reads it; werkzeug's limit guards the Flask routes)."""

    http_status = 413


class UnknownServer(ClientError):
    """No server with that id is in the registry."""

    http_status = 404
    code = METHOD_NOT_FOUND


class MethodNotAllowed(ClientError):
    """The HTTP method is not served on this route (e.g. GET without a stream)."""

    http_status = 405


class HeaderMismatch(ClientError):
    """MCP 2026-07-28 request headers are missing or disagree with the body."""

    code = HEADER_MISMATCH


class UnsupportedProtocolVersion(ClientError):
    """The client asked for a protocol version the gateway does not speak."""

    code = UNSUPPORTED_PROTOCOL_VERSION


class SessionNotFound(ClientError):
    """The Mcp-Session-Id was not minted by this gateway (or has expired).

    The MCP spec requires 404 so that the client starts a new session.
    """

    http_status = 404
    code = SESSION_NOT_FOUND


class Unauthorized(ClientError):
    """No valid credentials (HTTP 401, with WWW-Authenticate: Bearer)."""

    http_status = 401
    code = UNAUTHORIZED


class Forbidden(ClientError):
    """Valid credentials that may not reach this server or endpoint (HTTP 403)."""

    http_status = 403
    code = UNAUTHORIZED


class OriginNotAllowed(Forbidden):
    """A browser Origin that is not loopback nor in gateway.allowed_origins, or a malformed one (HTTP 403)."""


class HostNotAllowed(ClientError):
    """A Host the gateway does not answer to: a DNS-rebinding page's own name (HTTP 421, as the SDKs answer)."""

    http_status = 421


class RequestStateInvalid(ClientError):
    """An MRTR requestState envelope that does not open here, has expired, or names an instance that is gone."""

    code = INVALID_PARAMS


class NotSupported(ClientError):
    """A valid MCP request the gateway cannot serve on this route."""

    code = METHOD_NOT_FOUND


class Cancelled(ClientError):
    """The client cancelled the request (notifications/cancelled) or left while it was served.

    Not a failure of the upstream: a process or connection cancelled this
    way is wound down as the protocol says, and no answer is owed.
    """

    # nginx's "client closed request": in access lines and metrics; sent only to a client still waiting for
    # a JSON answer to the request it cancelled (a stream just ends, a WebSocket gets nothing).
    http_status = 499
    code = REQUEST_CANCELLED


# --- the upstream or the gateway's own capacity failed ------------------------


class UpstreamError(GatewayError):
    """Something went wrong between the gateway and an MCP server."""

    kind = "failed"  # the metrics label
    http_status = 502
    code = UPSTREAM_ERROR


class Overloaded(UpstreamError):
    """Every process is busy and the wait was too long or the queue full.

    Nothing was sent upstream, so a retry (after Retry-After) is safe.
    """

    kind = "overloaded"
    http_status = 503
    code = OVERLOADED
    retry_safe = True


class SpawnFailed(UpstreamError):
    """No process could be started; nothing was sent, so a retry is safe."""

    kind = "start_failed"
    http_status = 503
    retry_safe = True


class ProcessFailed(UpstreamError):
    """A process died, hung or wrote garbage while holding the request.

    The request reached the process, so it is not safe to replay blindly.
    """

    kind = "process_failed"


class RequestNotSent(ProcessFailed):
    """The process failed while the request was being written to it: it never got the request, so a retry is safe."""

    retry_safe = True


class UpstreamTimeout(ProcessFailed):
    """The process did not answer within the request timeout."""

    kind = "timeout"
    http_status = 504


class NoInstance(UpstreamError):
    """Every instance of an HTTP server was tried or is out; nothing more was sent."""

    kind = "no_instance"
    http_status = 503
    retry_safe = True


class UpstreamUnreachable(UpstreamError):
    """The instance could not be connected to; the request never left, so a retry is safe."""

    kind = "unreachable"
    retry_safe = True


class OwnerLoop(UpstreamError):
    """A request relayed to a session's owner would be relayed again elsewhere (owners.py): refused."""

    kind = "owner_loop"
    http_status = 508


class UpstreamFailed(UpstreamError):
    """The instance took the request, then failed (reset, bad status, garbled answer).

    Only methods that change nothing by protocol may be sent again.
    """

    kind = "failed"


class UpstreamRefused(UpstreamFailed):
    """The instance answered, but refused what the gateway asked (e.g. a handshake)."""

    kind = "refused"


class BadStatus(UpstreamFailed):
    """The instance answered 502, 503 or 504; `response` is that answer, passed on unchanged if not retried."""

    kind = "bad_status"

    def __init__(self, message: str, response: Any):
        super().__init__(message)
        self.response = response


class UpstreamReadTimeout(UpstreamFailed):
    """The instance took the request and did not answer within read_timeout."""

    kind = "timeout"
    http_status = 504


# --- what keeps the gateway from starting, or a reload from being applied ------------------


class ConfigurationError(Exception):
    """Root of the problems of what the gateway is configured with (never a request's answer)."""


class RegistryError(ConfigurationError):
    """The registry file cannot be used; `problems` lists each one."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))

    def one_line(self) -> str:
        return "; ".join(self.problems)


class TemplateError(ConfigurationError):
    """A template file is unusable; `problems` says why, each naming the file."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class UnsafePath(ConfigurationError):
    """A folder or file the gateway will not trust; the message says which and why, and what to do."""
