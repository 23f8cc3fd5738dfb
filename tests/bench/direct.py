"""The stdio server driven directly over its pipes: the baseline the gateway's stdio path is judged by.

asyncio, one reader task per process dispatching answers by JSON-RPC id, and
`concurrency` client tasks spread over the processes (task i uses process
i mod N; with fewer processes than tasks, several requests are in flight on
one pipe, as the stdio transport allows). Each process is asked
`server/discover` first and, unless it speaks 2026-07-28, initialized once;
requests then carry the same form the gateway sends a pooled process.
Every answer must be a JSON-RPC result; the run is bounded in time and count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Any

from . import procs
from .load import ENVELOPE, MODERN, Row


class PipeServer:
    """One stdio server process and the futures of its requests in flight."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process
        self.pending: dict[int | str, asyncio.Future[dict[str, Any]]] = {}
        self.modern = False
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, argv: Sequence[str], env: Mapping[str, str], legacy: bool = False) -> PipeServer:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=dict(env), start_new_session=True, limit=16 << 20,
        )
        procs.remember(process.pid)
        server = cls(process)
        if legacy:
            await server._initialize()
            return server
        discover = {"jsonrpc": "2.0", "id": "discover", "method": "server/discover",
                    "params": {"_meta": ENVELOPE}}
        answer = await asyncio.wait_for(server.call(discover), 5)
        versions = (answer.get("result") or {}).get("supportedVersions") or []
        server.modern = MODERN in versions
        if not server.modern:
            await server._initialize()
        return server

    async def _initialize(self) -> None:
        init = {"jsonrpc": "2.0", "id": "init", "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}}
        answer = await asyncio.wait_for(self.call(init), 10)
        if "result" not in answer:
            raise RuntimeError(f"initialize refused: {answer}")
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            key = message.get("id") if isinstance(message, dict) else None
            future = self.pending.pop(key, None) if isinstance(key, (int, str)) else None
            if future is not None and not future.done():
                future.set_result(message)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(RuntimeError("the server closed its stdout"))

    async def send(self, message: Mapping[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        await self.process.stdin.drain()

    async def call(self, message: Mapping[str, Any]) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[message["id"]] = future
        await self.send(message)
        return await future

    async def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 2)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()
        self.reader.cancel()


async def _run(argv: Sequence[str], env: Mapping[str, str], processes: int, concurrency: int, seconds: float,
               warmup: float, max_requests: int, tool: str, arguments: Mapping[str, Any],
               legacy: bool) -> tuple[list[float], int, float]:
    servers = [await PipeServer.start(argv, env, legacy) for _ in range(processes)]
    next_id = 0
    latencies: list[float] = []
    failures = 0
    try:
        def request(server: PipeServer) -> dict[str, Any]:
            nonlocal next_id
            next_id += 1
            params: dict[str, Any] = {"name": tool, "arguments": dict(arguments)}
            if server.modern:
                params["_meta"] = ENVELOPE
            return {"jsonrpc": "2.0", "id": next_id, "method": "tools/call", "params": params}

        async def client(index: int, until: float, record: bool) -> None:
            nonlocal failures
            server = servers[index % len(servers)]
            while time.monotonic() < until and (not record or len(latencies) + failures < max_requests):
                started = time.perf_counter()
                try:
                    answer = await asyncio.wait_for(server.call(request(server)), 10)
                    good = isinstance(answer.get("result"), dict) and not answer["result"].get("isError")
                except (TimeoutError, RuntimeError):
                    good = False
                if record:
                    if good:
                        latencies.append(time.perf_counter() - started)
                    else:
                        failures += 1

        if warmup > 0:
            await asyncio.gather(*(client(i, time.monotonic() + warmup, False) for i in range(concurrency)))
        started = time.monotonic()
        await asyncio.gather(*(client(i, started + seconds, True) for i in range(concurrency)))
        elapsed = time.monotonic() - started
    finally:
        await asyncio.gather(*(server.stop() for server in servers))
    return latencies, failures, elapsed


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(argv: Sequence[str], env: Mapping[str, str], processes: int, concurrency: int, seconds: float,
            warmup: float = 1.0, max_requests: int = 1_000_000, tool: str = "get_current_time",
            arguments: Mapping[str, Any] | None = None, legacy: bool = False) -> Row:
    """One row: `processes` stdio servers, `concurrency` requests in flight, for `seconds`.

    By default each process is spoken to in the era the gateway would pick
    (2026-07-28 when it answers server/discover); `legacy` forces initialize.
    """
    era = "handshake era" if legacy else "era as the gateway picks"
    row = Row("stdio", f"direct pipes, {processes} process{'es' if processes > 1 else ''} ({era})", concurrency, "python")
    try:
        latencies, failures, elapsed = asyncio.run(_run(
            argv, env, processes, concurrency, seconds, warmup, max_requests, tool,
            arguments or {"timezone": "Europe/Paris"}, legacy))
    except (OSError, RuntimeError, TimeoutError) as exc:
        row.note = f"not measured: {exc}"
        return row
    row.requests = len(latencies) + failures
    row.seconds = elapsed
    row.rps = row.requests / elapsed if elapsed else 0.0
    row.p50_ms = percentile(latencies, 0.50) * 1000
    row.p99_ms = percentile(latencies, 0.99) * 1000
    row.failures = failures
    return row
