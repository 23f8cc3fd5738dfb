"""What the bench runs: the gateway under real gunicorn, server-everything, nginx, and peer gateways.

Everything listens on 127.0.0.1 on a free port and is a `procs.Child`, stopped by
the PID the bench holds. Peers (sparfenyuk's mcp-proxy from PyPI, supergateway
from npm) are installed on first use into `.bench/` (ignored by git); their code
is never part of this repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
import yaml

from . import procs
from .load import ACCEPT_BOTH, rpc_result

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
TIME_SERVER = VENV_BIN / "mcp-server-time"
EVERYTHING = ROOT / "tests/node/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
LOOPBACK_ONLY = ROOT / "tests/servers/loopback-only.cjs"
SDK_SERVER = ROOT / "tests/servers/sdk_server.py"
BENCH_DIR = ROOT / ".bench"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
LEGACY_VERSION = "2025-06-18"
MCP_PROXY_VERSION = "0.13.0"
SUPERGATEWAY_VERSION = "4.0.0"


def open_session(url: str, version: str = LEGACY_VERSION) -> dict[str, str]:
    """A handshake-era session with an MCP endpoint: initialize, initialized; the headers to use it."""
    base = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
    init = {"jsonrpc": "2.0", "id": "bench-init", "method": "initialize", "params": {
        "protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "mcp-gateway-bench", "version": "1"}}}
    response = requests.post(url, json=init, headers=base, timeout=30)
    response.raise_for_status()
    answer = rpc_result(response)
    if "result" not in answer:
        raise RuntimeError(f"initialize at {url} was refused: {response.text[:300]}")
    result: dict[str, Any] = answer["result"]
    headers = {"MCP-Protocol-Version": str(result.get("protocolVersion", version))}
    session = response.headers.get("Mcp-Session-Id")
    if session:
        headers["Mcp-Session-Id"] = session
    requests.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                  headers={**base, **headers}, timeout=30).close()
    return headers


class Gateway:
    """The project's gateway: `.venv/bin/gunicorn --config conf/gunicorn.conf.py wsgi:app` on a free port."""

    def __init__(self, folder: Path, name: str, servers: Mapping[str, Any], workers: int, threads: int,
                 app: str = "wsgi:app"):
        self.port = procs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers_wanted = workers
        registry = folder / f"{name}.yaml"
        registry.write_text(yaml.safe_dump({"servers": dict(servers), "gateway": {"host": "127.0.0.1", "port": self.port}}))
        env = {
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            "MCP_GATEWAY_REGISTRY": str(registry),
            "MCP_GATEWAY_BIND": f"127.0.0.1:{self.port}",
            "MCP_GATEWAY_WORKERS": str(workers),
            "MCP_GATEWAY_THREADS": str(threads),
            "MCP_GATEWAY_SESSION_SECRET": "bench-secret-shared-by-all-workers",
        }
        self.child = procs.Child(name, [str(VENV_BIN / "gunicorn"), "--config", "conf/gunicorn.conf.py", app],
                                 folder, env=env, cwd=ROOT)

    def wait_ready(self, pooled: int = 0, timeout: float = 60.0) -> None:
        """Until /healthz answers, every worker runs and at least `pooled` stdio processes are up."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.child.alive():
                raise RuntimeError(f"gunicorn exited at start:\n{self.child.log_tail()}")
            try:
                healthy = requests.get(f"{self.url}/healthz", timeout=1).status_code < 500
            except requests.RequestException:
                healthy = False
            if healthy and len(self.worker_pids()) == self.workers_wanted and len(self.pooled_pids()) >= pooled:
                procs.remember(self.child.pid)
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn was not ready within {timeout:g}s:\n{self.child.log_tail()}")
            time.sleep(0.1)

    def worker_pids(self) -> list[int]:
        tree = procs.descendants(self.child.pid)
        return sorted(pid for pid, parent in tree.items()
                      if parent == self.child.pid and "gunicorn" in procs.cmdline(pid))

    def pooled_pids(self) -> list[int]:
        """Processes the workers started (pooled stdio servers and anything below them)."""
        workers = set(self.worker_pids())
        tree = procs.descendants(self.child.pid)
        return sorted(pid for pid in tree if pid not in workers)

    def memory(self) -> dict[str, Any]:
        """RSS (and PSS, which splits shared pages) of master+workers, and of the pooled processes."""
        procs.remember(self.child.pid)
        gateway = [self.child.pid, *self.worker_pids()]
        pooled = self.pooled_pids()
        return {
            "gateway_rss_mb": round(sum(procs.rss_kb(pid) for pid in gateway) / 1024, 1),
            "gateway_pss_mb": round(sum(procs.pss_kb(pid) for pid in gateway) / 1024, 1),
            "worker_rss_mb": [round(procs.rss_kb(pid) / 1024, 1) for pid in gateway[1:]],
            "pooled_processes": len(pooled),
            "pooled_rss_mb": round(sum(procs.rss_kb(pid) for pid in pooled) / 1024, 1),
            "pooled_pss_mb": round(sum(procs.pss_kb(pid) for pid in pooled) / 1024, 1),
        }

    def stop(self) -> None:
        # gunicorn's graceful_timeout is 30 s; nothing is in flight when the bench stops it.
        self.child.stop(grace=40)

    def problems(self, keep: int = 5) -> dict[str, Any]:
        """Warnings, errors and tracebacks in this gunicorn's log (the gateway's own and gunicorn's)."""
        try:
            lines = self.child.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return {}
        found = [line for line in lines if " WARNING " in line or " ERROR " in line or "[ERROR]" in line
                 or "[CRITICAL]" in line or line.startswith("Traceback")]
        return {"count": len(found), "first": found[:keep]} if found else {}


def stdio_time_server(pool: int) -> dict[str, Any]:
    """Registry entry: mcp-server-time, `pool` processes per worker, all kept warm."""
    return {"type": "stdio", "command": [str(TIME_SERVER)], "pool_size": pool, "pool_min": pool,
            "request_timeout": 30}


def http_server(url: str) -> dict[str, Any]:
    return {"type": "http", "instances": [{"endpoint": url}], "mcp_path": "/mcp"}


class Everything:
    """@modelcontextprotocol/server-everything over Streamable HTTP, forced onto loopback."""

    def __init__(self, folder: Path):
        if not (shutil.which("node") and EVERYTHING.exists()):
            raise RuntimeError("server-everything is not installed (make bench installs tests/node)")
        self.port = procs.free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        # A clean environment: server-everything has a tool that returns it.
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/"), "PORT": str(self.port)}
        self.child = procs.Child("server-everything", ["node", "--require", str(LOOPBACK_ONLY), str(EVERYTHING),
                                                       "streamableHttp"], folder, env=env)
        self.child.wait_port(self.port)


class Nginx:
    """nginx from conf/nginx.conf's site (keep-alive upstream, buffering off) in front of `upstream_port`."""

    def __init__(self, folder: Path, upstream_port: int):
        if not Path(NGINX).exists():
            raise RuntimeError("nginx is not installed (make bench installs it)")
        self.port = procs.free_port()
        home = folder / "nginx"
        home.mkdir(exist_ok=True)
        site = (ROOT / "conf/nginx.conf").read_text()
        site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
        site = site.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        (home / "site.conf").write_text(site)
        temp = "".join(f" {kind}_temp_path {home}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (home / "nginx.conf").write_text(
            f"daemon off;\nworker_processes auto;\npid {home}/nginx.pid;\nerror_log {home}/error.log;\n"
            f"events {{ worker_connections 256; }}\nhttp {{\n access_log off;\n{temp} include {home}/site.conf;\n}}\n")
        self.child = procs.Child("nginx", [NGINX, "-p", str(home), "-c", str(home / "nginx.conf")], folder)
        self.child.wait_port(self.port)


def _install_mcp_proxy() -> Path:
    venv = BENCH_DIR / "peers-venv"
    binary = venv / "bin" / "mcp-proxy"
    if not binary.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--quiet", f"mcp-proxy=={MCP_PROXY_VERSION}"],
                       check=True, timeout=600)
    return binary


def _install_supergateway() -> Path:
    folder = BENCH_DIR / "node"
    script = folder / "node_modules/supergateway/dist/index.js"
    if not script.exists():
        if not shutil.which("npm"):
            raise RuntimeError("npm is not installed")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"private": true}\n')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error",
                        f"supergateway@{SUPERGATEWAY_VERSION}"], cwd=folder, check=True, timeout=600)
    return script


class Peer:
    """A peer gateway in front of mcp-server-time, serving Streamable HTTP at /mcp on loopback."""

    def __init__(self, folder: Path, kind: str):
        self.kind = kind
        self.port = procs.free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        if kind == "mcp-proxy":
            argv = [str(_install_mcp_proxy()), "--host", "127.0.0.1", "--port", str(self.port), str(TIME_SERVER)]
            self.label = f"mcp-proxy {MCP_PROXY_VERSION} (sparfenyuk, PyPI), stateful"
        elif kind == "supergateway":
            argv = ["node", "--require", str(LOOPBACK_ONLY), str(_install_supergateway()), "--stdio", str(TIME_SERVER),
                    "--outputTransport", "streamableHttp", "--stateful", "--port", str(self.port), "--logLevel", "none"]
            self.label = f"supergateway {SUPERGATEWAY_VERSION} (npm), stateful"
        else:
            raise ValueError(kind)
        env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
        self.child = procs.Child(kind, argv, folder, env=env)
        self.child.wait_port(self.port)

    def processes(self) -> int:
        return 1 + len(procs.descendants(self.child.pid))
