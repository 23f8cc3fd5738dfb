"""The integration harness: what tests use to start, reach and check real processes.

Free loopback ports, registries written to files, `Gunicorn` (the project's own
conf/gunicorn.conf.py on a free port; when stopped, it checks that every process it
ever saw below the master is gone), `McpHttpServer` (a real MCP server over HTTP),
waiting for a condition or a listening port, raw HTTP for bytes that requests and
http.client would quote or refuse, a fake clock, and JSON-RPC message builders.
tests/conftest.py turns these into fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVERS = Path(__file__).resolve().parent / "servers"
PYTHON = sys.executable
BIN = Path(PYTHON).parent


def server_command(script: str, *args: str) -> list[str]:
    return [PYTHON, str(SERVERS / script), *args]


TIME_SERVER = [str(BIN / "mcp-server-time")]
# The MRTR requestState key every instance of the SDK test server shares.
SHARED_STATE_KEY = "test-request-state-key-shared-by-all-instances"


def write_registry(folder: Path, servers: dict[str, Any], gateway: dict[str, Any] | None = None, name: str = "registry.yaml") -> Path:
    path = folder / name
    data: dict[str, Any] = {"servers": servers}
    if gateway:
        data["gateway"] = gateway
    path.write_text(yaml.safe_dump(data) if name.endswith((".yaml", ".yml")) else json.dumps(data))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 30.0,
                  what: str = "the server", log: Callable[[], str] = lambda: "") -> None:
    """Until something listens on 127.0.0.1:`port`; fails at once (with `log()`) if `process` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert process is None or process.poll() is None, f"{what} exited at start\n{log()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{what} did not start listening on port {port}"
            time.sleep(0.05)


def descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        starts[int(entry)] = fields[19]
    found: set[tuple[int, str]] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add((child, starts[child]))
            todo.append(child)
    return found


def still_running(processes: set[tuple[int, str]]) -> set[int]:
    alive = set()
    for pid, start in processes:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[19] == start and fields[0] != "Z":
            alive.add(pid)
    return alive


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


GUNICORN_SECRET = "test-secret-shared-by-all-workers"


class Gunicorn:
    """A real gunicorn master running the gateway on a free loopback port."""

    def __init__(self, registry: Path, workers: int = 2, threads: int = 4, env: dict[str, str] | None = None,
                 log_dir: Path | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.registry = registry
        self.log_path = (log_dir or registry.parent) / f"gunicorn-{self.port}.log"
        environ = {
            **os.environ,
            "MCP_GATEWAY_REGISTRY": str(registry),
            "MCP_GATEWAY_WORKERS": str(workers),
            "MCP_GATEWAY_THREADS": str(threads),
            "MCP_GATEWAY_SESSION_SECRET": GUNICORN_SECRET,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            **(env or {}),
        }
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            [PYTHON, "-m", "gunicorn", "-c", str(ROOT / "conf/gunicorn.conf.py"), "--bind", f"127.0.0.1:{self.port}", "wsgi:app"],
            cwd=ROOT, env=environ, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.seen: set[tuple[int, str]] = set()
        self.workers = workers

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"gunicorn exited early:\n{self.log()}"
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).ok and len(self.worker_pids()) == self.workers:
                    self.remember()
                    return
            except requests.RequestException:  # not listening yet, or a worker still booting
                pass
            time.sleep(0.1)
        raise AssertionError(f"gunicorn did not become ready:\n{self.log()}")

    def worker_pids(self) -> set[int]:
        """The master's children that are gunicorn workers (not processes it supervises)."""
        workers = set()
        for pid, _ in descendants(self.process.pid):
            try:
                if parent_of(pid) == self.process.pid and b"gunicorn" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    workers.add(pid)
            except OSError:
                continue  # it exited since it was listed: an old worker ending after a HUP
        return workers

    def remember(self) -> None:
        """Note every process now below the master, to check it is gone at stop."""
        self.seen |= descendants(self.process.pid)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = requests.get(f"{self.url}/status", timeout=5).json()
        return result

    def stop(self) -> int:
        if self.process.poll() is None:
            self.remember()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    @contextmanager
    def serving(self) -> Iterator[Gunicorn]:
        """Ready on entry; stopped, and checked for leftovers, on exit whatever happened."""
        try:
            self.wait_ready()
            yield self
        finally:
            self.stop_and_check()

    def stop_and_check(self) -> None:
        code = self.stop()
        deadline = time.monotonic() + 5
        while still_running(self.seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = still_running(self.seen)
        for pid in left:  # clean up before failing, by the PIDs we hold
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left behind after gunicorn stopped: {sorted(left)}"
        assert code == 0, f"gunicorn exited with {code}:\n{self.log()}"


ACCEPT_BOTH = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
CURL_HEADERS = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "*/*", "User-Agent": "curl/8"}


def curl(gateway: Gunicorn, server: str, method: str, params: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None, request_id: int = 1,
         client: requests.Session | None = None) -> requests.Response:
    """A JSON-RPC POST as curl sends it; on `client`'s kept-alive connection if given."""
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        body["params"] = params
    return (client or requests).post(f"{gateway.url}/{server}/mcp", data=json.dumps(body), headers={**CURL_HEADERS, **(headers or {})},
                         timeout=30)


def wait_for(condition: Any, seconds: float = 15.0, what: str = "condition") -> None:
    """Until `condition()` is true, polled every 50 ms; fails after `seconds` naming `what`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {seconds:g}s"
        time.sleep(0.05)


def sse_or_json(response: requests.Response) -> Any:
    """The last message of an answer, whether it came as JSON or as SSE events."""
    if response.headers["Content-Type"].startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ") and line[6:]]
        return events[-1]
    return response.json()


EVERYTHING = ROOT / "tests/node/node_modules/@modelcontextprotocol/server-everything/dist/index.js"


class McpHttpServer:
    """A real MCP server over Streamable HTTP on a free 127.0.0.1 port (endpoint /mcp).

    kind: "sdk" (tests/servers/sdk_server.py, both eras), "modern" (2026-07-28
    only) or "everything" (@modelcontextprotocol/server-everything from npm,
    handshake era only, forced onto loopback by tests/servers/loopback-only.cjs).
    """

    def __init__(self, log_dir: Path, kind: str = "sdk", shared_state_key: bool = True,
                 env_extra: dict[str, str] | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_dir / f"{kind}-http-{self.port}.log", "ab")  # noqa: SIM115 - lives as long as the server
        if kind == "everything":
            assert shutil.which("node") and EVERYTHING.exists(), "run `make test` (it installs tests/node)"
            argv = ["node", "--require", str(SERVERS / "loopback-only.cjs"), str(EVERYTHING), "streamableHttp"]
            # A clean environment: server-everything has a tool that returns it.
            env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/"), "PORT": str(self.port)}
        else:
            script = {"sdk": "sdk_server.py", "modern": "modern_http_server.py"}[kind]
            argv = server_command(script, *(["http"] if kind == "sdk" else []), str(self.port))
            # Without the shared key each instance seals MRTR requestState with a key of its own (the SDK's default).
            env = {**os.environ, "TEST_SERVER_STATE_KEY": SHARED_STATE_KEY} if shared_state_key else {
                k: v for k, v in os.environ.items() if k != "TEST_SERVER_STATE_KEY"}
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env={**env, **(env_extra or {})})
        wait_for_port(self.port, self.process, what="test HTTP server")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()




# --- messages and raw bytes ------------------------------------------------------------


def rpc(method: str, params: dict[str, Any] | None = None, request_id: Any = 1) -> dict[str, Any]:
    """A JSON-RPC request (no `params` member when `params` is None)."""
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def raw_exchange(port: int, data: bytes, timeout: float = 30.0) -> bytes:
    """Send bytes as they are (requests and http.client quote or refuse some) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def parse_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, lower-cased headers and body (cut at Content-Length) of one raw HTTP answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body[: int(headers.get("content-length", len(body)))]


def read_answer(reader: Any) -> tuple[int, bytes]:
    """One HTTP answer with a Content-Length off a connection's reader (for pipelining, which http.client cannot)."""
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, reader.read(length)


def read_until(sock: socket.socket, marker: bytes, seconds: float = 15.0, data: bytes = b"") -> bytes:
    """Read a socket (after `data`, already read) until `marker` is in what came; fails on a timeout or a close."""
    deadline = time.monotonic() + seconds
    while marker not in data:
        assert time.monotonic() < deadline, f"{marker!r} not received within {seconds:g}s; got {data[-300:]!r}"
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            more = sock.recv(65536)
        except TimeoutError:
            continue
        assert more, f"the connection closed before {marker!r}; got {data[-300:]!r}"
        data += more
    return data


def read_request(sock: socket.socket, data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """For a raw test server: one HTTP request's head and body (by Content-Length) after `data`, and what is left; None at EOF."""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            return None
        data += more
    head, _, data = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(data) < length:
        more = sock.recv(65536)
        if not more:
            return None
        data += more
    return head, data[:length], data[length:]


# --- MCP over WebSocket, as a client's transport frames it (the `websockets` library's sync client) ---


def ws_receive(ws: Any, until_id: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Every message received on a WebSocket up to and including the answer to `until_id`."""
    seen = []
    while True:
        got = json.loads(ws.recv(timeout=timeout))
        seen.append(got)
        if got.get("id") == until_id and "method" not in got:
            return seen


def ws_ask(ws: Any, message: dict[str, Any]) -> list[dict[str, Any]]:
    """Send one request on a WebSocket; every message received up to and including its answer."""
    ws.send(json.dumps(message))
    return ws_receive(ws, message["id"])


def ws_initialize(ws: Any, client: str = "ws-test") -> dict[str, Any]:
    """The handshake-era handshake on a WebSocket: initialize (id 0), then notifications/initialized."""
    answer = ws_ask(ws, rpc("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                           "clientInfo": {"name": client, "version": "1"}}, request_id=0))[-1]
    ws.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    return answer


class Clock:
    """A monotonic or wall clock the test moves by hand (`clock.now += 5`)."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now
