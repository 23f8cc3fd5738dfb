"""Deliberately misbehaving modern (2026-07-28) MCP stdio server, stdlib only.

Answers ``server/discover`` (only when the ``_meta`` envelope is present) and
``tools/list`` (one tool, ``work``) correctly, then misbehaves on ``tools/call``
according to MODE.

Usage::

    python faulty_server.py MODE [PIDFILE]

MODE is one of: exit-at-start, hang, garbage, die, long-line, stderr-flood, ok,
discover-silent, die-on-list (exits with code 7 on tools/list), stale-answer (before
each tools/call answer, writes a late answer to the gateway's handshake id),
slow-start (sleeps FAULTY_START_SECONDS, default 1, before reading stdin),
bad-discover (a server/discover answer whose ``_meta`` is not an object),
record-shutdown (appends "PID eof" to PIDFILE at stdin EOF, keeps running, and
"PID term" at SIGTERM, then exits 0), and the cancel-* modes: tools/call sends
one progress notification (when the request has a progressToken), then waits for
``notifications/cancelled`` naming it, after which cancel-silent says nothing,
cancel-answers answers it anyway (after FAULTY_LATE_SECONDS, default 0), cancel-garbage writes non-JSON and cancel-busy
keeps sending progress for it for 3 s before answering (progress comes every
FAULTY_PROGRESS_SECONDS meanwhile, default 0.2); each appends "PID cancelled ID" to PIDFILE
when the cancel comes. asks-sampling: tools/call asks the client sampling/createMessage and
answers with the text of the error it got back.
If PIDFILE is given, "PID MODE" is appended to it at start.
SIGTERM keeps its default action (the process dies); stdin EOF exits with 0.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from typing import Any, NoReturn

JsonDict = dict[str, Any]

MODERN = "2026-07-28"
LEGACY_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
PV_KEY = "io.modelcontextprotocol/protocolVersion"
CAPS_KEY = "io.modelcontextprotocol/clientCapabilities"
SERVER_INFO = {"name": "faulty-server", "version": "1.0"}
MODES = (
    "exit-at-start",
    "hang",
    "garbage",
    "die",
    "long-line",
    "stderr-flood",
    "ok",
    "discover-silent",
    "die-on-list",
    "slow-start",
    "stale-answer",
    "bad-discover",
    "record-shutdown",
    "cancel-silent",
    "cancel-answers",
    "cancel-garbage",
    "cancel-busy",
    "asks-sampling",
)

LONG_LINE_BYTES = 50 * 1024 * 1024
CHUNK = 1024 * 1024
FLOOD_LINES = 20_000

TOOL_WORK: JsonDict = {
    "name": "work",
    "description": "Do some work (or misbehave, depending on the server's mode).",
    "inputSchema": {"type": "object", "properties": {}},
}


def send(msg: JsonDict) -> None:
    line = json.dumps(msg, separators=(",", ":")) + "\n"
    sys.stdout.buffer.write(line.encode("utf-8"))
    sys.stdout.buffer.flush()


def reply(req_id: Any, result: JsonDict) -> None:
    send({"jsonrpc": "2.0", "id": req_id, "result": result})


def error(req_id: Any, code: int, message: str, data: Any = None) -> None:
    err: JsonDict = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    send({"jsonrpc": "2.0", "id": req_id, "error": err})


def hard_exit(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def envelope(params: Any) -> JsonDict | None:
    """Return params._meta if it carries the required 2026 envelope keys."""
    if not isinstance(params, dict):
        return None
    meta = params.get("_meta")
    if isinstance(meta, dict) and PV_KEY in meta and CAPS_KEY in meta:
        return meta
    return None


def on_discover(mode: str, req_id: Any, params: Any) -> None:
    if mode == "bad-discover":  # offers 2026-07-28, but _meta is no object
        reply(req_id, {"resultType": "complete", "supportedVersions": [MODERN], "capabilities": {}, "_meta": "oops"})
        return
    meta = envelope(params)
    if meta is None:
        error(
            req_id,
            -32602,
            "params._meta must be an object carrying the required "
            f"'{PV_KEY}' and '{CAPS_KEY}' envelope keys",
        )
        return
    if meta[PV_KEY] != MODERN:
        error(
            req_id,
            -32022,
            "Unsupported protocol version",
            {"supported": [MODERN], "requested": meta[PV_KEY]},
        )
        return
    reply(
        req_id,
        {
            "resultType": "complete",
            "cacheScope": "private",
            "ttlMs": 0,
            "supportedVersions": [MODERN],
            "capabilities": {"tools": {"listChanged": False}},
            "_meta": {"io.modelcontextprotocol/serverInfo": SERVER_INFO},
        },
    )


def on_initialize(mode: str, req_id: Any, params: Any) -> None:
    requested = params.get("protocolVersion") if isinstance(params, dict) else None
    if mode != "discover-silent":
        error(
            req_id,
            -32022,
            "Unsupported protocol version",
            {"supported": [MODERN], "requested": requested},
        )
        return
    reply(
        req_id,
        {
            "protocolVersion": requested
            if requested in LEGACY_VERSIONS
            else LEGACY_VERSIONS[-1],
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": SERVER_INFO,
        },
    )


def on_call(mode: str, req_id: Any, params: Any) -> None:
    name = params.get("name") if isinstance(params, dict) else None
    if name != "work":
        error(req_id, -32602, f"Unknown tool: {name}")
        return
    if mode == "hang":
        return  # never answer
    if mode.startswith("cancel-"):
        after_cancel(mode, req_id, params)
        return
    if mode == "asks-sampling":
        ask_sampling(req_id)
        return
    if mode == "garbage":
        sys.stdout.buffer.write(b"this is not json\n")
        sys.stdout.buffer.flush()
        return
    if mode == "die":
        hard_exit(7)
    if mode == "long-line":
        chunk = b"x" * CHUNK
        for _ in range(LONG_LINE_BYTES // CHUNK):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        sys.stdout.buffer.write(b"\n")
        sys.stdout.buffer.flush()
        return
    if mode == "stale-answer":  # what a server/discover answered after its timeout looks like
        reply("mcp-gateway-discover", {"stale": True, "resultType": "complete"})
    if mode == "stderr-flood":
        for i in range(FLOOD_LINES):
            sys.stderr.write(
                f"stderr flood line {i} from faulty-server pid {os.getpid()}\n"
            )
        sys.stderr.flush()
    reply(
        req_id,
        {
            "content": [{"type": "text", "text": f"ok from pid {os.getpid()}"}],
            "isError": False,
            "resultType": "complete",
        },
    )


def progress(token: Any, n: int) -> None:
    send({"jsonrpc": "2.0", "method": "notifications/progress",
          "params": {"progressToken": token, "progress": n, "total": 100}})


def after_cancel(mode: str, req_id: Any, params: Any) -> None:
    """Report progress once, wait for the cancel of `req_id`, then behave as `mode` says."""
    meta = params.get("_meta") if isinstance(params, dict) else None
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    if token is not None:
        progress(token, 1)
    sent = 1
    every = float(os.environ.get("FAULTY_PROGRESS_SECONDS", "0.2"))
    while True:  # progress every 0.2 s (so a gateway notices a client that left) until the cancel
        if not select.select([sys.stdin.buffer], [], [], every)[0]:
            if token is not None:
                sent += 1
                progress(token, sent)
            continue
        raw = sys.stdin.buffer.readline()
        if not raw:
            hard_exit(0)  # stdin closed while waiting
        try:
            msg = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(msg, dict) or msg.get("method") != "notifications/cancelled":
            continue
        cancelled = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        if cancelled.get("requestId") == req_id:
            break
    if RECORD_PATH is not None:
        record(RECORD_PATH, f"cancelled {req_id}")
    if mode == "cancel-silent":
        return
    if mode == "cancel-garbage":
        sys.stdout.buffer.write(b"garbage after the cancel\n")
        sys.stdout.buffer.flush()
        return
    if mode == "cancel-busy":
        for n in range(30):
            progress(token, n + 2)
            time.sleep(0.1)
    time.sleep(float(os.environ.get("FAULTY_LATE_SECONDS", "0")))
    reply(req_id, {"content": [{"type": "text", "text": "late"}], "isError": False, "resultType": "complete"})


def ask_sampling(req_id: Any) -> None:
    """Ask the client to sample, and answer `req_id` with what came back (an error, from a gateway)."""
    send({"jsonrpc": "2.0", "id": "faulty-sampling-1", "method": "sampling/createMessage",
          "params": {"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}], "maxTokens": 5}})
    for raw in iter(sys.stdin.buffer.readline, b""):
        try:
            msg = json.loads(raw)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("id") == "faulty-sampling-1" and "method" not in msg:
            got = msg.get("error") or {}
            text = f"sampling refused: {got.get('code')} {got.get('message')}" if "error" in msg else "sampled"
            reply(req_id, {"content": [{"type": "text", "text": text}], "isError": False, "resultType": "complete"})
            return
    hard_exit(0)


RECORD_PATH: str | None = None


def record(path: str, what: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()} {what}\n")


def handle(mode: str, msg: Any) -> None:
    if (
        not isinstance(msg, dict)
        or not isinstance(msg.get("method"), str)
        or "id" not in msg
    ):
        return  # notifications and stray responses are ignored
    method, req_id, params = msg["method"], msg["id"], msg.get("params")
    if method == "server/discover":
        if mode != "discover-silent":
            on_discover(mode, req_id, params)
    elif method == "initialize":
        on_initialize(mode, req_id, params)
    elif method == "ping":
        reply(req_id, {})
    elif method == "tools/list":
        if mode == "die-on-list":  # a read-only method failing after it was sent
            hard_exit(7)
        # cacheScope/ttlMs are required on cacheable 2026-07-28 results.
        reply(
            req_id,
            {
                "tools": [TOOL_WORK],
                "resultType": "complete",
                "cacheScope": "private",
                "ttlMs": 0,
            },
        )
    elif method == "tools/call":
        on_call(mode, req_id, params)
    else:
        error(req_id, -32601, "Method not found")


def main(argv: list[str]) -> int:
    """Serve stdin/stdout in the mode named by ``argv[0]``."""
    if not argv or argv[0] not in MODES:
        print(
            f"usage: faulty_server.py {{{'|'.join(MODES)}}} [PIDFILE]", file=sys.stderr
        )
        return 64
    mode = argv[0]
    global RECORD_PATH
    if len(argv) > 1:
        RECORD_PATH = argv[1]
        with open(argv[1], "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()} {mode}\n")
    if mode == "exit-at-start":
        print("fatal: cannot start", file=sys.stderr, flush=True)
        return 2
    if mode == "slow-start":  # a 2026-07-28 server that takes its time to start reading
        time.sleep(float(os.environ.get("FAULTY_START_SECONDS", "1.0")))
    if mode == "record-shutdown":
        path = argv[1]

        def on_term(signum: int, frame: Any) -> None:
            record(path, "term")
            hard_exit(0)

        signal.signal(signal.SIGTERM, on_term)
    for raw in iter(sys.stdin.buffer.readline, b""):
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            continue
        try:
            msg = json.loads(text)
        except json.JSONDecodeError:
            error(None, -32700, "Parse error")
            continue
        handle(mode, msg)
    if mode == "record-shutdown":  # saw stdin close; ignores it until SIGTERM
        record(argv[1], "eof")
        while True:
            time.sleep(1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (BrokenPipeError, KeyboardInterrupt):
        os._exit(0)
