"""How one MCP request is served, decided once: the plan kinds and `decide`.

Every request on an MCP route is served one of five ways, decided here from
the facts known once it is parsed (HTTP method, upstream, session, client
era, JSON-RPC message) and carried out by carry_out.py:

- `PassThrough`: the request goes to an instance of an http server as it
  is (MCP HTTP end to end), its answer comes back as it is.
- `Bridge`: the gateway ends MCP HTTP itself and hands the message to the
  upstream's `call` (a stdio process, or an http server of the other era).
- `Answer`: the gateway answers alone (`Local` says what: initialize, ping,
  server/discover, a handshake-era session's logging/setLevel, 202 for a
  notification or a client's response, the end of a session it minted).
- `Refuse`: a gateway error, raised as the JSON-RPC error answer.
- `Dedicated`: a handshake-era session of a stdio server with
  `session_mode: dedicated` (`Held` says what): served by the session's own
  process (gateway/dedicated.py).

`decide` does no I/O of its own. It asks an http upstream which eras its
instances speak (`passes_through`, which probes an instance the first time)
only where that answer matters, as the gateway always has. The plans the hot
paths get are module-level values: deciding allocates nothing for them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import errors, jsonrpc, protocol

if TYPE_CHECKING:
    from .protocol import ClientContext
    from .sessions import Session
    from .upstreams import Upstream

SESSION_HEADER = "Mcp-Session-Id"
# A stream for as long as the client holds it: served on a dedicated session's process (gateway/dedicated.py)
# or passed through to an http server; refused where the gateway answers for a shared process or session.
LONG_LIVED = frozenset({"subscriptions/listen"})


@dataclass(frozen=True, slots=True)
class PassThrough:
    """To an instance: the one holding the session, else one the balancer picks."""

    ends_session: bool = False  # a DELETE of an instance's session: revoke our id when the instance ends it


@dataclass(frozen=True, slots=True)
class Bridge:
    """The gateway ends MCP HTTP and hands the message to the upstream's `call`."""


class Local(enum.Enum):
    """What the gateway answers itself."""

    INITIALIZE = "initialize"  # the handshake, and a session id of the gateway's own
    PING = "ping"
    DISCOVER = "server/discover"
    SET_LEVEL = "logging/setLevel"  # a handshake-era session's log level, kept by the gateway (log_levels.py)
    ACCEPTED = "accepted"  # 202: a notification or a client's response has nowhere to go
    END_SESSION = "end session"  # DELETE of a session the gateway minted: revoked, 204


@dataclass(frozen=True, slots=True)
class Answer:
    what: Local


@dataclass(frozen=True, slots=True)
class Refuse:
    error: errors.GatewayError


class Held(enum.Enum):
    """What a request of a dedicated session (gateway/dedicated.py) does with the session's own process."""

    START = "start"  # initialize: a process of its own, given the client's initialize
    REQUEST = "request"  # a request, answered by the process
    DELIVER = "deliver"  # a notification or a response to the process's request: written to it, 202
    STREAM = "stream"  # GET: the session's stream of what the process sends unasked
    CORRELATED = "correlated"  # a 2026-07-28 request: to the process of its principal or correlation header
    LISTEN = "listen"  # a 2026-07-28 subscriptions/listen: a stream of that process's change notifications
    END = "end"  # DELETE: the process closed, the id revoked


@dataclass(frozen=True, slots=True)
class Dedicated:
    what: Held


Plan = PassThrough | Bridge | Answer | Refuse | Dedicated

PASS_THROUGH = PassThrough()
PASS_THROUGH_ENDING_SESSION = PassThrough(ends_session=True)
BRIDGE = Bridge()
INITIALIZE = Answer(Local.INITIALIZE)
PING = Answer(Local.PING)
DISCOVER = Answer(Local.DISCOVER)
SET_LEVEL = Answer(Local.SET_LEVEL)
ACCEPTED = Answer(Local.ACCEPTED)
END_SESSION = Answer(Local.END_SESSION)
DEDICATED = {what: Dedicated(what) for what in Held}


def decide(method: str, upstream: Upstream, instances: bool, session: Session | None,
           client: ClientContext | None = None, message: dict[str, Any] | None = None) -> Plan:
    """The plan for one request to `upstream`.

    `instances`: the upstream has instances a request can be passed to (an
    http server); a stdio server has processes that speak JSON-RPC lines.
    `session`: the one the request names, already opened (or None).
    `client` and `message`: a POST's era and JSON-RPC message.
    """
    held = _held(method, upstream, session, client, message)
    if held is not None:
        return DEDICATED[held]
    if method == "POST":
        assert client is not None and message is not None
        return _post(upstream, instances, session, client, message)
    # A stream (GET) or an end (DELETE) goes to an instance unless the session is the gateway's own.
    through = instances and (session is None or session.instance is not None)
    if method == "GET":
        if through:
            return PASS_THROUGH
        return Refuse(errors.MethodNotAllowed(
            f"server '{upstream.server_id}': the gateway offers no server-to-client SSE stream; use POST"))
    if through:
        return PASS_THROUGH if session is None else PASS_THROUGH_ENDING_SESSION
    if session is None:
        return Refuse(errors.ClientError(
            f"server '{upstream.server_id}': DELETE needs the {SESSION_HEADER} header of the session to end"))
    return END_SESSION


def _held(method: str, upstream: Upstream, session: Session | None, client: ClientContext | None,
          message: dict[str, Any] | None) -> Held | None:
    """For a stdio server of session_mode dedicated: what a handshake-era session's request does, else None.

    A handshake-era initialize starts a session; a request naming one goes to
    its process; handshake-era requests outside a session (curl) are served
    by the pool as on a pooled server. A 2026-07-28 request goes to the
    process of its principal, or of the correlation header it carries.
    """
    if getattr(upstream, "sessions", None) is None:
        return None
    if method == "POST":
        assert client is not None and message is not None
        if client.era != protocol.LEGACY:
            # 2026-07-28 has no sessions: keyed by principal or the gateway's correlation header
            # (gateway/dedicated.py). Discover is the server's, answered as on a pooled server.
            if not jsonrpc.is_request(message) or message["method"] == "server/discover":
                return None
            return Held.LISTEN if message["method"] in LONG_LIVED else Held.CORRELATED
        if session is None:
            return Held.START if message.get("method") == "initialize" and jsonrpc.is_request(message) else None
    if session is None or session.upstream_session is None:
        return None  # a session the gateway minted for the pool (before the server became dedicated)
    if method == "GET":
        return Held.STREAM
    if method == "DELETE":
        return Held.END
    assert message is not None
    return Held.REQUEST if jsonrpc.is_request(message) else Held.DELIVER


def _post(upstream: Upstream, instances: bool, session: Session | None, client: ClientContext,
          message: dict[str, Any]) -> Plan:
    if instances and _passes(upstream, session, client, message):
        return PASS_THROUGH
    if instances and client.era == protocol.MODERN and message.get("method") == "server/discover":
        # The server's instances speak only the handshake era: they answer discover as they
        # do (an error, or no 2026-07-28 version), so a client that can fall back to
        # initialize does, and is passed through with the whole handshake-era protocol.
        return PASS_THROUGH
    # From here the gateway ends MCP HTTP itself: a stdio server, or an http
    # server of the other protocol era than the client's.
    if not jsonrpc.is_request(message):
        # Notifications (initialized, cancelled) and responses to server->client
        # requests have nowhere to go: a pooled or bridged server never asks the client.
        return ACCEPTED
    method = message["method"]
    if client.era == protocol.LEGACY:
        if method == "initialize":
            return INITIALIZE
        if method == "ping":
            return PING
        if method == "logging/setLevel":
            # Never sent on: a pooled process is shared (the level would be every client's),
            # and a 2026-07-28 server has no such method. The level rides on the session's
            # later requests instead (scope.py).
            return SET_LEVEL
    elif method == "server/discover":
        return DISCOVER
    if method in LONG_LIVED:
        # Its change notifications would be those of a process or session every client shares.
        where = "its processes are pooled" if not instances else "it is bridged across protocol eras"
        return Refuse(errors.NotSupported(
            f"server '{upstream.server_id}': {method} needs a server session of the client's own, and {where}; "
            "a stdio server serves it with session_mode: dedicated"))
    return BRIDGE


def _passes(upstream: Upstream, session: Session | None, client: ClientContext, message: dict[str, Any]) -> bool:
    """Whether a POST to an http server passes through to an instance, rather than being bridged.

    2026-07-28 clients pass through to servers that speak 2026-07-28;
    handshake-era clients with a session of an instance pass through. The
    rest is bridged: 2026-07-28 clients of legacy-only servers, handshake-era
    clients of modern-only servers, and handshake-era requests without a
    session (curl), which the gateway sends in a session of its own.
    """
    if client.era == protocol.MODERN:
        return upstream.passes_through(protocol.MODERN)
    if session is not None:
        return session.instance is not None  # None: the gateway minted it for a bridged session
    return message.get("method") == "initialize" and upstream.passes_through(protocol.LEGACY)
