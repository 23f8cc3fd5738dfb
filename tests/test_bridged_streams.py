"""Bridged SSE answers relayed by the worker's loop, cancelled calls, and upstream connections reused.

Real gunicorn in front of a raw-socket handshake-era instance (tests/raw_mcp.py),
which shows every TCP connection the gateway opens and closes. A handshake-era
POST without a session (as curl sends) is bridged through the gateway's own
session with the instance; its SSE answer is read by the request thread up to
the first message, then by the worker's loop.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway import errors, registry
from gateway.cancel import Cancellation
from gateway.protocol import ClientContext
from gateway.upstreams import HttpUpstream

from .harness import ACCEPT_BOTH, Gunicorn, read_until, rpc, wait_for, write_registry
from .raw_mcp import RawMcp


@pytest.fixture
def raw() -> Iterator[RawMcp]:
    server = RawMcp()
    yield server
    server.close()


def servers(raw: RawMcp, **options: Any) -> dict[str, Any]:
    return {"raw": {"type": "http", "instances": [{"endpoint": raw.url}], **options}}


def call(name: str, request_id: Any = 1) -> dict[str, Any]:
    return rpc("tools/call", {"name": name, "arguments": {}, "_meta": {"progressToken": "p"}}, request_id)


def open_call(gateway: Gunicorn, name: str, request_id: Any = 1, x_request_id: str = "",
              token: str = "") -> socket.socket:
    """A bridged tools/call on a raw socket, its request sent (with a bearer `token` when given)."""
    body = json.dumps(call(name, request_id)).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
    auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
    sock.sendall(b"POST /raw/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%s"
                 b"Accept: application/json, text/event-stream\r\nX-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (auth, (x_request_id or f"bridged-{request_id}").encode(), len(body), body))
    return sock



def events(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in data.decode(errors="replace").splitlines() if line.startswith("data: {")]


def in_flight(gateway: Gunicorn) -> int:
    return int(sum(i["in_flight"] for i in gateway.status()["servers"]["raw"]["instances"]))


def open_streams(gateway: Gunicorn) -> int:
    return int(sum(worker["streams"] for worker in gateway.status()["workers"]))


# --- relayed, not held by a thread ------------------------------------------------------


def test_more_long_bridged_calls_than_threads_all_progress_and_healthz_answers(gunicorn: Any, raw: RawMcp) -> None:
    gateway = gunicorn(servers(raw), workers=2, threads=2)  # four request threads in all
    socks = [open_call(gateway, "held", request_id=n) for n in range(8)]
    try:
        seen = [read_until(sock, b"notifications/progress") for sock in socks]  # every call has begun at once
        wait_for(lambda: open_streams(gateway) == 8, 10, "eight bridged streams relayed")
        assert requests.get(f"{gateway.url}/healthz", timeout=5).status_code == 200
        raw.release.set()
        for n, sock in enumerate(socks):
            seen[n] += read_until(sock, b"0\r\n\r\n")
            final = events(seen[n])[-1]
            assert final == {"jsonrpc": "2.0", "id": n, "result": {"content": [{"type": "text", "text": "done"}]}}, seen[n]
        assert len(raw.calls) == 8
        wait_for(lambda: in_flight(gateway) == 0, 10, "in_flight back to 0")
    finally:
        for sock in socks:
            sock.close()


def test_a_client_leaving_a_bridged_call_closes_the_upstream_connection(gunicorn: Any, raw: RawMcp) -> None:
    gateway = gunicorn(servers(raw), workers=2, threads=4)
    sock = open_call(gateway, "hang", x_request_id="leaving-bridged-1")
    read_until(sock, b"notifications/progress")
    wait_for(lambda: open_streams(gateway) == 1, 10, "the bridged stream relayed")
    sock.close()  # the instance stays silent: only the relay watching the client notices
    wait_for(lambda: len(raw.closed) == 1, 10, "the upstream connection closed")
    wait_for(lambda: in_flight(gateway) == 0, 10, "in_flight back to 0")
    wait_for(lambda: "request_id=leaving-bridged-1" in gateway.log(), 10, "the call's access line")
    # A handshake-era instance is told to stop working on it, for the gateway's id of the request.
    wait_for(lambda: any(m.get("method") == "notifications/cancelled" for m in raw.received), 10, "cancelled sent")
    cancelled = next(m for m in raw.received if m.get("method") == "notifications/cancelled")
    assert cancelled["params"]["requestId"] == raw.calls[0]


def test_a_clients_cancel_ends_a_relayed_bridged_call_without_an_answer(gunicorn: Any, raw: RawMcp) -> None:
    # A handshake-era call without a session is known by the token's principal and its id (in_flight.py).
    token = "cancel-token-" + "c" * 24
    gateway = gunicorn(servers(raw), {"auth": {"tokens": {"ci": token}, "protect_operator_endpoints": False}},
                       workers=1, threads=4)
    sock = open_call(gateway, "hang", request_id=41, x_request_id="cancelled-bridged-41", token=token)
    try:
        data = read_until(sock, b"notifications/progress")
        wait_for(lambda: open_streams(gateway) == 1, 10, "the bridged stream relayed")
        cancel = requests.post(f"{gateway.url}/raw/mcp", timeout=10, headers={
            **ACCEPT_BOTH, "Authorization": f"Bearer {token}"}, json={
            "jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 41, "reason": "enough"}})
        assert cancel.status_code == 202, cancel.text
        data = read_until(sock, b"\r\n0\r\n\r\n", 10, data)  # the stream ends cleanly
    finally:
        sock.close()
    assert not [m for m in events(data) if m.get("id") == 41], "a cancelled request gets no answer"
    wait_for(lambda: any(m.get("method") == "notifications/cancelled" for m in raw.received), 10, "cancelled sent")
    cancelled = next(m for m in raw.received if m.get("method") == "notifications/cancelled")
    assert cancelled["params"]["requestId"] == raw.calls[0]
    wait_for(lambda: len(raw.closed) >= 1, 10, "the answer's connection closed")
    wait_for(lambda: in_flight(gateway) == 0, 10, "in_flight back to 0")
    wait_for(lambda: 'mcp_gateway_streams_ended_total{reason="cancelled"} 1.0' in requests.get(
        f"{gateway.url}/metrics", timeout=5).text, 10, "the stream counted as cancelled")


def test_a_bridged_call_past_its_deadline_ends_with_an_error_event(gunicorn: Any, raw: RawMcp) -> None:
    gateway = gunicorn(servers(raw, request_timeout=3), workers=1, threads=4)
    sock = open_call(gateway, "hang", request_id="late")
    try:
        data = read_until(sock, b"notifications/progress")
        wait_for(lambda: open_streams(gateway) == 1, 10, "the bridged stream relayed")
        data += read_until(sock, b"0\r\n\r\n", 15)
        final = events(data)[-1]
        assert final["id"] == "late" and final["error"]["code"] == errors.UPSTREAM_ERROR, final
        assert "within 3s" in final["error"]["message"], final
        wait_for(lambda: len(raw.closed) == 1, 10, "the upstream connection closed")
        wait_for(lambda: in_flight(gateway) == 0, 10, "in_flight back to 0")
    finally:
        sock.close()


def test_a_request_from_the_instance_mid_relay_is_refused_and_the_call_goes_on(gunicorn: Any, raw: RawMcp) -> None:
    gateway = gunicorn(servers(raw), workers=1, threads=4)
    sock = open_call(gateway, "ask", request_id=5)
    try:
        data = read_until(sock, b"0\r\n\r\n")
        final = events(data)[-1]
        assert final["id"] == 5, data
        refusal = next(m for m in raw.received if m.get("id") == "ask-1")
        assert refusal["error"]["code"] == errors.METHOD_NOT_FOUND, refusal
        assert str(errors.METHOD_NOT_FOUND) in final["result"]["content"][0]["text"], final
        assert not [e for e in events(data) if e.get("method") == "elicitation/create"]  # never sent to the client
    finally:
        sock.close()


# --- connections given back ----------------------------------------------------------


def test_a_bridged_stream_ended_whole_gives_its_connection_back(gunicorn: Any, raw: RawMcp) -> None:
    gateway = gunicorn(servers(raw), {"health_check_interval": 3600}, workers=1, threads=4)
    with requests.Session() as http:
        for n in range(4):
            answer = http.post(f"{gateway.url}/raw/mcp", json=call("quick", n), headers=ACCEPT_BOTH, timeout=20)
            assert answer.headers["Content-Type"].startswith("text/event-stream"), answer.text
            assert events(answer.content)[-1]["result"]["content"][0]["text"] == "done", answer.text
            if n == 0:
                opened = raw.connections
    wait_for(lambda: open_streams(gateway) == 0, 10, "no stream left")
    assert raw.connections == opened, "each relayed stream ended whole: its connection serves the next request"
    assert "Connection pool is full" not in gateway.log()


def test_a_pass_through_stream_ended_whole_gives_its_connection_back(gunicorn: Any, raw: RawMcp) -> None:
    gateway = gunicorn(servers(raw), {"health_check_interval": 3600}, workers=1, threads=4)
    with requests.Session() as http:
        for n in range(4):
            answer = http.get(f"{gateway.url}/raw/mcp", headers={"Accept": "text/event-stream"}, timeout=20)
            assert b'"hello"' in answer.content, answer.content
            if n == 0:
                opened = raw.connections
    assert raw.connections == opened


def test_relayed_streams_closing_their_upstream_leave_the_worker_serving(gunicorn: Any, raw: RawMcp) -> None:
    # The feed closes the instance's connection (the response came before the body's end), and
    # that descriptor must leave the loop's selector with it, or the next connection accepted
    # on that number is "already registered" and the worker dies.
    gateway = gunicorn(servers(raw), {"health_check_interval": 3600}, workers=1, threads=4)
    workers = gateway.worker_pids()
    with requests.Session() as kept:  # its connection stays open: the next one accepted gets the freed number
        for n in range(4):
            answer = kept.post(f"{gateway.url}/raw/mcp", json=call("lingering", n), headers=ACCEPT_BOTH, timeout=20)
            assert events(answer.content)[-1]["result"]["content"][0]["text"] == "done", answer.content
            assert requests.get(f"{gateway.url}/healthz", timeout=5).status_code == 200  # a new connection
    assert gateway.worker_pids() == workers
    assert "already registered" not in gateway.log()
    page = requests.get(f"{gateway.url}/metrics", timeout=5).text
    assert "mcp_gateway_streams_started_total 4.0" in page


# --- cancellation, in the process: a real instance, the upstream as the views use it -----------------------


def test_a_cancelled_bridged_call_wakes_its_thread_and_drops_the_connection(raw: RawMcp, tmp_path: Path) -> None:
    entry = registry.load(write_registry(tmp_path, servers(raw))).servers["raw"]
    upstream = HttpUpstream(entry, 3600)
    try:
        cancel = Cancellation()
        replies = upstream.call(call("hang", 9), b"", ClientContext("legacy", "2025-06-18"), "cancel-1", cancel)
        first = next(replies)
        assert first.message["method"] == "notifications/progress"
        outcome: list[BaseException] = []

        def rest() -> None:
            try:
                list(replies)
            except BaseException as exc:  # noqa: BLE001 - what ended the thread's read is the point
                outcome.append(exc)

        reader = threading.Thread(target=rest)
        reader.start()
        time.sleep(0.3)  # the thread is blocked reading the silent instance
        cancel.cancel("the client cancelled it")
        reader.join(5)
        assert not reader.is_alive(), "the blocked read was not woken"
        assert len(outcome) == 1 and isinstance(outcome[0], errors.Cancelled), outcome
        wait_for(lambda: len(raw.closed) == 1, 10, "the connection dropped")
        wait_for(lambda: any(m.get("method") == "notifications/cancelled" for m in raw.received), 10, "cancelled sent")
        cancelled = next(m for m in raw.received if m.get("method") == "notifications/cancelled")
        assert cancelled["params"]["requestId"] == raw.calls[0]
        wait_for(lambda: upstream.balancer.instances[0].in_flight == 0, 10, "in_flight back to 0")
        assert upstream.balancer.instances[0].health.consecutive_failures == 0  # a cancellation is no failure of the instance
        replies.close()
    finally:
        upstream.close()
