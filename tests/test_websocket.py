"""MCP over WebSocket without a socket: gateway/websocket.py and gateway/ws_handshake.py driven by wsproto's client.

Unit tests, no processes: the client's bytes go into the gateway's sans-IO
connection and what it says to send comes back to the client's parser.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from gateway import errors, protocol, registry, websocket, ws_handshake, ws_serving
from gateway import settings as ws_settings
from gateway.auth import Authenticator
from gateway.exchange import Exchange
from gateway.rebinding import RebindingGuard

from .harness import ROOT, Clock

MIB = 1024 * 1024
TOKEN = "s3cret-token-0123456789"
OTHER_TOKEN = "other-token-0123456789ab"


@dataclass
class Access:
    auth_tokens: dict[str, str] = field(default_factory=dict)
    allow: tuple[str, ...] | None = None


def checks(tokens: dict[str, str] | None = None, servers: dict[str, Access] | None = None,
           allowed_hosts: Iterable[str] = ()) -> ws_handshake.UpgradeChecks:
    servers = {"time": Access()} if servers is None else servers
    auth = Authenticator({"tokens": tokens or {}}, servers)
    return ws_handshake.UpgradeChecks(RebindingGuard(allowed_hosts=allowed_hosts), auth, servers)


def connection(clock: Clock, *, upgrade: ws_handshake.UpgradeChecks | None = None,
               max_message_bytes: int = MIB, ping_interval: float = 20.0,
               dead_peer_timeout: float = 60.0) -> websocket.WebSocketConnection:
    return websocket.WebSocketConnection(
        upgrade or checks(), max_message_bytes=max_message_bytes, max_json_depth=64,
        ping_interval=ping_interval, dead_peer_timeout=dead_peer_timeout, now=clock(),
    )


class Client:
    """wsproto's client side, talking to the gateway's connection in memory."""

    def __init__(self, server: websocket.WebSocketConnection, clock: Clock):
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.server = server
        self.clock = clock
        self.outcomes: list[websocket.Outcome] = []

    def handshake(self, target: str = "/time/ws", subprotocols: Iterable[str] = ("mcp",),
                  headers: Iterable[tuple[str, str]] = (), host: str = "127.0.0.1:8000") -> list[Event]:
        request = Request(host=host, target=target, subprotocols=list(subprotocols),
                          extra_headers=[(k.encode(), v.encode()) for k, v in headers])
        return self.feed(self.ws.send(request))

    def send(self, event: Event) -> list[Event]:
        return self.feed(self.ws.send(event))

    def feed(self, data: bytes) -> list[Event]:
        """Bytes from the client to the gateway; the events the client then sees."""
        outcome = self.server.receive(data, self.clock())
        self.outcomes.append(outcome)
        return self.answer(outcome.to_send)

    def answer(self, data: bytes) -> list[Event]:
        if data:  # (b"" would be the end of the stream to wsproto)
            self.ws.receive_data(data)
        return list(self.ws.events())

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [m for o in self.outcomes for m in o.messages]


def open_client(clock: Clock, **kwargs: Any) -> Client:
    client = Client(connection(clock, **kwargs), clock)
    events = client.handshake()
    assert isinstance(events[0], AcceptConnection), events
    return client


def texts(events: list[Event]) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in events if isinstance(e, TextMessage)]


def closes(events: list[Event]) -> list[int]:
    return [e.code for e in events if isinstance(e, CloseConnection)]


def rejection(events: list[Event]) -> tuple[int, dict[str, str], dict[str, Any]]:
    assert isinstance(events[0], RejectConnection), events
    body = b"".join(e.data for e in events if isinstance(e, RejectData))
    return events[0].status_code, {k.decode().lower(): v.decode() for k, v in events[0].headers}, json.loads(body)


def request(rpc_id: Any, method: str = "tools/list", **params: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": method, **({"params": params} if params else {})})


# --- handshake ------------------------------------------------------------------


def test_handshake_accepted_with_subprotocol_mcp() -> None:
    clock = Clock()
    client = Client(connection(clock), clock)
    events = client.handshake(subprotocols=("other", "mcp"))
    assert isinstance(events[0], AcceptConnection)
    assert events[0].subprotocol == "mcp"
    accepted = client.outcomes[0].accepted
    assert accepted == ws_handshake.Accepted(server_id="time", principal=None, subprotocol="mcp")
    assert client.server.session is not None and client.server.session.server_id == "time"


def test_upgrade_on_the_mcp_path_is_accepted_too() -> None:
    clock = Clock()
    client = Client(connection(clock), clock)
    events = client.handshake(target="/time")
    assert isinstance(events[0], AcceptConnection)
    assert client.outcomes[0].accepted is not None and client.outcomes[0].accepted.server_id == "time"


def test_handshake_without_mcp_subprotocol_is_refused_before_the_upgrade() -> None:
    clock = Clock()
    client = Client(connection(clock), clock)
    status, _, body = rejection(client.handshake(subprotocols=()))
    assert status == 400
    assert "subprotocol" in body["error"]["message"] and "mcp" in body["error"]["message"]
    assert client.outcomes[-1].closed


def test_handshake_bytes_may_come_in_pieces() -> None:
    clock = Clock()
    server = connection(clock)
    ws = WSConnection(ConnectionType.CLIENT)
    data = ws.send(Request(host="localhost", target="/time/ws", subprotocols=["mcp"]))
    first = server.receive(data[:10], clock())
    assert first.to_send == b"" and not first.closed
    # A frame right behind the request head, before the 101 has arrived (a frame encoder of its own).
    frame = Connection(ConnectionType.CLIENT).send(TextMessage(data=request(1)))
    second = server.receive(data[10:] + frame, clock())
    ws.receive_data(second.to_send)
    assert isinstance(next(ws.events()), AcceptConnection)
    assert [m["id"] for m in second.messages] == [1]


def test_garbage_instead_of_a_handshake_is_a_400() -> None:
    clock = Clock()
    server = connection(clock)
    outcome = server.receive(b"\x16\x03\x01 not http at all\r\n\r\n", clock())
    assert outcome.to_send.startswith(b"HTTP/1.1 400 ")
    assert outcome.closed


def parsed_head(data: bytes) -> tuple[str, str, list[tuple[bytes, bytes]]]:
    """What the worker has of an upgrade request once gunicorn has read its head."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    return event.method.decode(), event.target.decode(), list(event.headers)


def test_upgrade_of_a_request_head_read_elsewhere() -> None:
    """The worker's way in: the head is parsed already; frames that came behind it are passed along."""
    clock = Clock()
    server = connection(clock)
    ws = WSConnection(ConnectionType.CLIENT)
    method, path, headers = parsed_head(ws.send(Request(host="localhost", target="/time/ws", subprotocols=["mcp"])))
    frame = Connection(ConnectionType.CLIENT).send(TextMessage(data=request(9)))
    outcome = server.upgrade(method, path, headers, clock(), trailing=frame)
    ws.receive_data(outcome.to_send)
    assert isinstance(next(ws.events()), AcceptConnection)
    assert outcome.accepted == ws_handshake.Accepted("time", None, "mcp")
    assert [m["id"] for m in outcome.messages] == [9]


def test_upgrade_of_a_request_head_read_elsewhere_refused() -> None:
    clock = Clock()
    server = connection(clock)
    ws = WSConnection(ConnectionType.CLIENT)
    method, path, headers = parsed_head(ws.send(Request(host="localhost", target="/time/ws", subprotocols=["x"])))
    outcome = server.upgrade(method, path, headers, clock())
    assert outcome.closed and outcome.to_send.startswith(b"HTTP/1.1 400 ")
    assert server.closed


def test_oversized_handshake_is_a_431() -> None:
    clock = Clock()
    server = connection(clock)
    outcome = server.receive(b"GET /time/ws HTTP/1.1\r\nX-Big: " + b"a" * (websocket.MAX_HANDSHAKE_BYTES + 1), clock())
    assert outcome.to_send.startswith(b"HTTP/1.1 431 ")
    assert outcome.closed


# --- the handshake checks, over a fake request ------------------------------------------


def upgrade_headers(**extra: str) -> dict[str, str]:
    headers = {"Host": "127.0.0.1:8000", "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Protocol": "mcp"}
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers


def refused(result: ws_handshake.Accepted | ws_handshake.Refused) -> ws_handshake.Refused:
    assert isinstance(result, ws_handshake.Refused), result
    return result


def test_foreign_host_is_421() -> None:
    result = refused(checks()("GET", "/time/ws", ws_handshake.RequestHeaders.of(upgrade_headers(Host="evil.example"))))
    assert result.status == 421
    assert "evil.example" in result.message["error"]["message"]


def test_foreign_origin_is_403() -> None:
    headers = ws_handshake.RequestHeaders.of(upgrade_headers(Origin="http://evil.example"))
    result = refused(checks()("GET", "/time/ws", headers))
    assert result.status == 403
    assert "Origin" in result.message["error"]["message"]


def test_missing_token_is_401_with_www_authenticate() -> None:
    result = refused(checks(tokens={"ci": TOKEN})("GET", "/time/ws", ws_handshake.RequestHeaders.of(upgrade_headers())))
    assert result.status == 401
    assert dict(result.headers)["WWW-Authenticate"].startswith("Bearer")
    assert result.message["error"]["code"] == errors.UNAUTHORIZED


def test_token_not_allowed_on_this_server_is_403() -> None:
    upgrade = checks(tokens={"ci": TOKEN, "other": OTHER_TOKEN}, servers={"time": Access(allow=("ci",))})
    headers = ws_handshake.RequestHeaders.of(upgrade_headers(Authorization=f"Bearer {OTHER_TOKEN}"))
    assert refused(upgrade("GET", "/time/ws", headers)).status == 403


def test_valid_token_is_accepted_with_its_principal() -> None:
    upgrade = checks(tokens={"ci": TOKEN})
    for header in ({"Authorization": f"Bearer {TOKEN}"}, {"X-API-Key": TOKEN}):
        result = upgrade("GET", "/time/ws", ws_handshake.RequestHeaders.of({**upgrade_headers(), **header}))
        assert result == ws_handshake.Accepted("time", "ci", "mcp")


def test_unknown_server_is_404() -> None:
    result = refused(checks()("GET", "/nope/ws", ws_handshake.RequestHeaders.of(upgrade_headers())))
    assert result.status == 404
    assert "nope" in result.message["error"]["message"]


def test_unknown_server_needs_a_token_first() -> None:
    result = refused(checks(tokens={"ci": TOKEN})("GET", "/nope/ws", ws_handshake.RequestHeaders.of(upgrade_headers())))
    assert result.status == 401


def test_plain_get_on_the_ws_route_is_426() -> None:
    headers = ws_handshake.RequestHeaders.of({"Host": "127.0.0.1:8000"})
    result = refused(checks()("GET", "/time/ws", headers))
    assert result.status == 426
    assert dict(result.headers)["Upgrade"] == "websocket"


@pytest.mark.parametrize("change", [
    {"Sec-WebSocket-Key": ""}, {"Sec-WebSocket-Key": "short"}, {"Connection": "keep-alive"},
])
def test_invalid_upgrade_is_400(change: dict[str, str]) -> None:
    result = refused(checks()("GET", "/time/ws", ws_handshake.RequestHeaders.of({**upgrade_headers(), **change})))
    assert result.status == 400


def test_upgrade_with_another_method_is_400() -> None:
    assert refused(checks()("POST", "/time/ws", ws_handshake.RequestHeaders.of(upgrade_headers()))).status == 400


def test_other_websocket_version_is_426_naming_13() -> None:
    headers = ws_handshake.RequestHeaders.of({**upgrade_headers(), "Sec-WebSocket-Version": "8"})
    result = refused(checks()("GET", "/time/ws", headers))
    assert result.status == 426
    assert dict(result.headers)["Sec-WebSocket-Version"] == "13"


def test_host_is_checked_before_anything_else() -> None:
    headers = ws_handshake.RequestHeaders.of({"Host": "evil.example"})
    assert refused(checks(tokens={"ci": TOKEN})("GET", "/nope/ws", headers)).status == 421


def test_is_upgrade_tells_which_requests_are_websocket() -> None:
    assert ws_handshake.is_websocket_request("GET", "/time/ws", ws_handshake.RequestHeaders.of(upgrade_headers()))
    assert ws_handshake.is_websocket_request("GET", "/time/ws", ws_handshake.RequestHeaders.of({}))
    assert ws_handshake.is_websocket_request("GET", "/time", ws_handshake.RequestHeaders.of(upgrade_headers()))
    assert not ws_handshake.is_websocket_request("GET", "/time", ws_handshake.RequestHeaders.of({}))
    assert not ws_handshake.is_websocket_request("GET", "/time/mcp", ws_handshake.RequestHeaders.of({}))


def test_refusal_encodes_as_an_http_response() -> None:
    result = refused(checks()("GET", "/nope/ws", ws_handshake.RequestHeaders.of(upgrade_headers())))
    head, _, body = result.encode().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    assert json.loads(body) == result.message


# --- messages ------------------------------------------------------------------------


def test_json_rpc_round_trip() -> None:
    clock = Clock()
    client = open_client(clock)
    assert client.send(TextMessage(data=request(1))) == []
    assert client.messages == [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}]
    answer = client.answer(client.server.send_message({"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}))
    assert texts(answer) == [{"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}]


def test_several_messages_in_flight_answered_out_of_order() -> None:
    clock = Clock()
    client = open_client(clock)
    data = b"".join(client.ws.send(TextMessage(data=request(i))) for i in (1, 2, 3))
    client.feed(data)
    assert [m["id"] for m in client.messages] == [1, 2, 3]
    assert client.server.in_flight == {1, 2, 3}
    answers = b"".join(client.server.send_message({"jsonrpc": "2.0", "id": i, "result": {}}) for i in (3, 1, 2))
    assert [m["id"] for m in texts(client.answer(answers))] == [3, 1, 2]
    assert client.server.in_flight == set()


def test_a_second_request_with_an_id_in_flight_is_refused() -> None:
    clock = Clock()
    client = open_client(clock)
    client.send(TextMessage(data=request("a")))
    answer = texts(client.send(TextMessage(data=request("a"))))
    assert answer[0]["id"] == "a" and answer[0]["error"]["code"] == errors.INVALID_REQUEST
    assert "in flight" in answer[0]["error"]["message"]
    assert len(client.messages) == 1


def test_a_cancelled_request_frees_its_id_and_its_late_answer_is_dropped() -> None:
    clock = Clock()
    client = open_client(clock)
    client.send(TextMessage(data=request(4, "tools/call", name="slow")))
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 4}}
    client.send(TextMessage(data=json.dumps(cancel)))
    assert client.messages[-1] == cancel  # passed on, so the call is cancelled upstream
    assert client.server.in_flight == set()
    assert client.server.send_message({"jsonrpc": "2.0", "id": 4, "result": {}}) == b""
    # The id may be used again.
    client.send(TextMessage(data=request(4)))
    assert client.server.in_flight == {4}


def test_notifications_and_client_responses_are_passed_on() -> None:
    clock = Clock()
    client = open_client(clock)
    client.send(TextMessage(data=json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})))
    client.send(TextMessage(data=json.dumps({"jsonrpc": "2.0", "id": 7, "result": {}})))
    assert [m.get("method") for m in client.messages] == ["notifications/initialized", None]
    assert client.server.in_flight == set()


@pytest.mark.parametrize(("text", "code"), [
    ("{not json", errors.PARSE_ERROR),
    ("[1, 2]", errors.INVALID_REQUEST),
    ('{"jsonrpc": "1.0", "id": 1, "method": "x"}', errors.INVALID_REQUEST),
    ('"just a string"', errors.INVALID_REQUEST),
    ('{"jsonrpc": "2.0", "id": 1, "method": "x", "params": []}', errors.INVALID_REQUEST),
    ("[" * 100 + "]" * 100, errors.INVALID_REQUEST),
])
def test_text_that_is_not_one_json_rpc_message_gets_a_json_rpc_error_not_a_close(text: str, code: int) -> None:
    clock = Clock()
    client = open_client(clock)
    events = client.send(TextMessage(data=text))
    assert closes(events) == []
    [answer] = texts(events)
    assert answer["error"]["code"] == code
    assert "time" in answer["error"]["message"]
    assert client.messages == []
    # The connection goes on.
    client.send(TextMessage(data=request(2)))
    assert [m["id"] for m in client.messages] == [2]


def test_fragmented_text_frames_are_reassembled() -> None:
    clock = Clock()
    client = open_client(clock)
    text = request(5, "tools/call", name="get_current_time", arguments={"timezone": "Europe/Paris"})
    client.send(TextMessage(data=text[:10], message_finished=False))
    client.send(TextMessage(data=text[10:30], message_finished=False))
    assert client.messages == []
    client.send(TextMessage(data=text[30:], message_finished=True))
    assert client.messages == [json.loads(text)]


# --- close codes ----------------------------------------------------------------


def test_binary_frame_is_closed_with_1003() -> None:
    clock = Clock()
    client = open_client(clock)
    events = client.send(BytesMessage(data=request(1).encode()))
    assert closes(events) == [websocket.UNSUPPORTED_DATA]
    assert client.messages == []
    # The client answers the close; the connection is then over.
    client.send(CloseConnection(code=websocket.UNSUPPORTED_DATA))
    assert client.outcomes[-1].closed


def test_message_over_max_body_bytes_is_closed_with_1009() -> None:
    clock = Clock()
    client = open_client(clock, max_message_bytes=MIB)
    events = client.send(TextMessage(data=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "x",
                                                      "params": {"blob": "x" * 2 * MIB}})))
    assert closes(events) == [websocket.MESSAGE_TOO_BIG]
    [close] = [e for e in events if isinstance(e, CloseConnection)]
    assert str(MIB) in close.reason
    assert client.messages == []


def test_fragments_over_the_limit_together_are_closed_with_1009() -> None:
    clock = Clock()
    client = open_client(clock, max_message_bytes=1024)
    events: list[Event] = []
    for _ in range(3):
        events += client.send(TextMessage(data="x" * 500, message_finished=False))
    assert closes(events) == [websocket.MESSAGE_TOO_BIG]


def test_message_of_exactly_the_limit_is_served() -> None:
    clock = Clock()
    text = request(1, "x", blob="")
    padded = text[:-3] + " " * (1024 - len(text)) + text[-3:]
    client = open_client(clock, max_message_bytes=len(padded))
    assert closes(client.send(TextMessage(data=padded))) == []
    assert [m["id"] for m in client.messages] == [1]


@pytest.mark.parametrize("code", [websocket.POLICY_VIOLATION, websocket.GATEWAY_ERROR, websocket.GOING_AWAY,
                                  websocket.NORMAL])
def test_gateway_initiated_close_codes(code: int) -> None:
    clock = Clock()
    client = open_client(clock)
    events = client.answer(client.server.close(code, "because"))
    assert closes(events) == [code]
    assert not client.server.closed
    client.send(CloseConnection(code=code))
    assert client.server.closed
    # Nothing more goes out once closed.
    assert client.server.send_message({"jsonrpc": "2.0", "id": 1, "result": {}}) == b""


def test_client_close_is_answered_with_its_code() -> None:
    clock = Clock()
    client = open_client(clock)
    events = client.send(CloseConnection(code=websocket.NORMAL, reason="bye"))
    assert closes(events) == [websocket.NORMAL]
    assert client.outcomes[-1].closed and client.server.closed


def test_client_going_away_without_a_close_ends_the_connection() -> None:
    clock = Clock()
    client = open_client(clock)
    outcome = client.server.receive(b"", clock())
    assert outcome.closed and outcome.to_send == b""


def test_invalid_utf8_text_is_closed_by_the_framing() -> None:
    clock = Clock()
    client = open_client(clock)
    # A masked text frame holding \xff (never UTF-8), built by hand.
    frame = bytes([0x81, 0x81, 0, 0, 0, 0, 0xFF])
    events = client.feed(frame)
    assert closes(events) == [1007]


def test_unexpected_failure_inside_is_a_1011_close_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    client = open_client(clock)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(websocket.jsonrpc, "parse", broken)
    events = client.send(TextMessage(data=request(1)))
    assert closes(events) == [websocket.GATEWAY_ERROR]


# --- keep-alive -------------------------------------------------------------------------


def test_ping_is_answered_with_pong() -> None:
    clock = Clock()
    client = open_client(clock)
    events = client.send(Ping(payload=b"are you there"))
    assert [e.payload for e in events if isinstance(e, Pong)] == [b"are you there"]


def test_idle_connection_is_pinged_and_a_pong_keeps_it() -> None:
    clock = Clock()
    client = open_client(clock, ping_interval=20, dead_peer_timeout=60)
    assert client.server.tick(clock() + 5).to_send == b""
    clock.now += 20
    assert client.server.next_deadline() <= clock.now
    pings = [e for e in client.answer(client.server.tick(clock()).to_send) if isinstance(e, Ping)]
    assert len(pings) == 1
    # No second ping until the interval has passed again.
    assert client.server.tick(clock() + 1).to_send == b""
    clock.now += 10
    client.feed(client.ws.send(pings[0].response()))
    clock.now += 45  # 65 s since the handshake, but the pong was 45 s ago
    outcome = client.server.tick(clock())
    assert not outcome.closed


def test_dead_peer_is_closed_after_the_timeout() -> None:
    clock = Clock()
    client = open_client(clock, ping_interval=20, dead_peer_timeout=60)
    for _ in range(5):
        clock.now += 10
        outcome = client.server.tick(clock())
        assert not outcome.closed
    clock.now += 10
    outcome = client.server.tick(clock())
    assert outcome.closed
    assert closes(client.answer(outcome.to_send)) == [websocket.GATEWAY_ERROR]
    assert client.server.closed


def test_peer_that_never_answers_our_close_is_dropped() -> None:
    clock = Clock()
    client = open_client(clock, dead_peer_timeout=60)
    client.server.close(websocket.GOING_AWAY, "shutting down")
    clock.now += websocket.CLOSE_TIMEOUT
    assert client.server.tick(clock()).closed


def test_handshake_that_never_completes_is_dropped() -> None:
    clock = Clock()
    server = connection(clock, dead_peer_timeout=60)
    server.receive(b"GET /time/ws HTTP/1.1\r\n", clock())
    clock.now += 60
    assert server.tick(clock()).closed


# --- hostile input ---------------------------------------------------------------------


def check_answers(client: Client, data: bytes) -> list[Event]:
    """Every byte the gateway sends is a valid frame for the client: JSON-RPC errors, pongs, a close."""
    events = client.answer(data)
    for event in events:
        assert isinstance(event, (TextMessage, Pong, Ping, CloseConnection)), event
        if isinstance(event, TextMessage):
            assert "error" in json.loads(event.data) or "id" in json.loads(event.data)
    return events


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_random_bytes_after_a_valid_handshake_never_raise(chunks: list[bytes]) -> None:
    clock = Clock()
    client = open_client(clock, max_message_bytes=4096)
    for chunk in chunks:
        outcome = client.server.receive(chunk, clock())
        check_answers(client, outcome.to_send)
        if outcome.closed:
            return
    # Whatever is pending, the connection ends: by a close or by the timeout.
    clock.now += 10_000
    final = client.server.tick(clock())
    check_answers(client, final.to_send)
    assert final.closed


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_text_frames_get_a_message_or_a_json_rpc_error(text: str) -> None:
    clock = Clock()
    client = open_client(clock)
    outcome = client.server.receive(client.ws.send(TextMessage(data=text)), clock())
    events = check_answers(client, outcome.to_send)
    errors_sent = [m for m in texts(events) if "error" in m]
    assert len(outcome.messages) + len(errors_sent) == 1  # each text frame: served, or answered with an error
    assert closes(events) == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_instead_of_a_handshake_never_raise(data: bytes) -> None:
    clock = Clock()
    server = connection(clock)
    outcome = server.receive(data, clock())
    assert outcome.accepted is None
    if outcome.to_send:
        assert outcome.to_send.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 "))
        assert outcome.closed


# --- eras ---------------------------------------------------------------------------------


HELLO = protocol.ServerHello(protocol.LEGACY, "2025-06-18", {"tools": {}}, {"name": "time", "version": "1"})


def test_handshake_era_client_initializes_the_connection_as_its_session() -> None:
    session = websocket.WebSocketSession("time", None)
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "c", "version": "1"}}}
    assert session.is_initialize(init)
    answer = session.initialize(init, HELLO)
    assert answer == {"jsonrpc": "2.0", "id": 0, "result": protocol.initialize_result(HELLO, "2025-06-18")}
    assert session.protocol_version == "2025-06-18"
    context = session.context(json.loads(request(1)))
    assert context == protocol.ClientContext(protocol.LEGACY, "2025-06-18")


def test_initialize_over_the_socket_then_requests_of_that_version() -> None:
    """What the event loop will do: answer initialize from the connection's session, then serve in its era."""
    clock = Clock()
    client = open_client(clock)
    client.send(TextMessage(data=json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                                             "params": {"protocolVersion": "2025-03-26", "capabilities": {}}})))
    [init] = client.messages
    session = client.server.session
    assert session is not None and session.is_initialize(init)
    [answer] = texts(client.answer(client.server.send_message(session.initialize(init, HELLO))))
    assert answer["id"] == 0 and answer["result"]["protocolVersion"] == "2025-03-26"
    assert answer["result"]["serverInfo"] == {"name": "time", "version": "1"}
    assert client.server.in_flight == set()
    client.send(TextMessage(data=request(1)))
    assert session.context(client.messages[-1]) == protocol.ClientContext(protocol.LEGACY, "2025-03-26")
    # A 2026-07-28 request on the same connection speaks for itself.
    client.send(TextMessage(data=json.dumps(modern(2))))
    assert session.context(client.messages[-1]).era == protocol.MODERN


def test_initialize_asking_for_an_unknown_version_gets_the_latest_legacy() -> None:
    session = websocket.WebSocketSession("time", None)
    session.initialize({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "1999-01-01"}},
                       HELLO)
    assert session.protocol_version == protocol.LATEST_LEGACY


def test_legacy_request_before_initialize_is_the_default_legacy_version() -> None:
    session = websocket.WebSocketSession("time", None)
    assert session.context(json.loads(request(1))) == protocol.ClientContext(protocol.LEGACY, protocol.DEFAULT_LEGACY)


def modern(rpc_id: Any, method: str = "tools/list", version: Any = protocol.LATEST_MODERN, **params: Any) -> dict[str, Any]:
    meta = {protocol.META_PROTOCOL_VERSION: version, protocol.META_CLIENT_CAPABILITIES: {},
            protocol.META_CLIENT_INFO: {"name": "c", "version": "1"}}
    return {"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": {**params, "_meta": meta}}


def test_modern_client_sends_per_request_meta() -> None:
    session = websocket.WebSocketSession("time", "ci")
    assert session.context(modern(1)) == protocol.ClientContext(protocol.MODERN, protocol.LATEST_MODERN)
    assert session.context(modern(2, "tools/call", name="get_current_time")).era == protocol.MODERN
    assert session.protocol_version is None


def test_modern_request_with_unsupported_version_is_refused_as_over_http() -> None:
    session = websocket.WebSocketSession("time", None)
    with pytest.raises(errors.UnsupportedProtocolVersion):
        session.context(modern(1, version="2030-01-01"))


def test_modern_request_with_bad_meta_types_is_invalid_params() -> None:
    session = websocket.WebSocketSession("time", None)
    with pytest.raises(errors.InvalidParams):
        session.context(modern(1, version=5))
    with pytest.raises(errors.InvalidParams):
        session.context({"jsonrpc": "2.0", "id": 1, "method": "x", "params": {"_meta": []}})


def test_modern_tool_call_with_a_name_that_is_no_string_is_invalid_params() -> None:
    session = websocket.WebSocketSession("time", None)
    with pytest.raises(errors.InvalidParams, match="name"):
        session.context(modern(1, "tools/call", name=5))


def test_responses_have_no_era_of_their_own() -> None:
    session = websocket.WebSocketSession("time", None)
    assert session.context({"jsonrpc": "2.0", "id": 1, "result": {}}).era == protocol.LEGACY


# --- settings -----------------------------------------------------------------------


def test_ws_settings_are_declared_with_defaults() -> None:
    assert ws_settings.GATEWAY.default("ws_ping_interval") == 20.0
    assert ws_settings.GATEWAY.default("ws_dead_peer_timeout") == 60.0
    assert registry.GatewaySettings().ws_ping_interval == 20.0


def test_connection_from_settings_uses_the_registry_values() -> None:
    clock = Clock()
    values = registry.GatewaySettings(max_body_bytes=2048, ws_ping_interval=5.0, ws_dead_peer_timeout=9.0)
    server = websocket.WebSocketConnection.from_settings(checks(), values, now=clock())
    assert (server.max_message_bytes, server.ping_interval, server.dead_peer_timeout) == (2048, 5.0, 9.0)


# --- nginx ----------------------------------------------------------------------------------


def test_nginx_passes_websocket_upgrades_and_keeps_keepalive_for_the_rest() -> None:
    """conf/nginx.conf: the Upgrade/Connection map (upgrade when the client asks, "" otherwise, so HTTP
    requests keep their keep-alive connection to gunicorn), HTTP/1.1, and a read timeout the gateway's
    pings stay well inside."""
    text = (ROOT / "conf" / "nginx.conf").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    mapping = re.search(r"map\s+\$http_upgrade\s+\$connection_upgrade\s*\{([^}]*)\}", code)
    assert mapping is not None, "no `map $http_upgrade $connection_upgrade` block"
    entries = dict(re.findall(r"(\S+)\s+(\S+);", mapping[1]))
    assert entries == {"default": "upgrade", "''": "''"}
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade;", code)
    assert re.search(r"proxy_set_header\s+Connection\s+\$connection_upgrade;", code)
    assert not re.search(r'proxy_set_header\s+Connection\s+"";', code)
    assert re.search(r"proxy_http_version\s+1\.1;", code)
    read_timeout = re.search(r"proxy_read_timeout\s+(\d+)s;", code)
    assert read_timeout is not None
    assert int(read_timeout[1]) >= 10 * ws_settings.GATEWAY.default("ws_ping_interval")


def test_an_open_connection_keeps_only_the_strings_of_its_upgrade_request() -> None:
    # Issue 15: an idle WebSocket must not keep gunicorn's request objects alive through its environ.
    body, sock = object(), object()
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/time/ws", "SCRIPT_NAME": "", "REMOTE_ADDR": "127.0.0.1",
               "QUERY_STRING": "", "HTTP_HOST": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "10.0.0.1",
               "HTTP_AUTHORIZATION": "Bearer t", "wsgi.input": body, "gunicorn.socket": sock, "RAW_URI": "/time/ws"}
    kept = ws_serving.kept_environ(environ)
    assert body not in kept.values() and sock not in kept.values()
    assert all(isinstance(value, str) for value in kept.values())
    exchange = Exchange.begin(kept, server_id="time", path=kept["PATH_INFO"])
    assert (exchange.method, exchange.path, exchange.peer) == ("GET", "/time/ws", "127.0.0.1")
    assert exchange.headers.get("X-Forwarded-For") == "10.0.0.1"
    assert exchange.headers.get("Authorization") == "Bearer t"
