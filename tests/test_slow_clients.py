"""Slow and stalled clients cannot hold gunicorn's threads (issue 13, "Threads are a bounded resource").

Real gunicorn (2 workers x 4 threads) and raw sockets for the misbehaving
clients: 2 x threads connections that send their headers a byte at a time,
their body a byte at a time, or nothing at all, must leave the gateway
answering everyone else while they are held open; past the registry's
`header_timeout` / `body_timeout` they are cut, with one log line each.
Clients that never read a large answer are cut after `send_timeout`.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests

from .harness import SHARED_STATE_KEY, TIME_SERVER, Gunicorn, server_command, wait_for

THREADS = 4
WORKERS = 2
HELD = WORKERS * THREADS  # enough to take every thread of every worker, evenly shared out
HELD_SLOWLY = 2 * HELD  # and then some, however the workers happened to share them
SERVERS = {
    "time": {"type": "stdio", "command": TIME_SERVER},
    # Every held request may be in progress at once: the bulkhead is not what these tests are about.
    "sdk": {"type": "stdio", "command": server_command("sdk_server.py", "stdio"), "pool_size": HELD,
            "max_concurrent": HELD, "env_vars": {"TEST_SERVER_STATE_KEY": SHARED_STATE_KEY}},
}
LIST = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
HEAD = b"POST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
# What an answer to the normal client may take: far more than it needs, far less than any hold.
PATIENCE = 4.0


@contextmanager
def connections(gateway: Gunicorn, count: int) -> Iterator[list[socket.socket]]:
    """`count` raw connections to the gateway, closed on exit whatever happened."""
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            opened.append(socket.create_connection(("127.0.0.1", gateway.port), timeout=10))
        yield opened
    finally:
        for sock in opened:
            sock.close()


def kept_alive(sock: socket.socket) -> None:
    """One whole request and its answer on `sock`, which then stays open (keep-alive)."""
    sock.sendall(HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(LIST), LIST))
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")).split(b":")[1])
    while len(body) < length:
        body += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head


def others_are_answered(gateway: Gunicorn) -> None:
    """A normal client's tools/list (on new connections) and /healthz answer, each within PATIENCE."""
    for _ in range(3):
        response = requests.post(f"{gateway.url}/time/mcp", data=LIST, timeout=PATIENCE,
                                 headers={"Content-Type": "application/json", "Connection": "close"})
        assert response.status_code == 200
        assert {tool["name"] for tool in response.json()["result"]["tools"]} == {"get_current_time", "convert_time"}
    assert requests.get(f"{gateway.url}/healthz", timeout=PATIENCE).json()["status"] == "ok"


# Generous timeouts: these clients must be held open, not cut, while the others are served.
HOLDING = {"header_timeout": 30, "body_timeout": 30}


@pytest.mark.parametrize("how", ["slow headers", "slow headers after a kept-alive request", "slow body", "silent"])
def test_slow_clients_leave_the_threads_to_the_others(gunicorn: Any, how: str) -> None:
    gateway = gunicorn(SERVERS, HOLDING, workers=WORKERS, threads=THREADS)
    with connections(gateway, HELD_SLOWLY) as held:
        if how == "slow headers after a kept-alive request":
            for sock in held:
                kept_alive(sock)
        first = {"silent": b"", "slow body": HEAD + b"Content-Length: 1000\r\n\r\n{"}.get(how, b"P")
        for sock in held:
            if first:
                sock.sendall(first)
        trickle = b"OST /time/mcp HTTP/1.1\r\n" if how.startswith("slow headers") else b" " * 3
        for byte in trickle[:3]:  # a byte a second: long enough for every worker to be reading them
            time.sleep(1)
            for sock in held:
                if how != "silent":
                    sock.sendall(bytes([byte]))
        others_are_answered(gateway)


@pytest.mark.parametrize("how", ["slow headers", "slow body", "silent"])
def test_a_slow_client_is_cut_at_its_timeout_with_one_log_line(gunicorn: Any, how: str) -> None:
    gateway = gunicorn(SERVERS, {"header_timeout": 1, "body_timeout": 1}, workers=1, threads=THREADS)
    with connections(gateway, 1) as (sock,):
        sock.sendall({"silent": b"", "slow body": HEAD + b"Content-Length: 1000\r\n\r\n{"}.get(how, b"POST /time"))
        answer = b""
        deadline = time.monotonic() + 15
        for _ in range(30):  # a byte a second until the gateway closes the connection
            assert time.monotonic() < deadline, "the slow client was never cut"
            try:
                if how != "silent":
                    sock.sendall(b" ")
                sock.settimeout(1)
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            answer += data
            if not data:
                break
        else:
            raise AssertionError("the slow client was never cut")
    if answer:  # best effort before the close: a JSON-RPC error saying why
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == -32600
    what = "body" if how == "slow body" else "headers"
    wait_for(lambda: f"request {what} not received within" in gateway.log())
    lines = [line for line in gateway.log().splitlines() if "slow client" in line]
    assert len(lines) == 1, lines
    others_are_answered(gateway)


def test_clients_that_never_read_a_large_answer_are_cut_after_send_timeout(gunicorn: Any) -> None:
    gateway = gunicorn(SERVERS, {"send_timeout": 1}, workers=WORKERS, threads=THREADS)
    call = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "blob", "arguments": {"size": 6 * 1024 * 1024}}}).encode()
    held: list[socket.socket] = []
    try:
        for _ in range(HELD):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
            sock.settimeout(10)
            held.append(sock)
            sock.connect(("127.0.0.1", gateway.port))
            sock.sendall(b"POST /sdk/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(call), call))
        wait_for(lambda: gateway.log().count("did not read the answer within") == HELD, 60)
        others_are_answered(gateway)
    finally:
        for sock in held:
            sock.close()
