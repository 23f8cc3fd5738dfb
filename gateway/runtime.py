"""The gateway's per-worker runtime, attached to the Flask app.

Owns the upstreams built from the registry, the authenticator, the session
signer (and the revocations of ended sessions, which outlive a reload) and the
upkeep thread. Every second upkeep keeps pools at their minimum, retires idle
processes, runs HTTP health checks, publishes this worker's status (for the
whole-gateway /status and /metrics), now and then forgets revocations of
sessions that have expired anyway and, with `gateway.reload_registry: true`,
looks at the registry file.

A reload keeps the upstream of every server whose entry did not change (its
pool, connections, health and sessions go on) and builds new ones for added
and changed servers. The replaced upstreams drain: requests no longer reach
them, and each is closed, its processes stopped, once the requests that
hold it are done (at the latest after DRAIN_TIMEOUT). A file that fails
validation is refused in one log line (one per gateway, not per worker) and
the running registry goes on. http templates' processes belong to gunicorn's
master, so a change to one asks it for a graceful reload (HUP) instead.

Nothing starts at import or in create_app: `start()` runs after gunicorn
forks (from the post_worker_init hook, or lazily on the first request), and
`close()` runs when the worker exits, so every child is stopped with it.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app

from . import accesslog, errors, metrics, rundir, supervisor, upstreams
from . import registry as registry_module
from .auth import Authenticator
from .bulkhead import Bulkhead
from .logtext import quoted
from .private import UnsafePath
from .rebinding import RebindingGuard
from .registry import Registry, RegistryError, ServerEntry
from .request_state import RequestStates
from .sessions import Revocations, SessionSigner, load_secrets
from .supervisor import Supervisor
from .upstreams import MessageUpstream
from .upstreams.http import HttpUpstream

if TYPE_CHECKING:
    from .exchange import Exchange

log = logging.getLogger(__name__)

EXTENSION_KEY = "mcp_gateway"
UPKEEP_INTERVAL = 1.0
DRAIN_TIMEOUT = 30.0  # gunicorn's graceful_timeout: what a request may still take after a reload
# Revocation records only need to go some time after their session expires: a scan a minute is plenty.
PRUNE_INTERVAL = 60.0

AnyUpstream = MessageUpstream | HttpUpstream


@dataclass
class Draining:
    """An upstream a reload replaced, closed when the requests holding it end."""

    server_id: str
    upstream: AnyUpstream
    supervisor: Supervisor | None
    deadline: float


class Gateway:
    def __init__(self, registry: Registry):
        self.registry = registry
        self.revocations = Revocations(rundir.revoked_dir())
        self.auth, self.rebinding, self.signer, self.states = _guards(registry, self.revocations)
        self._pruned_at = time.monotonic()
        # http templates: gunicorn's master runs their processes and publishes where they
        # listen; without it, this gateway process runs its own supervisor per template.
        self._master_runs_templates = supervisor.ENDPOINTS_ENV in os.environ
        self._published = supervisor.inherited_endpoints()
        self._supervisors: dict[str, Supervisor] = {}
        self._started_in: int | None = None
        self.upstreams: dict[str, AnyUpstream] = {
            sid: self._build(entry, registry.gateway.health_check_interval) for sid, entry in registry.servers.items()
        }
        self._app: Flask | None = None
        self._lock = threading.Lock()
        # Each upstream's share of this worker's threads; it also counts the requests holding it.
        self._bulkheads = {upstream: _bulkhead(registry.servers[sid]) for sid, upstream in self.upstreams.items()}
        self._draining: list[Draining] = []
        self._started_at = time.time()
        self._loaded_at = time.time()
        self._stopping = threading.Event()
        self._upkeep: threading.Thread | None = None
        # The registry file as upkeep last saw it, and as it last acted on it.
        self._seen_file: tuple[int, int, int] | None = None
        self._handled_file: tuple[int, int, int] | None = None

    def init_app(self, app: Flask) -> None:
        self._app = app
        app.extensions[EXTENSION_KEY] = self
        _configure(app, self.registry)
        app.before_request(self.start)

    def _build(self, entry: ServerEntry, check_interval: float) -> AnyUpstream:
        if entry.launch is not None:
            endpoints = self._published.get(entry.id)
            if endpoints is None:
                own = self._supervisors[entry.id] = Supervisor([entry])
                endpoints = own.endpoints()[entry.id]
                if self._started_in == os.getpid():
                    own.start()  # added by a reload: the worker is running already
            entry = supervisor.as_http(entry, endpoints)
        return upstreams.build(entry, check_interval)

    # --- requests hold upstreams ----------------------------------------------------

    def checkout(self, server_id: str, exchange: Exchange) -> AnyUpstream:
        """The upstream serving `server_id`, held by `exchange` until its response closes."""
        upstream = self.upstreams.get(server_id)
        if upstream is None:
            raise errors.UnknownServer(f"no MCP server {quoted(server_id)} in this gateway's registry")
        exchange.served = True
        bulkhead = self._bulkheads[upstream]
        bulkhead.acquire()  # errors.Overloaded when the server has all the threads it may have
        exchange.release = bulkhead.release
        return upstream

    def _holding(self, upstream: AnyUpstream) -> int:
        """Requests that hold `upstream` now."""
        bulkhead = self._bulkheads.get(upstream)
        return bulkhead.active if bulkhead is not None else 0

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start upkeep in this process; cheap and idempotent (called per request)."""
        if self._started_in == os.getpid():
            return
        with self._lock:
            if self._started_in == os.getpid():
                return
            self._started_in = os.getpid()
            self._stopping.clear()
            for own in self._supervisors.values():
                own.start()
            self._upkeep = threading.Thread(target=self._run_upkeep, name="mcp-gateway-upkeep", daemon=True)
            self._upkeep.start()
            atexit.register(self.close)
        log.info("gateway started in pid %s with %d servers from %s", os.getpid(), len(self.upstreams), self.registry.source)

    def _run_upkeep(self) -> None:
        while not self._stopping.is_set():
            for upstream in list(self.upstreams.values()):
                if self._stopping.is_set():
                    return
                self._guarded(upstream.maintain, f"upkeep of server {upstream.server_id}")
            self._guarded(self._finish_draining, "draining replaced servers")
            if time.monotonic() - self._pruned_at >= PRUNE_INTERVAL:
                self._pruned_at = time.monotonic()
                self._guarded(lambda: self.revocations.prune(time.time()), "forgetting expired session revocations")
            if self.registry.gateway.reload_registry:
                self._guarded(self._look_at_registry, "reading the registry")
            self._guarded(lambda: rundir.publish_status(self.worker_status()), "publishing status")
            self._stopping.wait(UPKEEP_INTERVAL)

    @staticmethod
    def _guarded(step: Any, what: str) -> None:
        try:
            step()
        except Exception:  # upkeep must survive anything one server or file does
            log.exception("%s failed", what)

    def close(self) -> None:
        """Stop upkeep and every child process this worker started."""
        self._stopping.set()
        if self._upkeep is not None and self._upkeep is not threading.current_thread():
            self._upkeep.join(timeout=30)
        for upstream in self.upstreams.values():
            upstream.close()
        for item in self._draining:
            item.upstream.close()
            if item.supervisor is not None:
                item.supervisor.stop()
        for own in self._supervisors.values():
            own.stop()

    # --- reloading the registry ------------------------------------------------------

    def _look_at_registry(self) -> None:
        source = self.registry.source
        try:
            stat = os.stat(source)
            seen: tuple[int, int, int] | None = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            seen = None
        if seen != self._seen_file:
            self._seen_file = seen  # act once it has stayed the same for a tick: not mid-write
            return
        if seen == self._handled_file:
            return
        self._handled_file = seen
        try:
            text = registry_module.read(source)
            new = registry_module.parse(text, source)
        except RegistryError as error:
            self._refuse(source, error)
            return
        if new.digest != self.registry.digest:
            try:
                self.reload(new, text)
            except UnsafePath as error:
                self._refuse(source, RegistryError(source, [str(error)]))

    def _refuse(self, source: str, error: RegistryError) -> None:
        metrics.RELOADS.labels("rejected").inc()
        # Every worker sees the bad file; the first one to claim it says so.
        stamp = "-".join(map(str, self._seen_file)) if self._seen_file else "unreadable"
        if rundir.claim(f"refused-{stamp}"):
            log.error("registry %s changed but is invalid, still serving the version loaded %s: %s", source,
                      _iso(self._loaded_at), error.one_line())

    def reload(self, new: Registry, text: str) -> None:
        """Serve `new`: keep unchanged servers as they are, drain replaced ones.

        UnsafePath, before anything changed, if its session secret cannot be trusted.
        """
        guards = _guards(new, self.revocations)
        old = self.registry
        changed = {sid for sid, entry in new.servers.items() if old.servers.get(sid) != entry}
        removed = set(old.servers) - set(new.servers)
        templates = {sid for sid in changed | removed
                     if any(e is not None and e.launch is not None for e in (old.servers.get(sid), new.servers.get(sid)))}
        if templates and self._master_runs_templates:
            if rundir.claim(f"hup-{new.digest}"):
                log.warning("registry %s changes http templates %s: asking gunicorn for a graceful reload (HUP)",
                            new.source, ", ".join(sorted(templates)))
                os.kill(os.getppid(), signal.SIGHUP)
            return
        deadline = time.monotonic() + DRAIN_TIMEOUT
        draining = [Draining(sid, self.upstreams[sid], self._supervisors.pop(sid, None), deadline)
                    for sid in sorted((changed & set(old.servers)) | removed)]
        interval = new.gateway.health_check_interval
        fresh = {sid: self._build(entry, interval) if sid in changed else self.upstreams[sid]
                 for sid, entry in new.servers.items()}
        for upstream in fresh.values():
            if isinstance(upstream, HttpUpstream):
                upstream.check_interval = interval
                upstream.relearn()  # a reload is when an operator expects servers to be asked again
        bulkheads = {upstream: self._bulkheads.get(upstream) or _bulkhead(new.servers[sid]) for sid, upstream in fresh.items()}
        with self._lock:
            self.registry, self.upstreams = new, fresh
            # A drained upstream keeps its bulkhead until it is closed: its requests still give their slot back.
            self._bulkheads = {**{item.upstream: self._bulkheads[item.upstream] for item in self._draining + draining},
                               **bulkheads}
            self.auth, self.rebinding, self.signer, self.states = guards
            self._draining.extend(draining)
            self._loaded_at = time.time()
        if self._app is not None:
            _configure(self._app, new)
        rundir.save_registry(new.source, text)  # workers started from now on serve this one
        metrics.RELOADS.labels("applied").inc()
        added = sorted(changed - set(old.servers))
        log.info("registry %s reloaded (%s): added %s, changed %s, removed %s, %d unchanged", new.source, new.digest,
                 added or "none", sorted(changed - set(added)) or "none", sorted(removed) or "none",
                 len(new.servers) - len(changed))
        if (old.gateway.host, old.gateway.port) != (new.gateway.host, new.gateway.port):
            log.warning("gateway.host/port changed in %s: the listening address moves on HUP or restart", new.source)

    def _finish_draining(self) -> None:
        now = time.monotonic()
        for item in list(self._draining):
            holding = self._holding(item.upstream)
            if holding and now < item.deadline:
                continue
            if holding:
                log.warning("server %s: %d requests still hold the replaced upstream after %.0fs; closing it",
                            item.server_id, holding, DRAIN_TIMEOUT)
            self._draining.remove(item)
            with self._lock:
                self._bulkheads.pop(item.upstream, None)
            item.upstream.close()
            if item.supervisor is not None:
                item.supervisor.stop()
            log.info("server %s: the replaced upstream is drained and closed", item.server_id)

    # --- reporting ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            registry, current, bulkheads = self.registry, self.upstreams, self._bulkheads
        return {
            sid: {"description": entry.description, **({"template": entry.template} if entry.template else {}),
                  **current[sid].status(), "requests": bulkheads[current[sid]].status()}
            for sid, entry in registry.servers.items()
        }

    def worker_status(self) -> dict[str, Any]:
        """This worker's view, as status.combine expects it."""
        draining = [{"server": item.server_id, "in_flight": self._holding(item.upstream)} for item in list(self._draining)]
        return {
            "pid": os.getpid(),
            "started": _iso(self._started_at),
            "registry": {"source": self.registry.source, "digest": self.registry.digest, "loaded": _iso(self._loaded_at)},
            "draining": draining,
            "servers": self.status(),
        }


def _guards(registry: Registry,
            revocations: Revocations) -> tuple[Authenticator, RebindingGuard, SessionSigner, RequestStates]:
    """Who may call, from which Host and Origin, and the sealers of session ids and requestStates, as `registry` says."""
    settings = registry.gateway
    # The address gunicorn binds (conf/gunicorn.conf.py: MCP_GATEWAY_BIND, else the registry's).
    bound = os.environ.get("MCP_GATEWAY_BIND", "").rpartition(":")[0]
    rebinding = RebindingGuard(settings.allowed_hosts, settings.allowed_origins, (settings.host, bound))
    keys = load_secrets(settings.session_secret)
    signer = SessionSigner(keys, settings.session_ttl, revocations=revocations)
    return Authenticator(registry.gateway.auth, registry.servers), rebinding, signer, RequestStates(keys, settings.session_ttl)


def _bulkhead(entry: ServerEntry) -> Bulkhead:
    return Bulkhead(entry.id, entry.max_concurrent, entry.max_queued, entry.queue_timeout)


def _configure(app: Flask, registry: Registry) -> None:
    """The app-wide settings of `registry`: body limit and access line (at start and on reload)."""
    app.config["MAX_CONTENT_LENGTH"] = registry.gateway.max_body_bytes
    accesslog.configure(app, registry.gateway.log_format, registry.gateway.trusted_proxies)


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def current_gateway() -> Gateway:
    gateway: Gateway = current_app.extensions[EXTENSION_KEY]
    return gateway
