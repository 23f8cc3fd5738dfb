"""Hand-written LEGACY-ONLY MCP stdio server (protocol 2025-11-25), stdlib only.

Used to test the gateway's era bridging: it knows nothing of the 2026-07-28
protocol, rejects ``server/discover`` and refuses any request whose
``params._meta`` carries an ``io.modelcontextprotocol/`` envelope key.

Usage::

    python legacy_server.py

Tools: ``echo(text: str)``, ``whoami()``, ``progress(steps: int = 3)``, ``elicit()``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from typing import Any, NoReturn

JsonDict = dict[str, Any]

LATEST_VERSION = "2025-11-25"
KNOWN_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
ENVELOPE_PREFIX = "io.modelcontextprotocol/"

TOOLS: list[JsonDict] = [
    {
        "name": "echo",
        "description": "Return the given text.",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
    },
    {
        "name": "whoami",
        "description": "Return the server's PID as text.",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {
        "name": "progress",
        "description": "Send `steps` progress notifications (if a progressToken is given) and one log message.",
        "inputSchema": {
            "type": "object",
            "properties": {"steps": {"type": "integer", "default": 3, "minimum": 0}},
        },
    },
    {
        "name": "elicit",
        "description": "Ask the client for a name via elicitation/create.",
        "inputSchema": {"type": "object", "properties": {}},
    },
]

METHODS = {"initialize", "ping", "tools/list", "tools/call", "logging/setLevel"}


class RpcError(Exception):
    """A JSON-RPC error to be sent back for the current request."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class LegacyServer:
    """Line-oriented JSON-RPC loop implementing the legacy MCP handshake."""

    def __init__(self) -> None:
        self.initialized = False
        self.next_server_id = 1
        self.deferred: deque[Any] = deque()

    # ---- I/O -------------------------------------------------------------
    def send(self, msg: JsonDict) -> None:
        line = json.dumps(msg, separators=(",", ":"), ensure_ascii=False) + "\n"
        sys.stdout.buffer.write(line.encode("utf-8"))
        sys.stdout.buffer.flush()

    def read_message(self) -> Any:
        """Return the next parsed message, or raise EOFError at end of stdin."""
        while True:
            raw = sys.stdin.buffer.readline()
            if not raw:
                raise EOFError
            text = raw.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                self.send(
                    {
                        "jsonrpc": "2.0",
                        "id": None,
                        "error": {"code": -32700, "message": "Parse error"},
                    }
                )

    def next_message(self) -> Any:
        if self.deferred:
            return self.deferred.popleft()
        return self.read_message()

    def notify(self, method: str, params: JsonDict) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    # ---- main loop -------------------------------------------------------
    def run(self) -> None:
        while True:
            try:
                msg = self.next_message()
            except EOFError:
                return
            self.handle(msg)

    def handle(self, msg: Any) -> None:
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            self.send(
                {
                    "jsonrpc": "2.0",
                    "id": None,
                    "error": {"code": -32600, "message": "Invalid Request"},
                }
            )
            return
        method = msg.get("method")
        if not isinstance(method, str):
            return  # a stray response; nothing is waiting for it
        if "id" not in msg:
            return  # notifications (notifications/initialized etc.) need no answer
        req_id = msg["id"]
        try:
            result = self.dispatch(method, msg.get("params"))
        except RpcError as exc:
            err: JsonDict = {"code": exc.code, "message": exc.message}
            if exc.data is not None:
                err["data"] = exc.data
            self.send({"jsonrpc": "2.0", "id": req_id, "error": err})
            return
        self.send({"jsonrpc": "2.0", "id": req_id, "result": result})

    def dispatch(self, method: str, params: Any) -> JsonDict:
        # Unknown methods (server/discover included) fail, before or after initialize.
        if method not in METHODS:
            raise RpcError(-32601, "Method not found", {"method": method})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise RpcError(-32602, "params must be an object")
        if not self.initialized and method not in ("initialize", "ping"):
            raise RpcError(-32002, "not initialized")
        meta = params.get("_meta")
        if isinstance(meta, dict):
            bad = sorted(
                k for k in meta if isinstance(k, str) and k.startswith(ENVELOPE_PREFIX)
            )
            if bad:
                raise RpcError(-32602, f"unexpected 2026 envelope key {', '.join(bad)}")
        if method == "initialize":
            return self.on_initialize(params)
        if method == "ping":
            return {}
        if method == "logging/setLevel":
            return {}
        if method == "tools/list":
            return {"tools": TOOLS}
        return self.on_call(params)

    # ---- methods ---------------------------------------------------------
    def on_initialize(self, params: JsonDict) -> JsonDict:
        requested = params.get("protocolVersion")
        version = requested if requested in KNOWN_VERSIONS else LATEST_VERSION
        self.initialized = True
        return {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "legacy-server", "version": "1.0"},
            "instructions": "legacy test server",
        }

    def on_call(self, params: JsonDict) -> JsonDict:
        name = params.get("name")
        args = params.get("arguments") or {}
        if not isinstance(args, dict):
            raise RpcError(-32602, "arguments must be an object")
        if name == "echo":
            text = args.get("text")
            if not isinstance(text, str):
                raise RpcError(-32602, "echo: 'text' (string) is required")
            return text_result(text)
        if name == "whoami":
            return text_result(str(os.getpid()))
        if name == "progress":
            return self.tool_progress(params, args)
        if name == "elicit":
            return self.tool_elicit()
        raise RpcError(-32602, f"Unknown tool: {name}")

    def tool_progress(self, params: JsonDict, args: JsonDict) -> JsonDict:
        steps = args.get("steps", 3)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise RpcError(-32602, "progress: 'steps' must be a non-negative integer")
        meta = params.get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        if token is not None:
            for i in range(1, steps + 1):
                self.notify(
                    "notifications/progress",
                    {
                        "progressToken": token,
                        "progress": i,
                        "total": steps,
                        "message": f"step {i}",
                    },
                )
                time.sleep(0.05)
        self.notify(
            "notifications/message",
            {"level": "info", "logger": "legacy-server", "data": "progress finished"},
        )
        return text_result("done")

    def tool_elicit(self) -> JsonDict:
        srv_id = f"srv-{self.next_server_id}"
        self.next_server_id += 1
        self.send(
            {
                "jsonrpc": "2.0",
                "id": srv_id,
                "method": "elicitation/create",
                "params": {
                    "mode": "form",
                    "message": "What is your name?",
                    "requestedSchema": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}},
                        "required": ["name"],
                    },
                },
            }
        )
        # Wait for the reply; park anything else that arrives meanwhile.
        while True:
            try:
                msg = self.read_message()
            except EOFError:
                sys.exit(0)
            if (
                isinstance(msg, dict)
                and "method" not in msg
                and msg.get("id") == srv_id
            ):
                break
            self.deferred.append(msg)
        if "error" in msg:
            err = msg["error"] if isinstance(msg["error"], dict) else {}
            raise RpcError(
                int(err.get("code", -32603)),
                str(err.get("message", "elicitation failed")),
                err.get("data"),
            )
        result = msg.get("result")
        if not isinstance(result, dict):
            raise RpcError(-32603, "malformed elicitation result")
        content = result.get("content")
        if content is None:
            return text_result(str(result.get("action", "")))
        return text_result(
            json.dumps(
                content, separators=(",", ":"), sort_keys=True, ensure_ascii=False
            )
        )


def text_result(text: str) -> JsonDict:
    """A tools/call result holding one text block."""
    return {"content": [{"type": "text", "text": text}], "isError": False}


def main() -> NoReturn:
    """Run the server until stdin reaches EOF."""
    print(f"legacy-server starting pid {os.getpid()}", file=sys.stderr, flush=True)
    try:
        LegacyServer().run()
    except (BrokenPipeError, KeyboardInterrupt):
        os._exit(0)
    sys.exit(0)


if __name__ == "__main__":
    main()
