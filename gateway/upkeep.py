"""Upkeep: the thread that looks after one worker's gateway, every second.

It keeps pools at their minimum, retires idle processes and runs HTTP health
checks (each upstream's `maintain`), closes replaced upstreams once drained,
now and then forgets revocations of sessions that have expired anyway,
publishes this worker's status (for the whole-gateway /status and /metrics)
and, with `gateway.reload_registry: true`, watches the registry file: a
change that has settled is read, and a valid file handed to the gateway's
`reload`, an invalid one refused in one log line (one per gateway, not per
worker) while the running registry goes on. No step's failure stops the
others, or the next tick.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from . import metrics, rundir
from . import registry as registry_module
from .errors import RegistryError, UnsafePath
from .log_levels import LogLevels
from .registry import Registry
from .sessions import Revocations
from .upstreams import Upstream

log = logging.getLogger(__name__)

UPKEEP_INTERVAL = 1.0
# Revocation records only need to go some time after their session expires: a scan a minute is plenty.
PRUNE_INTERVAL = 60.0


class Upkept(Protocol):
    """What upkeep looks after (runtime.Gateway)."""

    revocations: Revocations
    log_levels: LogLevels
    loaded_at: float  # time.time() the running registry was loaded

    @property
    def registry(self) -> Registry: ...
    @property
    def upstreams(self) -> Mapping[str, Upstream]: ...
    def finish_draining(self) -> None: ...
    def reload(self, new: Registry, text: str) -> None: ...
    def worker_status(self) -> dict[str, Any]: ...


def guarded(step: Callable[[], object], what: str) -> None:
    try:
        step()
    except Exception:  # upkeep must survive anything one server or file does
        log.exception("%s failed", what)


class Upkeep:
    def __init__(self, gateway: Upkept):
        self._gateway = gateway
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pruned_at = time.monotonic()
        # The registry file as upkeep last saw it, and as it last acted on it.
        self._seen_file: tuple[int, int, int] | None = None
        self._handled_file: tuple[int, int, int] | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="mcp-gateway-upkeep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        gateway = self._gateway
        while not self._stopping.is_set():
            for upstream in list(gateway.upstreams.values()):
                if self._stopping.is_set():
                    return
                guarded(upstream.maintain, f"upkeep of server {upstream.server_id}")
            guarded(gateway.finish_draining, "draining replaced servers")
            if time.monotonic() - self._pruned_at >= PRUNE_INTERVAL:
                self._pruned_at = time.monotonic()
                guarded(lambda: gateway.revocations.prune(time.time()), "forgetting expired session revocations")
                guarded(lambda: gateway.log_levels.prune(time.time()), "forgetting expired session log levels")
            if gateway.registry.gateway.reload_registry:
                guarded(self._look_at_registry, "reading the registry")
            guarded(lambda: rundir.publish_status(gateway.worker_status()), "publishing status")
            self._stopping.wait(UPKEEP_INTERVAL)

    # --- watching the registry file ------------------------------------------------------

    def _look_at_registry(self) -> None:
        running = self._gateway.registry
        source = running.source
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
        if new.digest != running.digest:
            try:
                self._gateway.reload(new, text)
            except UnsafePath as error:
                self._refuse(source, RegistryError(source, [str(error)]))

    def _refuse(self, source: str, error: RegistryError) -> None:
        metrics.RELOADS.labels("rejected").inc()
        # Every worker sees the bad file; the first one to claim it says so.
        stamp = "-".join(map(str, self._seen_file)) if self._seen_file else "unreadable"
        if rundir.claim(f"refused-{stamp}"):
            log.error("registry %s changed but is invalid, still serving the version loaded %s: %s", source,
                      iso(self._gateway.loaded_at), error.one_line())


def iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
