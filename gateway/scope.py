"""What a pooled stdio process may tell the client it is serving.

A pooled process is shared by unrelated clients, one request at a time, and
whatever it writes while a request holds it arrives on that request's stream.
Not all of it belongs to that request: work an earlier client's call left
behind can still log or report progress, and change notifications concern the
server, not a caller. The protocol ties a notification to a request in
exactly two ways, and only those reach the client:

- `notifications/progress` names the request by its `progressToken`, the one
  the request put in `params._meta` (basic/utilities/progress, both eras).
  Clients choose tokens and unrelated clients choose alike (SDK clients count
  from 0), so the process is sent a gateway-unique token instead, and only
  progress carrying that token is passed on, with the client's token put back.
- `notifications/message` is request-scoped only in 2026-07-28: a server MUST
  NOT log for a request that did not set `io.modelcontextprotocol/logLevel` in
  its `_meta`, and logs at that level and above ride that request's response
  stream (server/utilities/logging, SEP-2575). So a log message reaches the
  client when the process speaks 2026-07-28 and the request asked for that
  level. Handshake-era logging belongs to the connection, which for a pooled
  process is the gateway's: the gateway never sends such a process
  `logging/setLevel` (it would change the level for every client of it).
  Instead the level a request asks for (a handshake-era session's, set with
  `logging/setLevel` and answered by the gateway, see log_levels.py, or a
  2026-07-28 request's `_meta` level) is the gateway's own filter: the
  process's log messages at that level and above written while it serves the
  request reach the client, the rest are dropped; a request that asked for no
  level gets none of them.

Everything else (`*/list_changed`, `resources/updated`, `cancelled`, methods
no spec defines) is dropped: on a pooled process no client subscribed to it.
What remains possible: a request that asked for logs can receive a log line
an earlier call's leftover work writes during it, since stdio carries no
related-request marker in either era (the official SDK's
`related_request_id` is transport metadata, never written to the pipe).
"""

from __future__ import annotations

import itertools
from typing import Any

from . import protocol

META_LOG_LEVEL = protocol.META_LOG_LEVEL
# RFC 5424 severities, least severe first (server/utilities/logging).
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
# Tokens and request ids the process sees that the gateway made; a client's own
# id in this namespace is swapped, so no client can name one.
PROGRESS_TOKEN_PREFIX = "mcp-gateway-progress-"
REQUEST_ID_PREFIX = "mcp-gateway-"

# Why a notification was not delivered: the `reason` label of the dropped counter.
FOREIGN_PROGRESS = "foreign_progress"
UNREQUESTED_LOG = "unrequested_log"
NOT_REQUEST_SCOPED = "not_request_scoped"

_numbers = itertools.count(1)  # next() is atomic under the GIL: unique per worker process


class RequestScope:
    """What one request may receive from the process serving it."""

    __slots__ = ("client_token", "log_levels", "process_token")

    def __init__(self, client_token: Any = None, process_token: str | None = None,
                 log_levels: frozenset[str] = frozenset()):
        self.client_token = client_token
        self.process_token = process_token
        self.log_levels = log_levels

    def drop_reason(self, notification: dict[str, Any]) -> str | None:
        """None when `notification` belongs to this request, else why it does not."""
        method = notification.get("method")
        params = notification.get("params")
        if method == "notifications/progress":
            token = params.get("progressToken") if isinstance(params, dict) else None
            mine = self.process_token is not None and token == self.process_token
            return None if mine else FOREIGN_PROGRESS
        if method == "notifications/message":
            level = params.get("level") if isinstance(params, dict) else None
            return None if level in self.log_levels else UNREQUESTED_LOG
        return NOT_REQUEST_SCOPED

    def for_client(self, notification: dict[str, Any]) -> dict[str, Any]:
        """A delivered notification as the client expects it: its own progress token back."""
        if self.process_token is None or notification.get("method") != "notifications/progress":
            return notification
        return {**notification, "params": {**notification["params"], "progressToken": self.client_token}}


def scope(outgoing: dict[str, Any], process_era: str, level: Any = None) -> tuple[dict[str, Any], RequestScope]:
    """The request as the process gets it (own progress token), and what may come back for it.

    `level`: the log level the client asked for this request, for a
    handshake-era process, which is never told it (a 2026-07-28 process reads
    it from `outgoing`'s `_meta`). A request without a progress token is
    returned as it is, so its bytes can pass through untouched (the hot path).
    """
    params = outgoing.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if process_era == protocol.MODERN:
        levels = _levels_from(meta.get(META_LOG_LEVEL)) if isinstance(meta, dict) else frozenset()
    else:
        levels = _levels_from(level)
    if not isinstance(meta, dict):
        return outgoing, RequestScope(log_levels=levels)
    client_token = meta.get("progressToken")
    if client_token is None:
        return outgoing, RequestScope(log_levels=levels)
    process_token = f"{PROGRESS_TOKEN_PREFIX}{next(_numbers)}"
    assert isinstance(params, dict)
    outgoing = {**outgoing, "params": {**params, "_meta": {**meta, "progressToken": process_token}}}
    return outgoing, RequestScope(client_token, process_token, levels)


def process_request_id(client_id: Any) -> Any:
    """The id the process is sent: the client's, unless it is in the gateway's own namespace.

    The gateway's handshake ids live there, and a process may answer one late
    (a slow server/discover); a client choosing such an id must not receive
    that answer as its own, so its request goes with an id no one can choose.
    """
    if isinstance(client_id, str) and client_id.startswith(REQUEST_ID_PREFIX):
        return fresh_request_id()
    return client_id


def fresh_request_id() -> str:
    """An id for the process that no client can choose (see process_request_id)."""
    return f"{REQUEST_ID_PREFIX}request-{next(_numbers)}"


def requested_level(message: dict[str, Any]) -> Any:
    """The log level a 2026-07-28 request asks for in its `_meta` (None when it asks for none)."""
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta.get(META_LOG_LEVEL) if isinstance(meta, dict) else None


def _levels_from(requested: Any) -> frozenset[str]:
    if requested not in LOG_LEVELS:
        return frozenset()  # absent or unknown: the request asked for no logs
    return frozenset(LOG_LEVELS[LOG_LEVELS.index(requested):])
