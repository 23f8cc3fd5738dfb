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
    def kill(self) -> None: ...


P = TypeVar("P", bound=Process)

# How long close() waits for busy processes to come back before it kills them by
# signal (their request threads then see EOF, and close them themselves).
CLOSE_WAIT = 2.0


def in_a_thread(job: Callable[[], None]) -> None:
    """Run a spawn job in the background: a waiting request must not be tied to it."""
    threading.Thread(target=job, name="mcp-gateway-spawn", daemon=True).start()


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
        start: Callable[[Callable[[], None]], None] = in_a_thread,
    ):
        self.server_id = server_id
        self.settings = settings
        self._spawn = spawn
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._close_grace = close_grace
        self._start = start
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
        with self._cond:  # the hot path: a lock and a deque pop
            while self._idle and not self._closed:
                process, _ = self._idle.pop()
                if process.alive():
                    self._busy.add(process)
                    return process
                self._forget_locked(process, f"process {process.pid} exited while idle")
        return self._wait_for_one()

    def _wait_for_one(self) -> P:
        """No process is idle: start one in the background if there is room, and take
        whichever process becomes idle first, that one or one another request returns
        (the waiters share one condition, as urllib3's and HikariCP's do)."""
        # Waiting is real time; the injected clock drives the policies (back-off, idling).
        deadline = time.monotonic() + self.settings.wait_timeout
        first = True
        with self._cond:
            self._waiting += 1
            try:
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
                    if self._may_spawn_locked(now) and self._spawning < self._waiting:
                        # One spawn per waiting request at most, never past pool_size.
                        self._spawning += 1
                        self._cond.release()
                        try:
                            self._launch()
                        finally:
                            self._cond.acquire()
                        continue
                    if self._total_locked() == 0:
                        # Nothing will be returned to wait for: fail fast while backing off.
                        raise errors.SpawnFailed(
                            f"server '{self.server_id}' has no running process: {self._last_error_text()}; "
                            f"next start attempt in {self._next_spawn_at - now:.1f}s",
                            retry_after=max(1.0, self._next_spawn_at - now),
                        )
                    # Requests not covered by a spawn under way queue for a busy process.
                    queued = self._waiting - 1 - self._spawning
                    if first and queued >= self.settings.max_waiting:
                        raise errors.Overloaded(
                            f"server '{self.server_id}' is overloaded: all {self._total_locked()} processes are busy "
                            f"and {max(0, queued)} requests are already waiting",
                            retry_after=1,
                        )
                    first = False
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise errors.Overloaded(
                            f"server '{self.server_id}' is overloaded: no process became free within "
                            f"{self.settings.wait_timeout:g}s",
                            retry_after=1,
                        )
                    if self._total_locked() < self.settings.pool_size:
                        remaining = min(remaining, max(0.01, self._next_spawn_at - now))
                    self._cond.wait(remaining)
            finally:
                self._waiting -= 1

    def release(self, process: P, *, failure: str | None = None) -> None:
        """Give a process back; one that failed (`failure` says how) is killed.

        After close() this is where a busy process is stopped: by the thread
        that used its pipes, so no other thread closes fds this one still reads.
        """
        with self._cond:
            self._busy.discard(process)
            keep = failure is None and not self._closed and process.alive()
            if keep:
                self._idle.append((process, self._clock()))
            else:
                self._forget_locked(process, failure)
            # close() may be waiting for the busy set to empty: wake it too.
            self._cond.notify_all() if self._closed else self._cond.notify()
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

    def _may_spawn_locked(self, now: float) -> bool:
        return not self._closed and self._total_locked() < self.settings.pool_size and now >= self._next_spawn_at

    def _launch(self) -> None:
        """Start the spawn of a slot already counted in `_spawning` (outside the lock)."""
        try:
            self._start(self._spawn_into_pool)
        except Exception as exc:  # noqa: BLE001 - no thread could be started: the slot must come back
            self._spawn_failed(exc)

    def _spawn_into_pool(self) -> None:
        """Start a process for a slot counted in `_spawning`, and make it idle.

        Any exception is a failed start (a NUL in argv, a malformed handshake
        answer, ...): counted, backed off, the slot given back.
        """
        try:
            process = self._spawn()
        except Exception as exc:  # noqa: BLE001 - whatever failed, the slot must come back
            self._spawn_failed(exc)
            return
        metrics.PROCESS_STARTS.labels(self.server_id).inc()
        with self._cond:
            self.spawned += 1
            self.spawn_failures = 0
            self._next_spawn_at = 0.0
            if self.hello is None:
                self.hello = process.hello
            if not self._closed:
                self._spawning -= 1
                self._idle.append((process, self._clock()))
                self._cond.notify()
                return
        # Started after close(): stopped here, and only then no longer counted
        # (close() waits for the count, so the child is gone when close() returns).
        process.close(self._close_grace)
        with self._cond:
            self._spawning -= 1
            self._cond.notify_all()

    def _spawn_failed(self, exc: Exception) -> None:
        message = exc.message if isinstance(exc, errors.GatewayError) else (
            f"server '{self.server_id}': start-up failed: {type(exc).__name__}: {exc}")
        with self._cond:
            self._spawning -= 1
            self.spawn_failures += 1
            delay = self._backoff.delay(self.spawn_failures)
            self._next_spawn_at = self._clock() + delay
            self._record_error_locked(message)
            self._cond.notify_all()  # waiters decide again: nothing may be coming now
        metrics.PROCESS_START_FAILURES.labels(self.server_id).inc()
        log.error("server %s: %s (attempt %d, next in %.1fs)", self.server_id, message, self.spawn_failures, delay)

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
            top_up = self._total_locked() < self.settings.pool_min and self._may_spawn_locked(now)
            if top_up:
                self._spawning += 1  # one at a time; upkeep runs again soon
        for process in retired:
            log.info("server %s: retiring idle process %s", self.server_id, process.pid)
            process.close(self._close_grace)
        if top_up:
            self._launch()

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """Stop every process: idle ones now, busy ones when their request returns them.

        Called when the worker exits, after gunicorn's graceful timeout let
        in-flight requests finish, and when a reload's drain times out. A busy
        process's pipes belong to its request thread: closing them here could
        let a reused fd number receive another request's bytes. So close() waits
        up to `wait` seconds for busy processes to come back (release() closes
        them), then kills the stragglers by signal only: their threads read EOF,
        fail, and close them; the process group does not outlive the worker.
        """
        with self._cond:
            self._closed = True
            idle = [process for process, _ in self._idle]
            self._idle.clear()
            self._cond.notify_all()
        for process in idle:
            process.close(self._close_grace)
        deadline = time.monotonic() + wait
        with self._cond:
            # Spawns under way end too (a new process is closed when it sees the pool closed).
            while (self._busy or self._spawning) and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
            stragglers = list(self._busy)
        for process in stragglers:
            log.warning("server %s: process %s still busy at shutdown; killing it", self.server_id, process.pid)
            process.kill()

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
