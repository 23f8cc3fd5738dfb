"""End to end: real gunicorn (several workers) in front of real stdio MCP servers.

Driven by the official SDK client in both modes and by raw HTTP as curl
sends it. Every gunicorn started here is stopped with TERM at the end, must
exit 0, and must leave no process behind (see conftest.Gunicorn).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
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
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError

from .harness import (
    ROOT,
    SHARED_STATE_KEY,
    TIME_SERVER,
    Gunicorn,
    curl,
    descendants,
    free_port,
    parent_of,
    read_answer,
    server_command,
    still_running,
    wait_for,
    write_registry,
)

SERVERS = {
    "time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 2},
    "sdk": {"type": "stdio", "command": server_command("sdk_server.py", "stdio"), "pool_size": 2,
            "env_vars": {"TEST_SERVER_STATE_KEY": SHARED_STATE_KEY}},
    "legacy": {"type": "stdio", "command": server_command("legacy_server.py"), "pool_size": 2},
    "hang": {"type": "stdio", "command": server_command("faulty_server.py", "hang"), "request_timeout": 1.5},
    "garbage": {"type": "stdio", "command": server_command("faulty_server.py", "garbage")},
    "die": {"type": "stdio", "command": server_command("faulty_server.py", "die")},
    "nostart": {"type": "stdio", "command": server_command("faulty_server.py", "exit-at-start")},
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    registry = write_registry(tmp_path_factory.mktemp("gw"), SERVERS)
    with Gunicorn(registry, workers=2, threads=4).serving() as instance:
        yield instance


def run(coroutine_function: Any, *args: Any) -> Any:
    return anyio.run(coroutine_function, *args)


# --- the official SDK client ---------------------------------------------------


def test_sdk_client_in_auto_mode_speaks_2026_07_28_to_a_stdio_server(gateway: Gunicorn) -> None:
    async def scenario() -> tuple[str | None, list[str], Any]:
        async with Client(f"{gateway.url}/time/mcp", mode="auto", read_timeout_seconds=30) as client:
            tools = [tool.name for tool in (await client.list_tools()).tools]
            result = await client.call_tool("get_current_time", {"timezone": "Asia/Tokyo"})
            return client.protocol_version, tools, result.structured_content

    version, tools, content = run(scenario)
    assert version == "2026-07-28"
    assert sorted(tools) == ["convert_time", "get_current_time"]
    assert content["timezone"] == "Asia/Tokyo"


@pytest.mark.parametrize("server", ["time", "legacy"])
def test_sdk_client_in_legacy_mode_gets_a_session_and_calls_tools(gateway: Gunicorn, server: str) -> None:
    sessions: set[str] = set()

    async def remember(response: httpx2.Response) -> None:
        if "mcp-session-id" in response.headers:
            sessions.add(response.headers["mcp-session-id"])

    async def scenario() -> tuple[str | None, list[str]]:
        async with (
            httpx2.AsyncClient(event_hooks={"response": [remember]}, timeout=30) as http,
            Client(streamable_http_client(f"{gateway.url}/{server}/mcp", http_client=http), mode="legacy") as client,
        ):
            tools = [tool.name for tool in (await client.list_tools()).tools]
            with warnings.catch_warnings():  # ping is legacy-only; the SDK says so
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                await client.send_ping()
            return client.protocol_version, tools

    version, tools = run(scenario)
    assert version == "2025-11-25"
    assert tools and len(sessions) == 1


def test_sdk_client_auto_mode_in_front_of_a_legacy_only_server(gateway: Gunicorn) -> None:
    async def scenario() -> tuple[str | None, str]:
        async with Client(f"{gateway.url}/legacy/mcp", mode="auto") as client:
            result = await client.call_tool("echo", {"text": "across eras"})
            assert isinstance(result.content[0], types.TextContent)
            return client.protocol_version, result.content[0].text

    assert run(scenario) == ("2026-07-28", "across eras")


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_progress_notifications_reach_the_sdk_client_before_the_result(gateway: Gunicorn, mode: str) -> None:
    events: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        events.append(f"progress {progress:g}/{total:g}")

    async def scenario() -> None:
        async with Client(f"{gateway.url}/sdk/mcp", mode=mode) as client:
            result = await client.call_tool("slow", {"steps": 3}, progress_callback=on_progress)
            assert isinstance(result.content[0], types.TextContent)
            events.append(f"result {result.content[0].text}")

    run(scenario)
    assert events == ["progress 1/3", "progress 2/3", "progress 3/3", "result done"]


def test_elicitation_works_for_a_2026_client_through_a_pooled_process(gateway: Gunicorn) -> None:
    asked: list[str] = []

    async def on_elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Zed"})

    async def scenario() -> str:
        async with Client(f"{gateway.url}/sdk/mcp", mode="auto", elicitation_callback=on_elicit) as client:
            result = await client.call_tool("ask", {})
            assert isinstance(result.content[0], types.TextContent)
            return result.content[0].text

    assert run(scenario) == "hello Zed"
    assert asked == ["What is your name?"]


def test_elicitation_for_a_legacy_client_is_a_clear_error_not_a_hang(gateway: Gunicorn) -> None:
    async def on_elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        raise AssertionError("the gateway cannot route elicitation to a legacy client")

    async def scenario() -> str:
        async with Client(f"{gateway.url}/legacy/mcp", mode="legacy", elicitation_callback=on_elicit) as client:
            with anyio.fail_after(20), pytest.raises(MCPError) as caught:
                await client.call_tool("elicit", {})
            return str(caught.value)

    assert "elicitation/create is not available" in run(scenario)


# --- sessions across workers -------------------------------------------------


def test_a_legacy_session_is_honoured_by_every_worker(gateway: Gunicorn) -> None:
    init = curl(gateway, "sdk", "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "c", "version": "1"}})
    session = {"Mcp-Session-Id": init.headers["Mcp-Session-Id"], "MCP-Protocol-Version": "2025-11-25"}
    workers_seen: set[int] = set()
    clients: list[requests.Session] = []
    try:
        # Each client keeps its connection, and the workers share new connections out
        # evenly (gateway/worker.py), so a few clients reach every worker.
        for attempt in range(8):
            clients.append(requests.Session())
            response = curl(gateway, "sdk", "tools/call", {"name": "whoami", "arguments": {}}, session,
                            request_id=attempt, client=clients[-1])
            assert response.status_code == 200, response.text
            pid = int(response.json()["result"]["structuredContent"]["result"])
            workers_seen.add(parent_of(pid))
            if len(workers_seen) == 2:
                break
    finally:
        for client in clients:
            client.close()
    assert workers_seen == gateway.worker_pids()
    forged = curl(gateway, "sdk", "tools/list", headers={**session, "Mcp-Session-Id": session["Mcp-Session-Id"][:-2] + "xx"})
    assert forged.status_code == 404


# --- curl -----------------------------------------------------------------------


def test_curl_style_post_with_no_mcp_headers_returns_json(gateway: Gunicorn) -> None:
    response = curl(gateway, "time", "tools/list")
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    assert {t["name"] for t in response.json()["result"]["tools"]} == {"get_current_time", "convert_time"}


def test_sse_events_are_streamed_as_they_happen(gateway: Gunicorn) -> None:
    body = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "slow", "arguments": {"steps": 3}, "_meta": {"progressToken": "p"}}}
    with requests.post(f"{gateway.url}/sdk/mcp", json=body, stream=True, timeout=30,
                       headers={"Accept": "application/json, text/event-stream"}) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Accel-Buffering"] == "no"
        chunks = response.iter_content(chunk_size=None)
        first = next(chunks)
        # The first progress event arrived while the tool was still working.
        assert b"notifications/progress" in first and b'"result"' not in first
        rest = b"".join(chunks)
    assert b'"result"' in rest and rest.count(b"notifications/progress") == 2


# --- faults through real gunicorn ----------------------------------------------


def test_hung_child_gives_504_and_capacity_comes_back(gateway: Gunicorn) -> None:
    response = curl(gateway, "hang", "tools/call", {"name": "work", "arguments": {}})
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["message"].startswith("server 'hang': process ") and error["message"].endswith("did not answer in time")
    assert curl(gateway, "hang", "tools/list").status_code == 200


@pytest.mark.parametrize("server, cause", [("garbage", "wrote non-JSON to stdout"), ("die", "exited with code 7")])
def test_misbehaving_child_gives_502_naming_server_and_cause(gateway: Gunicorn, server: str, cause: str) -> None:
    response = curl(gateway, server, "tools/call", {"name": "work", "arguments": {}})
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert message.startswith(f"server '{server}': process ") and cause in message
    assert curl(gateway, server, "tools/list").status_code == 200


def test_child_crashing_mid_call_is_replaced(gateway: Gunicorn) -> None:
    response = curl(gateway, "sdk", "tools/call", {"name": "crash", "arguments": {}})
    assert response.status_code == 502 and "exited with code 3" in response.json()["error"]["message"]
    again = curl(gateway, "sdk", "tools/call", {"name": "add", "arguments": {"a": 1, "b": 2}})
    assert again.json()["result"]["structuredContent"]["result"] == 3


def test_server_that_cannot_start_is_503_and_shows_in_status(gateway: Gunicorn) -> None:
    response = curl(gateway, "nostart", "tools/list")
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert "exited with code 2" in response.json()["error"]["message"]
    status = gateway.status()["servers"]["nostart"]
    assert status["healthy"] is False and "exited with code 2" in status["last_error"]["message"]
    assert status["spawn_failures"] >= 1
    assert gateway.status()["servers"]["time"]["healthy"] is True


def test_killed_worker_takes_its_children_with_it(gateway: Gunicorn) -> None:
    curl(gateway, "time", "tools/list")
    worker = next(iter(gateway.worker_pids()))
    children = {entry for entry in descendants(worker)}
    assert children, "each worker keeps pool_min processes warm"
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not still_running(children), 10, "the killed worker's children gone")
    # gunicorn replaces the worker; the gateway keeps serving.
    wait_for(lambda: len(gateway.worker_pids()) == 2, 20, "a replacement worker")
    gateway.remember()
    assert curl(gateway, "time", "tools/list").status_code == 200


# --- separate gunicorns ---------------------------------------------------------


# No process starts, so nothing competes with the workers for the CPU while they accept.
NO_PROCESSES = {"time": {"type": "stdio", "command": TIME_SERVER, "pool_min": 0}}


def open_kept_alive(instance: Gunicorn, count: int) -> tuple[list[http.client.HTTPConnection], list[int]]:
    """Open `count` keep-alive connections one after another; which worker answered on each (by /healthz's pid)."""
    connections, pids = [], []
    for _ in range(count):
        connection = http.client.HTTPConnection("127.0.0.1", instance.port, timeout=10)
        connections.append(connection)
        connection.request("GET", "/healthz")
        answer = connection.getresponse()
        assert not answer.will_close, "the gateway did not keep the connection alive"
        pids.append(json.loads(answer.read())["pid"])
    return connections, pids


def test_kept_alive_connections_are_shared_evenly_by_the_workers(gunicorn: Any) -> None:
    # Plain gthread lets whichever worker wakes first take each new connection:
    # one worker often ends up with most of a client's pool (gateway/worker.py).
    instance = gunicorn(NO_PROCESSES, workers=2)
    connections, pids = open_kept_alive(instance, 8)
    try:
        per_worker = Counter(pids)
        assert set(per_worker) == instance.worker_pids()
        assert max(per_worker.values()) - min(per_worker.values()) <= 1, per_worker
    finally:
        for connection in connections:
            connection.close()


def test_a_stopped_worker_does_not_keep_new_connections_waiting(gunicorn: Any) -> None:
    # The other worker steps back for a moment (it holds more connections), then takes them itself.
    instance = gunicorn(NO_PROCESSES, workers=2)
    stopped, running = sorted(instance.worker_pids())
    os.kill(stopped, signal.SIGSTOP)
    try:
        connections, pids = open_kept_alive(instance, 4)
        for connection in connections:
            connection.close()
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert pids == [running] * 4


def test_a_kept_alive_connection_never_holds_the_thread_another_needs(gunicorn: Any) -> None:
    # One thread: after each answer it waits briefly for its connection's next
    # request (gateway/worker.py), which must never keep the other connection waiting.
    instance = gunicorn(NO_PROCESSES, workers=1, threads=1)
    first, second = (http.client.HTTPConnection("127.0.0.1", instance.port, timeout=10) for _ in range(2))
    try:
        for connection in (first, second, first, second, second, first):
            connection.request("GET", "/healthz")
            answer = connection.getresponse()
            assert answer.status == 200 and not answer.will_close
            answer.read()
    finally:
        first.close()
        second.close()


def test_pipelined_requests_are_answered_in_order(gunicorn: Any) -> None:
    instance = gunicorn(NO_PROCESSES, workers=1)
    calls = [json.dumps({"jsonrpc": "2.0", "id": n, "method": "ping"}).encode() for n in (1, 2, 3)]
    wire = b"".join(b"POST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(call), call) for call in calls)
    with socket.create_connection(("127.0.0.1", instance.port), timeout=10) as sock, sock.makefile("rb") as reader:
        sock.sendall(wire)  # all three at once: the worker reads past the first
        answers = [read_answer(reader) for _ in calls]
    assert [status for status, _ in answers] == [200, 200, 200]
    ids = [json.loads(body)["id"] for _, body in answers]
    assert ids == [1, 2, 3]


def test_a_chunked_body_is_read_whole_and_refused_past_the_limit(gunicorn: Any) -> None:
    # No Content-Length to refuse up front: the limit is enforced while the body is read.
    instance = gunicorn(NO_PROCESSES, {"max_body_bytes": 4096}, workers=1)

    def chunked(message: dict[str, Any]) -> bytes:
        body = json.dumps(message).encode()
        halves = (body[:len(body) // 2], body[len(body) // 2:])
        return (b"POST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(b"%x\r\n%s\r\n" % (len(h), h) for h in halves)
                + b"0\r\n\r\n")

    with socket.create_connection(("127.0.0.1", instance.port), timeout=10) as sock, sock.makefile("rb") as reader:
        sock.sendall(chunked({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "x" * 3900}}))
        status, body = read_answer(reader)
        assert status == 200 and json.loads(body)["result"] == {}, body
        sock.sendall(chunked({"jsonrpc": "2.0", "id": 2, "method": "ping", "params": {"pad": "x" * 5000}}))
        status, body = read_answer(reader)
    assert status == 413, body
    assert json.loads(body)["error"]["message"] == "server 'time': request body is over the gateway's limit of 4096 bytes"


def test_full_pool_answers_503_with_retry_after_at_once(gunicorn: Any) -> None:
    instance = gunicorn({"one": {"type": "stdio", "command": server_command("sdk_server.py", "stdio"),
                                 "pool_size": 1, "max_waiting": 0}}, workers=1)
    wait_for(lambda: instance.status()["servers"]["one"]["idle"] == 1)  # the warm process has started
    slow_result: list[requests.Response] = []
    slow = threading.Thread(target=lambda: slow_result.append(
        curl(instance, "one", "tools/call", {"name": "sleep", "arguments": {"seconds": 3}})))
    slow.start()
    try:
        wait_for(lambda: instance.status()["servers"]["one"]["busy"] == 1)
        response = curl(instance, "one", "tools/list")
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "server 'one' is overloaded" in response.json()["error"]["message"]
    finally:
        slow.join(30)
    assert slow_result[0].json()["result"]["structuredContent"]["result"] == "slept"


def serve_until_answered(argv: list[str], port: int, env: dict[str, str], log_path: Path) -> None:
    """Run a gateway command, check it answers a curl-style call, TERM it: exit 0, nothing left."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    seen: set[tuple[int, str]] = set()
    try:
        deadline = time.monotonic() + 30
        response = None
        while response is None and time.monotonic() < deadline and process.poll() is None:
            try:
                response = requests.post(f"http://127.0.0.1:{port}/time/mcp", timeout=10,
                                         data='{"jsonrpc":"2.0","id":1,"method":"tools/list"}')
            except requests.ConnectionError:
                time.sleep(0.1)
        assert response is not None and response.status_code == 200, log_path.read_text()
        assert "tools" in response.json()["result"]
        seen = descendants(process.pid)
        assert len(seen) >= 2  # a worker and its pooled process
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    wait_for(lambda: not still_running(seen), 5, "every process of the gateway gone")
    assert code == 0


def test_bare_gunicorn_wsgi_app_also_serves(tmp_path: Path) -> None:
    registry = write_registry(tmp_path, {"time": {"type": "stdio", "command": TIME_SERVER}})
    port = free_port()
    serve_until_answered([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "wsgi:app"], port,
                         {"MCP_GATEWAY_REGISTRY": str(registry), "MCP_GATEWAY_SESSION_SECRET": "s" * 32}, tmp_path / "bare.log")


def test_mcp_gateway_serve_runs_gunicorn_with_the_projects_config(tmp_path: Path) -> None:
    registry = write_registry(tmp_path, {"time": {"type": "stdio", "command": TIME_SERVER}})
    port = free_port()
    serve_until_answered([str(Path(sys.executable).parent / "mcp-gateway"), "serve", "--registry", str(registry),
                          "--bind", f"127.0.0.1:{port}", "--workers", "2"], port, {}, tmp_path / "serve.log")
