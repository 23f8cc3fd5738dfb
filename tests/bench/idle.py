"""Idle streams for the bench (issue 15): many held GET streams while a load runs.

`IdleUpstream` is a minimal handshake-era MCP server over HTTP/1.1 on asyncio,
in a thread of the bench process: it answers initialize (with a session id),
notifications, tools/list and tools/call, and holds every GET stream open
without writing to it, noting when each one's connection closes. `hold`
opens sessions through the gateway (initialize, initialized, GET) on
kept-alive connections and keeps their GET streams. So the bench measures
what idle streams cost the gateway: throughput and p99 of a load beside
them, worker RSS per stream, and how soon the upstream connection of a
stream its client left is released. Everything is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import procs

STREAM_HEADER = "X-Bench-Stream"  # passed through by the gateway: names a stream to the upstream
OPEN_CONCURRENCY = 64  # sessions being opened at once
OPEN_TIMEOUT = 10.0  # seconds for one session's three requests
GIVE_UP_AFTER = 2 * OPEN_CONCURRENCY  # failed opens after which the rest are not tried
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "mcp-gateway-bench", "version": "1"}}}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
PRIMING = b": stream open\n\n"


class IdleUpstream:
    """A handshake-era MCP server on 127.0.0.1 that holds GET streams open (see module doc)."""

    def __init__(self) -> None:
        self.port = procs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.open_streams = 0
        self.closed_at: dict[str, float] = {}  # X-Bench-Stream -> time.monotonic() its connection closed
        self._sessions = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="bench-idle-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the idle upstream did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", self.port, backlog=2048)
        self._ready.set()
        async with server:
            await self._stop.wait()

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method = lines[0].split(" ")[0]
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if method == "GET":
                    await self._hold(reader, writer, headers.get(STREAM_HEADER.lower(), "?"))
                    return
                writer.write(self._answer(method, body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
        # A priming comment, as servers send when a stream opens; then nothing, until the client goes.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(PRIMING), PRIMING))
        await writer.drain()
        self.open_streams += 1
        try:
            while await reader.read(65536):  # nothing is sent on a GET stream's connection but its end
                pass
        finally:
            self.open_streams -= 1
            self.closed_at[name] = time.monotonic()

    def _answer(self, method: str, body: bytes) -> bytes:
        if method == "DELETE":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        try:
            message: Any = json.loads(body)
        except ValueError:
            message = None
        if not isinstance(message, dict) or "id" not in message:
            return b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
        extra = ""
        name = message.get("method")
        if name == "initialize":
            self._sessions += 1
            extra = f"Mcp-Session-Id: idle-{self._sessions}\r\n"
            result: dict[str, Any] = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                                      "serverInfo": {"name": "bench-idle", "version": "1"}}
        elif name == "tools/list":
            result = {"tools": [{"name": "ping", "inputSchema": {"type": "object"}}]}
        elif name in ("tools/call", "ping"):
            result = {"content": [{"type": "text", "text": "pong"}]} if name == "tools/call" else {}
        else:
            answer = json.dumps({"jsonrpc": "2.0", "id": message["id"],
                                 "error": {"code": -32601, "message": f"{name} not found"}}).encode()
            return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(answer), answer))
        data = json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode()
        return (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}Content-Length: {len(data)}\r\n\r\n"
                .encode() + data)


@dataclass
class Held:
    """Streams held open through the gateway, and what opening them cost."""

    streams: list[tuple[str, asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    failed: int = 0
    first_failure: str = ""
    seconds: float = 0.0


async def _open_one(host: str, port: int, path: str, name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        session = None
        for message in (INITIALIZE, INITIALIZED):
            body = json.dumps(message).encode()
            extra = f"Mcp-Session-Id: {session}\r\nMCP-Protocol-Version: 2025-06-18\r\n" if session else ""
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Accept: application/json, text/event-stream\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
                         .encode() + body)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status = int(head.split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])}
            await reader.readexactly(int(headers.get("content-length", "0")))
            if status >= 300:
                raise RuntimeError(f"{message.get('method')} answered {status}")
            session = session or headers.get("mcp-session-id")
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
                     f"Mcp-Session-Id: {session}\r\nMCP-Protocol-Version: 2025-06-18\r\n{STREAM_HEADER}: {name}\r\n\r\n"
                     .encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        if " 200 " not in head.split("\r\n", 1)[0]:
            raise RuntimeError(f"GET answered {head.splitlines()[0]}")
        return reader, writer
    except BaseException:
        writer.close()
        raise


async def hold(url: str, count: int) -> Held:
    """Open `count` sessions through the gateway at `url` (.../<server>/mcp) and keep their GET streams."""
    host, _, rest = url.removeprefix("http://").partition(":")
    port_text, _, path = rest.partition("/")
    held = Held()
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    started = time.monotonic()

    async def one(index: int) -> None:
        async with gate:
            if held.failed >= GIVE_UP_AFTER:  # the gateway holds no more: the rest would only time out
                held.failed += 1
                return
            try:
                reader, writer = await asyncio.wait_for(_open_one(host, int(port_text), "/" + path, f"s{index}"),
                                                        OPEN_TIMEOUT)
                held.streams.append((f"s{index}", reader, writer))
            except (TimeoutError, OSError, RuntimeError, asyncio.IncompleteReadError, ValueError) as exc:
                held.failed += 1
                held.first_failure = held.first_failure or f"{type(exc).__name__}: {str(exc) or f'no answer within {OPEN_TIMEOUT:g} s'}"

    await asyncio.gather(*(one(index) for index in range(count)))
    held.seconds = time.monotonic() - started
    return held


RELEASE_WAIT = 5.0  # seconds a closed stream's upstream connection is waited for


async def release_times(held: Held, upstream: IdleUpstream, count: int) -> list[float | None]:
    """Close `count` held streams one by one; ms from each close to the upstream seeing its connection
    close (None: not within RELEASE_WAIT)."""
    times: list[float | None] = []
    for name, _, writer in held.streams[:count]:
        closed = time.monotonic()
        writer.close()
        deadline = closed + RELEASE_WAIT
        while name not in upstream.closed_at and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        times.append((upstream.closed_at[name] - closed) * 1000 if name in upstream.closed_at else None)
    del held.streams[:count]
    return times


def close_all(held: Held) -> None:
    for _, _, writer in held.streams:
        with contextlib.suppress(Exception):
            writer.close()
    held.streams.clear()


def summary(times: list[float | None]) -> dict[str, Any]:
    """How many closed streams were released within RELEASE_WAIT, and how soon."""
    released = [t for t in times if t is not None]
    found: dict[str, Any] = {"closed": len(times), "released": len(released), "within_s": RELEASE_WAIT}
    if released:
        found.update(median_ms=round(statistics.median(released), 1), max_ms=round(max(released), 1))
    return found
