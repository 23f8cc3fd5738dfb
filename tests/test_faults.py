"""Faults under steady load, with counted outcomes (`pytest -m faults`; `make test` runs it too).

Real gunicorn (2 workers) in front of pooled stdio servers and two HTTP
instances, with a few client threads sending tools/list and tools/call for a
bounded count and time. Meanwhile the test kills pooled processes, stops one
with SIGSTOP, kills an HTTP instance (and starts it again), edits the
registry and sends HUP. Then it counts: no tools/list failed (they may be
retried), no more calls failed than faults that could fail one, no
tools/call ran twice (each records a unique token), no process is left busy,
and no worker holds a pipe of a process that is gone.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from .harness import (
    ACCEPT_BOTH,
    CURL_HEADERS,
    TIME_SERVER,
    Gunicorn,
    McpHttpServer,
    descendants,
    server_command,
    wait_for,
)

pytestmark = pytest.mark.faults

THREADS = 3
PER_THREAD = 3000  # requests per client thread at most
LOAD_SECONDS = 60.0  # and at most this long
MODERN = {**ACCEPT_BOTH, "MCP-Protocol-Version": "2026-07-28"}
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


class Load:
    """Client threads cycling through the operations; every outcome counted."""

    def __init__(self, gateway: Gunicorn):
        self.gateway = gateway
        self.outcomes: Counter[tuple[str, str, str]] = Counter()
        self.called: list[str] = []  # tokens of tools/call that succeeded
        self.failures: list[str] = []
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(THREADS)]

    def start(self) -> None:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self._threads)

    def _run(self, number: int) -> None:
        operations = itertools.cycle([("time", "tools/list"), ("tools", "tools/call"), ("web", "tools/list"),
                                      ("web", "tools/call")])
        deadline = time.monotonic() + LOAD_SECONDS
        with requests.Session() as http:
            for _ in range(PER_THREAD):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                server, method = next(operations)
                self._one(http, server, method)

    def _one(self, http: requests.Session, server: str, method: str) -> None:
        token = f"t{next(self._tokens)}"
        url = f"{self.gateway.url}/{server}/mcp"
        if method == "tools/list":  # as curl sends it: bridged through the gateway's own session for "web"
            body: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
            headers = CURL_HEADERS
        else:  # a 2026-07-28 client: passed through to "web", translated for the stdio server
            body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": "record", "arguments": {"token": token}, "_meta": META}}
            headers = {**MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "record"}
        try:
            answer = http.post(url, data=json.dumps(body), headers=headers, timeout=30)
            text = answer.text
            ok = answer.status_code == 200 and '"error"' not in text and ("tools" in text or token in text)
        except requests.RequestException as exc:
            ok, text = False, repr(exc)
        with self._lock:
            self.outcomes[(server, method, "ok" if ok else "failed")] += 1
            if ok and method == "tools/call":
                self.called.append(token)
            if not ok:
                self.failures.append(f"{time.monotonic() - self.started:.1f}s {server} {method}: {text[:300]}")

    def failed(self, method: str | None = None) -> int:
        return sum(n for (_, m, outcome), n in self.outcomes.items() if outcome == "failed" and method in (None, m))


def pipes(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        except OSError:
            continue
    return count


def pipes_beyond_children(gateway: Gunicorn) -> dict[int, int]:
    """Per worker: pipes it holds, less three for each live child (its stdin, stdout and stderr)."""
    return {pid: pipes(pid) - 3 * len(descendants(pid) - descendants_of_children(pid)) for pid in gateway.worker_pids()}


def descendants_of_children(pid: int) -> set[tuple[int, str]]:
    """Grandchildren and below (a stdio server's own children hold no pipe of the worker's)."""
    below: set[tuple[int, str]] = set()
    for child, _ in descendants(pid):
        below |= descendants(child)
    return below


def pool_pid(gateway: Gunicorn, server: str) -> int:
    pids = gateway.status()["servers"][server]["pids"]
    assert pids, f"no process of {server} to fault"
    return int(pids[0])


def test_faults_under_load_fail_only_what_they_must(tmp_path: Path) -> None:
    record = tmp_path / "calls.txt"
    record.touch()
    instances = [McpHttpServer(tmp_path, env_extra={"TEST_RECORD_FILE": str(record)}) for _ in range(2)]
    servers = {
        "time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 2},
        "tools": {"type": "stdio", "command": server_command("sdk_server.py", "stdio"), "pool_size": 2,
                  "request_timeout": 3, "env_vars": {"TEST_RECORD_FILE": str(record)}},
        "web": {"type": "http", "instances": [{"endpoint": s.url} for s in instances]},
        "spare": {"type": "stdio", "command": TIME_SERVER, "pool_min": 0},
    }
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"servers": servers, "gateway": {"reload_registry": True,
                                                                     "health_check_interval": 2}}))
    gateway = Gunicorn(path, workers=2, threads=4)
    try:
        with gateway.serving():
            wait_for(lambda: all(gateway.status()["servers"][s]["idle"] >= 1 for s in ("time", "tools")), 30)
            overhead = set(pipes_beyond_children(gateway).values())
            load = Load(gateway)
            load.start()
            budget = 0  # calls the faults may fail: only those in flight on what was killed
            time.sleep(1.5)
            os.kill(pool_pid(gateway, "time"), signal.SIGKILL)  # tools/list: retried on a fresh process
            time.sleep(1.5)
            os.kill(pool_pid(gateway, "tools"), signal.SIGKILL)  # a tools/call in flight there fails (one process, one call)
            budget += 1
            time.sleep(1.5)
            stopped = pool_pid(gateway, "tools")
            os.kill(stopped, signal.SIGSTOP)  # its call times out; the process is replaced
            budget += 1
            time.sleep(4)
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
            port = instances[0].port
            instances[0].stop()  # tools/call in flight there fail; everything else fails over
            budget += THREADS
            time.sleep(2)
            instances[0] = McpHttpServer(tmp_path, env_extra={"TEST_RECORD_FILE": str(record)}, port=port)
            servers["spare"]["idle_timeout"] = 120
            path.write_text(yaml.safe_dump({"servers": servers, "gateway": {"reload_registry": True,
                                                                             "health_check_interval": 2}}))
            time.sleep(3)  # the workers see the file and reload it
            os.kill(gateway.process.pid, signal.SIGHUP)
            time.sleep(3)
            load.stop()

            runs = Counter(record.read_text().split())
            assert load.failed("tools/list") == 0, load.failures
            assert load.failed() <= budget, load.failures
            assert [token for token, n in runs.items() if n > 1] == [], "a tools/call ran twice"
            assert all(runs[token] == 1 for token in load.called)
            assert sum(n for (_, _, outcome), n in load.outcomes.items() if outcome == "ok") > THREADS * 20
            wait_for(lambda: all(server.get("busy", 0) == 0 for server in gateway.status()["servers"].values()), 30)
            wait_for(lambda: len(gateway.worker_pids()) == 2, 30)
            # Every pipe a worker holds belongs to a live child: no fd of a killed process was leaked.
            assert set(pipes_beyond_children(gateway).values()) <= overhead
    finally:
        for instance in instances:
            instance.stop()
