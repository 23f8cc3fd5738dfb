"""Long-lived streams hold no thread: real gunicorn (2 workers x 4 threads) relaying pass-through SSE streams.

A raw-socket upstream (below) gives precise control of what an instance
sends and shows when its connection closes; @modelcontextprotocol/server-everything
shows real handshake-era sessions holding their GET streams.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import pytest
import requests

from .harness import (
    ACCEPT_BOTH,
    EVERYTHING,
    Gunicorn,
    McpHttpServer,
    read_request,
    read_until,
    rpc,
    wait_for,
    write_registry,
)

MODERN_META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream:
    """An HTTP instance on a raw socket: POSTs get a JSON-RPC error, each GET is served by `on_get` in a thread.

    `on_get(sock, index)` writes what it likes; the upstream then waits for the
    gateway to close the connection and records that in `closed`.
    """

    def __init__(self, on_get: Callable[[socket.socket, int], None]):
        self.on_get = on_get
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.gets = 0
        self.closed: list[int] = []  # the GETs whose connection the gateway closed
        self.sent_all: list[int] = []  # the GETs whose on_get wrote everything it meant to
        self.lock = threading.Lock()
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with closing(sock), suppress(OSError):
            data = b""
            while (request := read_request(sock, data)) is not None:
                head, body, data = request
                if head.startswith(b"GET"):
                    with self.lock:
                        index = self.gets
                        self.gets += 1
                    try:
                        self.on_get(sock, index)
                        self.sent_all.append(index)
                        while sock.recv(65536):
                            pass
                    finally:
                        self.closed.append(index)
                    return
                message = json.loads(body) if body else {}
                answer = json.dumps({"jsonrpc": "2.0", "id": message.get("id"),
                                     "error": {"code": -32601, "message": "raw test upstream"}}).encode()
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(answer), answer))

    def close(self) -> None:
        self.listener.close()
        for sock in self.connections:
            with suppress(OSError):
                sock.close()


def first_event_then_silence(sock: socket.socket, index: int) -> None:
    sock.sendall(SSE_HEAD + chunk(b'event: message\ndata: {"hello": %d}\n\n' % index))


@pytest.fixture
def upstream() -> Iterator[Callable[[Callable[[socket.socket, int], None]], Upstream]]:
    made: list[Upstream] = []

    def make(on_get: Callable[[socket.socket, int], None]) -> Upstream:
        made.append(Upstream(on_get))
        return made[-1]

    yield make
    for item in made:
        item.close()


def raw_server(upstream: Upstream) -> dict[str, Any]:
    return {"raw": {"type": "http", "instances": [{"endpoint": upstream.url}]}}


def open_stream(gateway: Gunicorn, request_id: str = "", path: str = "/raw/mcp") -> socket.socket:
    """A GET stream on a raw socket, its head read; the socket is left where the body begins."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\nAccept: text/event-stream\r\n"
                 f"X-Request-Id: {request_id or os.urandom(8).hex()}\r\n\r\n".encode())
    return sock



def read_to_end(sock: socket.socket, seconds: float = 15.0) -> bytes:
    """Until the final chunk (a kept-alive connection stays open) or the connection's end."""
    data = b""
    deadline = time.monotonic() + seconds
    while not data.endswith(b"\r\n0\r\n\r\n"):
        assert time.monotonic() < deadline, f"the stream did not end within {seconds:g}s; got {data[-300:]!r}"
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            more = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data + b"<reset>"
        if not more:
            return data
        data += more
    return data


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """The body of a chunked answer (head included in `data`), and whether its final chunk arrived."""
    rest = data.partition(b"\r\n\r\n")[2]
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return body, True
        body, rest = body + rest[:size], rest[size + 2:]
    return body, False


def in_flight(gateway: Gunicorn) -> int:
    return int(sum(i["in_flight"] for i in gateway.status()["servers"]["raw"]["instances"]))


def open_streams(gateway: Gunicorn) -> int:
    return int(sum(worker["streams"] for worker in gateway.status()["workers"]))


# --- threads ------------------------------------------------------------------------------


@pytest.mark.skipif(not EVERYTHING.exists(), reason="needs tests/node (make test installs it)")
def test_twenty_sessions_holding_get_streams_leave_the_threads_free(gunicorn: Any, tmp_path: Path) -> None:
    everything = McpHttpServer(tmp_path, kind="everything")
    try:
        gateway = gunicorn({"every": {"type": "http", "instances": [{"endpoint": everything.url}]}}, workers=2, threads=4)
        url = f"{gateway.url}/every/mcp"
        held: list[requests.Response] = []
        try:
            for number in range(20):
                session = initialized(url, number)
                stream = requests.get(url, headers={"Accept": "text/event-stream", "Mcp-Session-Id": session,
                                                    "MCP-Protocol-Version": "2025-06-18"}, stream=True, timeout=10)
                assert stream.status_code == 200, stream.text
                held.append(stream)
            # 20 streams, 8 threads: with a thread per stream nothing below would be answered.
            assert requests.get(f"{gateway.url}/healthz", timeout=5).ok
            session = initialized(url, 21)
            headers = {**ACCEPT_BOTH, "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-06-18"}
            tools = requests.post(url, json=rpc("tools/list", {}, 2), headers=headers, timeout=10)
            assert tools.status_code == 200 and "echo" in tools.text, tools.text
            echo = requests.post(url, json=rpc("tools/call", {"name": "echo", "arguments": {"message": "hi"}}, 3),
                                 headers=headers, timeout=10)
            assert echo.status_code == 200 and "Echo: hi" in echo.text, echo.text
            wait_for(lambda: open_streams(gateway) == 20, 10, "20 relayed streams")
            wait_for(lambda: "mcp_gateway_streams_open 20.0" in requests.get(f"{gateway.url}/metrics", timeout=5).text,
                     10, "the gauge")
        finally:
            for stream in held:
                stream.close()
    finally:
        everything.stop()


def initialized(url: str, number: int) -> str:
    init = requests.post(url, json=rpc("initialize", {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": f"s{number}", "version": "1"}}),
        headers=ACCEPT_BOTH, timeout=10)
    assert init.status_code == 200, init.text
    session = init.headers["Mcp-Session-Id"]
    done = requests.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                         headers={**ACCEPT_BOTH, "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-06-18"},
                         timeout=10)
    assert done.status_code == 202, done.text
    return session


# --- a client that leaves ------------------------------------------------------------------


def test_a_client_leaving_its_stream_closes_the_upstream_connection(gunicorn: Any, upstream: Any) -> None:
    raw = upstream(first_event_then_silence)
    gateway = gunicorn(raw_server(raw), workers=2, threads=4)
    sock = open_stream(gateway, request_id="leaving-stream-1")
    read_until(sock, b'{"hello": 0}')
    wait_for(lambda: in_flight(gateway) == 1, 10, "the stream counted in flight")
    sock.close()  # the upstream stays silent: only watching the client notices this
    wait_for(lambda: raw.closed == [0], 10, "the upstream connection closed")
    wait_for(lambda: in_flight(gateway) == 0, 10, "in_flight back to 0")
    wait_for(lambda: "request_id=leaving-stream-1" in gateway.log(), 10, "the stream's access line")
    wait_for(lambda: open_streams(gateway) == 0, 10, "no stream in /status")
    page = requests.get(f"{gateway.url}/metrics", timeout=5).text
    assert 'mcp_gateway_streams_ended_total{reason="client_gone"} 1.0' in page


def test_relayed_streams_ending_do_not_overflow_the_connection_pool(gunicorn: Any, upstream: Any) -> None:
    # A relayed stream's upstream connection is closed at its end, never given back to the
    # keep-alive pool: more streams than max_connections ending must not each log "pool is full".
    raw = upstream(first_event_then_silence)
    servers = {"raw": {**raw_server(raw)["raw"], "max_connections": 1}}
    gateway = gunicorn(servers, workers=1, threads=4)
    socks = [open_stream(gateway) for _ in range(4)]
    for sock in socks:
        read_until(sock, b'"hello"')
    wait_for(lambda: open_streams(gateway) == 4, 10, "four streams relayed")
    for sock in socks:
        sock.close()
    wait_for(lambda: len(raw.closed) == 4, 10, "every upstream connection closed")
    wait_for(lambda: open_streams(gateway) == 0, 10, "no stream left")
    assert "Connection pool is full" not in gateway.log()


def test_a_client_leaving_mid_sse_answer_releases_the_instance(gunicorn: Any, tmp_path: Path) -> None:
    sdk = McpHttpServer(tmp_path, kind="sdk")
    try:
        gateway = gunicorn({"raw": {"type": "http", "instances": [{"endpoint": sdk.url}]}}, workers=2, threads=4)
        body = rpc("tools/call", {"name": "sleep", "arguments": {"seconds": 60}, "_meta": MODERN_META}, 7)
        headers = {**ACCEPT_BOTH, "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "sleep",
                   "X-Request-Id": "leaving-answer-1"}
        with requests.post(f"{gateway.url}/raw/mcp", json=body, headers=headers, stream=True, timeout=30) as answer:
            assert answer.headers["Content-Type"].startswith("text/event-stream"), answer.text
            wait_for(lambda: in_flight(gateway) == 1, 10, "the call in flight")
        # The instance says nothing for a minute: only watching the client notices it left.
        wait_for(lambda: in_flight(gateway) == 0, 10, "in_flight back to 0")
        wait_for(lambda: "request_id=leaving-answer-1" in gateway.log(), 10, "the answer's access line")
    finally:
        sdk.stop()


def test_a_client_that_does_not_read_is_cut_and_the_upstream_is_not_held(gunicorn: Any, upstream: Any) -> None:
    event = b"data: " + b"x" * 65536 + b"\n\n"

    def flood(sock: socket.socket, index: int) -> None:
        sock.sendall(SSE_HEAD)
        for _ in range(256 if index == 0 else 16):  # 16 MiB to the first: far past the buffer and the sockets' own
            sock.sendall(chunk(event))
        sock.sendall(b"0\r\n\r\n")

    raw = upstream(flood)
    gateway = gunicorn(raw_server(raw), {"stream_buffer_bytes": 262144, "send_timeout": 60}, workers=2, threads=4)
    sleeper = open_stream(gateway)  # never reads
    sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    wait_for(lambda: 0 in raw.closed, 15, "the gateway to let the slow stream's upstream go")
    wait_for(lambda: "slow client" in gateway.log() and "unread" in gateway.log(), 5, "the log line")
    # Another client of the same upstream gets its whole stream.
    reader = open_stream(gateway)
    body, ended = dechunk(read_to_end(reader, 30))
    assert ended and body.count(b"data: ") == 16, body[-200:]
    sleeper.close()
    reader.close()


# --- keep-alive comments ---------------------------------------------------------------


def test_idle_streams_get_keepalive_comments_between_events_only(gunicorn: Any, upstream: Any) -> None:
    def slow_event(sock: socket.socket, index: int) -> None:
        sock.sendall(SSE_HEAD + chunk(b'event: message\ndata: {"first": '))
        time.sleep(2.5)  # half an event, for longer than the interval
        sock.sendall(chunk(b'1}\n\n'))
        time.sleep(2.5)
        sock.sendall(chunk(b'data: {"second": 2}\n\n') + b"0\r\n\r\n")

    raw = upstream(slow_event)
    gateway = gunicorn(raw_server(raw), {"sse_keepalive_interval": 1}, workers=2, threads=4)
    with closing(open_stream(gateway)) as sock:
        body, ended = dechunk(read_to_end(sock, 30))
        # A stream that ended cleanly leaves its connection to keep-alive: it serves the next request.
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n\r\n".encode())
        assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    assert ended, body
    blocks = [block for block in body.split(b"\n\n") if block]
    assert b": keep-alive" in blocks
    assert [block for block in blocks if block != b": keep-alive"] == [
        b'event: message\ndata: {"first": 1}', b'data: {"second": 2}']


# --- limits ----------------------------------------------------------------------------------


def test_past_max_streams_a_new_stream_gets_503_until_one_ends(gunicorn: Any, upstream: Any) -> None:
    raw = upstream(first_event_then_silence)
    # One worker: max_streams is per worker.
    gateway = gunicorn(raw_server(raw), {"max_streams": 2}, workers=1, threads=4)
    first, second = open_stream(gateway), open_stream(gateway)
    read_until(first, b"hello")
    read_until(second, b"hello")
    refused = requests.get(f"{gateway.url}/raw/mcp", headers={"Accept": "text/event-stream"}, timeout=10)
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"]
    error = refused.json()["error"]
    assert "max_streams" in error["message"]
    assert raw.gets == 2  # refused before the instance was asked
    first.close()
    wait_for(lambda: in_flight(gateway) == 1, 10, "the first stream to end")
    third = open_stream(gateway)
    read_until(third, b"hello")
    second.close()
    third.close()


# --- stopping workers ---------------------------------------------------------------------


def test_hup_ends_streams_cleanly_after_the_graceful_timeout(upstream: Any, tmp_path: Path) -> None:
    raw = upstream(first_event_then_silence)
    env = {"GUNICORN_CMD_ARGS": "--graceful-timeout 2"}
    with Gunicorn(write_registry(tmp_path, raw_server(raw)), workers=2, threads=4, env=env).serving() as gateway:
        streams = [open_stream(gateway) for _ in range(3)]
        for sock in streams:
            read_until(sock, b"hello")
        old = gateway.worker_pids()
        gateway.remember()
        gateway.process.send_signal(signal.SIGHUP)
        for sock in streams:
            rest = read_to_end(sock, 15)
            assert rest.endswith(b"0\r\n\r\n"), f"the stream was not ended cleanly: {rest[-200:]!r}"
            sock.close()
        wait_for(lambda: not (gateway.worker_pids() & old) and len(gateway.worker_pids()) == 2, 30, "new workers only")
        again = open_stream(gateway)
        read_until(again, b"hello")
        again.close()
        wait_for(lambda: len(raw.closed) == 4, 10, "every upstream connection closed")


def test_max_requests_ends_the_workers_streams_cleanly(upstream: Any, tmp_path: Path) -> None:
    # A worker that reaches max_requests stops as on HUP: its streams end cleanly, after the
    # graceful timeout, and the stream's client can reconnect to its replacement.
    raw = upstream(first_event_then_silence)
    env = {"GUNICORN_CMD_ARGS": "--graceful-timeout 2 --max-requests 3"}
    with Gunicorn(write_registry(tmp_path, raw_server(raw)), workers=1, threads=4, env=env).serving() as gateway:
        old = gateway.worker_pids()
        sock = open_stream(gateway)  # request 1
        read_until(sock, b"hello")
        gateway.remember()
        for _ in range(2):  # requests 2 and 3: the worker has served its max_requests
            requests.get(f"{gateway.url}/healthz", timeout=10)
        rest = read_to_end(sock, 15)
        assert rest.endswith(b"0\r\n\r\n"), f"the stream was not ended cleanly: {rest[-200:]!r}"
        sock.close()
        wait_for(lambda: gateway.worker_pids() and not (gateway.worker_pids() & old), 30, "a new worker")
        again = open_stream(gateway)
        read_until(again, b"hello")
        again.close()
        wait_for(lambda: len(raw.closed) == 2, 10, "both upstream connections closed")


# --- the relay's decoders, alone ------------------------------------------------------------


def test_chunked_framing_is_decoded_however_it_is_cut() -> None:
    from gateway.streams import Chunked

    wire = b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n"
    for size in (1, 2, 3, 7, len(wire)):
        framing, payload, done = Chunked(), b"", False
        for start in range(0, len(wire), size):
            piece, done = framing.feed(wire[start:start + size])
            payload += piece
        assert (payload, done) == (b"hello world", True)
    with pytest.raises(ValueError, match="chunk size"):
        Chunked().feed(b"zz\r\n")
    with pytest.raises(ValueError, match="CRLF"):
        Chunked().feed(b"1\r\nab\r\n")


def test_sse_events_are_cut_whole_with_crlf_split_across_reads() -> None:
    from gateway.streams import Events

    events = Events()
    assert events.feed(b"data: 1\r") == []
    assert events.feed(b"\n\r") == []
    assert events.feed(b"\ndata: 2\n\ndata: 3") == [b"data: 1\n\n", b"data: 2\n\n"]
    assert bytes(events.pending) == b"data: 3"
