"""Supervising the local processes of http templates, once per gateway.

An http template with `instances: N` becomes N local processes, each on its
own free loopback port, balanced over as an ordinary HTTP server. They must
exist once per gateway, not once per gunicorn worker, so gunicorn's master
runs one supervisor per template (master.py) and tells the workers where the
instances listen through MCP_GATEWAY_TEMPLATE_ENDPOINTS, which the workers
inherit. A process that exits is restarted on the same port after an
exponential back-off; all of them stop with the master. Without the master's
hooks (plain `gunicorn wsgi:app`, tests) each gateway process runs its own.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from . import errors, processes
from .backoff import Backoff
from .registry import HttpInstanceSettings, HttpSettings, ServerEntry

log = logging.getLogger(__name__)

ENDPOINTS_ENV = "MCP_GATEWAY_TEMPLATE_ENDPOINTS"
HOST = "127.0.0.1"
CHECK_EVERY = 0.5
STARTUP_WAIT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Instance:
    """One supervised process of an http template."""

    server_id: str
    entry: ServerEntry
    port: int
    popen: subprocess.Popen[bytes] | None = None
    failures: int = 0
    next_start: float = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"


class Supervisor:
    """The processes of the http templates among `entries` (other entries are ignored)."""

    def __init__(self, entries: Iterable[ServerEntry]):
        self.instances: list[Instance] = [
            Instance(entry.id, entry, free_port())
            for entry in entries if entry.launch is not None for _ in range(entry.instances)
        ]
        self._backoff = Backoff()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def endpoints(self) -> dict[str, list[str]]:
        planned: dict[str, list[str]] = {}
        for instance in self.instances:
            planned.setdefault(instance.server_id, []).append(instance.endpoint)
        return planned

    def start(self) -> None:
        if not self.instances or self._thread is not None:
            return
        for instance in self.instances:
            self._start(instance)
        self._await_listening()
        self._thread = threading.Thread(target=self._watch, name="mcp-gateway-supervisor", daemon=True)
        self._thread.start()

    def _start(self, instance: Instance) -> None:
        launch = instance.entry.launch
        assert launch is not None
        argv = [part.replace("{host}", HOST).replace("{port}", str(instance.port)) for part in launch.command]
        try:
            instance.popen = processes.spawn(
                instance.server_id, argv, env=processes.environment(launch.env), cwd=launch.working_dir,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
        except errors.SpawnFailed as exc:
            self._failed(instance, exc.message)
            return
        assert instance.popen.stdout is not None
        processes.log_lines(instance.popen.stdout, instance.server_id, instance.popen.pid)
        log.info("server %s: started %s (pid %s)", instance.server_id, instance.endpoint, instance.popen.pid)

    def _await_listening(self) -> None:
        """Give the instances their start-up time, so the first requests find them."""
        deadline = time.monotonic() + STARTUP_WAIT
        waiting = [i for i in self.instances if i.popen is not None]
        while waiting and time.monotonic() < deadline:
            for instance in list(waiting):
                if instance.popen is None or instance.popen.poll() is not None:
                    waiting.remove(instance)  # the watcher restarts it
                    continue
                try:
                    socket.create_connection((HOST, instance.port), timeout=0.2).close()
                    waiting.remove(instance)
                except OSError:
                    pass
            time.sleep(0.05)
        for instance in waiting:
            log.warning("server %s: instance %s is not listening after %.0fs", instance.server_id, instance.endpoint,
                        STARTUP_WAIT)

    def _failed(self, instance: Instance, reason: str) -> None:
        instance.failures += 1
        delay = self._backoff.delay(instance.failures)
        instance.next_start = time.monotonic() + delay
        instance.popen = None
        log.error("server %s: instance %s %s; restarting in %.1fs", instance.server_id, instance.endpoint, reason, delay)

    def _watch(self) -> None:
        while not self._stopping.wait(CHECK_EVERY):
            with self._lock:
                for instance in self.instances:
                    if self._stopping.is_set():
                        return
                    if instance.popen is not None:
                        code = instance.popen.poll()
                        if code is None:
                            if instance.failures and time.monotonic() - instance.next_start > 30:
                                instance.failures = 0  # it has run well for a while
                            continue
                        processes.stop(instance.popen, 0)  # reap it, and any stray of its group
                        self._failed(instance, f"exited with code {code}")
                    if time.monotonic() >= instance.next_start:
                        self._start(instance)

    def stop(self, grace: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._lock:
            for instance in self.instances:
                if instance.popen is not None:
                    processes.stop(instance.popen, grace)
                    instance.popen = None


def export(endpoints: Mapping[str, list[str]]) -> None:
    """Tell gateway processes forked after this where the instances listen."""
    os.environ[ENDPOINTS_ENV] = json.dumps(endpoints)


def inherited_endpoints() -> dict[str, list[str]]:
    """Endpoints the gunicorn master's supervisor published, if it runs one."""
    text = os.environ.get(ENDPOINTS_ENV)
    loaded: dict[str, list[str]] = json.loads(text) if text else {}
    return loaded


def as_http(entry: ServerEntry, endpoints: list[str]) -> ServerEntry:
    """An http template's entry as the HTTP server its supervised instances make."""
    launch = entry.launch
    assert launch is not None
    settings = HttpSettings(
        instances=tuple(HttpInstanceSettings(endpoint) for endpoint in endpoints),
        mcp_path=launch.mcp_path, health_check=launch.health_check,
    )
    return replace(entry, http=settings)
