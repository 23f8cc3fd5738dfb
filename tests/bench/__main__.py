"""`python -m tests.bench`: run the whole side-by-side benchmark once (what `make bench` does).

Settings come from the environment (defaults in brackets):
  BENCH_SECONDS [5]      measured seconds per row        BENCH_WARMUP [1]   unmeasured seconds before it
  BENCH_WORKERS [2]      gunicorn workers                BENCH_THREADS [8]  threads per worker
  BENCH_POOL [2]         mcp-server-time processes per worker (2 x 2 = the goals' 4 processes)
  BENCH_RSS_REQUESTS [100000]  requests of the memory loop, BENCH_RSS_SECONDS [300] its time bound
  BENCH_SCALING_WORKERS [1,2,4], BENCH_SCALING_POOLS [1,2,4]   the scaling grid
  BENCH_PEERS [mcp-proxy,supergateway]   peers to run (empty: none)
  BENCH_ONLY [direct,stdio,peers,http,ws,floor,sdk,rss,scaling,streams]   sections to run
    (ws: the WebSocket tools/call rows beside the gateway's HTTP ones, in the same gateway run)
  BENCH_IDLE_STREAMS [1000]   idle GET streams the streams section holds beside its load
  BENCH_IDLE_WEBSOCKETS [1000]   idle WebSocket connections it holds beside them
  BENCH_MAX_REQUESTS [1000000]  count bound of every measured run
  BENCH_WRK_THREADS [1]  wrk threads             BENCH_OUT [.bench]  where results.json and table.md go
  BENCH_REPEAT [1]       runs per row; the row shows the run with the median req/s (others in its JSON)
  BENCH_README [0]       1: also put table.md into README.md between its bench:table markers
Exit status: 0 when the run completed and left no process behind (goals are reported, not enforced).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import requests

from gateway.protocol import LATEST_LEGACY

from . import direct, idle, load, procs, report, servers, wsload
from .load import Row


def _env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


@dataclass(frozen=True)
class Settings:
    seconds: float = float(os.environ.get("BENCH_SECONDS", "5"))
    warmup: float = float(os.environ.get("BENCH_WARMUP", "1"))
    workers: int = int(os.environ.get("BENCH_WORKERS", "2"))
    threads: int = int(os.environ.get("BENCH_THREADS", "8"))
    pool: int = int(os.environ.get("BENCH_POOL", "2"))
    rss_requests: int = int(os.environ.get("BENCH_RSS_REQUESTS", "100000"))
    rss_seconds: float = float(os.environ.get("BENCH_RSS_SECONDS", "300"))
    max_requests: int = int(os.environ.get("BENCH_MAX_REQUESTS", "1000000"))
    wrk_threads: int = int(os.environ.get("BENCH_WRK_THREADS", "1"))
    repeat: int = max(1, int(os.environ.get("BENCH_REPEAT", "1")))
    idle_streams: int = int(os.environ.get("BENCH_IDLE_STREAMS", "1000"))
    idle_websockets: int = int(os.environ.get("BENCH_IDLE_WEBSOCKETS", "1000"))
    out: Path = Path(os.environ.get("BENCH_OUT", str(servers.BENCH_DIR)))

    @property
    def scaling_workers(self) -> list[int]:
        return [int(x) for x in _env_list("BENCH_SCALING_WORKERS", "1,2,4")]

    @property
    def scaling_pools(self) -> list[int]:
        return [int(x) for x in _env_list("BENCH_SCALING_POOLS", "1,2,4")]

    @property
    def peers(self) -> list[str]:
        return _env_list("BENCH_PEERS", "mcp-proxy,supergateway")

    @property
    def sections(self) -> set[str]:
        return set(_env_list("BENCH_ONLY", "direct,stdio,peers,http,ws,floor,sdk,rss,scaling,streams"))

    def summary(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "warmup": self.warmup, "workers": self.workers, "threads": self.threads,
                "pool_per_worker": self.pool, "rss_requests": self.rss_requests, "wrk_threads": self.wrk_threads,
                "repeat": self.repeat}


# What may keep a peer from installing or running here; reported in its row.
PEER_FAILURES = (OSError, RuntimeError, ValueError, subprocess.SubprocessError, requests.RequestException)

TIME_CALL = load.tool_call("get_current_time", {"timezone": "Europe/Paris"})
TIME_CALL_MODERN = load.tool_call("get_current_time", {"timezone": "Europe/Paris"}, modern=True)
ECHO_CALL = load.tool_call("echo", {"message": "hello from the bench"})
ECHO_CALL_MODERN = load.tool_call("echo", {"message": "hello from the bench"}, modern=True)
ADD_CALL_MODERN = load.tool_call("add", {"a": 2, "b": 3}, modern=True)


class Bench:
    def __init__(self, settings: Settings, folder: Path):
        self.settings = settings
        self.folder = folder
        self.rows: list[Row] = []
        self.scaling: list[Row] = []
        self.memory: dict[str, Any] = {}
        self.log_problems: dict[str, dict[str, Any]] = {}  # gunicorn name -> warnings/errors in its log

    def stop_gateway(self, gateway: servers.Gateway) -> None:
        """Stop a gunicorn and keep what its log says went wrong."""
        gateway.stop()
        problems = gateway.problems()
        if problems:
            self.log_problems[gateway.child.name] = problems
            print(f"  {gateway.child.name}: {problems['count']} warnings/errors in its log, first: {problems['first'][0]}")

    # --- running rows ------------------------------------------------------------

    def timed(self, make: Callable[[], Row], into: list[Row] | None = None) -> Row:
        """Run one row, note how busy the rest of the machine was meanwhile, print and keep it."""
        runs = []
        for _ in range(self.settings.repeat):
            before, started = procs.foreign_cpu(), time.monotonic()
            run = make()
            run.extra["other_cpu_percent"] = round(procs.foreign_cpu_percent(before, time.monotonic() - started), 1)
            run.extra["load_average"] = os.getloadavg()[0]
            runs.append(run)
        runs.sort(key=lambda run: run.rps)
        row = runs[len(runs) // 2]
        if len(runs) > 1:
            row.extra["runs"] = [{"rps": round(r.rps, 1), "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "failures": r.failures}
                                 for r in runs]
            others = sum(r.failures for r in runs) - row.failures
            if others:
                row.note = f"{row.note}; {others} failures in the other runs".lstrip("; ")
        return self.keep(row, into)

    def keep(self, row: Row, into: list[Row] | None = None) -> Row:
        """Keep a row and print it as it comes."""
        (self.rows if into is None else into).append(row)
        text = (f"{row.rps:8,.0f} req/s  p50 {row.p50_ms:6.2f} ms  p99 {row.p99_ms:7.2f} ms  failures {row.failures}"
                if row.requests else row.note)
        print(f"  {row.group:<6} {row.name:<68} c={row.concurrency:<2} {text}", flush=True)
        return row

    def wrk_row(self, group: str, name: str, url: str, body: Mapping[str, Any], headers: Mapping[str, str],
                concurrency: int, note: str = "", into: list[Row] | None = None) -> Row:
        s = self.settings
        return self.timed(lambda: load.measure(group, name, url, body, headers, concurrency, s.seconds, s.warmup,
                                               s.max_requests, s.wrk_threads, note), into)

    def warm(self, url: str, body: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        """Unmeasured load at c=8 before a gateway's first row: every worker and pooled process
        then has served calls, as the direct driver's processes have before theirs."""
        s = self.settings
        load.wrk(url, body, {"Accept": load.ACCEPT_BOTH, **headers}, 8, 2 * s.warmup, threads=s.wrk_threads)

    # --- sections ------------------------------------------------------------------

    def direct_stdio(self) -> None:
        s = self.settings
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")}
        argv = [str(servers.TIME_SERVER)]
        for processes in (1, 4):
            for concurrency in (1, 8):
                self.timed(partial(direct.measure, argv, env, processes, concurrency, s.seconds, s.warmup,
                                   s.max_requests))
        self.timed(partial(direct.measure, argv, env, 1, 1, s.seconds, s.warmup, s.max_requests, legacy=True))

    def gateway_stdio(self, gateway: servers.Gateway) -> None:
        s = self.settings
        shape = f"{s.workers} workers x {s.pool} processes"
        url = f"{gateway.url}/time/mcp"
        self.warm(url, TIME_CALL, {})
        for concurrency in (1, 8):
            self.wrk_row("stdio", f"gateway, handshake era client, no session ({shape})", url, TIME_CALL, {}, concurrency)
        for concurrency in (1, 8):
            self.wrk_row("stdio", f"gateway, 2026-07-28 client ({shape})", url, TIME_CALL_MODERN,
                         load.modern_headers(TIME_CALL_MODERN), concurrency)

    def peers(self) -> None:
        for kind in self.settings.peers:
            try:
                peer = servers.Peer(self.folder, kind)
                session = servers.open_session(peer.url)
            except PEER_FAILURES as exc:  # a peer that cannot run here is reported, not fatal
                self.keep(Row("stdio", kind, 1, "wrk", note=f"could not run here: {exc}"))
                continue
            try:
                for concurrency in (1, 8):
                    self.wrk_row("stdio", peer.label, peer.url, TIME_CALL, session, concurrency,
                                 note="one mcp-server-time process behind it")
            finally:
                peer.child.stop()

    def http(self, everything: servers.Everything, gateway: servers.Gateway) -> None:
        session = servers.open_session(everything.url)
        for concurrency in (1, 8):
            self.wrk_row("http", "server-everything direct (session)", everything.url, ECHO_CALL, session, concurrency)
        # The gateway's own upstream session (bridged rows) speaks the newest handshake-era
        # version, for which server-everything primes every SSE answer with a stored event.
        newest = servers.open_session(everything.url, LATEST_LEGACY)
        for concurrency in (1, 8):
            self.wrk_row("http", f"{report.DIRECT_AS_GATEWAY} {LATEST_LEGACY}, as the gateway's own session)",
                         everything.url, ECHO_CALL, newest, concurrency)
        nginx = servers.Nginx(self.folder, everything.port)
        try:
            for concurrency in (1, 8):
                self.wrk_row("http", "nginx proxy_pass (conf/nginx.conf site, session)",
                             f"http://127.0.0.1:{nginx.port}/mcp", ECHO_CALL, session, concurrency)
        finally:
            nginx.child.stop()
        url = f"{gateway.url}/everything/mcp"
        client_session = servers.open_session(url)  # initialize through the gateway: a signed session id
        self.warm(url, ECHO_CALL, client_session)
        for concurrency in (1, 8):
            self.wrk_row("http", "gateway, handshake era, client session (pass-through)", url, ECHO_CALL,
                         client_session, concurrency)
        for concurrency in (1, 8):
            self.wrk_row("http", "gateway, handshake era, no session (gateway's upstream session)", url, ECHO_CALL,
                         {}, concurrency)
        for concurrency in (1, 8):
            self.wrk_row("http", "gateway, 2026-07-28 client (bridged to the handshake era)", url, ECHO_CALL_MODERN,
                         load.modern_headers(ECHO_CALL_MODERN), concurrency)

    def websocket(self, gateway: servers.Gateway) -> None:
        """tools/call over /everything/ws (subprotocol mcp), beside the HTTP rows of the same gateway run."""
        s = self.settings
        url = f"ws://127.0.0.1:{gateway.port}/everything/ws"
        for concurrency in (1, 8):
            self.timed(partial(wsload.measure, "http", "gateway WebSocket /everything/ws, handshake era "
                               "(initialize on the socket)", url, ECHO_CALL, concurrency, s.seconds, s.warmup,
                               s.max_requests))

    def floor(self) -> None:
        """A constant-answering Flask app under the same gunicorn config: what the stack costs before forwarding."""
        s = self.settings
        gateway = servers.Gateway(self.folder, "gunicorn-floor", {}, s.workers, s.threads,
                                  app="tests.bench.floor_app:app")
        try:
            gateway.wait_ready()
            for concurrency in (1, 8):
                self.wrk_row("http", "floor: Flask constant answer, same gunicorn config (tests/bench/floor_app.py)",
                             f"{gateway.url}/mcp", ECHO_CALL, {}, concurrency)
        finally:
            self.stop_gateway(gateway)

    def sdk(self) -> None:
        """tests/servers/sdk_server.py over HTTP: a 2026-07-28 client passes straight through the gateway."""
        port = procs.free_port()
        sdk = procs.Child("sdk-server", [str(servers.VENV_BIN / "python"), str(servers.SDK_SERVER), "http", str(port)],
                          self.folder)
        gateway = None
        try:
            sdk.wait_port(port)
            s = self.settings
            gateway = servers.Gateway(self.folder, "gunicorn-sdk", {"sdk": servers.http_server(f"http://127.0.0.1:{port}")},
                                      s.workers, s.threads)
            gateway.wait_ready()
            headers = load.modern_headers(ADD_CALL_MODERN)
            for concurrency in (1, 8):
                self.wrk_row("http", "SDK server (tests/servers/sdk_server.py) direct, 2026-07-28",
                             f"http://127.0.0.1:{port}/mcp", ADD_CALL_MODERN, headers, concurrency)
            for concurrency in (1, 8):
                self.wrk_row("http", "gateway, 2026-07-28 client, SDK server (pass-through)",
                             f"{gateway.url}/sdk/mcp", ADD_CALL_MODERN, headers, concurrency)
        except (RuntimeError, requests.RequestException) as exc:
            self.keep(Row("http", "SDK server", 1, "wrk", note=f"not measured: {exc}"))
        finally:
            if gateway is not None:
                self.stop_gateway(gateway)
            sdk.stop()

    def rss_loop(self, gateway: servers.Gateway) -> None:
        """Bounded loop of `rss_requests` through the gateway (all four request kinds, c=8); RSS before and after."""
        s = self.settings
        kinds = [
            (f"{gateway.url}/time/mcp", TIME_CALL, {}),
            (f"{gateway.url}/time/mcp", TIME_CALL_MODERN, load.modern_headers(TIME_CALL_MODERN)),
            (f"{gateway.url}/everything/mcp", ECHO_CALL, {}),
            (f"{gateway.url}/everything/mcp", ECHO_CALL_MODERN, load.modern_headers(ECHO_CALL_MODERN)),
        ]
        for url, body, headers in kinds:
            load.check(url, body, {"Accept": load.ACCEPT_BOTH, **headers})
        before = gateway.memory()
        done = failures = 0
        rate = 500.0
        started = time.monotonic()
        deadline = started + s.rss_seconds
        turn = 0
        print(f"  memory loop: {s.rss_requests:,} requests through the gateway (bound {s.rss_seconds:g} s)", flush=True)
        while done < s.rss_requests and time.monotonic() < deadline:
            url, body, headers = kinds[turn % len(kinds)]
            turn += 1
            remaining = s.rss_requests - done
            # wrk runs its whole -d even when the count bound stops it early, so size the last slices.
            slice_seconds = min(10.0, max(1.0, remaining / rate + 0.5), max(1.0, deadline - time.monotonic()))
            try:
                result = load.wrk(url, body, {"Accept": load.ACCEPT_BOTH, **headers}, 8, slice_seconds,
                                  max_requests=remaining, threads=s.wrk_threads)
            except load.LoadError as exc:
                print(f"  memory loop stopped: {exc}")
                break
            done += result["requests"]
            failures += result["failures"] + result["socket_errors"] + result["timeouts"]
            rate = max(50.0, result["requests"] / (result["duration_us"] / 1e6))
        after = gateway.memory()
        self.memory["rss_loop"] = {
            "requests": done, "seconds": round(time.monotonic() - started, 1), "failures": failures,
            "mix": "stdio and HTTP, both eras, c=8",
            "before_mb": before["gateway_rss_mb"], "after_mb": after["gateway_rss_mb"],
            "growth_mb": round(after["gateway_rss_mb"] - before["gateway_rss_mb"], 1),
            "pooled_before_mb": before["pooled_rss_mb"], "pooled_after_mb": after["pooled_rss_mb"],
        }
        print("  " + report._memory_lines({"rss_loop": self.memory["rss_loop"]})[0], flush=True)

    def streams(self) -> None:
        """Issue 15: a c=8 stdio load with and without many idle GET streams and idle WebSockets held
        through the same gateway; worker RSS per idle stream and per idle WebSocket, and release times."""
        s = self.settings
        wsload.raise_fd_limit()
        upstream = idle.IdleUpstream()
        gateway = servers.Gateway(self.folder, "gunicorn-streams", {
            "time": servers.stdio_time_server(s.pool), "idle": servers.http_server(upstream.url),
        }, s.workers, s.threads)
        loop = asyncio.new_event_loop()  # the held streams live as long as this loop
        held = idle.Held()
        sockets = wsload.IdleSockets()  # the held WebSockets live on a loop thread of their own
        try:
            gateway.wait_ready(pooled=s.workers * s.pool)
            url = f"{gateway.url}/time/mcp"
            self.warm(url, TIME_CALL, {})
            alone = self.wrk_row("streams", "gateway stdio tools/call, no idle streams", url, TIME_CALL, {}, 8)
            before = gateway.memory()
            held = loop.run_until_complete(idle.hold(f"{gateway.url}/idle/mcp", s.idle_streams))
            after_streams = gateway.memory()
            sockets.open(f"ws://127.0.0.1:{gateway.port}/time/ws", s.idle_websockets)
            after_sockets = gateway.memory()
            opened, opened_ws = len(held.streams), len(sockets.sockets)
            note = f"{opened} of {s.idle_streams} idle GET streams, {opened_ws} of {s.idle_websockets} idle WebSockets held"
            if held.failed:
                note += f"; {held.failed} streams could not be opened (first: {held.first_failure})"
            if sockets.failed:
                note += f"; {sockets.failed} WebSockets could not be opened (first: {sockets.first_failure})"
            beside = self.wrk_row("streams", f"gateway stdio tools/call, beside {s.idle_streams} idle GET streams "
                                  f"and {s.idle_websockets} idle WebSockets", url, TIME_CALL, {}, 8, note=note)
            gauge_held = _websockets_gauge(gateway)
            alive_ws = sockets.alive()
            released = loop.run_until_complete(idle.release_times(held, upstream, min(20, opened)))
            released_ws = sockets.release_times(min(20, opened_ws))
            self.memory["idle_streams"] = {
                "wanted": s.idle_streams, "held": opened, "failed": held.failed, "open_seconds": round(held.seconds, 1),
                "rss_growth_kb_per_stream": _kb_per(before, after_streams, opened),
                "throughput_ratio": round(beside.rps / alone.rps, 3) if alone.rps else None,
                "p99_ratio": round(beside.p99_ms / alone.p99_ms, 2) if alone.p99_ms and beside.requests else None,
                "release": idle.summary(released),
                "websockets": {
                    "wanted": s.idle_websockets, "held": opened_ws, "failed": sockets.failed,
                    "open_seconds": round(sockets.seconds, 1), "alive_after_load": alive_ws,
                    "status_gauge": gauge_held,
                    "rss_growth_kb_per_websocket": _kb_per(after_streams, after_sockets, opened_ws),
                    "release": idle.summary(released_ws),
                },
            }
            for line in report._memory_lines({"idle_streams": self.memory["idle_streams"]}):
                print("  " + line, flush=True)
        finally:
            sockets.stop()
            idle.close_all(held)
            loop.close()
            self.stop_gateway(gateway)
            upstream.stop()

    def scaling_grid(self, everything: servers.Everything) -> None:
        s = self.settings
        for workers in s.scaling_workers:
            for index, pool in enumerate(s.scaling_pools):
                gateway = servers.Gateway(self.folder, f"gunicorn-w{workers}-p{pool}", {
                    "time": servers.stdio_time_server(pool),
                    "everything": servers.http_server(f"http://127.0.0.1:{everything.port}"),
                }, workers, s.threads)
                try:
                    gateway.wait_ready(pooled=workers * pool)
                    row = self.wrk_row("scaling stdio", f"gateway, handshake era, {workers} workers x {pool} processes",
                                       f"{gateway.url}/time/mcp", TIME_CALL, {}, 8, into=self.scaling)
                    row.extra.update(workers=workers, pool=pool, memory=gateway.memory())
                    if index == 0:
                        url = f"{gateway.url}/everything/mcp"
                        row = self.wrk_row("scaling http", f"gateway, handshake era session, {workers} workers",
                                           url, ECHO_CALL, servers.open_session(url), 8, into=self.scaling)
                        row.extra.update(workers=workers, memory=gateway.memory())
                except (RuntimeError, requests.RequestException) as exc:
                    self.keep(Row("scaling stdio", f"gateway, {workers} workers x {pool} processes", 8, "wrk",
                                  note=f"not measured: {exc}", extra={"workers": workers, "pool": pool}), self.scaling)
                finally:
                    self.stop_gateway(gateway)

    # --- the whole run -------------------------------------------------------------

    def section(self, group: str, run: Callable[[], None]) -> None:
        """Run one section; one that breaks is a row saying why, and the others still run."""
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others' rows
            self.keep(Row(group, f"section {getattr(run, '__name__', group)}", 0, "-",
                          note=f"broke: {type(exc).__name__}: {exc}"))

    def run(self) -> None:
        s = self.settings
        sections = s.sections
        print(f"MCP gateway bench: {s.summary()}, sections {sorted(sections)}; logs in {self.folder}", flush=True)
        if "peers" in sections:  # install before anything is measured
            for kind in s.peers:
                try:
                    {"mcp-proxy": servers._install_mcp_proxy, "supergateway": servers._install_supergateway}[kind]()
                except PEER_FAILURES as exc:  # reported in the peer's row
                    print(f"  could not install {kind}: {exc}")
        if "direct" in sections:
            self.section("stdio", self.direct_stdio)
        everything = servers.Everything(self.folder)
        gateway = servers.Gateway(self.folder, "gunicorn-main", {
            "time": servers.stdio_time_server(s.pool),
            "everything": servers.http_server(f"http://127.0.0.1:{everything.port}"),
        }, s.workers, s.threads)
        try:
            gateway.wait_ready(pooled=s.workers * s.pool)
            for url, body in ((f"{gateway.url}/time/mcp", TIME_CALL), (f"{gateway.url}/everything/mcp", ECHO_CALL)):
                load.check(url, body, {"Accept": load.ACCEPT_BOTH})
            self.memory["ready"] = gateway.memory()
            if "stdio" in sections:
                self.section("stdio", lambda: self.gateway_stdio(gateway))
            if "peers" in sections:
                self.section("stdio", self.peers)
            if "http" in sections:
                self.section("http", lambda: self.http(everything, gateway))
            if "ws" in sections:
                self.section("http", lambda: self.websocket(gateway))
            self.memory["after_rows"] = gateway.memory()
            if "rss" in sections and s.rss_requests > 0:
                self.rss_loop(gateway)
            self.memory["end"] = gateway.memory()
        finally:
            self.stop_gateway(gateway)
        if "floor" in sections:
            self.section("http", self.floor)
        if "sdk" in sections:
            self.section("http", self.sdk)
        if "scaling" in sections:
            self.section("scaling stdio", lambda: self.scaling_grid(everything))
        if "streams" in sections:
            self.section("streams", self.streams)
        everything.child.stop()


def _kb_per(before: Mapping[str, Any], after: Mapping[str, Any], count: int) -> float | None:
    """Growth of master+workers RSS between two snapshots, per held connection."""
    return round((after["gateway_rss_mb"] - before["gateway_rss_mb"]) * 1024 / count, 1) if count else None


def _websockets_gauge(gateway: servers.Gateway) -> int | None:
    """WebSockets open over all workers, as /status says (workers[].websockets)."""
    try:
        status = requests.get(f"{gateway.url}/status", timeout=5).json()
    except (requests.RequestException, ValueError):
        return None
    return sum(int(worker.get("websockets", 0)) for worker in status.get("workers", []))


def main() -> int:
    settings = Settings()
    folder = Path(tempfile.mkdtemp(prefix="mcp-gateway-bench-"))
    bench = Bench(settings, folder)
    info = report.machine()
    started = time.monotonic()
    failed: BaseException | None = None
    try:
        bench.run()
    except BaseException as exc:  # noqa: BLE001 - stop every process first, then say what broke
        failed = exc
    finally:
        leftovers = procs.stop_all()
    info["duration_s"] = round(time.monotonic() - started)
    info["load_average_at_end"] = os.getloadavg()
    goal_list = report.goals(bench.rows, bench.memory)
    print()
    print(report.console(bench.rows, goal_list, bench.memory, bench.scaling))
    if bench.log_problems:
        print("\nwarnings and errors in the gateways' logs:")
        for name, problems in bench.log_problems.items():
            print(f"  {name}: {problems['count']}")
            for line in problems["first"]:
                print(f"    {line[:300]}")
    report.write(settings.out, bench.rows, goal_list, bench.memory, bench.scaling, info, settings.summary(),
                 [list(item) for item in leftovers], bench.log_problems)
    print(f"\nwrote {settings.out / 'results.json'} and {settings.out / 'table.md'} ({info['duration_s']} s)")
    if os.environ.get("BENCH_README") == "1" and failed is None:
        readme = servers.ROOT / "README.md"
        table = (settings.out / "table.md").read_text()
        print(f"README.md {'updated' if report.update_readme(readme, table) else 'has no bench:table markers'}")
    if leftovers:
        print(f"processes left behind (killed now, by PID): {leftovers}")
    else:
        print("processes left behind: none")
    if failed is not None:
        if isinstance(failed, KeyboardInterrupt):
            return 130
        print(f"bench failed: {failed!r}\nlogs kept in {folder}", file=sys.stderr)
        return 1
    shutil.rmtree(folder, ignore_errors=True)
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
