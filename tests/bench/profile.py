"""`python -m tests.bench.profile`: where a gateway worker spends its time under wrk load (py-spy).

One gunicorn worker (so every request is its), wrk at c=8 for each scenario,
`py-spy record --format raw` on the worker meanwhile. Prints CPU per request of
the worker (from /proc, over the wrk run) and its split by library and by
function (inclusive: a sample counts once for every function on its stack),
and writes the collapsed stacks to .bench/profile-<scenario>.txt (load them in
speedscope or flamegraph.pl) and a summary to .bench/profile.md.
Settings: PROFILE_SECONDS [10], PROFILE_WORKERS [1], PROFILE_THREADS [8], PROFILE_RATE [1000 Hz],
PROFILE_ONLY [stdio,http,http-bridged]. Needs py-spy in the venv (`make bench-profile` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import load, procs, servers

SECONDS = float(os.environ.get("PROFILE_SECONDS", "10"))
WORKERS = int(os.environ.get("PROFILE_WORKERS", "1"))
THREADS = int(os.environ.get("PROFILE_THREADS", "8"))
RATE = int(os.environ.get("PROFILE_RATE", "1000"))
ONLY = [s.strip() for s in os.environ.get("PROFILE_ONLY", "stdio,http,http-bridged").split(",") if s.strip()]
PY_SPY = servers.VENV_BIN / "py-spy"
# A frame of py-spy's raw output: "function (path:line)".
FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")
LIBRARIES = ("flask", "werkzeug", "requests", "urllib3", "gunicorn", "jinja2", "yaml", "jsonschema")
STDLIB = ("logging", "json", "http", "email", "socket", "selectors", "select", "threading", "uuid", "re", "queue",
          "subprocess", "ssl", "urllib", "base64", "hmac", "hashlib", "contextlib", "concurrent")


@dataclass
class Profile:
    scenario: str
    requests: int = 0  # answered during the py-spy window (estimated from wrk's rate)
    seconds: float = 0.0
    worker_cpu_s: float = 0.0  # over the same window, from /proc (user + system)
    worker_system_s: float = 0.0
    samples: int = 0  # taken while a thread of the worker held the GIL (py-spy --gil)
    by_area: Counter[str] = field(default_factory=Counter)  # inclusive
    self_by_area: Counter[str] = field(default_factory=Counter)
    by_function: Counter[str] = field(default_factory=Counter)  # inclusive
    self_by_function: Counter[str] = field(default_factory=Counter)
    by_layer: Counter[str] = field(default_factory=Counter)  # exclusive, see layer_of
    by_centre: Counter[str] = field(default_factory=Counter)  # inclusive, see COST_CENTRES
    failures: int = 0

    @property
    def cpu_us_per_request(self) -> float:
        return self.worker_cpu_s / self.requests * 1e6 if self.requests else 0.0

    def us(self, samples: int) -> float:
        """Samples as microseconds of GIL-held time per request."""
        return samples / RATE / self.requests * 1e6 if self.requests else 0.0


def area(path: str) -> str:
    """Which part of the stack a frame belongs to: a gateway module, a library, a stdlib module.

    py-spy shortens paths to what follows site-packages/ or the stdlib folder
    ("flask/app.py", "threading.py"); the gateway's are relative to the repository.
    """
    if not path or path.startswith("<"):
        return "builtins"
    parts = Path(path).parts
    if parts[0] == "gateway":
        return "gateway." + Path(path).stem
    if parts[0] in LIBRARIES:
        return parts[0]
    module = parts[0] if len(parts) > 1 else Path(path).stem
    if module in STDLIB:
        return "stdlib " + module
    return "other" if "site-packages" in path or len(parts) > 1 else "stdlib other"


def analyse(scenario: str, raw: str, requests: int, seconds: float, cpu_s: float) -> Profile:
    profile = Profile(scenario, requests, seconds, cpu_s)
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = []
        for text in stack.split(";"):
            match = FRAME.match(text)
            if match:
                function, path = match["function"], match["path"]
                frames.append((f"{function} ({_short(path)})", area(_short(path))))
        if not frames:
            continue
        profile.samples += count
        for name in {name for name, _ in frames}:
            profile.by_function[name] += count
        for where in {where for _, where in frames}:
            profile.by_area[where] += count
        profile.self_by_function[frames[-1][0]] += count
        profile.self_by_area[frames[-1][1]] += count
        profile.by_layer[layer_of(frames)] += count
        for label, matches in COST_CENTRES:
            if any(matches(name) for name, _ in frames):
                profile.by_centre[label] += count
    return profile


# Named pieces of the hot path, counted inclusively (a sample counts if any frame of its stack matches).
COST_CENTRES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("gunicorn main loop (ThreadWorker.run: epoll, hand-off, keep-alive)", lambda f: f.startswith("ThreadWorker.run ")),
    ("gunicorn request parsing", lambda f: f.startswith(("Request.__init__ (gunicorn", "Message.__init__ (gunicorn"))),
    ("gunicorn environ (wsgi.create)", lambda f: f.startswith("create (gunicorn/http/wsgi")),
    ("gunicorn response writing", lambda f: f.startswith(("Response.write (gunicorn", "Response.close (gunicorn",
                                                           "Response.send_headers", "write_chunk"))),
    ("the POST route (gateway/post.py), view included", lambda f: f.startswith("McpPostRoute.__call__")),
    ("Flask request/app context push+pop (GET, DELETE, operator endpoints)", lambda f: f.startswith((
        "RequestContext.push", "RequestContext.pop", "AppContext.push", "AppContext.pop"))),
    ("request end (gateway/exchange.py: lease, access line, metrics)", lambda f: f.startswith("Exchange.finish")),
    ("metrics, all of it (prometheus_client)", lambda f: "prometheus_client/" in f),
    ("werkzeug Response building and WSGI headers", lambda f: f.startswith((
        "Response.__init__", "Response.__call__", "Response.get_wsgi_response", "Response.get_wsgi_headers",
        "Response.get_app_iter"))),
    ("request body read", lambda f: f.startswith("read_body (gateway/post")),
    ("access log, all of it (gateway/accesslog.py and its logging)", lambda f: "gateway/accesslog.py" in f),
    ("logging, all of it", lambda f: "(logging/" in f),
    ("json, all of it", lambda f: "(json/" in f),
    ("view: post.serve", lambda f: f.startswith("serve (gateway/post")),
    ("jsonrpc.parse", lambda f: f.startswith("parse (gateway/jsonrpc")),
    ("signed session check (gateway/sessions.py)", lambda f: "gateway/sessions.py" in f),
    ("stdio pool acquire+release", lambda f: f.startswith(("StdioPool.acquire", "StdioPool.release"))),
    ("stdio read and parse the answer", lambda f: f.startswith("StdioProcess.messages")),
    ("requests Session.request, all of it", lambda f: f.startswith("Session.request (requests")),
    ("requests: environment merge and request preparation", lambda f: f.startswith((
        "Session.merge_environment_settings", "Session.prepare_request", "PreparedRequest.prepare"))),
    ("urllib3 urlopen, all of it", lambda f: f.startswith("HTTPConnectionPool.urlopen")),
    ("http.client status line and header parsing (email parser)", lambda f: f.startswith((
        "parse_headers (http/client", "HTTPResponse.begin (http/client"))),
    ("urllib3 new upstream connection", lambda f: f.startswith("create_connection (urllib3")),
    ("gateway header filter (transport.forwardable)", lambda f: f.startswith("forwardable")),
)


# Helpers a layer calls that are charged to that layer (uuid4 to the access log, hmac to sessions, ...).
TRANSPARENT = {"builtins", "stdlib other", "stdlib contextlib", "stdlib re", "stdlib threading", "stdlib uuid",
               "stdlib base64", "stdlib hmac", "stdlib hashlib", "stdlib queue", "other"}


def layer_of(frames: list[tuple[str, str]]) -> str:
    """The layer a sample is charged to: its innermost frame that is not a transparent helper.

    gunicorn is split into its request threads (parsing, environ, writing the
    answer) and its main thread (the event loop that accepts and polls keep-alive
    connections and hands them to the thread pool).
    """
    for _, where in reversed(frames):
        if where in TRANSPARENT:
            continue
        if where == "gunicorn" or where == "stdlib selectors" or where == "stdlib concurrent":
            in_thread_pool = any(n.startswith("_WorkItem.run") for n, _ in frames)
            return "gunicorn request thread" if in_thread_pool and where == "gunicorn" else (
                "gunicorn main loop (epoll, thread pool hand-off, keep-alive)" if not in_thread_pool
                else "thread pool (concurrent.futures)")
        return where
    return frames[-1][1]


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/lib/python3.11/", str(servers.ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def run_scenario(scenario: str, url: str, body: Mapping[str, Any], headers: Mapping[str, str],
                 gateway: servers.Gateway) -> Profile:
    all_headers = {"Accept": load.ACCEPT_BOTH, **headers}
    load.check(url, body, all_headers)
    load.wrk(url, body, all_headers, 8, 2)  # warm up
    worker = gateway.worker_pids()[0]
    out = servers.BENCH_DIR / f"profile-{scenario}.txt"
    # wrk runs a little longer than py-spy on both sides; CPU and requests are scaled to py-spy's window.
    wrk_seconds = SECONDS + 2
    wrk_run = subprocess.Popen([sys.executable, "-c", _WRK_CHILD, url, json.dumps(body), json.dumps(all_headers),
                                str(wrk_seconds)], stdout=subprocess.PIPE, text=True, start_new_session=True,
                               cwd=servers.ROOT)
    time.sleep(1)
    ticks = [_cpu_ticks(pid) for pid in gateway.worker_pids()]
    started = time.monotonic()
    spy = subprocess.run([str(PY_SPY), "record", "--pid", str(worker), "--duration", str(int(SECONDS)), "--gil",
                          "--rate", str(RATE), "--format", "raw", "--output", str(out)],
                         capture_output=True, text=True, timeout=SECONDS + 60, check=False)
    window = time.monotonic() - started
    after = [_cpu_ticks(pid) for pid in gateway.worker_pids()]
    user_s, system_s = ((sum(a[i] for a in after) - sum(b[i] for b in ticks)) / os.sysconf("SC_CLK_TCK") for i in (0, 1))
    stdout, _ = wrk_run.communicate(timeout=wrk_seconds + 60)
    result = json.loads(stdout)
    raw = out.read_text() if out.exists() else ""
    if not raw:
        raise RuntimeError(f"py-spy wrote nothing: {spy.stderr[-500:]}")
    rate = result["requests"] / (result["duration_us"] / 1e6)
    profile = analyse(scenario, raw, round(rate * window), window, user_s + system_s)
    profile.worker_system_s = system_s
    profile.failures = result["failures"] + result["socket_errors"] + result["timeouts"]
    return profile


# wrk in a child process, so py-spy can run in this one meanwhile; prints wrk's BENCH_RESULT as JSON.
_WRK_CHILD = (
    "import json, sys\n"
    "from tests.bench import load\n"
    "url, body, headers, seconds = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4])\n"
    "print(json.dumps(load.wrk(url, body, headers, 8, seconds)))\n"
)


def _cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) CPU ticks of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def describe(profile: Profile, top: int = 25) -> str:
    gil_us = profile.us(profile.samples)
    title = (f"### {profile.scenario}: ≈{profile.requests:,} requests in {profile.seconds:.0f} s "
             f"({profile.requests / profile.seconds:,.0f} req/s with py-spy attached, wrk failures {profile.failures}); "
             f"worker CPU {profile.cpu_us_per_request:,.0f} µs per request (/proc; "
             f"{100 * profile.worker_system_s / max(profile.worker_cpu_s, 1e-9):.0f}% in the kernel), GIL held "
             f"{gil_us:,.0f} µs ({profile.samples:,} samples)")
    lines = [title, "", "| layer (exclusive: innermost non-helper frame) | % | µs/request |", "|---|---|---|"]
    for name, count in profile.by_layer.most_common():
        lines.append(f"| {name} | {100 * count / profile.samples:.1f} | {profile.us(count):,.0f} |")
    lines += ["", "| cost centre (inclusive; they overlap) | % | µs/request |", "|---|---|---|"]
    for label, _ in COST_CENTRES:
        if profile.by_centre[label]:
            count = profile.by_centre[label]
            lines.append(f"| {label} | {100 * count / profile.samples:.1f} | {profile.us(count):,.0f} |")
    lines += ["", "| area | inclusive % | µs/request | self % |", "|---|---|---|---|"]
    for name, count in profile.by_area.most_common():
        lines.append(f"| {name} | {100 * count / profile.samples:.1f} | {profile.us(count):,.0f} | "
                     f"{100 * profile.self_by_area[name] / profile.samples:.1f} |")
    lines += ["", "| function (inclusive, top) | % | µs/request | self % |", "|---|---|---|---|"]
    for name, count in profile.by_function.most_common(top):
        lines.append(f"| {name} | {100 * count / profile.samples:.1f} | {profile.us(count):,.0f} | "
                     f"{100 * profile.self_by_function[name] / profile.samples:.1f} |")
    lines += ["", "| function (self, top) | % | µs/request |", "|---|---|---|"]
    for name, count in profile.self_by_function.most_common(15):
        lines.append(f"| {name} | {100 * count / profile.samples:.1f} | {profile.us(count):,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if not PY_SPY.exists():
        print("py-spy is not in the venv: `make bench-profile` installs it", file=sys.stderr)
        return 1
    folder = Path(tempfile.mkdtemp(prefix="mcp-gateway-profile-"))
    servers.BENCH_DIR.mkdir(exist_ok=True)
    sections = []
    try:
        everything = servers.Everything(folder)
        gateway = servers.Gateway(folder, "gunicorn-profile", {
            "time": servers.stdio_time_server(4),
            "everything": servers.http_server(f"http://127.0.0.1:{everything.port}"),
        }, WORKERS, THREADS)
        gateway.wait_ready(pooled=4 * WORKERS)
        time_call = load.tool_call("get_current_time", {"timezone": "Europe/Paris"})
        echo = load.tool_call("echo", {"message": "hello from the bench"})
        url_http = f"{gateway.url}/everything/mcp"
        scenarios = {
            "stdio": (f"{gateway.url}/time/mcp", time_call, {}),
            "http": (url_http, echo, servers.open_session(url_http)),
            "http-bridged": (url_http, echo, {}),
        }
        for scenario in ONLY:
            url, body, headers = scenarios[scenario]
            profile = run_scenario(scenario, url, body, headers, gateway)
            text = describe(profile)
            print(text, flush=True)
            sections.append(text)
    finally:
        left = procs.stop_all()
    header = (f"py-spy --gil {RATE} Hz (samples only while a worker thread holds the GIL; % of those samples, "
              "µs of GIL-held time per request) on one gunicorn worker ({WORKERS} worker(s) x {THREADS} threads), wrk c=8, "
              f"{SECONDS:g} s per scenario; stdio: mcp-server-time (handshake-era client, 4 processes); http: "
              "server-everything with a client session (pass-through); http-bridged: no session "
              "(the gateway's own upstream session).\n\n")
    (servers.BENCH_DIR / "profile.md").write_text(header + "\n".join(sections))
    print(json.dumps({"processes_left": left}))
    shutil.rmtree(folder, ignore_errors=True)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
