"""Load generation: wrk with rpc.lua for HTTP, one real-client check before each run.

`Row` is one measured line of the table, whatever made it (wrk, or the Python
stdio driver in direct.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

LUA = Path(__file__).resolve().parent / "rpc.lua"
ACCEPT_BOTH = "application/json, text/event-stream"
MODERN = "2026-07-28"
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}


@dataclass
class Row:
    """One measurement: throughput, latency and failures of one target at one concurrency."""

    group: str
    name: str
    concurrency: int
    generator: str
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    failures: int = 0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoadError(RuntimeError):
    """A target did not answer the real-client check, or wrk could not run."""


def tool_call(name: str, arguments: Mapping[str, Any], modern: bool = False) -> dict[str, Any]:
    """A tools/call request (id 0, which rpc.lua replaces); with the 2026-07-28 _meta envelope if `modern`."""
    params: dict[str, Any] = {"name": name, "arguments": dict(arguments)}
    if modern:
        params["_meta"] = ENVELOPE
    return {"jsonrpc": "2.0", "id": 0, "method": "tools/call", "params": params}


def modern_headers(message: Mapping[str, Any]) -> dict[str, str]:
    """The 2026-07-28 request headers that mirror a tools/call body."""
    return {"MCP-Protocol-Version": MODERN, "Mcp-Method": str(message["method"]),
            "Mcp-Name": str(message["params"]["name"])}


def rpc_result(response: requests.Response) -> dict[str, Any]:
    """The JSON-RPC message of an answer, JSON or SSE (the last `data:` line holding a response)."""
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        found: dict[str, Any] | None = None
        for line in response.text.splitlines():
            if line.startswith("data:") and line[5:].strip():  # 2025-11-25 servers prime streams with empty data
                event = json.loads(line[5:])
                if "result" in event or "error" in event:
                    found = event
        if found is None:
            raise LoadError(f"SSE answer without a JSON-RPC response: {response.text[:300]!r}")
        return found
    message = response.json()
    if not isinstance(message, dict):
        raise LoadError(f"answer is not a JSON-RPC object: {response.text[:300]!r}")
    return message


def check(url: str, body: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    """POST once with requests and insist on HTTP 200 and a JSON-RPC result; returns the result."""
    sent = {**body, "id": "bench-check"}
    response = requests.post(url, json=sent, headers={"Content-Type": "application/json", **headers}, timeout=30)
    if response.status_code != 200:
        raise LoadError(f"check of {url}: HTTP {response.status_code}: {response.text[:300]}")
    message = rpc_result(response)
    if "result" not in message or message.get("id") != "bench-check":
        raise LoadError(f"check of {url}: not a JSON-RPC result for our id: {json.dumps(message)[:300]}")
    result: dict[str, Any] = message["result"]
    if result.get("isError"):
        raise LoadError(f"check of {url}: the tool reported an error: {json.dumps(result)[:300]}")
    return result


def wrk(url: str, body: Mapping[str, Any], headers: Mapping[str, str], concurrency: int, seconds: float,
        max_requests: int = 0, threads: int = 1) -> dict[str, Any]:
    """Run wrk with rpc.lua for `seconds` (and at most `max_requests` answers); its BENCH_RESULT."""
    binary = shutil.which("wrk")
    if binary is None:
        raise LoadError("wrk is not installed (make bench installs Debian's wrk)")
    threads = max(1, min(threads, concurrency))
    env = {
        **os.environ,
        "BENCH_BODY": json.dumps(body, separators=(",", ":")),
        "BENCH_HEADERS": "\n".join(f"{name}: {value}" for name, value in headers.items()),
        "BENCH_MAX": str(-(-max_requests // threads) if max_requests else 0),
    }
    argv = [binary, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-s", str(LUA), url]
    try:
        finished = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=seconds + 60,
                                  start_new_session=True)
    except subprocess.TimeoutExpired as exc:  # subprocess.run kills the child it started
        raise LoadError(f"wrk did not finish within {seconds + 60:g}s") from exc
    for line in finished.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result: dict[str, Any] = json.loads(line[len("BENCH_RESULT "):])
            return result
    raise LoadError(f"wrk gave no result (exit {finished.returncode}): {finished.stdout[-500:]} {finished.stderr[-500:]}")


def measure(group: str, name: str, url: str, body: Mapping[str, Any], headers: Mapping[str, str], concurrency: int,
            seconds: float, warmup: float = 1.0, max_requests: int = 0, threads: int = 1, note: str = "") -> Row:
    """Check with a real client, warm up, then one measured wrk run; a failed check is a row with a note."""
    row = Row(group, name, concurrency, "wrk", note=note)
    all_headers = {"Accept": ACCEPT_BOTH, **headers}
    try:
        check(url, body, all_headers)
        if warmup > 0:
            wrk(url, body, all_headers, concurrency, warmup, threads=threads)
        result = wrk(url, body, all_headers, concurrency, seconds, max_requests=max_requests, threads=threads)
    except (LoadError, requests.RequestException, ValueError) as exc:
        row.note = f"not measured: {exc}"
        return row
    row.requests = result["requests"]
    row.seconds = result["duration_us"] / 1e6
    row.rps = row.requests / row.seconds if row.seconds else 0.0
    row.p50_ms = result["p50_us"] / 1000
    row.p99_ms = result["p99_us"] / 1000
    row.failures = result["failures"] + result["socket_errors"] + result["timeouts"]
    row.extra = {k: result[k] for k in ("non_2xx", "socket_errors", "timeouts", "max_us", "p90_us")}
    if result["first_failure"]:
        row.extra["first_failure"] = result["first_failure"]
    return row
