"""Bulkheads: how many of a worker's threads one MCP server's requests may hold.

A gunicorn worker has a fixed number of threads, and a request holds one
for as long as its server takes to answer. Without a bound, a server that
answers in seconds takes every thread and the fast servers next to it get
none (Envoy's max_requests, Hystrix's thread-pool isolation). So each
server has a `Bulkhead` per worker: at most `max_concurrent` of its
requests are served at once (default: half the worker's threads); past
that a request waits in the server's own queue, at most `max_queued` of
them for at most `queue_timeout`, and is refused with `errors.Overloaded`
(503, Retry-After) when the queue is full, when its wait runs out, or when
a request for another server is waiting for a thread meanwhile: a queued
request holds a thread too, and gives it up rather than keep another
server's request from one (the worker knows each waiting request's server
from its path, read before a thread is given).

Taking and giving back a slot is one lock acquire each; only a request that
has to queue does more. A bulkhead also counts the requests that hold its
server's upstream, which is what a reload waits for before it closes a
replaced one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from . import errors
from .logtext import quoted
from .settings import COMMON

# The worker's thread count (gunicorn's `threads`), set by gateway/worker.py before the app is made.
# Unset (another server, or the Flask test client), there is no fixed pool of threads to share
# out, and only the limits the registry gives apply.
_worker_threads: int | None = None
UNBOUNDED = 2**31
# How often a queued request looks whether another request is waiting for a thread.
YIELD_CHECK = 0.05
RETRY_AFTER = 1.0


def set_worker_threads(threads: int) -> None:
    global _worker_threads
    _worker_threads = max(1, threads)


def default_limits() -> tuple[int, int]:
    """(max_concurrent, max_queued) when the registry gives none: half the threads, and the rest."""
    if _worker_threads is None:
        return UNBOUNDED, 0
    concurrent = max(1, _worker_threads // 2)
    return concurrent, max(0, _worker_threads - concurrent)


def no_demand(server_id: str) -> bool:
    return False


# Whether a request for a server other than the one named is waiting for one of this worker's
# threads (the worker sets it; none outside gunicorn). Requests for the same server are not
# helped by a refusal: they would take the freed thread only to queue here in turn.
threads_wanted: Callable[[str], bool] = no_demand


class Bulkhead:
    """One server's share of a worker's threads: `acquire` before serving, `release` after."""

    def __init__(self, server_id: str, max_concurrent: int | None = None, max_queued: int | None = None,
                 queue_timeout: float = COMMON.default("queue_timeout")):
        concurrent, queued = default_limits()
        self.server_id = server_id
        self.max_concurrent = max_concurrent if max_concurrent is not None else concurrent
        self.max_queued = max_queued if max_queued is not None else queued
        self.queue_timeout = queue_timeout
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self.active = 0
        self.queued = 0
        self.refused = 0

    def acquire(self) -> None:
        """A slot, at once or after queueing; errors.Overloaded when there is none to have."""
        with self._lock:
            # Newcomers queue behind waiting requests rather than overtake them.
            if self.active < self.max_concurrent and not self.queued:
                self.active += 1
                return
            # Waiters just woken by a freed slot have not taken it yet: count the slots as theirs.
            if self.active + self.queued >= self.max_concurrent + self.max_queued:
                self.refused += 1
                raise self._overloaded(f"{self.queued} more are waiting, the most it queues (max_queued)")
            self._wait()

    def _wait(self) -> None:
        """Queue for a slot (the lock is held)."""
        self.queued += 1
        deadline = time.monotonic() + self.queue_timeout
        wanted = 0  # checks in a row that saw a request waiting for a thread (one may be a thread just starting)
        try:
            while self.active >= self.max_concurrent:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.refused += 1
                    raise self._overloaded(f"none freed within queue_timeout ({self.queue_timeout:g}s)")
                self._freed.wait(min(left, YIELD_CHECK))
                wanted = wanted + 1 if self.active >= self.max_concurrent and threads_wanted(self.server_id) else 0
                if wanted >= 2:
                    self.refused += 1
                    raise self._overloaded("a request for another server needs the thread this one waits in")
            self.active += 1
        finally:
            self.queued -= 1
            if self.queued and self.active < self.max_concurrent:
                self._freed.notify()  # a slot this waiter did not take goes to the next

    def _overloaded(self, why: str) -> errors.Overloaded:
        return errors.Overloaded(
            f"server {quoted(self.server_id)} is overloaded: {self.active} requests in progress, the most this "
            f"gateway worker serves at once (max_concurrent), and {why}; try again shortly",
            retry_after=RETRY_AFTER)

    def release(self) -> None:
        with self._lock:
            self.active -= 1
            if self.queued:
                self._freed.notify()

    def status(self) -> dict[str, Any]:
        return {"active": self.active, "queued": self.queued, "refused": self.refused,
                "max_concurrent": None if self.max_concurrent >= UNBOUNDED else self.max_concurrent,
                "max_queued": self.max_queued}
