"""A handshake-era MCP HTTP instance on raw sockets, for tests that must see its connections.

It counts the TCP connections the gateway opens, keeps each alive across
requests, answers initialize (JSON, with a session id), 202s notifications
and responses (recording them), answers a GET with a stream of one event
ended whole (ended by closing the connection for /mcp/close), and answers `tools/call` as SSE by tool name:

- `quick`: a progress notification and the result, the body ended (chunked).
- `lingering`: the same, the body's last chunk 0.3 s after the result.
- `held`: a progress notification, then the result once `release` is set.
- `hang`: a progress notification, then silence until the gateway closes the
  connection (recorded in `closed`).
- `ask`: an elicitation/create request to the client, then (once the
  gateway's answer to it arrives) a result naming that answer's error code.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import closing, suppress
from typing import Any

from .harness import read_request

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
SESSION = "raw-session-1"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(message: dict[str, Any]) -> bytes:
    return chunk(b"event: message\ndata: " + json.dumps(message).encode() + b"\n\n")


def text_result(request_id: Any, text: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": {"content": [{"type": "text", "text": text}]}}


class RawMcp:
    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.connections = 0  # TCP connections accepted
        self.calls: list[Any] = []  # the ids tools/call came with (the gateway's own)
        self.received: list[dict[str, Any]] = []  # notifications and responses POSTed to it
        self.closed: list[Any] = []  # the tools/call ids whose connection the gateway closed mid-answer
        self.release = threading.Event()
        self.answered = threading.Event()  # a response to its elicitation arrived
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.listener.close()
        for sock in self._socks:
            with suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with closing(sock), suppress(OSError):
            data = b""
            while (request := read_request(sock, data)) is not None:
                head, body, data = request
                if head.startswith(b"GET"):  # a stream of one event, ended whole
                    sock.sendall(SSE_HEAD + event({"jsonrpc": "2.0", "method": "notifications/message",
                                                   "params": {"level": "info", "data": "hello"}}) + b"0\r\n\r\n")
                    continue
                message = json.loads(body) if body else {}
                if not self._answer(sock, message):
                    return

    def _json(self, sock: socket.socket, message: dict[str, Any], extra: bytes = b"") -> None:
        body = json.dumps(message).encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
                     % (extra, len(body), body))

    def _answer(self, sock: socket.socket, message: dict[str, Any]) -> bool:
        """Answer one request; False when the connection is over."""
        method, request_id = message.get("method"), message.get("id")
        if method is None or request_id is None:
            with self.lock:
                self.received.append(message)
            if method is None:
                self.answered.set()
            sock.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
            return True
        if method == "initialize":
            self._json(sock, {"jsonrpc": "2.0", "id": request_id, "result": {
                "protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                "serverInfo": {"name": "raw-mcp", "version": "1"}}}, b"Mcp-Session-Id: %s\r\n" % SESSION.encode())
            return True
        if method != "tools/call":
            self._json(sock, {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "no such method"}})
            return True
        with self.lock:
            self.calls.append(request_id)
        name = (message.get("params") or {}).get("name")
        progress = {"jsonrpc": "2.0", "method": "notifications/progress",
                    "params": {"progressToken": "p", "progress": 1, "total": 2}}
        sock.sendall(SSE_HEAD + event(progress))
        if name == "hang":
            while sock.recv(65536):
                pass
            with self.lock:
                self.closed.append(request_id)
            return False
        if name == "lingering":  # the body's end comes a little after the result
            sock.sendall(event(text_result(request_id, "done")))
            time.sleep(0.3)
            sock.sendall(b"0\r\n\r\n")
            return True
        if name == "held":
            self.release.wait(60)
        if name == "ask":
            sock.sendall(event({"jsonrpc": "2.0", "id": "ask-1", "method": "elicitation/create",
                                "params": {"message": "name?", "requestedSchema": {"type": "object"}}}))
            self.answered.wait(10)
            answer = next((m for m in self.received if m.get("id") == "ask-1"), {})
            sock.sendall(event(text_result(request_id, f"elicitation answered {json.dumps(answer.get('error'))}"))
                         + b"0\r\n\r\n")
            return True
        sock.sendall(event(text_result(request_id, "done")) + b"0\r\n\r\n")
        return True
