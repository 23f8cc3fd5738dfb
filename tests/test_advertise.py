"""The gateway advertises only what it delivers (issue 16, part A).

Real gunicorn (2 workers) in front of stdio servers of both eras (pooled) and
http servers of one era each:

- `logging/setLevel` from a handshake-era client is answered by the gateway and
  the level is the session's: it rides on the session's later requests as the
  2026-07-28 `_meta` log level (a 2026-07-28 stdio process, a 2026-07-28-only
  http server), or filters what a shared handshake-era process logs; it is
  never sent to a shared process. Each session's requests land on both workers
  (no keep-alive), so the level is kept where every worker of the host sees it.
- The gateway's own initialize answer claims no notification it cannot deliver.
- `server/discover` for a handshake-era-only http server is answered by that
  server, so the SDK client in auto mode falls back to initialize and is passed
  through: server-everything then offers its sampling/elicitation/roots tools.
- The MCP Inspector CLI against stdio servers of both eras.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
import requests
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPDeprecationWarning
from websockets.sync.client import connect

from .harness import (
    ACCEPT_BOTH,
    ROOT,
    TIME_SERVER,
    Gunicorn,
    McpHttpServer,
    rpc,
    server_command,
    write_registry,
    ws_ask,
    ws_initialize,
)

INSPECTOR = ROOT / "tests/node/node_modules/.bin/mcp-inspector"
MODERN_HEADERS = {**ACCEPT_BOTH, "MCP-Protocol-Version": "2026-07-28"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    folder = tmp_path_factory.mktemp("advertise")
    upstreams: list[McpHttpServer] = []
    instance = None
    try:
        everything = McpHttpServer(folder, "everything")
        upstreams.append(everything)
        modern = McpHttpServer(folder, "modern")
        upstreams.append(modern)
        stdio = {"type": "stdio", "pool_size": 1, "pool_min": 1, "request_timeout": 30}
        servers = {
            "time": {**stdio, "command": TIME_SERVER},  # handshake era (mcp-server-time)
            "legacy": {**stdio, "command": server_command("legacy_server.py")},  # handshake era, logs at info
            "sdk": {**stdio, "command": server_command("sdk_server.py", "stdio")},  # speaks 2026-07-28
            # A process of each session's own, speaking both eras (a handshake-era session keeps that era).
            "sdk-dedicated": {**stdio, "command": server_command("sdk_server.py", "stdio"), "session_mode": "dedicated",
                              "pool_min": 0},
            "time-dedicated": {**stdio, "command": TIME_SERVER, "session_mode": "dedicated", "pool_min": 0},
            "everything": {"type": "http", "instances": [{"endpoint": everything.url}]},
            "modern": {"type": "http", "instances": [{"endpoint": modern.url}]},
        }
        instance = Gunicorn(write_registry(folder, servers), workers=2, threads=4)
        instance.wait_ready()
        yield instance
    finally:
        if instance is not None:
            instance.stop_and_check()
        for upstream in upstreams:
            upstream.stop()


def http_client() -> httpx2.AsyncClient:
    # No keep-alive: each request on a new connection, so a session's requests reach both workers.
    return httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60), limits=httpx2.Limits(max_keepalive_connections=0))


# --- logging/setLevel, the official SDK (handshake era) ------------------------------

LOGGING_CASES = [  # server, tool, arguments, what it logs at info
    ("sdk", "slow", {"steps": 1}, "slow finished"),  # a 2026-07-28 process: the level rides in _meta
    ("legacy", "progress", {"steps": 0}, "progress finished"),  # a shared handshake-era process: filtered
    ("modern", "echo", {"text": "hi"}, "echoed hi"),  # a 2026-07-28-only http server, bridged
]


@pytest.mark.parametrize(("server", "tool", "arguments", "logged"), LOGGING_CASES, ids=[c[0] for c in LOGGING_CASES])
def test_sdk_legacy_client_gets_logs_at_the_level_it_set(gateway: Gunicorn, server: str, tool: str,
                                                         arguments: dict[str, Any], logged: str) -> None:
    received: list[tuple[str, Any]] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        received.append((params.level, params.data))

    async def scenario() -> list[list[tuple[str, Any]]]:
        seen = []
        async with http_client() as http, Client(streamable_http_client(f"{gateway.url}/{server}/mcp", http_client=http),
                                                  mode="legacy", logging_callback=on_log) as client:
            await client.call_tool(tool, arguments)  # no level set: nothing
            seen.append(list(received))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                assert await client.set_logging_level("info") is not None
                for _ in range(3):  # on both workers
                    received.clear()
                    await client.call_tool(tool, arguments)
                    seen.append(list(received))
                await client.set_logging_level("error")
            received.clear()
            await client.call_tool(tool, arguments)  # below the level: dropped
            seen.append(list(received))
        return seen

    seen = anyio.run(scenario)
    assert seen == [[], [("info", logged)], [("info", logged)], [("info", logged)], []], seen


@pytest.mark.parametrize(("server", "tool", "arguments", "logged"), LOGGING_CASES, ids=[c[0] for c in LOGGING_CASES])
def test_sdk_auto_client_gets_logs_at_the_level_its_requests_ask(gateway: Gunicorn, server: str, tool: str,
                                                                 arguments: dict[str, Any], logged: str) -> None:
    """In auto mode the client speaks 2026-07-28 here: each request carries its level in `_meta`, which the
    gateway passes to a 2026-07-28 process and applies itself to what a handshake-era process logs."""

    async def session(level: Any) -> tuple[str | None, list[tuple[str, Any]]]:
        received: list[tuple[str, Any]] = []

        async def on_log(params: types.LoggingMessageNotificationParams) -> None:
            received.append((params.level, params.data))

        async with http_client() as http, Client(streamable_http_client(f"{gateway.url}/{server}/mcp", http_client=http),
                                                  mode="auto", logging_callback=on_log, log_level=level) as client:
            for _ in range(2):
                await client.call_tool(tool, arguments)
            return client.protocol_version, received

    async def scenario() -> list[tuple[str | None, list[tuple[str, Any]]]]:
        return [await session("info"), await session("error"), await session(None)]

    asked, above, unasked = anyio.run(scenario)
    assert asked == ("2026-07-28", [("info", logged), ("info", logged)])
    assert above == ("2026-07-28", []) and unasked == ("2026-07-28", [])


# --- logging/setLevel, raw HTTP ---------------------------------------------------------


def post(gateway: Gunicorn, server: str, message: dict[str, Any], session: str | None = None) -> requests.Response:
    headers = {**ACCEPT_BOTH, **({"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"} if session else {})}
    return requests.post(f"{gateway.url}/{server}/mcp", data=json.dumps(message), headers=headers, timeout=30)


def messages(response: requests.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    if response.headers["Content-Type"].startswith("text/event-stream"):
        return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ") and line[6:]]
    return [response.json()]


def initialize(gateway: Gunicorn, server: str) -> tuple[str, dict[str, Any]]:
    answer = post(gateway, server, rpc("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                                      "clientInfo": {"name": "raw", "version": "1"}}))
    assert answer.status_code == 200, answer.text
    return answer.headers["Mcp-Session-Id"], answer.json()["result"]


@pytest.mark.parametrize(("server", "tool", "arguments", "logged"), LOGGING_CASES, ids=[c[0] for c in LOGGING_CASES])
def test_raw_set_level_is_answered_and_kept_per_session(gateway: Gunicorn, server: str, tool: str,
                                                        arguments: dict[str, Any], logged: str) -> None:
    mine, _ = initialize(gateway, server)
    other, _ = initialize(gateway, server)
    call = rpc("tools/call", {"name": tool, "arguments": arguments}, request_id=2)
    assert messages(post(gateway, server, rpc("logging/setLevel", {"level": "debug"}), mine)) == [
        {"jsonrpc": "2.0", "id": 1, "result": {}}]
    for _ in range(2):
        logs = [m["params"]["data"] for m in messages(post(gateway, server, call, mine)) if m.get("method")]
        assert logs == [logged]
        # Another session of the same server (the same pooled process) set no level: it gets none.
        assert [m for m in messages(post(gateway, server, call, other)) if m.get("method")] == []
    refused = post(gateway, server, rpc("logging/setLevel", {"level": "loud"}), mine)
    bad = refused.json()
    assert refused.status_code == 400 and bad["error"]["code"] == -32602 and "params.level must be one of debug" in bad["error"]["message"]


@pytest.mark.parametrize(("server", "tool", "arguments", "logged"), LOGGING_CASES[:2], ids=[c[0] for c in LOGGING_CASES[:2]])
def test_websocket_set_level_is_the_connections(gateway: Gunicorn, server: str, tool: str, arguments: dict[str, Any],
                                                logged: str) -> None:
    call = rpc("tools/call", {"name": tool, "arguments": arguments}, request_id=2)
    with connect(f"ws://127.0.0.1:{gateway.port}/{server}/ws", subprotocols=["mcp"],  # type: ignore[list-item]
                 open_timeout=10) as ws:
        assert ws_initialize(ws)["result"]["capabilities"]["logging"] == {}
        assert [m for m in ws_ask(ws, call) if m.get("method")] == []
        assert ws_ask(ws, rpc("logging/setLevel", {"level": "info"}, request_id=3)) == [
            {"jsonrpc": "2.0", "id": 3, "result": {}}]
        assert [m["params"]["data"] for m in ws_ask(ws, call) if m.get("method")] == [logged]
        bad = ws_ask(ws, rpc("logging/setLevel", {"level": "loud"}, request_id=4))[-1]
        assert bad["error"]["code"] == -32602


def test_initialize_claims_no_notification_the_gateway_cannot_deliver(gateway: Gunicorn) -> None:
    _, result = initialize(gateway, "sdk")
    capabilities = result["capabilities"]
    assert capabilities["logging"] == {}, "logging/setLevel is answered and its logs delivered"
    for name, flags in (("tools", ("listChanged",)), ("prompts", ("listChanged",)),
                        ("resources", ("listChanged", "subscribe"))):
        assert not set(flags) & set(capabilities.get(name) or {}), capabilities


# --- server/discover for a handshake-era-only http server ---------------------------------


def test_raw_discover_gets_the_servers_own_answer(gateway: Gunicorn) -> None:
    body = rpc("server/discover", {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}})
    direct = requests.post(f"{gateway.url}/everything/mcp", data=json.dumps(body),
                           headers={**MODERN_HEADERS, "Mcp-Method": "server/discover"}, timeout=30)
    # server-everything's own answer, not one the gateway makes up: the client knows to fall back.
    assert direct.status_code == 400, direct.text
    assert direct.json()["error"] == {"code": -32000, "message": "Bad Request: Server not initialized"}


def test_sdk_auto_mode_falls_back_and_is_passed_through(gateway: Gunicorn) -> None:
    asked: list[str] = []

    async def on_sample(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append("sampling")
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="sampled"),
                                         model="test-model")

    async def on_roots(context: Any) -> types.ListRootsResult:
        asked.append("roots")
        return types.ListRootsResult(roots=[types.Root(uri="file:///tmp/root", name="root")])  # type: ignore[arg-type]

    async def on_elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append("elicitation")
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    def text_of(result: types.CallToolResult) -> str:
        return json.dumps([c.model_dump() for c in result.content])

    async def scenario() -> tuple[str | None, set[str], dict[str, str]]:
        async with http_client() as http, Client(streamable_http_client(f"{gateway.url}/everything/mcp", http_client=http),
                                                  mode="auto", sampling_callback=on_sample, list_roots_callback=on_roots,
                                                  elicitation_callback=on_elicit) as client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            texts = {
                "sampling": text_of(await client.call_tool("trigger-sampling-request", {"prompt": "hi", "maxTokens": 9})),
                "elicitation": text_of(await client.call_tool("trigger-elicitation-request", {})),
                "roots": text_of(await client.call_tool("get-roots-list", {})),
            }
            return client.protocol_version, tools, texts

    version, tools, texts = anyio.run(scenario)
    assert version == "2025-11-25", "fell back to initialize"
    assert {"trigger-sampling-request", "trigger-elicitation-request", "get-roots-list"} <= tools, tools
    assert {"sampling", "elicitation", "roots"} <= set(asked), asked
    assert "sampled" in texts["sampling"], texts
    assert "User provided the requested information" in texts["elicitation"], texts
    assert "file:///tmp/root" in texts["roots"], texts


# --- the MCP Inspector CLI ------------------------------------------------------------------


def inspector(gateway: Gunicorn, home: Path, server: str, *args: str) -> subprocess.CompletedProcess[str]:
    """One Inspector CLI run (it writes its catalog under HOME); killed by subprocess.run if it overruns."""
    node = shutil.which("node")
    assert node and INSPECTOR.exists(), "run `make test` (it installs tests/node)"
    return subprocess.run([str(INSPECTOR), "--cli", f"{gateway.url}/{server}/mcp", "--transport", "http", *args],
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT / "tests/node",
                          env={"PATH": f"{Path(node).parent}:/usr/bin:/bin", "HOME": str(home)})


@pytest.mark.parametrize(("server", "tool", "tool_args", "expected"), [
    ("time", "get_current_time", ["timezone=UTC"], "UTC"),
    ("sdk", "add", ["a=2", "b=3"], "5"),
    # A dedicated session's initialize is its process's own: neither of these declares logging, and the
    # Inspector, told so, does not send logging/setLevel.
    ("time-dedicated", "get_current_time", ["timezone=UTC"], "UTC"),
    ("sdk-dedicated", "add", ["a=2", "b=3"], "5"),
], ids=["handshake-era", "2026-07-28", "handshake-era-dedicated", "both-eras-dedicated"])
def test_inspector_cli_against_stdio_servers_of_both_eras(gateway: Gunicorn, tmp_path: Path, server: str, tool: str,
                                                          tool_args: list[str], expected: str) -> None:
    listed = inspector(gateway, tmp_path, server, "--method", "tools/list")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert tool in {t["name"] for t in json.loads(listed.stdout)["tools"]}
    called = inspector(gateway, tmp_path, server, "--method", "tools/call", "--tool-name", tool, "--tool-arg", *tool_args)
    assert called.returncode == 0, called.stdout + called.stderr
    assert expected in called.stdout and '"isError": true' not in called.stdout
    level = inspector(gateway, tmp_path, server, "--method", "logging/setLevel", "--log-level", "debug")
    if server.endswith("-dedicated"):
        assert level.returncode != 0 and "does not support logging" in level.stderr, level.stdout + level.stderr
        return
    assert level.returncode == 0, level.stdout + level.stderr
    assert json.loads(level.stdout) == {}, level.stdout
