"""Cancellation with the official SDK client in every mode: a caller that gives up on a call stops it upstream.

The SDK cancels a call its caller abandons: in the handshake era with a
courtesy `notifications/cancelled` (a POST of its own, which may land on either
worker), in 2026-07-28 by closing the call's stream. Either way the stdio
process serving the call, pooled or dedicated, must be told: faulty_server.py
(cancel-silent) records each cancel it gets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2
import pytest
import requests
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from .harness import Gunicorn, server_command, wait_for, write_registry

MODES = ("legacy", "auto", "2026-07-28")
SESSION_MODES = ("pooled", "dedicated")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gunicorn, Path]]:
    folder = tmp_path_factory.mktemp("sdk-cancel")
    servers = {
        f"{session_mode}-{number}": {
            "type": "stdio", "command": server_command("faulty_server.py", "cancel-silent", str(folder / session_mode)),
            "session_mode": session_mode, "pool_size": 2, "pool_min": 0}
        for session_mode in SESSION_MODES for number, _ in enumerate(MODES)}
    with Gunicorn(write_registry(folder, servers, {"auth": {"protect_operator_endpoints": False}}),
                  workers=2, threads=4).serving() as instance:
        yield instance, folder


def cancels(record: Path) -> int:
    return sum(1 for line in record.read_text().splitlines() if " cancelled " in line) if record.exists() else 0


@pytest.mark.parametrize("session_mode", SESSION_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_an_sdk_call_its_caller_abandons_is_cancelled_upstream(gateway: tuple[Gunicorn, Path], mode: str,
                                                              session_mode: str) -> None:
    instance, folder = gateway
    record = folder / session_mode
    server = f"{session_mode}-{MODES.index(mode)}"
    before = cancels(record)

    async def scenario() -> tuple[str | None, bool]:
        progressed = anyio.Event()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            progressed.set()

        # No kept-alive connections: the cancel may land on either worker.
        http = httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60), limits=httpx2.Limits(max_keepalive_connections=0))
        async with http, Client(streamable_http_client(f"{instance.url}/{server}/mcp", http_client=http),
                                mode=mode) as client:
            finished = False
            async with anyio.create_task_group() as group:
                async def call() -> None:
                    nonlocal finished
                    await client.call_tool("work", {}, progress_callback=on_progress)
                    finished = True

                group.start_soon(call)
                with anyio.fail_after(20):
                    await progressed.wait()  # the process is working on it: now the caller gives up
                group.cancel_scope.cancel()
            return client.protocol_version, finished

    version, finished = anyio.run(scenario)
    assert not finished, "the call was answered, though the process never answers a call"
    assert version is not None
    wait_for(lambda: cancels(record) > before, 15, f"the process told of the cancel ({mode}, {session_mode})")


def test_a_session_ended_with_a_call_in_flight_tells_its_process(gateway: tuple[Gunicorn, Path]) -> None:
    """DELETE while a call runs: the process is sent notifications/cancelled before it is closed (a client's own
    cancel and its DELETE travel on different connections, so the DELETE may come first)."""
    instance, folder = gateway
    record, url = folder / "dedicated", f"{instance.url}/dedicated-0/mcp"
    before = cancels(record)
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    init = requests.post(url, headers=headers, timeout=30, json={"jsonrpc": "2.0", "id": 0, "method": "initialize",
                         "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                    "clientInfo": {"name": "t", "version": "1"}}})
    assert init.status_code == 200, init.text
    headers.update({"Mcp-Session-Id": init.headers["Mcp-Session-Id"], "MCP-Protocol-Version": "2025-11-25"})
    body = {"jsonrpc": "2.0", "id": 5, "method": "tools/call",
            "params": {"name": "work", "arguments": {}, "_meta": {"progressToken": "p"}}}
    with requests.post(url, headers=headers, json=body, stream=True, timeout=30) as call:
        assert b"notifications/progress" in next(line for line in call.iter_lines() if line.startswith(b"data: "))
        ended = requests.delete(url, headers=headers, timeout=10)
        assert ended.status_code == 204, ended.text
        wait_for(lambda: cancels(record) > before, 15, "the process told its call was cancelled")
