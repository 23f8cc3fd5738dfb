"""MCP over WebSocket, sans-IO: one client connection's bytes in, what to serve and what to send out.

The event loop that holds the socket (it comes with the stream relay; see
README, "WebSocket") owns no WebSocket knowledge: it passes what it reads to
`WebSocketConnection.receive(data, now)` and the clock to `tick(now)`, sends
the `to_send` bytes of each Outcome, serves its `messages` (JSON-RPC, one per
text frame, any number in flight, answered in any order by id through
`send_message`) and closes the socket once an Outcome says `closed`. Framing
is wsproto's (RFC 6455: masking, fragments, UTF-8, control frames); this
module decides what MCP makes of it, as the SDKs' WebSocket transports and
the WebSocket SEP draft frame it: text frames only (a binary frame is closed
with 1003), a message over `gateway.max_body_bytes` closed with 1009 while it
arrives, a text frame that is not one JSON-RPC message answered with the
JSON-RPC error a POST body would get (the connection goes on), pings
answered, a quiet client pinged every `gateway.ws_ping_interval` and closed
after `gateway.ws_dead_peer_timeout` without a byte from it. Nothing here
raises on what a client sends: a fault of the gateway's own is a 1011 close.
No permessage-deflate: a message's size on the wire is its size.

WebSocketSession is the MCP state of one connection, both eras: a
handshake-era client's `initialize` makes the connection its session (and
names the protocol version of what follows); a 2026-07-28 client names its
version in each request's `_meta`. `context(message)` is the ClientContext
protocol.py gives the same request over HTTP.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import h11
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import ProtocolError

from . import errors, jsonrpc, log_levels, protocol
from .logtext import quoted
from .protocol import Headers
from .ws_handshake import Accepted, Refused, RequestHeaders

log = logging.getLogger(__name__)

# Close codes (RFC 6455 7.4.1) the gateway sends.
NORMAL = 1000
GOING_AWAY = 1001  # the worker is stopping (HUP, TERM, max_requests): reconnect
UNSUPPORTED_DATA = 1003  # a binary frame
POLICY_VIOLATION = 1008  # the caller may no longer be served (e.g. its token is gone after a reload)
MESSAGE_TOO_BIG = 1009  # a message over gateway.max_body_bytes
GATEWAY_ERROR = 1011  # a fault of the gateway's, or a peer that stopped answering (as the websockets library closes it)

# Seconds a client has to answer our close before the socket is simply dropped.
CLOSE_TIMEOUT = 5.0
# The largest request head of an upgrade; h11 answers past it with a protocol error, refused with 400.
MAX_HANDSHAKE_BYTES = 16 * 1024
PING_PAYLOAD = b"mcp-gateway"

UpgradeCheck = Callable[[str, str, Headers], "Accepted | Refused"]


class WsSettings(Protocol):
    """What a connection reads of registry.GatewaySettings."""

    @property
    def max_body_bytes(self) -> int: ...

    @property
    def max_json_depth(self) -> int: ...

    @property
    def ws_ping_interval(self) -> float: ...

    @property
    def ws_dead_peer_timeout(self) -> float: ...


class State(enum.Enum):
    HANDSHAKE = "handshake"  # reading the upgrade request
    OPEN = "open"
    CLOSING = "closing"  # our close is sent; waiting for the client's
    CLOSED = "closed"


@dataclass
class Outcome:
    """What to do after some bytes or a tick: send `to_send`, serve `messages`, then close if `closed`."""

    to_send: bytes = b""
    messages: list[dict[str, Any]] = field(default_factory=list)
    accepted: Accepted | None = None  # set by the receive that completed the handshake
    closed: bool = False


class WebSocketConnection:
    """One client's WebSocket, from its upgrade request to its close."""

    def __init__(self, checks: UpgradeCheck, *, max_message_bytes: int, max_json_depth: int,
                 ping_interval: float, dead_peer_timeout: float, now: float):
        self.checks = checks
        self.max_message_bytes = max_message_bytes
        self.max_json_depth = max_json_depth
        self.ping_interval = ping_interval
        self.dead_peer_timeout = dead_peer_timeout
        self.state = State.HANDSHAKE
        self.session: WebSocketSession | None = None
        # Ids of the client's requests passed on and not answered yet.
        self.in_flight: set[Any] = set()
        # The handshake's parser: let go once the connection is open (memory per idle WebSocket, issue 15).
        self._http: h11.Connection | None = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HANDSHAKE_BYTES)
        self._ws: Connection | None = None
        self._text: list[str] = []
        self._text_bytes = 0
        self._now = now
        self._opened = now
        self._last_received = now
        self._last_ping = now
        self._closing_since = now

    @classmethod
    def from_settings(cls, checks: UpgradeCheck, values: WsSettings, now: float) -> WebSocketConnection:
        return cls(checks, max_message_bytes=values.max_body_bytes, max_json_depth=values.max_json_depth,
                   ping_interval=values.ws_ping_interval, dead_peer_timeout=values.ws_dead_peer_timeout, now=now)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # --- what the event loop calls ---------------------------------------------------

    def receive(self, data: bytes, now: float) -> Outcome:
        """Bytes read from the client (b"" when it has gone: end of file)."""
        self._now = now
        if data:
            self._last_received = now
        outcome = Outcome()
        try:
            if self.state is State.CLOSED:
                outcome.closed = True
            elif not data:
                self.state = State.CLOSED  # gone without a close frame (1006, never sent)
                outcome.closed = True
            elif self.state is State.HANDSHAKE:
                self._handshake(data, outcome)
            else:
                self._frames(data, outcome)
        except Exception:  # noqa: BLE001  # a fault of ours must end this connection, not the loop
            log.exception("WebSocket connection for %s failed", self.session.server_id if self.session else "?")
            outcome.to_send += self._fail()
            outcome.messages.clear()
            outcome.closed = True
        return outcome

    def upgrade(self, method: str, path: str, headers: list[tuple[bytes, bytes]], now: float,
                trailing: bytes = b"") -> Outcome:
        """A request head already read elsewhere (by the worker): checked, then answered 101 or refused.

        Called once, on a new connection, instead of passing the head to
        `receive`; `trailing` is what the client sent behind the head.
        """
        if self.state is not State.HANDSHAKE:
            raise RuntimeError("upgrade() is for a connection that has not had its upgrade request yet")
        self._now = self._last_received = now
        outcome = Outcome()
        try:
            self._upgrade(method, path, headers, trailing, outcome)
        except Exception:  # noqa: BLE001
            log.exception("WebSocket upgrade of %s failed", quoted(path))
            outcome.to_send += self._fail()
            outcome.closed = True
        return outcome

    def tick(self, now: float) -> Outcome:
        """The clock: a ping for a quiet client, a close for a dead one, the end of a close that got no answer."""
        self._now = now
        outcome = Outcome()
        if self.state is State.HANDSHAKE:
            if now - self._opened >= self.dead_peer_timeout:
                self.state = State.CLOSED
        elif self.state is State.CLOSING:
            if now - self._closing_since >= CLOSE_TIMEOUT:
                self.state = State.CLOSED
        elif self.state is State.OPEN and self._ws is not None:
            quiet = now - self._last_received
            if quiet >= self.dead_peer_timeout:
                outcome.to_send = self._ws.send(CloseConnection(
                    GATEWAY_ERROR, f"keepalive: nothing from the client for {quiet:g} s (gateway.ws_dead_peer_timeout)"))
                self.state = State.CLOSED  # no answer to wait for
            elif now - max(self._last_received, self._last_ping) >= self.ping_interval:
                outcome.to_send = self._ws.send(Ping(PING_PAYLOAD))
                self._last_ping = now
        outcome.closed = self.closed
        return outcome

    def next_deadline(self) -> float:
        """When `tick` next has something to do (math.inf: never)."""
        if self.state is State.HANDSHAKE:
            return self._opened + self.dead_peer_timeout
        if self.state is State.CLOSING:
            return self._closing_since + CLOSE_TIMEOUT
        if self.state is State.OPEN:
            return min(self._last_received + self.dead_peer_timeout,
                       max(self._last_received, self._last_ping) + self.ping_interval)
        return math.inf

    def send_message(self, message: dict[str, Any]) -> bytes:
        """One JSON-RPC message to the client as a text frame (b"" once the connection is closing).

        An answer to a request not in flight is dropped (b""): the client
        cancelled it, and MCP has no answer follow a cancellation, as the
        HTTP path drops a late answer to a cancelled id.
        """
        if "method" not in message:
            if message.get("id") not in self.in_flight:
                return b""
            self.in_flight.discard(message.get("id"))  # answered
        return self._text_frame(message)

    def close(self, code: int, reason: str = "") -> bytes:
        """The gateway ends the connection (1000, 1001, 1008, 1011); the client's close, or CLOSE_TIMEOUT, finishes it."""
        if self.state is State.OPEN and self._ws is not None:
            data = self._ws.send(CloseConnection(code, reason))
            self._start_closing()
            return data
        if self.state is State.HANDSHAKE:
            self.state = State.CLOSED
        return b""

    # --- the handshake ---------------------------------------------------------------

    def _handshake(self, data: bytes, outcome: Outcome) -> None:
        http = self._http
        assert http is not None  # dropped only when the connection opened, which ends the handshake state
        try:
            http.receive_data(data)
            event = http.next_event()
        except h11.RemoteProtocolError as exc:  # 400, or 431 for a head over MAX_HANDSHAKE_BYTES
            self._refuse(Refused.of(errors.ClientError(f"not a valid WebSocket upgrade request: {exc}"),
                                    exc.error_status_hint), outcome)
            return
        if not isinstance(event, h11.Request):
            return  # h11.NEED_DATA: the head is not complete yet
        trailing, _ = http.trailing_data
        self._upgrade(event.method.decode("latin-1"), event.target.decode("latin-1"),
                      list(event.headers), trailing, outcome)

    def _upgrade(self, method: str, path: str, headers: list[tuple[bytes, bytes]], trailing: bytes,
                 outcome: Outcome) -> None:
        verdict = self.checks(method, path, RequestHeaders(headers))
        if isinstance(verdict, Refused):
            self._refuse(verdict, outcome)
            return
        handshake = H11Handshake(ConnectionType.SERVER)
        try:
            handshake.initiate_upgrade_connection(headers, path)
            [request] = [event for event in handshake.events() if isinstance(event, Request)]
        except (ProtocolError, ValueError) as exc:
            # The checks passed what wsproto will not take: refused the same way.
            self._refuse(Refused.of(errors.ClientError(f"not a valid WebSocket upgrade request: {exc}")), outcome)
            return
        outcome.to_send += handshake.send(AcceptConnection(subprotocol=verdict.subprotocol, extensions=[]))
        assert request.target == path
        self._ws = handshake.connection
        self._http = None
        self.state = State.OPEN
        self.session = WebSocketSession(verdict.server_id, verdict.principal)
        outcome.accepted = verdict
        if trailing:  # frames the client sent right behind its request
            self._frames(trailing, outcome)

    def _refuse(self, refusal: Refused, outcome: Outcome) -> None:
        outcome.to_send += refusal.encode()
        self.state = State.CLOSED
        outcome.closed = True

    # --- frames ---------------------------------------------------------------------------

    def _frames(self, data: bytes, outcome: Outcome) -> None:
        ws = self._ws
        assert ws is not None
        if ws.state is ConnectionState.CLOSED:
            self.state = State.CLOSED
            outcome.closed = True
            return
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, CloseConnection):
                self._closed_by_client(ws, event, outcome)
                break
            if self.state is not State.OPEN:
                continue  # after our close, what the client still sends is not served
            if isinstance(event, TextMessage):
                self._text_part(event, outcome)
            elif isinstance(event, BytesMessage):
                outcome.to_send += self._close(UNSUPPORTED_DATA,
                                               "binary frames are not MCP: send each JSON-RPC message as one text frame")
            elif isinstance(event, Ping):
                outcome.to_send += ws.send(event.response())
            # A Pong says the client is alive, which any byte received has said already.
        outcome.closed = self.closed

    def _closed_by_client(self, ws: Connection, event: CloseConnection, outcome: Outcome) -> None:
        if ws.state is ConnectionState.REMOTE_CLOSING:
            outcome.to_send += ws.send(event.response())  # the client closes first: echo its code
        elif ws.state is ConnectionState.OPEN:
            # Not a close frame: wsproto could not parse the stream (1002, 1007). Fail the connection.
            outcome.to_send += ws.send(CloseConnection(event.code, event.reason))
        self.state = State.CLOSED

    def _text_part(self, event: TextMessage, outcome: Outcome) -> None:
        self._text.append(event.data)
        self._text_bytes += len(event.data.encode("utf-8", "surrogatepass"))
        if self._text_bytes > self.max_message_bytes:
            outcome.to_send += self._close(
                MESSAGE_TOO_BIG, f"message over the gateway's limit of {self.max_message_bytes} bytes (gateway.max_body_bytes)")
            return
        if event.message_finished:
            body = "".join(self._text).encode("utf-8")
            self._text, self._text_bytes = [], 0
            self._serve(body, outcome)

    def _serve(self, body: bytes, outcome: Outcome) -> None:
        """One text message: passed on as a JSON-RPC message, or answered with the error a POST would get."""
        server_id = self.session.server_id if self.session else ""
        try:
            message = jsonrpc.parse(body, server_id, self.max_json_depth)
            if jsonrpc.is_request(message):
                rpc_id = message["id"]
                if rpc_id in self.in_flight:
                    raise errors.InvalidRequest(
                        f"server '{server_id}': request id {quoted(rpc_id)} is already in flight on this connection; "
                        "use a new id for each request", rpc_id=rpc_id)
                self.in_flight.add(rpc_id)
            elif message.get("method") == "notifications/cancelled":
                # The id is free again; the notification still goes on, so the request is cancelled upstream.
                params = message.get("params") or {}
                self.in_flight.discard(params.get("requestId") if isinstance(params.get("requestId"), (str, int)) else None)
        except errors.GatewayError as exc:
            outcome.to_send += self._text_frame(jsonrpc.error(exc.rpc_id, exc.code, exc.message, exc.data))
            return
        outcome.messages.append(message)

    def _text_frame(self, message: dict[str, Any]) -> bytes:
        if self.state is not State.OPEN or self._ws is None:
            return b""
        return self._ws.send(TextMessage(jsonrpc.encode(message).decode("utf-8")))

    def _close(self, code: int, reason: str) -> bytes:
        data = self.close(code, reason)
        self._text, self._text_bytes = [], 0
        return data

    def _start_closing(self) -> None:
        self.state = State.CLOSING
        self._closing_since = self._now

    def _fail(self) -> bytes:
        """Close 1011 after a fault of ours, without waiting for the client."""
        data = b""
        if self._ws is not None and self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            data = self._ws.send(CloseConnection(GATEWAY_ERROR, "gateway error"))
        elif self.state is State.HANDSHAKE:
            data = Refused.of(errors.GatewayError("internal gateway error during the WebSocket upgrade")).encode()
        self.state = State.CLOSED
        return data


class WebSocketSession:
    """The MCP side of one connection: which server, which caller, which protocol version after `initialize`."""

    def __init__(self, server_id: str, principal: str | None):
        self.server_id = server_id
        self.principal = principal
        self.protocol_version: str | None = None  # set by a handshake-era client's initialize
        # Set by its logging/setLevel, which the gateway answers (a pooled process is shared):
        # carried by each later request of the connection, as over HTTP (log_levels.py).
        self.log_level: str | None = None

    @staticmethod
    def is_initialize(message: dict[str, Any]) -> bool:
        return message.get("method") == "initialize" and jsonrpc.is_request(message)

    def initialize(self, message: dict[str, Any], hello: protocol.ServerHello) -> dict[str, Any]:
        """The gateway's answer to `initialize`, as over HTTP; the connection is the client's session from now on."""
        params = message.get("params")
        requested = params.get("protocolVersion") if isinstance(params, dict) else None
        result = protocol.initialize_result(hello, requested)
        self.protocol_version = str(result["protocolVersion"])
        return jsonrpc.result(message.get("id"), result)

    def set_level(self, message: dict[str, Any]) -> dict[str, Any]:
        """The gateway's answer to a handshake-era `logging/setLevel`: the connection's level from now on."""
        self.log_level = log_levels.requested(message)
        return jsonrpc.result(message.get("id"), {})

    def context(self, message: dict[str, Any]) -> protocol.ClientContext:
        """The era and version of one message, decided by protocol.client_context as for a POST.

        A WebSocket message has no headers of its own: a 2026-07-28 client's
        `_meta` is the only place it names its version, so the headers its
        POST would carry are derived from the message itself (they agree by
        construction) and the version's support and the envelope's shape are
        checked as over HTTP. A handshake-era message carries the version
        its connection's initialize agreed.
        """
        params = message.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        version = meta.get(protocol.META_PROTOCOL_VERSION) if isinstance(meta, dict) else None
        headers: dict[str, str] = {}
        if isinstance(version, str) and "method" in message:
            method = str(message["method"])
            field_name = protocol.NAMED_PARAM.get(method)
            if field_name is not None and not isinstance(params.get(field_name) if isinstance(params, dict) else None, str):
                raise errors.InvalidParams(f"server '{self.server_id}': params.{field_name} of {method} must be a string",
                                           rpc_id=message.get("id"))
            headers = {**protocol.request_headers(message), "MCP-Protocol-Version": version}
        elif self.protocol_version is not None:
            headers = {"MCP-Protocol-Version": self.protocol_version}
        client = protocol.client_context(RequestHeaders.of(headers), message, self.protocol_version)
        if self.log_level is not None and client.era == protocol.LEGACY:
            return dataclasses.replace(client, log_level=self.log_level)
        return client
