"""A 2026-07-28-only MCP server over Streamable HTTP (stdlib), for era-bridging tests.

Usage: python modern_http_server.py PORT   (binds 127.0.0.1, endpoint /mcp)

It refuses anything without the 2026-07-28 headers and envelope (so it proves
the gateway adds them), answers `initialize` with -32022, and streams two
progress notifications before a `tools/call` result when given a progressToken,
and one `info` log message when the request's `_meta` log level asks for it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VERSION = "2026-07-28"
ENVELOPE = ("io.modelcontextprotocol/protocolVersion", "io.modelcontextprotocol/clientCapabilities")
LOG_LEVEL = "io.modelcontextprotocol/logLevel"
LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
INFO = {"io.modelcontextprotocol/serverInfo": {"name": "modern-server", "version": "1.0"}}
ECHO_TOOL = {"name": "echo", "description": "Echo text back.",
             "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}


def result(request_id: Any, value: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": {"resultType": "complete", **value, "_meta": INFO}}


def error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        body["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": body}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._json(405, error(None, -32600, "no GET stream in 2026-07-28"))

    do_DELETE = do_GET

    def do_POST(self) -> None:
        message = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
        request_id = message.get("id") if isinstance(message, dict) else None
        method = message.get("method") if isinstance(message, dict) else None
        meta = ((message.get("params") or {}).get("_meta") or {}) if isinstance(message, dict) else {}
        if self.headers.get("MCP-Protocol-Version") != VERSION or method == "initialize":
            self._json(400, error(request_id, -32022, "Unsupported protocol version",
                                  {"supported": [VERSION], "requested": self.headers.get("MCP-Protocol-Version")}))
        elif self.headers.get("Mcp-Method") != method or any(key not in meta for key in ENVELOPE):
            self._json(400, error(request_id, -32020, "Header mismatch or missing _meta envelope"))
        elif method == "server/discover":
            self._json(200, result(request_id, {"supportedVersions": [VERSION], "ttlMs": 0, "cacheScope": "private",
                                                "capabilities": {"tools": {"listChanged": False}}}))
        elif method == "tools/list":
            self._json(200, result(request_id, {"tools": [ECHO_TOOL], "ttlMs": 0, "cacheScope": "private"}))
        elif method == "tools/call" and message["params"].get("name") == "echo":
            text = str(message["params"].get("arguments", {}).get("text", ""))
            answer = result(request_id, {"content": [{"type": "text", "text": f"{text} (pid {os.getpid()})"}],
                                         "isError": False})
            token = meta.get("progressToken")
            notes = [] if token is None else [{"jsonrpc": "2.0", "method": "notifications/progress",
                                               "params": {"progressToken": token, "progress": n, "total": 2}}
                                              for n in (1, 2)]
            level = meta.get(LOG_LEVEL)
            if level in LEVELS and LEVELS.index(level) <= LEVELS.index("info"):  # logs only when asked (SEP-2575)
                notes.append({"jsonrpc": "2.0", "method": "notifications/message",
                              "params": {"level": "info", "logger": "modern-server", "data": f"echoed {text}"}})
            if notes:
                self._sse([*notes, answer])
            else:
                self._json(200, answer)
        else:
            self._json(404, error(request_id, -32601, "Method not found"))

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, messages: list[dict[str, Any]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for message in messages:
            event = f"event: message\ndata: {json.dumps(message)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            time.sleep(0.05)
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: Any) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
