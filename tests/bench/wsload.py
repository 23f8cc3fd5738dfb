"""WebSockets for the bench (issue 15): tools/call rows over `/<server>/ws`, and idle WebSockets held open.

`measure` is the WebSocket counterpart of load.measure: `concurrency`
connections of the `websockets` library (subprotocol `mcp`), each a
handshake-era client that sends initialize on its socket first, then one
tools/call at a time, one JSON-RPC message per text frame, for a bounded
time and count; throughput and p50/p99 as the wrk rows give them. The
client runs on one asyncio loop of the bench process, so at c=8 it is part
of what is measured (the row's note says so).

`IdleSockets` holds many WebSocket connections opened with raw sockets
(handshake, initialize, initialized; then nothing but pongs to the
gateway's pings) on an event loop in a thread of its own, so they stay
answered while the main thread runs wrk. `release_times` lets clients leave
(a FIN, no close frame, as a killed client's kernel sends) and measures how
soon the worker drops each connection: its own FIN or RST at the client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
import struct
import threading
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect

from .idle import (
    GIVE_UP_AFTER,
    INITIALIZE,
    INITIALIZED,
    OPEN_CONCURRENCY,
    OPEN_TIMEOUT,
    RELEASE_WAIT,
)
from .load import Row

T = TypeVar("T")
CLIENT_NOTE = "client: websockets on one asyncio loop in the bench process"


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit (held sockets are 2-3 fds each here)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- load rows ---------------------------------------------------------------------


async def _answer(ws: ClientConnection, request_id: int | str) -> dict[str, Any]:
    """The response to `request_id`, skipping notifications the server sends before it."""
    while True:
        message = json.loads(await ws.recv())
        if isinstance(message, dict) and message.get("id") == request_id and ("result" in message or "error" in message):
            return message


async def _session(url: str) -> ClientConnection:
    ws = await connect(url, subprotocols=["mcp"], ping_interval=None, max_size=2**22,  # type: ignore[list-item]
                       open_timeout=OPEN_TIMEOUT)
    try:
        await ws.send(json.dumps({**INITIALIZE, "id": "init"}))
        answer = await asyncio.wait_for(_answer(ws, "init"), OPEN_TIMEOUT)
        if "result" not in answer:
            raise RuntimeError(f"initialize over the WebSocket: {json.dumps(answer)[:300]}")
        await ws.send(json.dumps(INITIALIZED))
        return ws
    except BaseException:
        await ws.close()
        raise


@dataclass
class _Run:
    latencies_us: list[int] = field(default_factory=list)
    failures: int = 0
    first_failure: str = ""


async def _drive(url: str, body: Mapping[str, Any], concurrency: int, seconds: float, max_requests: int,
                 measure: bool) -> tuple[_Run, float]:
    """`concurrency` sessions, each sending the next tools/call when its last one is answered."""
    sockets = await asyncio.gather(*(_session(url) for _ in range(concurrency)))
    run = _Run()
    deadline = time.monotonic() + seconds
    counter = 0

    async def loop(ws: ClientConnection, lane: int) -> None:
        nonlocal counter
        serial = 0
        while time.monotonic() < deadline and (not max_requests or counter < max_requests):
            serial += 1
            request_id = f"{lane}-{serial}"
            started = time.perf_counter_ns()
            await ws.send(json.dumps({**body, "id": request_id}, separators=(",", ":")))
            answer = await asyncio.wait_for(_answer(ws, request_id), 10)
            took = (time.perf_counter_ns() - started) // 1000
            counter += 1
            if "error" in answer or (answer.get("result") or {}).get("isError"):
                run.failures += 1
                run.first_failure = run.first_failure or json.dumps(answer)[:300]
            elif measure:
                run.latencies_us.append(took)

    started = time.monotonic()
    try:
        await asyncio.gather(*(loop(ws, lane) for lane, ws in enumerate(sockets)))
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return run, time.monotonic() - started


def _percentile(ordered: list[int], fraction: float) -> int:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(group: str, name: str, url: str, body: Mapping[str, Any], concurrency: int, seconds: float,
            warmup: float = 1.0, max_requests: int = 0, note: str = "") -> Row:
    """Warm up, then one measured run over `url` (ws://.../<server>/ws); a failed run is a row with a note."""
    row = Row(group, name, concurrency, "websockets", note="; ".join(filter(None, (note, CLIENT_NOTE))))
    try:
        if warmup > 0:
            asyncio.run(_drive(url, body, concurrency, warmup, 0, measure=False))
        run, took = asyncio.run(_drive(url, body, concurrency, seconds, max_requests, measure=True))
    except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
        row.note = f"not measured: {type(exc).__name__}: {exc}"
        return row
    ordered = sorted(run.latencies_us)
    row.requests = len(ordered) + run.failures
    row.seconds = took
    row.rps = row.requests / took if took else 0.0
    row.failures = run.failures
    if ordered:
        row.p50_ms = _percentile(ordered, 0.50) / 1000
        row.p99_ms = _percentile(ordered, 0.99) / 1000
        row.extra = {"p90_us": _percentile(ordered, 0.90), "max_us": ordered[-1]}
    if run.first_failure:
        row.extra["first_failure"] = run.first_failure
    return row


# --- idle WebSockets ---------------------------------------------------------------


def _frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (RFC 6455 5.3: every client frame is masked)."""
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([0x80 | opcode])
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame (unmasked; the gateway sends no fragments on a control frame)."""
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
    elif size == 127:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(size)


@dataclass
class IdleSocket:
    name: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # the gateway closed its side
    gone_at: float = 0.0
    pings: int = 0


class IdleSockets:
    """WebSockets held open through the gateway on a loop thread of their own (see module doc)."""

    def __init__(self) -> None:
        self.sockets: list[IdleSocket] = []
        self.failed = 0
        self.first_failure = ""
        self.seconds = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-idle-websockets", daemon=True)
        self._thread.start()

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    def open(self, url: str, count: int) -> None:
        self.run(self._open_all(url, count))

    def release_times(self, count: int) -> list[float | None]:
        return self.run(self._release(count))

    def stop(self) -> None:
        """Close every socket still held, then the loop and its thread."""
        with contextlib.suppress(Exception):
            self.run(self._close_all(), timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _open_all(self, url: str, count: int) -> None:
        host, _, rest = url.removeprefix("ws://").partition(":")
        port_text, _, path = rest.partition("/")
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)
        started = time.monotonic()

        async def one(index: int) -> None:
            async with gate:
                if self.failed >= GIVE_UP_AFTER:
                    self.failed += 1
                    return
                try:
                    held = await asyncio.wait_for(self._open_one(host, int(port_text), "/" + path, f"w{index}"),
                                                  OPEN_TIMEOUT)
                except (TimeoutError, OSError, RuntimeError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.failed += 1
                    self.first_failure = self.first_failure or f"{type(exc).__name__}: {str(exc) or 'no answer'}"
                    return
                self.sockets.append(held)
                task = asyncio.create_task(self._keep(held))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        await asyncio.gather(*(one(index) for index in range(count)))
        self.seconds = time.monotonic() - started

    async def _open_one(self, host: str, port: int, path: str, name: str) -> IdleSocket:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mcp\r\n\r\n"
                         .encode())
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            if " 101 " not in head.split("\r\n", 1)[0]:
                raise RuntimeError(f"upgrade answered {head.splitlines()[0]}")
            writer.write(_frame(json.dumps(INITIALIZE).encode()))
            while True:
                opcode, payload = await _read_frame(reader)
                if opcode == 0x9:
                    writer.write(_frame(payload, 0xA))
                elif opcode == 0x8:
                    raise RuntimeError(f"closed by the gateway: {payload[:2].hex()} {payload[2:]!r}")
                elif opcode == 0x1 and json.loads(payload).get("id") == INITIALIZE["id"]:
                    if "result" not in json.loads(payload):
                        raise RuntimeError(f"initialize: {payload[:300]!r}")
                    break
            writer.write(_frame(json.dumps(INITIALIZED).encode()))
            await writer.drain()
            return IdleSocket(name, reader, writer)
        except BaseException:
            writer.close()
            raise

    async def _keep(self, held: IdleSocket) -> None:
        """Answer pings until the gateway closes its side (its FIN or RST, or a close frame)."""
        try:
            while True:
                opcode, payload = await _read_frame(held.reader)
                if opcode == 0x9:
                    held.pings += 1
                    held.writer.write(_frame(payload, 0xA))
                elif opcode == 0x8:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            held.gone_at = time.monotonic()
            held.gone.set()

    async def _release(self, count: int) -> list[float | None]:
        times: list[float | None] = []
        for held in self.sockets[:count]:
            left = time.monotonic()
            if held.gone.is_set():
                times.append(None)
                continue
            held.writer.write_eof()  # the client leaves: its FIN, no close frame
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(held.gone.wait(), RELEASE_WAIT)
            times.append((held.gone_at - left) * 1000 if held.gone.is_set() else None)
            held.writer.close()
        del self.sockets[:count]
        return times

    async def _close_all(self) -> None:
        for held in self.sockets:
            with contextlib.suppress(Exception):
                held.writer.close()
        self.sockets.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def alive(self) -> int:
        """Held sockets the gateway has not closed."""
        return sum(not held.gone.is_set() for held in self.sockets)

