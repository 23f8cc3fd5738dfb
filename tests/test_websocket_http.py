"""MCP over WebSocket in front of HTTP servers: real gunicorn (2 workers x 4 threads), the `websockets` client.

Every request of a WebSocket is bridged to the HTTP server's instances
(gateway/upstreams/bridge.py), whichever era the client and the server speak:
the SDK server over HTTP (both eras: the gateway speaks the handshake era in a
session of its own), the 2026-07-28-only server, and a raw-socket instance
(tests/raw_mcp.py) that asks the client something mid-call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.sync.client import ClientConnection, connect

from gateway import errors

from .harness import (
    Gunicorn,
    McpHttpServer,
    rpc,
    wait_for,
    write_registry,
    ws_ask,
    ws_initialize,
)
from .raw_mcp import RawMcp

TOKEN = "ws-http-token-" + "x" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODERN_META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
# What each server's tools/call with progress is, and how many progress notifications it sends first.
SLOW = {"sdk": ({"name": "slow", "arguments": {"steps": 3}}, 3, "done"),
        "modern": ({"name": "echo", "arguments": {"text": "hi"}}, 2, "hi (pid ")}


class Servers:
    def __init__(self, folder: Path):
        self.sdk = McpHttpServer(folder, kind="sdk")
        self.modern = McpHttpServer(folder, kind="modern")
        self.raw = RawMcp()

    def stop(self) -> None:
        self.sdk.stop()
        self.modern.stop()
        self.raw.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    running = Servers(tmp_path_factory.mktemp("ws-http-servers"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def gateway(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    folder = tmp_path_factory.mktemp("ws-http")
    registry = {name: {"type": "http", "instances": [{"endpoint": server.url}]}
                for name, server in (("sdk", servers.sdk), ("modern", servers.modern), ("raw", servers.raw))}
    with Gunicorn(write_registry(folder, registry, {"auth": {"tokens": {"ci": TOKEN}}}), workers=2,
                  threads=4).serving() as running:
        yield running


def open_ws(gateway: Gunicorn, server: str) -> ClientConnection:
    return connect(f"ws://127.0.0.1:{gateway.port}/{server}/ws", subprotocols=["mcp"],  # type: ignore[list-item]
                   additional_headers=AUTH, open_timeout=10)




def tools_and_progress(ws: ClientConnection, server: str, meta: dict[str, Any]) -> None:
    """tools/list, then a tools/call whose progress notifications all arrive before its response."""
    tools = ws_ask(ws, rpc("tools/list", {"_meta": meta} if meta else {}, request_id=1))[-1]
    call, progress, text = SLOW[server]
    assert call["name"] in {tool["name"] for tool in tools["result"]["tools"]}, tools
    seen = ws_ask(ws, rpc("tools/call", {**call, "_meta": {**meta, "progressToken": "p1"}}, request_id=2))
    kinds = [m.get("method") or "answer" for m in seen]
    assert kinds.count("notifications/progress") == progress and kinds[-1] == "answer", kinds
    assert all(m["params"]["progressToken"] == "p1" for m in seen if m.get("method") == "notifications/progress"), seen
    assert seen[-1]["result"]["content"][0]["text"].startswith(text), seen[-1]


@pytest.mark.parametrize("server", ["sdk", "modern"])
def test_a_handshake_era_client_initializes_on_the_socket(gateway: Gunicorn, server: str) -> None:
    with open_ws(gateway, server) as ws:
        answer = ws_initialize(ws, "ws-http-test")
        assert answer["result"]["protocolVersion"] == "2025-06-18", answer
        assert answer["result"]["serverInfo"]["name"], answer
        tools_and_progress(ws, server, {})


@pytest.mark.parametrize("server", ["sdk", "modern"])
def test_a_2026_client_names_its_version_per_request(gateway: Gunicorn, server: str) -> None:
    with open_ws(gateway, server) as ws:
        tools_and_progress(ws, server, MODERN_META)


def test_a_request_from_the_http_server_mid_call_is_refused_at_once(gateway: Gunicorn, servers: Servers) -> None:
    with open_ws(gateway, "raw") as ws:
        ws_initialize(ws, "ws-http-test")
        seen = ws_ask(ws, rpc("tools/call", {"name": "ask", "arguments": {}}, request_id=3))
        assert [m.get("method") for m in seen[:-1]] == ["notifications/progress"], seen  # never the elicitation
        refusal = next(m for m in servers.raw.received if m.get("id") == "ask-1")
        assert refusal["error"]["code"] == errors.METHOD_NOT_FOUND, refusal
        assert str(errors.METHOD_NOT_FOUND) in seen[-1]["result"]["content"][0]["text"], seen[-1]


def test_an_http_instance_dying_mid_call_gives_an_error_and_the_socket_stays_open(tmp_path: Path) -> None:
    server = McpHttpServer(tmp_path, kind="sdk")
    try:
        registry = write_registry(tmp_path, {"dying": {"type": "http", "instances": [{"endpoint": server.url}]}},
                                  {"auth": {"tokens": {"ci": TOKEN}}, "health_check_interval": 3600})
        with Gunicorn(registry, workers=1, threads=4).serving() as gateway, open_ws(gateway, "dying") as ws:
            ws_initialize(ws, "ws-http-test")
            assert "result" in ws_ask(ws, rpc("tools/list", {}, request_id=1))[-1]
            ws.send(json.dumps(rpc("tools/call", {"name": "sleep", "arguments": {"seconds": 60}}, request_id=2)))
            time.sleep(1)  # the call is at the instance
            server.stop()
            answer = json.loads(ws.recv(timeout=20))
            assert answer["id"] == 2 and answer["error"]["code"] == errors.UPSTREAM_ERROR, answer
            # The socket goes on: the next request is answered (with an error: no instance left).
            later = ws_ask(ws, rpc("tools/list", {}, request_id=3))[-1]
            assert later["id"] == 3 and "error" in later, later
            wait_for(lambda: requests.get(f"{gateway.url}/status", headers=AUTH, timeout=5).json()
                     ["servers"]["dying"]["instances"][0]["in_flight"] == 0, 10, "in_flight back to 0")
    finally:
        server.stop()
