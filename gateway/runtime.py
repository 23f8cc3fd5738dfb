"""The gateway's per-worker runtime, attached to the Flask app.

`Gateway` puts together what one worker serves with: the leases of the
upstreams built from the registry (leases.py), the authenticator, the session
signer (and the revocations of ended sessions, which outlive a reload), the
supervisors of http templates when no gunicorn master runs them, and the
upkeep thread (upkeep.py).

A reload (upkeep's, when the registry file changed) carries out the plan of
reload.py: the upstream of every server whose entry did not change goes on
(its pool, connections, health and sessions), added and changed servers get
new ones, and the replaced upstreams drain: requests no longer reach them,
and each is closed, its processes stopped, once the requests that hold it
are done (at the latest after `drain_timeout`: gunicorn's graceful_timeout,
which conf/gunicorn.conf.py hands over at worker init). http templates'
processes belong to gunicorn's master, so a change to one asks it for a
graceful reload (HUP) instead.

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
from collections.abc import Mapping
from typing import Any

from flask import Flask, current_app

from . import accesslog, metrics, owners, rundir, streams, supervisor, upstreams
from .auth import Authenticator
from .leases import AnyUpstream, Draining, Leases
from .log_levels import LogLevels
from .rebinding import RebindingGuard
from .registry import Registry, ServerEntry
from .reload import plan_reload
from .request_state import RequestStates
from .sessions import Revocations, SessionSigner, load_secrets
from .supervisor import Supervisor
from .upkeep import Upkeep, guarded, iso
from .upstreams.http import HttpUpstream

log = logging.getLogger(__name__)

EXTENSION_KEY = "mcp_gateway"
# What a request may still take after a reload replaced its upstream, when no gunicorn worker
# says (gunicorn's own default graceful_timeout); under gunicorn, its graceful_timeout.
DRAIN_TIMEOUT = 30.0


class Gateway:
    def __init__(self, registry: Registry):
        self.revocations = Revocations(rundir.revoked_dir())
        folder = rundir.directory()
        self.log_levels = LogLevels(folder / "levels" if folder is not None else None)
        self.auth, self.rebinding, self.signer, self.states = _guards(registry, self.revocations)
        # What authenticates a request relayed to the worker holding its session (owners.py).
        self.forward_keys = owners.keys(load_secrets(registry.gateway.session_secret))
        self.drain_timeout = DRAIN_TIMEOUT
        # http templates: gunicorn's master runs their processes and publishes where they
        # listen; without it, this gateway process runs its own supervisor per template.
        self._master_runs_templates = supervisor.ENDPOINTS_ENV in os.environ
        self._published = supervisor.inherited_endpoints()
        self._supervisors: dict[str, Supervisor] = {}
        self._started_in: int | None = None
        interval = registry.gateway.health_check_interval
        self.leases = Leases(registry, {sid: self._build(entry, interval) for sid, entry in registry.servers.items()})
        # For the request path, plain attributes rather than properties: every POST reads them. They are
        # the leases' current table's, set again where a reload swaps it; whoever needs the two to agree
        # (status) reads the table.
        self.checkout = self.leases.checkout
        self.registry: Registry = registry
        self.upstreams: Mapping[str, AnyUpstream] = self.leases.table.upstreams
        self._app: Flask | None = None
        self._start_lock = threading.Lock()
        self._started_at = time.time()
        self.loaded_at = time.time()
        self._upkeep = Upkeep(self)

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

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start upkeep in this process; cheap and idempotent (called per request)."""
        if self._started_in == os.getpid():
            return
        with self._start_lock:
            if self._started_in == os.getpid():
                return
            self._started_in = os.getpid()
            for own in self._supervisors.values():
                own.start()
            self._upkeep.start()
            atexit.register(self.close)
        log.info("gateway started in pid %s with %d servers from %s", os.getpid(), len(self.upstreams), self.registry.source)

    def close(self) -> None:
        """Stop upkeep and every child process this worker started."""
        self._upkeep.stop()
        table = self.leases.table
        for upstream in table.upstreams.values():
            upstream.close()
        for item in table.draining:
            item.close()
        for own in self._supervisors.values():
            own.stop()

    @property
    def owner(self) -> str:
        """This process as the owner of the sessions it holds: new in every worker, naming the replica if advertised."""
        return owners.owner_name(self.registry.gateway.advertise_url)

    # --- reloading the registry ------------------------------------------------------

    def reload(self, new: Registry, text: str) -> None:
        """Serve `new`: keep unchanged servers as they are, drain replaced ones.

        UnsafePath, before anything changed, if its session secret cannot be trusted.
        """
        guards = _guards(new, self.revocations)
        table = self.leases.table
        old, current = table.registry, table.upstreams
        plan = plan_reload(old, new)
        if plan.templates and self._master_runs_templates:
            if rundir.claim(f"hup-{new.digest}"):
                log.warning("registry %s changes http templates %s: asking gunicorn for a graceful reload (HUP)",
                            new.source, ", ".join(sorted(plan.templates)))
                os.kill(os.getppid(), signal.SIGHUP)
            return
        deadline = time.monotonic() + self.drain_timeout
        draining = [Draining(sid, current[sid], deadline, self._supervisors.pop(sid, None)) for sid in plan.draining]
        interval = new.gateway.health_check_interval
        fresh = {sid: self._build(entry, interval) if sid in plan.rebuilt else current[sid]
                 for sid, entry in new.servers.items()}
        for upstream in fresh.values():
            if isinstance(upstream, HttpUpstream):
                upstream.check_interval = interval
                upstream.relearn()  # a reload is when an operator expects servers to be asked again
        self.leases.swap(new, fresh, draining)
        self.registry, self.upstreams = new, self.leases.table.upstreams
        self.auth, self.rebinding, self.signer, self.states = guards
        self.forward_keys = owners.keys(load_secrets(new.gateway.session_secret))
        self.loaded_at = time.time()
        if self._app is not None:
            _configure(self._app, new)
        rundir.save_registry(new.source, text)  # workers started from now on serve this one
        metrics.RELOADS.labels("applied").inc()
        log.info("registry %s reloaded (%s): added %s, changed %s, removed %s, %d unchanged", new.source, new.digest,
                 sorted(plan.added) or "none", sorted(plan.changed) or "none", sorted(plan.removed) or "none",
                 len(plan.unchanged))
        if plan.moves_listener:
            log.warning("gateway.host/port changed in %s: the listening address moves on HUP or restart", new.source)

    def finish_draining(self) -> None:
        """Close the replaced upstreams no request holds any more, or that ran out of time."""
        for item, holding in self.leases.drained(time.monotonic()):
            if holding:
                log.warning("server %s: %d requests still hold the replaced upstream after %.0fs; closing it",
                            item.server_id, holding, self.drain_timeout)
            guarded(item.close, f"closing the replaced upstream of server {item.server_id}")
            log.info("server %s: the replaced upstream is drained and closed", item.server_id)

    # --- reporting ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        table = self.leases.table
        return {
            sid: {"description": entry.description, **({"template": entry.template} if entry.template else {}),
                  **table.upstreams[sid].status(), "requests": table.routes[sid][1].status()}
            for sid, entry in table.registry.servers.items()
        }

    def worker_status(self) -> dict[str, Any]:
        """This worker's view, as status.combine expects it."""
        table = self.leases.table
        return {
            "pid": os.getpid(),
            "owner": self.owner,
            "started": iso(self._started_at),
            "registry": {"source": table.registry.source, "digest": table.registry.digest, "loaded": iso(self.loaded_at)},
            "draining": [{"server": item.server_id, "in_flight": self.leases.holding(item.upstream)}
                         for item in table.draining],
            "servers": self.status(),
            "streams": streams.CLAIMS.count,  # pass-through streams and WebSockets open in this worker (streams.py)
            "websockets": streams.WEBSOCKETS.count,  # of which WebSocket connections (ws_serving.py)
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


def _configure(app: Flask, registry: Registry) -> None:
    """The app-wide settings of `registry`: body limit and access line (at start and on reload)."""
    app.config["MAX_CONTENT_LENGTH"] = registry.gateway.max_body_bytes
    accesslog.configure(app, registry.gateway.log_format, registry.gateway.trusted_proxies)


def current_gateway() -> Gateway:
    gateway: Gateway = current_app.extensions[EXTENSION_KEY]
    return gateway
