"""The per-worker pool of stdio processes for one server.

Modelled on urllib3's connection pool: idle processes wait in a LIFO (the
warmest is reused first, the coldest ages out), checkout has a bounded wait,
a dead process found at checkout is discarded, and a process that failed is
closed instead of returned. On top: the pool grows from `pool_min` to
`pool_size` under load, shrinks back after `idle_timeout`, bounds how many
requests may wait, and backs off exponentially when processes fail to start.
Time comes from an injected clock so the policies can be tested exactly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from . import errors, metrics
from .backoff import Backoff
from .protocol import ServerHello
from .registry import StdioSettings

log = logging.getLogger(__name__)


class Process(Protocol):
    pid: int
    hello: ServerHello | None

    def alive(self) -> bool: ...
    def close(self, grace: float = ...) -> None: ...


P = TypeVar("P", bound=Process)


class StdioPool(Generic[P]):
    def __init__(
        self,
        server_id: str,
        settings: StdioSettings,
        spawn: Callable[[], P],
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
        close_grace: float = 2.0,
    ):
        self.server_id = server_id
        self.settings = settings
        self._spawn = spawn
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._close_grace = close_grace
        self._cond = threading.Condition(threading.Lock())
        self._idle: deque[tuple[P, float]] = deque()  # (process, idle since); right end is warmest
        self._busy: set[P] = set()
        self._spawning = 0
        self._waiting = 0
        self._closed = False
        self.hello: ServerHello | None = None
        self.restarts = 0
        self.spawn_failures = 0  # consecutive
        self.spawned = 0
        self.last_error: tuple[str, float] | None = None  # message, wall-clock time
        self._next_spawn_at = 0.0

    # --- checkout / checkin ----------------------------------------------------

    def acquire(self) -> P:
        """An idle (or new) process, or Overloaded / SpawnFailed; never a hang."""
        # Waiting is real time; the injected clock drives the policies (back-off, idling).
        deadline = time.monotonic() + self.settings.wait_timeout
        with self._cond:
            while True:
                if self._closed:
                    raise errors.Overloaded(f"server '{self.server_id}' is shutting down", retry_after=1)
                while self._idle:
                    process, _ = self._idle.pop()
                    if process.alive():
                        self._busy.add(process)
                        return process
                    self._forget_locked(process, f"process {process.pid} exited while idle")
                now = self._clock()
                if self._total_locked() < self.settings.pool_size and now >= self._next_spawn_at:
                    self._spawning += 1
                    break
                if self._total_locked() == 0:
                    # Nothing will be returned to wait for: fail fast while backing off.
                    raise errors.SpawnFailed(
                        f"server '{self.server_id}' has no running process: {self._last_error_text()}; "
                        f"next start attempt in {self._next_spawn_at - now:.1f}s",
                        retry_after=max(1.0, self._next_spawn_at - now),
                    )
                if self._waiting >= self.settings.max_waiting:
                    raise errors.Overloaded(
                        f"server '{self.server_id}' is overloaded: all {self._total_locked()} processes are busy "
                        f"and {self._waiting} requests are already waiting",
                        retry_after=1,
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise errors.Overloaded(
                        f"server '{self.server_id}' is overloaded: no process became free within "
                        f"{self.settings.wait_timeout:g}s",
                        retry_after=1,
                    )
                if self._total_locked() < self.settings.pool_size:
                    remaining = min(remaining, max(0.01, self._next_spawn_at - now))
                self._waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1
        process = self._spawn_counted()
        with self._cond:
            self._busy.add(process)
        return process

    def release(self, process: P, *, failure: str | None = None) -> None:
        """Give a process back; one that failed (`failure` says how) is killed."""
        with self._cond:
            self._busy.discard(process)
            keep = failure is None and not self._closed and process.alive()
            if keep:
                self._idle.append((process, self._clock()))
            else:
                self._forget_locked(process, failure)
            self._cond.notify()
        if not keep:
            # A misbehaving process is killed at once; a healthy one after shutdown gently.
            process.close(0 if failure else self._close_grace)

    def _forget_locked(self, process: P, failure: str | None) -> None:
        if failure:
            self.restarts += 1
            metrics.PROCESS_RESTARTS.labels(self.server_id).inc()
            self._record_error_locked(failure)
            log.warning("server %s: replacing process %s: %s", self.server_id, process.pid, failure)

    # --- spawning --------------------------------------------------------------

    def _spawn_counted(self) -> P:
        """Start a process for a slot already counted in `_spawning`."""
        try:
            process = self._spawn()
        except errors.GatewayError as exc:
            with self._cond:
                self._spawning -= 1
                self.spawn_failures += 1
                delay = self._backoff.delay(self.spawn_failures)
                self._next_spawn_at = self._clock() + delay
                self._record_error_locked(exc.message)
                self._cond.notify_all()
            metrics.PROCESS_START_FAILURES.labels(self.server_id).inc()
            log.error("server %s: %s (attempt %d, next in %.1fs)", self.server_id, exc.message, self.spawn_failures, delay)
            raise errors.SpawnFailed(exc.message, retry_after=max(1.0, delay)) from None
        with self._cond:
            self._spawning -= 1
            self.spawned += 1
            self.spawn_failures = 0
            self._next_spawn_at = 0.0
            if self.hello is None:
                self.hello = process.hello
        metrics.PROCESS_STARTS.labels(self.server_id).inc()
        return process

    def _record_error_locked(self, message: str) -> None:
        self.last_error = (message, time.time())

    def _last_error_text(self) -> str:
        return self.last_error[0] if self.last_error else "not started yet"

    def _total_locked(self) -> int:
        return len(self._idle) + len(self._busy) + self._spawning

    # --- upkeep ---------------------------------------------------------------

    def maintain(self) -> None:
        """Retire processes idle too long (down to pool_min); top up to pool_min."""
        retired: list[P] = []
        with self._cond:
            if self._closed:
                return
            now = self._clock()
            for entry in list(self._idle):
                process = entry[0]
                if not process.alive():
                    self._idle.remove(entry)
                    self._forget_locked(process, f"process {process.pid} exited while idle")
            while (
                self._idle
                and self._total_locked() > self.settings.pool_min
                and now - self._idle[0][1] >= self.settings.idle_timeout
            ):
                retired.append(self._idle.popleft()[0])
            wanted = self.settings.pool_min - self._total_locked()
            if wanted > 0 and now >= self._next_spawn_at:
                self._spawning += 1  # one at a time; upkeep runs again soon
            else:
                wanted = 0
        for process in retired:
            log.info("server %s: retiring idle process %s", self.server_id, process.pid)
            process.close(self._close_grace)
        if wanted > 0:
            try:
                process = self._spawn_counted()
            except errors.SpawnFailed:
                return
            with self._cond:
                if self._closed:
                    retired = [process]
                else:
                    self._idle.append((process, self._clock()))
                    self._cond.notify()
                    retired = []
            for process in retired:
                process.close(self._close_grace)

    def close(self) -> None:
        """Stop every process: idle ones gently, busy ones at once.

        Called when the worker exits, after gunicorn's graceful timeout let
        in-flight requests finish; a call still running then is stuck, and its
        process group must not outlive the worker.
        """
        with self._cond:
            self._closed = True
            idle = [process for process, _ in self._idle]
            busy = list(self._busy)
            self._idle.clear()
            self._cond.notify_all()
        for process in idle:
            process.close(self._close_grace)
        for process in busy:
            process.close(0)

    # --- reporting ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._cond:
            now = self._clock()
            processes = [p for p, _ in self._idle] + list(self._busy)
            status: dict[str, Any] = {
                "processes": len(processes),
                "alive": sum(1 for p in processes if p.alive()),
                "busy": len(self._busy),
                "idle": len(self._idle),
                "starting": self._spawning,
                "waiting": self._waiting,
                "pool_size": self.settings.pool_size,
                "pool_min": self.settings.pool_min,
                "pids": sorted(p.pid for p in processes),
                "restarts": self.restarts,
                "spawned": self.spawned,
                "spawn_failures": self.spawn_failures,
                "next_spawn_in": round(max(0.0, self._next_spawn_at - now), 3),
                "last_error": None,
            }
            if self.last_error:
                message, at = self.last_error
                status["last_error"] = {
                    "message": message,
                    "at": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds"),
                }
            if self.hello:
                status["era"] = self.hello.era
                status["protocol_version"] = self.hello.protocol_version
            # Unhealthy means processes cannot be started; a pool still warming up,
            # or one that replaced a crashed process, can serve.
            status["healthy"] = self.spawn_failures == 0
        return status
