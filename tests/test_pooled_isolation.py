"""A pooled stdio process is shared by unrelated clients: each gets only its own notifications.

Real gunicorn (one worker, so both clients meet the same pool) in front of
tests/servers/noisy_server.py with pool_size 1: client A's call leaves work
behind in the process that speaks while client B holds it. B must receive
none of it, although B even chose the same progress token as A; A's own
progress and the log it asked for reach A.
"""

from __future__ import annotations

import json
from typing import Any

import requests

from .harness import Gunicorn, server_command

LOG_LEVEL = "io.modelcontextprotocol/logLevel"
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
HEADERS = {"MCP-Protocol-Version": "2026-07-28", "Accept": "application/json, text/event-stream",
           "Content-Type": "application/json", "Mcp-Method": "tools/call"}


def call_tool(gateway: Gunicorn, name: str, request_id: int, meta: dict[str, Any]) -> list[dict[str, Any]]:
    body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": name, "arguments": {}, "_meta": {**ENVELOPE, **meta}}}
    response = requests.post(f"{gateway.url}/noisy/mcp", data=json.dumps(body), headers={**HEADERS, "Mcp-Name": name},
                             timeout=30)
    assert response.status_code == 200, response.text
    if not response.headers["Content-Type"].startswith("text/event-stream"):
        return [response.json()]
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ") and line[6:]]


def metric(gateway: Gunicorn, name: str) -> dict[str, float]:
    found = {}
    for line in requests.get(f"{gateway.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            found[labels] = float(value)
    return found


def test_a_pooled_process_gives_each_client_only_its_own_notifications(gunicorn: Any) -> None:
    gateway = gunicorn({"noisy": {"type": "stdio", "command": server_command("noisy_server.py"),
                                  "pool_size": 1, "pool_min": 1, "request_timeout": 30}}, workers=1)
    # Client A asks for progress and for logs, and its call leaves work behind.
    a_events = call_tool(gateway, "noisy", 1, {"progressToken": 1, LOG_LEVEL: "debug"})
    assert a_events[-1]["result"]["content"][0]["text"] == "noisy done"
    a_notes = a_events[:-1]
    assert [n["params"]["progressToken"] for n in a_notes if n["method"] == "notifications/progress"] == [1, 1]
    assert [n["params"]["data"] for n in a_notes if n["method"] == "notifications/message"] == ["own log of the noisy call"]
    assert {n["method"] for n in a_notes} == {"notifications/progress", "notifications/message"}

    # Client B, on the same process next, with the same progress token (SDK clients
    # number their tokens alike) and without asking for logs.
    b_events = call_tool(gateway, "listen", 1, {"progressToken": 1})
    assert b_events[-1]["result"]["content"][0]["text"] == "heard the leftovers", "A's leftovers did not run during B's call"
    b_notes = b_events[:-1]
    assert [(n["method"], n["params"]["progressToken"], n["params"]["message"]) for n in b_notes] == [
        ("notifications/progress", 1, "own step of listen")], b_notes

    dropped = metric(gateway, "mcp_gateway_notifications_dropped_total")
    by_reason = {labels.split('reason="')[1].split('"')[0]: value for labels, value in dropped.items() if 'server="noisy"' in labels}
    assert by_reason == {"foreign_progress": 2.0, "unrequested_log": 1.0, "not_request_scoped": 4.0}, dropped


# --- the rule, unit by unit (gateway/scope.py) ------------------------------------

def note(method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def test_a_request_without_a_token_or_meta_is_sent_as_it_is() -> None:
    from gateway import protocol, scope

    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": dict(ENVELOPE)}}
    outgoing, request_scope = scope.scope(message, protocol.MODERN)
    assert outgoing is message, "no copy: the bytes can pass through untouched"
    assert request_scope.drop_reason(note("notifications/progress", progressToken=1, progress=1)) == scope.FOREIGN_PROGRESS


def test_progress_reaches_the_client_only_under_the_token_the_gateway_sent() -> None:
    from gateway import protocol, scope

    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x", "_meta": {"progressToken": 7}}}
    outgoing, request_scope = scope.scope(message, protocol.LEGACY)
    sent = outgoing["params"]["_meta"]["progressToken"]
    assert isinstance(sent, str) and sent.startswith(scope.PROGRESS_TOKEN_PREFIX)
    assert message["params"]["_meta"]["progressToken"] == 7, "the client's message is not changed in place"
    assert scope.scope(message, protocol.LEGACY)[0]["params"]["_meta"]["progressToken"] != sent, "unique per request"
    mine = note("notifications/progress", progressToken=sent, progress=1)
    assert request_scope.drop_reason(mine) is None
    assert request_scope.for_client(mine)["params"] == {"progressToken": 7, "progress": 1}
    assert request_scope.drop_reason(note("notifications/progress", progressToken=7, progress=1)) == scope.FOREIGN_PROGRESS


def test_log_messages_reach_only_a_2026_request_that_asked_for_that_level() -> None:
    from gateway import protocol, scope

    asked = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"_meta": {**ENVELOPE, LOG_LEVEL: "warning"}}}
    _, modern = scope.scope(asked, protocol.MODERN)
    assert modern.drop_reason(note("notifications/message", level="error", data="x")) is None
    assert modern.drop_reason(note("notifications/message", level="info", data="x")) == scope.UNREQUESTED_LOG
    _, legacy = scope.scope(asked, protocol.LEGACY)  # a handshake-era process is filtered by the level given
    assert legacy.drop_reason(note("notifications/message", level="error", data="x")) == scope.UNREQUESTED_LOG
    _, filtered = scope.scope({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, protocol.LEGACY, "warning")
    assert filtered.drop_reason(note("notifications/message", level="error", data="x")) is None
    assert filtered.drop_reason(note("notifications/message", level="info", data="x")) == scope.UNREQUESTED_LOG
    assert scope.scope(asked, protocol.LEGACY, "loud")[1].drop_reason(
        note("notifications/message", level="emergency", data="x")) == scope.UNREQUESTED_LOG
    _, unasked = scope.scope({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"_meta": ENVELOPE}}, protocol.MODERN)
    assert unasked.drop_reason(note("notifications/message", level="emergency", data="x")) == scope.UNREQUESTED_LOG
    for method in ("notifications/tools/list_changed", "notifications/resources/updated", "notifications/x"):
        assert modern.drop_reason(note(method)) == scope.NOT_REQUEST_SCOPED


def test_a_session_log_level_is_kept_by_revocation_id_until_the_session_expires(tmp_path: Any) -> None:
    from gateway.log_levels import LogLevels

    for levels in (LogLevels(tmp_path / "levels"), LogLevels(None)):
        assert levels.get("a" * 32) is None
        levels.set("a" * 32, "info", expires_at=100.0)
        levels.set("b" * 32, "error", expires_at=300.0)
        levels.set("a" * 32, "debug", expires_at=100.0)  # set again: the new level
        assert (levels.get("a" * 32), levels.get("b" * 32)) == ("debug", "error")
        assert levels.prune(200.0) == 1
        assert (levels.get("a" * 32), levels.get("b" * 32)) == (None, "error")
    (tmp_path / "levels" / ("c" * 32)).write_text("loud")  # not a level: read as none
    assert LogLevels(tmp_path / "levels").get("c" * 32) is None
