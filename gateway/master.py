"""What the gateway does in gunicorn's master process (hooks of conf/gunicorn.conf.py).

The master validates the registry before any worker starts and keeps the
last version that passed in the runtime directory, so workers, including
ones started later, serve what the master accepted. It also checks, before any
worker boots, that the runtime directory and the session secret can be trusted
(private.py): if not, gunicorn exits at once with the reason rather than
booting workers that would each fail the same way. On HUP (gunicorn's own
reload: config read again, new workers, old ones finish their requests) a
registry that fails validation is refused in one log line and the running
one goes on. The master also runs http templates' processes, once per
gateway: on HUP, templates whose entry did not change keep theirs, and the
processes of changed or removed ones stop once the old workers are gone.
State that must outlive a re-read of the config file lives on gunicorn's
arbiter object.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn

from . import configure_logging, rundir, sessions, supervisor
from . import registry as registry_module
from . import worker as gateway_worker
from .errors import RegistryError, UnsafePath
from .registry import GatewaySettings, Registry, ServerEntry

log = logging.getLogger(__name__)

MASTER_ENV = "MCP_GATEWAY_MASTER_PID"


def load_settings() -> GatewaySettings:
    """Read the registry as the config file is read: at start (invalid: exit 1) and on HUP.

    Called before anything imports prometheus_client, so that the runtime
    directory (and its metrics folder) is named first.
    """
    configure_logging()
    first = os.environ.get(MASTER_ENV) != str(os.getpid())
    if first:
        try:
            rundir.prepare()
        except UnsafePath as error:
            _not_starting(str(error))
        os.environ[MASTER_ENV] = str(os.getpid())
    source = str(registry_module.registry_path())
    try:
        text = registry_module.read(source)
        registry = registry_module.parse(text, source)
        # Made (if need be) and checked here, once, before the workers read it.
        sessions.load_secrets(registry.gateway.session_secret)
    except (RegistryError, UnsafePath) as error:
        saved = None if first else rundir.saved_registry(source)
        if saved is None:  # nothing to fall back on: stop before any worker starts, with the reason
            if isinstance(error, UnsafePath):
                _not_starting(str(error))
            sys.stderr.write(f"mcp-gateway: invalid registry, not starting:\n{error}\n")
            sys.exit(1)
        problem = error.one_line() if isinstance(error, RegistryError) else str(error)
        log.error("registry %s not reloaded, the running one stays: %s", source, problem)
        return registry_module.parse(saved, source).gateway
    rundir.save_registry(source, text)
    return registry.gateway


def _not_starting(reason: str) -> NoReturn:
    sys.stderr.write(f"mcp-gateway: not starting: {reason}\n")
    sys.exit(1)


@dataclass
class Templates:
    """The master's supervisors of http templates, one per server, kept across HUPs."""

    running: dict[str, tuple[ServerEntry, supervisor.Supervisor]] = field(default_factory=dict)
    # Supervisors replaced by a HUP, each stopped when the workers that used them are gone.
    retiring: list[tuple[set[int], supervisor.Supervisor]] = field(default_factory=list)

    def reconcile(self, registry: Registry) -> list[supervisor.Supervisor]:
        """Run what `registry` asks for; return the supervisors it no longer wants."""
        wanted = {sid: entry for sid, entry in registry.servers.items() if entry.launch is not None}
        retired = [self.running.pop(sid)[1] for sid, (entry, _) in list(self.running.items()) if wanted.get(sid) != entry]
        for sid, entry in wanted.items():
            if sid not in self.running:
                started = supervisor.Supervisor([entry])
                started.start()
                self.running[sid] = (entry, started)
        supervisor.export({sid: sup.endpoints()[sid] for sid, (_, sup) in self.running.items()})
        return retired

    def worker_gone(self, pid: int) -> None:
        for waiting_for, retired in list(self.retiring):
            waiting_for.discard(pid)
            if not waiting_for:
                self.retiring.remove((waiting_for, retired))
                retired.stop()

    def stop(self) -> None:
        for _, retired in self.retiring:
            retired.stop()
        for _, running in self.running.values():
            running.stop()
        self.retiring.clear()
        self.running.clear()


def _templates(server: Any) -> Templates:
    if not hasattr(server, "mcp_templates"):
        server.mcp_templates = Templates()
    templates: Templates = server.mcp_templates
    return templates


def on_starting(server: Any) -> None:
    _templates(server).reconcile(rundir.serving_registry())


def on_reload(server: Any) -> None:
    """HUP: run the registry now in force (the new one, or the old if the new failed) before new workers fork."""
    templates = _templates(server)
    old_workers = set(server.WORKERS)
    for retired in templates.reconcile(rundir.serving_registry()):
        if old_workers:
            templates.retiring.append((set(old_workers), retired))
        else:
            retired.stop()


def child_exit(server: Any, worker: Any) -> None:
    gateway_worker.release(worker)
    rundir.forget_worker(worker.pid)
    _templates(server).worker_gone(worker.pid)


def on_exit(server: Any) -> None:
    _templates(server).stop()
    rundir.remove()
