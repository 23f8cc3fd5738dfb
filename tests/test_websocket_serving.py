"""MCP over WebSocket from a running gateway: real gunicorn (2 workers x 4 threads) in front of stdio servers,
driven by the `websockets` library's sync client, as an MCP client's WebSocket transport would."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from .harness import (
    CURL_HEADERS,
    TIME_SERVER,
    Gunicorn,
    rpc,
    server_command,
    wait_for,
    write_registry,
    ws_ask,
    ws_initialize,
)

TOKEN = "ws-token-" + "x" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODERN_META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
SERVERS = {
    "time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 2},
    "sdk": {"type": "stdio", "command": server_command("sdk_server.py", "stdio"), "pool_size": 2},
}
SETTINGS = {"auth": {"tokens": {"ci": TOKEN}}, "max_body_bytes": 65536}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    folder = tmp_path_factory.mktemp("ws")
    with Gunicorn(write_registry(folder, SERVERS, SETTINGS), workers=2, threads=4).serving() as running:
        yield running


def ws_url(gateway: Gunicorn, server: str) -> str:
    return f"ws://127.0.0.1:{gateway.port}/{server}/ws"


def open_ws(gateway: Gunicorn, server: str = "time", **options: Any) -> ClientConnection:
    return connect(ws_url(gateway, server), subprotocols=["mcp"], additional_headers=AUTH,  # type: ignore[list-item]
                   open_timeout=10, **options)




def close_code(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed):
        for _ in range(100):
            ws.recv(timeout=15)
    return ws.close_code


def test_handshake_era_initialize_then_tools(gateway: Gunicorn) -> None:
    with open_ws(gateway) as ws:
        assert ws.subprotocol == "mcp"
        answer = ws_initialize(ws)
        assert answer["result"]["protocolVersion"] == "2025-06-18", answer
        assert answer["result"]["serverInfo"]["name"]
        tools = ws_ask(ws, rpc("tools/list", {}, request_id=1))[-1]
        assert "get_current_time" in {tool["name"] for tool in tools["result"]["tools"]}, tools
        called = ws_ask(ws, rpc("tools/call", {"name": "get_current_time", "arguments": {"timezone": "UTC"}}, request_id=2))[-1]
        assert "UTC" in called["result"]["content"][0]["text"], called


def test_a_2026_client_names_its_version_per_request(gateway: Gunicorn) -> None:
    with open_ws(gateway) as ws:
        called = ws_ask(ws, rpc("tools/call", {"name": "get_current_time", "arguments": {"timezone": "UTC"},
                                            "_meta": MODERN_META}, request_id="a"))[-1]
        assert "UTC" in called["result"]["content"][0]["text"], called


def test_progress_arrives_before_the_result_and_two_requests_are_answered_by_id(gateway: Gunicorn) -> None:
    with open_ws(gateway, "sdk") as ws:
        ws_initialize(ws)
        slow = rpc("tools/call", {"name": "slow", "arguments": {"steps": 3}, "_meta": {"progressToken": "p1"}}, request_id=7)
        quick = rpc("tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}}, request_id=8)
        ws.send(json.dumps(slow))
        ws.send(json.dumps(quick))
        seen: list[dict[str, Any]] = []
        while not {7, 8} <= {m.get("id") for m in seen if "method" not in m}:
            seen.append(json.loads(ws.recv(timeout=30)))
        order = [m.get("method") or f"answer {m['id']}" for m in seen]
        progress = [i for i, m in enumerate(seen) if m.get("method") == "notifications/progress"]
        assert len(progress) == 3, order
        assert max(progress) < order.index("answer 7"), order
        answers = {m["id"]: m for m in seen if "method" not in m}
        assert answers[7]["result"]["content"][0]["text"] == "done", answers
        assert answers[8]["result"]["content"][0]["text"] == "5", answers


def test_a_flood_of_requests_on_one_connection_is_refused_past_its_share(tmp_path: Path) -> None:
    # A client may not queue unbounded work: past MAX_SERVING requests being served for one
    # connection, the next ones are answered at once with an overload error; every request gets
    # exactly one answer, and the connection goes on.
    from gateway.ws_serving import MAX_SERVING

    count = MAX_SERVING + 8
    # Room to queue every request it takes, so none is refused by the server's bulkhead or pool instead.
    roomy = {"sdk": {**SERVERS["sdk"], "pool_size": 4, "max_waiting": 100, "wait_timeout": 60,
                     "max_concurrent": 4, "max_queued": 100, "queue_timeout": 60}}
    with Gunicorn(write_registry(tmp_path, roomy, SETTINGS), workers=1, threads=4).serving() as gateway, \
            open_ws(gateway, "sdk") as ws:
        ws_initialize(ws)
        for n in range(count):
            ws.send(json.dumps(rpc("tools/call", {"name": "sleep", "arguments": {"seconds": 1}}, request_id=n)))
        answers: dict[int, dict[str, Any]] = {}
        while len(answers) < count:
            got = json.loads(ws.recv(timeout=60))
            assert got["id"] not in answers, got
            answers[got["id"]] = got
        refused = [a for a in answers.values() if "in progress on this WebSocket connection" in str(a.get("error"))]
        assert len(refused) == 8, answers
        assert all(a["error"]["code"] == -32002 for a in refused)
        assert all(a.get("result", {}).get("content") for a in answers.values() if a not in refused), answers
        after = ws_ask(ws, rpc("tools/call", {"name": "add", "arguments": {"a": 1, "b": 2}}, request_id="after"))[-1]
        assert after["result"]["content"][0]["text"] == "3", after


def test_a_binary_frame_closes_with_1003(gateway: Gunicorn) -> None:
    with open_ws(gateway) as ws:
        ws.send(b"\x00\x01")
        assert close_code(ws) == 1003


def test_an_oversized_message_closes_with_1009(gateway: Gunicorn) -> None:
    with open_ws(gateway, max_size=None) as ws:
        ws.send(json.dumps(rpc("tools/list", {"pad": "x" * 70000})))
        assert close_code(ws) == 1009


def test_a_text_frame_that_is_not_json_rpc_gets_an_error_and_the_connection_goes_on(gateway: Gunicorn) -> None:
    with open_ws(gateway) as ws:
        ws.send("{not json")
        error = json.loads(ws.recv(timeout=10))
        assert error["error"]["code"] == -32700, error
        assert "result" in ws_ask(ws, rpc("tools/list", {}, request_id=3))[-1]


@pytest.mark.parametrize(("headers", "status"), [
    ({"host": "evil.example"}, 421),  # the URL's host, on a socket to the gateway
    ({"Origin": "http://evil.example"}, 403),
    ({}, 401),  # no token
])
def test_refusals_are_http_errors_before_the_upgrade(gateway: Gunicorn, headers: dict[str, str], status: int) -> None:
    sent = {**AUTH, **headers} if headers else {}
    url = ws_url(gateway, "time")
    host = sent.pop("host", None)
    if host is not None:
        url = url.replace("127.0.0.1", host)
    with pytest.raises(InvalidStatus) as refused:
        connect(url, subprotocols=["mcp"], additional_headers=sent, open_timeout=10,  # type: ignore[arg-type]
                sock=socket.create_connection(("127.0.0.1", gateway.port), timeout=10))
    assert refused.value.response.status_code == status
    assert "error" in json.loads(refused.value.response.body)


def test_idle_websockets_hold_no_thread(gateway: Gunicorn) -> None:
    with ExitStack() as stack:
        sockets = [stack.enter_context(open_ws(gateway)) for _ in range(20)]  # 20 > 2 workers x 4 threads
        assert requests.get(f"{gateway.url}/healthz", timeout=10).ok
        body = json.dumps(rpc("tools/call", {"name": "get_current_time", "arguments": {"timezone": "UTC"}}))
        answer = requests.post(f"{gateway.url}/time/mcp", data=body, headers={**CURL_HEADERS, **AUTH}, timeout=30)
        assert answer.ok and "UTC" in answer.text, answer.text
        status = requests.get(f"{gateway.url}/status", headers=AUTH, timeout=10).json()
        assert sum(worker["websockets"] for worker in status["workers"]) >= 10, status["workers"]  # the answering worker's half
        for ws in sockets:  # all still served
            assert "result" in ws_ask(ws, rpc("tools/list", {}, request_id=9))[-1]


def test_hup_closes_websockets_with_1001(tmp_path: Path) -> None:
    env = {"GUNICORN_CMD_ARGS": "--graceful-timeout 2"}
    with Gunicorn(write_registry(tmp_path, SERVERS, SETTINGS), workers=2, threads=4, env=env).serving() as gateway, \
            ExitStack() as stack:
        sockets = [stack.enter_context(open_ws(gateway)) for _ in range(4)]
        for ws in sockets:
            ws_initialize(ws)
        old = gateway.worker_pids()
        gateway.remember()
        gateway.process.send_signal(signal.SIGHUP)
        for ws in sockets:
            assert close_code(ws) == 1001
        wait_for(lambda: not (gateway.worker_pids() & old) and len(gateway.worker_pids()) == 2, 30, "new workers only")
        with open_ws(gateway) as again:
            assert "result" in ws_initialize(again)


def test_a_plain_get_on_the_ws_route_is_told_to_upgrade(gateway: Gunicorn) -> None:
    answer = requests.get(f"{ws_url(gateway, 'time').replace('ws://', 'http://')}", headers=AUTH, timeout=10)
    assert answer.status_code == 426, answer.text
    assert "upgrade" in answer.json()["error"]["message"].lower()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5):
        pass


def test_an_upgrade_on_the_mcp_path_is_served_too(gateway: Gunicorn) -> None:
    with connect(f"ws://127.0.0.1:{gateway.port}/time/mcp", subprotocols=["mcp"],  # type: ignore[list-item]
                 additional_headers=AUTH, open_timeout=10) as ws:
        assert "result" in ws_ask(ws, rpc("tools/list", {"_meta": MODERN_META}, request_id=1))[-1]


def test_websockets_count_in_max_streams(tmp_path: Path) -> None:
    registry = write_registry(tmp_path, SERVERS, {**SETTINGS, "max_streams": 2})
    with Gunicorn(registry, workers=1, threads=4).serving() as gateway, ExitStack() as stack:
        for _ in range(2):
            stack.enter_context(open_ws(gateway))
        with pytest.raises(InvalidStatus) as refused:
            open_ws(gateway)
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["Retry-After"] == "1"
        assert "max_streams" in json.loads(refused.value.response.body)["error"]["message"]


NODE_MODULES = Path(__file__).parent / "node" / "node_modules"


@pytest.mark.skipif(not (NODE_MODULES / "@modelcontextprotocol/sdk/dist/esm/client/websocket.js").exists(),
                    reason="tests/node/node_modules is missing (npm ci in tests/node)")
def test_the_npm_sdks_websocket_transport(tmp_path: Path) -> None:
    # The browser WebSocket API the transport uses sends no headers of ours: a gateway without tokens.
    with Gunicorn(write_registry(tmp_path, {"time": SERVERS["time"]}), workers=2, threads=4).serving() as gateway:
        done = subprocess.run(["node", "--experimental-websocket", str(Path(__file__).parent / "node" / "ws_client.mjs"),
                               ws_url(gateway, "time")], check=False, capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).parent / "node")
        assert done.returncode == 0, done.stdout + done.stderr
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert "get_current_time" in seen["tools"], seen
        assert "UTC" in seen["called"]["content"][0]["text"], seen
