"""The HTTP surface through Flask's test client, in front of real stdio servers.

Every error a client can get is a JSON-RPC error object naming the server
and the problem; the 2026-07-28 header rules and the legacy session rules
are the spec's.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import request

from gateway import errors, post

from .harness import TIME_SERVER, rpc, server_command

MODERN_HEADERS = {"MCP-Protocol-Version": "2026-07-28", "Accept": "application/json, text/event-stream"}
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


@pytest.fixture
def client(make_app: Any) -> Any:
    app = make_app(
        {
            "time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 2},
            "legacy": {"type": "stdio", "command": server_command("legacy_server.py"), "pool_size": 1},
            "sdk": {"type": "stdio", "command": server_command("sdk_server.py", "stdio"), "pool_size": 1},
            "broken": {"type": "stdio", "command": server_command("faulty_server.py", "exit-at-start")},
            "gh": {"type": "http", "instances": [{"endpoint": "http://127.0.0.1:9"}]},
        },
        {"max_body_bytes": 4096},
    )
    return app.test_client()


def modern(client: Any, server: str, method: str, params: dict[str, Any] | None = None, **headers: str) -> Any:
    body = rpc(method, {**(params or {}), "_meta": ENVELOPE})
    sent = {**MODERN_HEADERS, "Mcp-Method": method, **headers}
    if params and "name" in params and method in ("tools/call", "prompts/get"):
        sent.setdefault("Mcp-Name", params["name"])
    return client.post(f"/{server}/mcp", json=body, headers=sent)


def error_of(response: Any) -> dict[str, Any]:
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["jsonrpc"] == "2.0" and "error" in body, body
    error: dict[str, Any] = body["error"]
    return error


# --- curl-style requests ------------------------------------------------------


def test_plain_post_without_headers_answers_json(client: Any) -> None:
    response = client.post("/time/mcp", data=json.dumps(rpc("tools/list")))
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert {t["name"] for t in response.get_json()["result"]["tools"]} == {"get_current_time", "convert_time"}


def test_any_path_after_the_server_id_reaches_the_server(client: Any) -> None:
    for path in ("/time", "/time/mcp", "/time/some/deeper/path"):
        assert "result" in client.post(path, data=json.dumps(rpc("tools/list"))).get_json()


def test_unknown_server_is_404_with_a_jsonrpc_error(client: Any) -> None:
    response = client.post("/nope/mcp", data=json.dumps(rpc("tools/list")))
    assert response.status_code == 404
    assert error_of(response)["message"] == "no MCP server 'nope' in this gateway's registry"


def test_body_that_is_not_json_is_a_parse_error(client: Any) -> None:
    response = client.post("/time/mcp", data="{not json")
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == -32700 and "server 'time'" in error["message"]


@pytest.mark.parametrize("body, problem", [
    ({"id": 1, "method": "x"}, "not a JSON-RPC 2.0 message"),
    ([rpc("tools/list")], "batches are not supported"),
    ({"jsonrpc": "2.0", "id": 1}, "neither \"method\" nor"),
    ({"jsonrpc": "2.0", "id": None, "method": "tools/list"}, "\"id\" must be"),
    ({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": [1]}, "\"params\" must be an object"),
    ("just a string", "not a JSON-RPC 2.0 message"),
])
def test_json_that_is_not_a_jsonrpc_message_is_invalid_request(client: Any, body: Any, problem: str) -> None:
    response = client.post("/time/mcp", data=json.dumps(body))
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == -32600 and problem in error["message"] and "server 'time'" in error["message"]


def test_body_over_the_limit_is_413(client: Any) -> None:
    response = client.post("/time/mcp", data=json.dumps(rpc("tools/list", {"pad": "x" * 5000})))
    assert response.status_code == 413
    assert error_of(response)["message"] == "server 'time': request body is over the gateway's limit of 4096 bytes"


def test_the_post_route_runs_no_flask_request_hook(make_app: Any) -> None:
    # POST, every MCP message, is served by gateway/post.py without Flask's request
    # machinery (the hot path): a Flask hook added for all routes sees the other routes only.
    app = make_app({"time": {"type": "stdio", "command": TIME_SERVER, "pool_min": 0}})
    seen: list[str] = []
    app.before_request(lambda: seen.append(request.path))
    client = app.test_client()
    assert client.post("/time/mcp", json=rpc("ping")).get_json()["result"] == {}
    assert client.get("/healthz").status_code == 200
    assert seen == ["/healthz"]


def test_an_unexpected_failure_on_the_post_route_is_a_jsonrpc_500(client: Any, monkeypatch: Any,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(post, "serve", broken)
    response = client.post("/time/mcp", json=rpc("tools/list"))
    assert response.status_code == 500
    assert error_of(response)["message"] == "internal gateway error serving server 'time': RuntimeError"
    assert "unhandled error on POST /time/mcp" in caplog.text and "a bug" in caplog.text


def test_unrouted_paths_answer_jsonrpc_errors_too(client: Any) -> None:
    response = client.put("/time/mcp")
    assert response.status_code == 405 and error_of(response)["code"] == -32600


def test_notification_is_accepted_with_202_and_no_body(client: Any) -> None:
    response = client.post("/time/mcp", data=json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    assert response.status_code == 202 and response.data == b""


# --- 2026-07-28 clients -------------------------------------------------------


def test_modern_request_with_matching_headers_is_served(client: Any) -> None:
    response = modern(client, "time", "tools/call", {"name": "get_current_time", "arguments": {"timezone": "UTC"}})
    assert response.status_code == 200
    assert response.get_json()["result"]["structuredContent"]["timezone"] == "UTC"


def test_modern_header_mismatches_are_400_with_32020(client: Any) -> None:
    call = {"name": "get_current_time", "arguments": {"timezone": "UTC"}}
    cases = [
        (modern(client, "time", "tools/list", **{"Mcp-Method": "tools/call"}), "Mcp-Method header value 'tools/call' does not match body value 'tools/list'"),
        (modern(client, "time", "tools/call", call, **{"Mcp-Name": "convert_time"}), "Mcp-Name header value 'convert_time' does not match body value 'get_current_time'"),
        (client.post("/time/mcp", json=rpc("tools/list", {"_meta": ENVELOPE}), headers=MODERN_HEADERS), "the Mcp-Method header is required"),
        (client.post("/time/mcp", json=rpc("tools/list", {"_meta": ENVELOPE}), headers={"Mcp-Method": "tools/list"}), "MCP-Protocol-Version header is missing"),
        (client.post("/time/mcp", json=rpc("tools/list"), headers={**MODERN_HEADERS, "Mcp-Method": "tools/list"}), "does not match params._meta"),
    ]
    for response, message in cases:
        assert response.status_code == 400
        error = error_of(response)
        assert error["code"] == errors.HEADER_MISMATCH and message in error["message"], error


def test_base64_encoded_mcp_name_is_decoded_before_comparing(client: Any) -> None:
    response = modern(client, "time", "tools/call", {"name": "get_current_time", "arguments": {"timezone": "UTC"}},
                      **{"Mcp-Name": "=?base64?Z2V0X2N1cnJlbnRfdGltZQ==?="})
    assert response.status_code == 200 and "result" in response.get_json()


def test_unsupported_protocol_version_is_400_with_supported_list(client: Any) -> None:
    response = client.post("/time/mcp", json=rpc("tools/list"), headers={"MCP-Protocol-Version": "2099-01-01"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == errors.UNSUPPORTED_PROTOCOL_VERSION
    assert "2026-07-28" in error["data"]["supported"] and error["data"]["requested"] == "2099-01-01"


def test_server_discover_is_answered_from_what_the_process_reported(client: Any) -> None:
    result = modern(client, "legacy", "server/discover").get_json()["result"]
    assert result["supportedVersions"] == ["2026-07-28"] and result["resultType"] == "complete"
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "legacy-server"
    assert "tools" in result["capabilities"]


def test_sse_is_chosen_when_the_server_sends_notifications_and_the_client_accepts_it(client: Any) -> None:
    params = {"name": "slow", "arguments": {"steps": 2}, "_meta": {**ENVELOPE, "progressToken": "p"}}
    headers = {**MODERN_HEADERS, "Mcp-Method": "tools/call", "Mcp-Name": "slow"}
    response = client.post("/sdk/mcp", json=rpc("tools/call", params, request_id=7), headers=headers)
    assert response.mimetype == "text/event-stream" and response.headers["X-Accel-Buffering"] == "no"
    events = [json.loads(chunk.split("data: ", 1)[1]) for chunk in response.get_data(as_text=True).split("\n\n") if chunk]
    assert [e.get("method") for e in events[:-1]] == ["notifications/progress"] * 2
    assert events[-1]["id"] == 7 and events[-1]["result"]["content"][0]["text"] == "done"
    # The same call from a client that accepts only JSON: the final response alone.
    response = client.post("/sdk/mcp", json=rpc("tools/call", params, request_id=8), headers={**headers, "Accept": "application/json"})
    assert response.mimetype == "application/json" and response.get_json()["result"]["content"][0]["text"] == "done"


# --- handshake-era clients ----------------------------------------------------


def initialize(client: Any, server: str = "time", version: str = "2025-06-18") -> Any:
    params = {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    return client.post(f"/{server}/mcp", json=rpc("initialize", params))


def test_initialize_is_answered_by_the_gateway_with_a_signed_session(client: Any) -> None:
    response = initialize(client, version="2025-06-18")
    result = response.get_json()["result"]
    assert result["protocolVersion"] == "2025-06-18" and result["serverInfo"]["name"] == "mcp-time"
    assert "tools" in result["capabilities"]
    session = response.headers["Mcp-Session-Id"]
    follow = client.post("/time/mcp", json=rpc("tools/list", request_id=2),
                         headers={"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-06-18"})
    assert follow.status_code == 200 and len(follow.get_json()["result"]["tools"]) == 2


def test_unknown_requested_version_gets_the_latest_legacy_one(client: Any) -> None:
    assert initialize(client, version="1999-01-01").get_json()["result"]["protocolVersion"] == "2025-11-25"


@pytest.mark.parametrize("token", ["made-up", "eyJzIjoidGltZSJ9.AAAA", ""])
def test_session_id_the_gateway_did_not_mint_is_404(client: Any, token: str) -> None:
    response = client.post("/time/mcp", json=rpc("tools/list"), headers={"Mcp-Session-Id": token})
    assert response.status_code == 404
    assert error_of(response)["code"] == errors.SESSION_NOT_FOUND


def test_session_of_one_server_is_not_valid_on_another(client: Any) -> None:
    session = initialize(client, "time").headers["Mcp-Session-Id"]
    response = client.post("/legacy/mcp", json=rpc("tools/list"), headers={"Mcp-Session-Id": session})
    assert response.status_code == 404 and "server 'legacy'" in error_of(response)["message"]


def test_ping_get_and_delete_in_a_session(client: Any) -> None:
    session = {"Mcp-Session-Id": initialize(client).headers["Mcp-Session-Id"]}
    assert client.post("/time/mcp", json=rpc("ping"), headers=session).get_json() == {"jsonrpc": "2.0", "id": 1, "result": {}}
    get = client.get("/time/mcp", headers=session)
    assert get.status_code == 405 and get.headers["Allow"] == "POST, DELETE" and error_of(get)["message"]
    assert client.delete("/time/mcp", headers=session).status_code == 204
    assert client.delete("/time/mcp", headers={"Mcp-Session-Id": "forged"}).status_code == 404
    assert client.delete("/time/mcp").status_code == 400


def test_modern_client_ignores_a_stray_session_header(client: Any) -> None:
    response = modern(client, "time", "tools/list", **{"Mcp-Session-Id": "whatever"})
    assert response.status_code == 200


# --- capacity and failures ----------------------------------------------------


def test_server_that_cannot_start_answers_503_with_retry_after(client: Any) -> None:
    response = client.post("/broken/mcp", json=rpc("tools/list"))
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    error = error_of(response)
    assert "server 'broken'" in error["message"] and "exited with code 2" in error["message"]
    status = client.get("/status").get_json()["servers"]["broken"]
    assert status["healthy"] is False and status["spawn_failures"] >= 1 and "exited with code 2" in status["last_error"]["message"]


def test_unreachable_http_instance_is_502_naming_server_instance_and_cause(client: Any) -> None:
    response = client.post("/gh/mcp", json=rpc("tools/list"))
    assert response.status_code == 502
    assert error_of(response)["message"] == (
        "server 'gh': instance http://127.0.0.1:9 is unreachable: [Errno 111] Connection refused"
    )


def test_http_template_is_served_by_processes_the_gateway_starts(make_app: Any) -> None:
    client = make_app({"tpl": {"type": "template", "template_name": "demo", "transport": "http"}}).test_client()
    call = rpc("tools/call", {"name": "say_hello", "arguments": {"name": "Ada"}})
    response = client.post("/tpl/mcp", json=call)
    assert response.status_code == 200, response.data
    assert response.get_json()["result"]["content"][0]["text"] == "Hello, Ada! Greetings from the MCP gateway demo."
    status = client.get("/status").get_json()["servers"]["tpl"]
    assert status["type"] == "http" and status["template"] == "demo" and len(status["instances"]) == 1


def test_status_and_liveness(client: Any) -> None:
    assert client.get("/healthz").get_json()["status"] == "ok"
    client.post("/time/mcp", json=rpc("tools/list"))
    time_status = client.get("/status").get_json()["servers"]["time"]
    assert time_status["alive"] >= 1 and time_status["busy"] == 0 and time_status["waiting"] == 0
    assert time_status["restarts"] == 0 and time_status["last_error"] is None and time_status["era"] == "2026-07-28"
