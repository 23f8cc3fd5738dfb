"""The gateway's per-worker runtime, attached to the Flask app.

Owns the upstreams built from the registry, the authenticator, the session
signer, the upkeep thread (pools kept at their minimum, idle processes
retired, HTTP health checks run) and, when gunicorn's master runs none, the
supervisor of http templates' processes.
Nothing starts at import or in create_app: `start()` runs after gunicorn
forks (from the post_worker_init hook, or lazily on the first request), and
`close()` runs when the worker exits, so every child is stopped with it.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading

from flask import Flask, current_app

from . import errors, supervisor, upstreams
from .auth import Authenticator
from .proxy import HttpUpstream
from .registry import Registry
from .sessions import SessionSigner, load_secret
from .upstreams import MessageUpstream

log = logging.getLogger(__name__)

EXTENSION_KEY = "mcp_gateway"
UPKEEP_INTERVAL = 1.0


class Gateway:
    def __init__(self, registry: Registry):
        self.registry = registry
        self.auth = Authenticator(registry)
        self.signer = SessionSigner(load_secret(registry.gateway.session_secret), registry.gateway.session_ttl)
        # http templates: the gunicorn master's supervisor runs their processes and
        # publishes where they listen; without one, this gateway process runs its own.
        published = supervisor.inherited_endpoints()
        entries = dict(registry.servers)
        templated = [sid for sid, entry in entries.items() if entry.launch is not None]
        self.supervisor: supervisor.Supervisor | None = None
        if any(sid not in published for sid in templated):
            self.supervisor = supervisor.Supervisor(registry)
            published = self.supervisor.endpoints()
        for sid in templated:
            entries[sid] = supervisor.as_http(entries[sid], published[sid])
        interval = registry.gateway.health_check_interval
        self.upstreams: dict[str, MessageUpstream | HttpUpstream] = {
            sid: upstreams.build(entry, interval) for sid, entry in entries.items()
        }
        self._lock = threading.Lock()
        self._started_in: int | None = None
        self._stopping = threading.Event()
        self._upkeep: threading.Thread | None = None

    def init_app(self, app: Flask) -> None:
        app.extensions[EXTENSION_KEY] = self
        app.before_request(self.start)

    def upstream(self, server_id: str) -> MessageUpstream | HttpUpstream:
        try:
            return self.upstreams[server_id]
        except KeyError:
            raise errors.UnknownServer(f"no MCP server '{server_id}' in this gateway's registry") from None

    def start(self) -> None:
        """Start upkeep in this process; cheap and idempotent (called per request)."""
        if self._started_in == os.getpid():
            return
        with self._lock:
            if self._started_in == os.getpid():
                return
            self._started_in = os.getpid()
            self._stopping.clear()
            self._upkeep = threading.Thread(target=self._run_upkeep, name="mcp-gateway-upkeep", daemon=True)
            self._upkeep.start()
            if self.supervisor is not None:
                self.supervisor.start()
            atexit.register(self.close)
        log.info("gateway started in pid %s with %d servers from %s", os.getpid(), len(self.upstreams), self.registry.source)

    def _run_upkeep(self) -> None:
        while not self._stopping.is_set():
            for upstream in self.upstreams.values():
                if self._stopping.is_set():
                    break
                try:
                    upstream.maintain()
                except Exception:  # upkeep must survive anything one server does
                    log.exception("upkeep of server %s failed", upstream.server_id)
            self._stopping.wait(UPKEEP_INTERVAL)

    def close(self) -> None:
        """Stop upkeep and every child process this worker started."""
        self._stopping.set()
        if self._upkeep is not None and self._upkeep is not threading.current_thread():
            self._upkeep.join(timeout=30)
        for upstream in self.upstreams.values():
            upstream.close()
        if self.supervisor is not None:
            self.supervisor.stop()

    def status(self) -> dict[str, object]:
        return {
            sid: {"description": entry.description, **({"template": entry.template} if entry.template else {}),
                  **self.upstreams[sid].status()}
            for sid, entry in self.registry.servers.items()
        }


def current_gateway() -> Gateway:
    gateway: Gateway = current_app.extensions[EXTENSION_KEY]
    return gateway
