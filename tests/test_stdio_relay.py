"""Stdio answers relayed by the worker's loop, and stdio calls cancelled: real gunicorn in front of stdio servers.

faulty_server.py's cancel-* modes report progress every 0.2 s until they are
sent notifications/cancelled, and write "PID cancelled ID" to their PIDFILE
when it comes: what shows a call was cut short at the process, and by which id.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.sync.client import ClientConnection, connect

from .harness import (
    Gunicorn,
    read_until,
    rpc,
    server_command,
    wait_for,
    write_registry,
    ws_initialize,
    ws_receive,
)

TOKEN = "relay-token-" + "x" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def call_body(request_id: Any, tool: str = "work", arguments: dict[str, Any] | None = None) -> bytes:
    return json.dumps(rpc("tools/call", {"name": tool, "arguments": arguments or {},
                                         "_meta": {"progressToken": f"p-{request_id}"}}, request_id)).encode()


def open_call(gateway: Gunicorn, request_id: Any, server: str = "srv", tag: str = "") -> socket.socket:
    """A tools/call POSTed on a raw socket, asking for SSE; the socket is left to read the answer."""
    body = call_body(request_id)
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(f"POST /{server}/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Accept: application/json, text/event-stream\r\nContent-Length: {len(body)}\r\n"
                 f"X-Request-Id: {tag or f'relay-{request_id}'}\r\n\r\n".encode() + body)
    return sock



def pool(gateway: Gunicorn, server: str = "srv") -> dict[str, Any]:
    # With the token: the WebSocket tests' gateway asks for one (the others take it and ignore it).
    result: dict[str, Any] = requests.get(f"{gateway.url}/status", headers=AUTH, timeout=5).json()["servers"][server]
    return result


def open_streams(gateway: Gunicorn) -> int:
    return int(sum(worker["streams"] for worker in gateway.status()["workers"]))


def cancelled(record: Path) -> list[str]:
    """The ids the processes were told were cancelled ("PID cancelled ID" lines), in order."""
    if not record.exists():
        return []
    return [line.split(" ", 2)[2] for line in record.read_text().splitlines() if " cancelled " in line]


def access_line(gateway: Gunicorn, request_id: str) -> str:
    lines = [line for line in gateway.log().splitlines() if f"request_id={request_id} " in line]
    assert lines, f"no access line for {request_id}"
    return lines[-1]


def faulty(mode: str, record: Path, **settings: Any) -> dict[str, Any]:
    return {"srv": {"type": "stdio", "command": server_command("faulty_server.py", mode, str(record)), **settings}}


# --- over HTTP: the relay ---------------------------------------------------------------------


def test_more_long_stdio_calls_than_request_threads_all_progress(gunicorn: Any, tmp_path: Path) -> None:
    # 2 workers x 2 threads; 8 calls that report progress until cancelled. A thread held per
    # call would leave the fifth without one, and /healthz too.
    record = tmp_path / "record"
    gateway = gunicorn(faulty("cancel-silent", record, pool_size=8, pool_min=0), workers=2, threads=2)
    socks = [open_call(gateway, n) for n in range(8)]
    try:
        for n, sock in enumerate(socks):
            data = read_until(sock, b"notifications/progress", 20)
            assert b"text/event-stream" in data and f'"progressToken":"p-{n}"'.encode() in data.replace(b" ", b"")
        wait_for(lambda: open_streams(gateway) == 8, 10, "eight streams relayed")
        for _ in range(3):
            assert requests.get(f"{gateway.url}/healthz", timeout=5).ok
        for sock in socks:  # each goes on: more progress on every one
            read_until(sock, b"notifications/progress", 5)
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: len(cancelled(record)) == 8, 15, "every call cancelled at its process")
    assert sorted(cancelled(record)) == sorted(str(n) for n in range(8))
    wait_for(lambda: open_streams(gateway) == 0 and pool(gateway)["busy"] == 0, 10, "no stream nor busy process")
    assert pool(gateway)["restarts"] == 0


def test_a_client_leaving_a_relayed_stdio_call_cancels_it_and_the_process_is_reused(
        gunicorn: Any, tmp_path: Path) -> None:
    record = tmp_path / "record"
    # Progress once, then silence: only watching the client notices it left, not a write failing.
    gateway = gunicorn(faulty("cancel-silent", record, pool_size=1, pool_min=1,
                              env_vars={"FAULTY_PROGRESS_SECONDS": "60"}), workers=1, threads=2)
    wait_for(lambda: pool(gateway)["idle"] == 1, 30)
    [pid] = pool(gateway)["pids"]
    sock = open_call(gateway, 7, tag="leaving-stdio-1")
    read_until(sock, b"notifications/progress")
    wait_for(lambda: open_streams(gateway) == 1, 10, "the stream relayed")
    time.sleep(1.0)  # held a while: the access line's duration counts it
    sock.close()
    wait_for(lambda: cancelled(record) == ["7"], 10, "notifications/cancelled at the process")
    assert record.read_text().splitlines()[-1].startswith(f"{pid} ")
    wait_for(lambda: pool(gateway)["busy"] == 0 and open_streams(gateway) == 0, 10, "the process free")
    wait_for(lambda: "request_id=leaving-stdio-1 " in gateway.log(), 10, "the access line")
    line = access_line(gateway, "leaving-stdio-1")
    assert "status=200" in line and "mcp_method=tools/call" in line, line
    duration = float(re.search(r"duration_ms=([0-9.]+)", line).group(1))  # type: ignore[union-attr]
    assert duration >= 1000, line
    page = requests.get(f"{gateway.url}/metrics", timeout=5).text
    assert 'mcp_gateway_streams_ended_total{reason="client_gone"} 1.0' in page
    # Kept: the next call goes to the same process, and is cut short the same way.
    sock = open_call(gateway, 8)
    read_until(sock, b"notifications/progress")
    sock.close()
    wait_for(lambda: cancelled(record) == ["7", "8"], 10, "the second call cancelled")
    assert record.read_text().splitlines()[-1].startswith(f"{pid} ")
    assert pool(gateway)["pids"] == [pid] and pool(gateway)["restarts"] == 0


def test_a_relayed_stdio_call_past_its_deadline_ends_with_an_error_event(gunicorn: Any, tmp_path: Path) -> None:
    record = tmp_path / "record"
    gateway = gunicorn(faulty("cancel-silent", record, pool_size=1, pool_min=1, request_timeout=1.5),
                       workers=1, threads=2)
    wait_for(lambda: pool(gateway)["idle"] == 1, 30)
    sock = open_call(gateway, 9, tag="deadline-stdio-1")
    try:
        data = read_until(sock, b"notifications/progress")
        data = read_until(sock, b"\r\n0\r\n\r\n", 15, data)  # the stream's end, after the error event
    finally:
        sock.close()
    events = [json.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: ")]
    final = events[-1]
    assert final["id"] == 9 and final["error"]["code"] == -32001, final
    assert "no answer within 1.5s" in final["error"]["message"]
    assert all(event.get("method") == "notifications/progress" for event in events[:-1])
    # Wound down as a cancelled call: the process is told, and (silent after it) kept.
    wait_for(lambda: cancelled(record) == ["9"], 10, "the process told")
    wait_for(lambda: pool(gateway)["busy"] == 0, 10, "the process free")
    wait_for(lambda: "request_id=deadline-stdio-1 " in gateway.log(), 10, "the access line")
    assert pool(gateway)["restarts"] == 0
    page = requests.get(f"{gateway.url}/metrics", timeout=5).text  # its final reply was an error
    assert 'mcp_gateway_requests_total{method="tools/call",outcome="rpc_error",server="srv"} 1.0' in page, page


def test_a_relayed_stdio_call_whose_process_dies_ends_with_an_error_event(gunicorn: Any, tmp_path: Path) -> None:
    record = tmp_path / "record"
    gateway = gunicorn(faulty("cancel-silent", record, pool_size=1, pool_min=1), workers=1, threads=2)
    wait_for(lambda: pool(gateway)["idle"] == 1, 30)
    [pid] = pool(gateway)["pids"]
    sock = open_call(gateway, 10)
    try:
        data = read_until(sock, b"notifications/progress")
        wait_for(lambda: open_streams(gateway) == 1, 10, "the stream relayed")
        os.kill(pid, signal.SIGKILL)
        data = read_until(sock, b"\r\n0\r\n\r\n", 15, data)
    finally:
        sock.close()
    final = json.loads([line for line in data.split(b"\n") if line.startswith(b"data: ")][-1][6:])
    assert b"error" in data, data[-600:]
    assert final["id"] == 10 and final["error"]["code"] == -32001, final
    # The loop does not wait for the exit status: whether the kernel has it yet when the pipe ends is a race.
    message = final["error"]["message"]
    assert f"process {pid} " in message and ("killed by signal 9" in message or "closed its stdout" in message), message
    wait_for(lambda: pool(gateway)["restarts"] == 1 and pool(gateway)["busy"] == 0, 10, "the process replaced")


def test_hup_ends_relayed_stdio_streams_cleanly(gunicorn: Any, tmp_path: Path) -> None:
    record = tmp_path / "record"
    gateway = gunicorn(faulty("cancel-silent", record, pool_size=2, pool_min=0), workers=1, threads=2)
    socks = [open_call(gateway, n) for n in (21, 22)]
    try:
        for sock in socks:
            read_until(sock, b"notifications/progress")
        wait_for(lambda: open_streams(gateway) == 2, 10, "two streams relayed")
        gateway.process.send_signal(signal.SIGHUP)
        for sock in socks:
            read_until(sock, b"\r\n0\r\n\r\n", 30)  # a clean end of each chunked stream
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: sorted(cancelled(record)) == ["21", "22"], 15, "both calls cancelled at their processes")
    gateway.wait_ready()
    gateway.remember()


# --- over WebSocket: cancellation -------------------------------------------------------------


@pytest.fixture(scope="module")
def ws_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gunicorn, Path]]:
    folder = tmp_path_factory.mktemp("relay-ws")
    record = folder / "record"
    servers = {**faulty("cancel-silent", record, pool_size=2, pool_min=0),
               "asks": {"type": "stdio", "command": server_command("faulty_server.py", "asks-sampling"),
                        "pool_size": 1}}
    registry = write_registry(folder, servers, {"auth": {"tokens": {"ci": TOKEN}}})
    with Gunicorn(registry, workers=1, threads=2).serving() as running:
        yield running, record


def open_ws(gateway: Gunicorn, server: str = "srv") -> ClientConnection:
    return connect(f"ws://127.0.0.1:{gateway.port}/{server}/ws", subprotocols=["mcp"],  # type: ignore[list-item]
                   additional_headers=AUTH, open_timeout=10)




def test_a_websocket_clients_cancel_reaches_the_process_and_its_request_gets_no_answer(
        ws_gateway: tuple[Gunicorn, Path]) -> None:
    gateway, record = ws_gateway
    before = len(cancelled(record))
    with open_ws(gateway) as ws:
        ws_initialize(ws, "relay-test")
        # Ignored, not errors: a response to nothing asked, and a notification no one serves.
        ws.send(json.dumps({"jsonrpc": "2.0", "id": "stray", "result": {}}))
        ws.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}))
        ws.send(call_body("ws-a").decode())
        progress = json.loads(ws.recv(timeout=20))
        assert progress["method"] == "notifications/progress", progress
        ws.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                            "params": {"requestId": "ws-a", "reason": "changed my mind"}}))
        wait_for(lambda: cancelled(record)[before:] == ["ws-a"], 10, "the process told of the cancel")
        # Other requests are still answered; nothing more comes for the cancelled one.
        ws.send(json.dumps(rpc("tools/list", request_id="list-1")))
        seen = ws_receive(ws, "list-1")
        assert seen[-1]["result"]["tools"], seen
        assert not [m for m in seen if m.get("id") == "ws-a" and "method" not in m], seen
        assert not [m for m in seen if m.get("id") == "stray" or "error" in m], seen
    wait_for(lambda: pool(gateway)["busy"] == 0, 10, "no process busy")
    log = gateway.log()
    assert re.search(r"http=\"?WS [^ ]*\"? server=srv .*mcp_method=tools/call .*status=499", log), log[-2000:]


def test_a_websocket_closed_mid_call_cancels_it(ws_gateway: tuple[Gunicorn, Path]) -> None:
    gateway, record = ws_gateway
    before = len(cancelled(record))
    with open_ws(gateway) as ws:
        ws_initialize(ws, "relay-test")
        ws.send(call_body("ws-b").decode())
        assert json.loads(ws.recv(timeout=20))["method"] == "notifications/progress"
    wait_for(lambda: cancelled(record)[before:] == ["ws-b"], 10, "the process told of the cancel")
    wait_for(lambda: pool(gateway)["busy"] == 0, 10, "no process busy")


def test_a_pooled_processs_sampling_request_during_a_websocket_call_is_refused(
        ws_gateway: tuple[Gunicorn, Path]) -> None:
    gateway, _ = ws_gateway
    with open_ws(gateway, "asks") as ws:
        ws_initialize(ws, "relay-test")
        ws.send(json.dumps(rpc("tools/call", {"name": "work", "arguments": {}}, request_id="s")))
        seen = ws_receive(ws, "s")
    assert not [m for m in seen if m.get("method") == "sampling/createMessage"], seen  # never reaches the client
    text = seen[-1]["result"]["content"][0]["text"]
    assert text.startswith("sampling refused: -32601 sampling/createMessage is not available"), text
