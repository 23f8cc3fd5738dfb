"""A request's cancellation: set from any thread, seen by the thread that serves the request.

A WebSocket client's `notifications/cancelled`, or its connection gone, is
noticed by the worker's loop while a serving thread waits on the upstream.
`Cancellation.cancel` wakes that thread: a stdio process's read waits on
`fileno()` beside the process's stdout, an HTTP upstream's read is cut by
the callbacks registered with `on_cancel` (its socket shut down). The
waiting side then raises `errors.Cancelled`, and the upstream winds the
request down as a client that left would (the process is sent
`notifications/cancelled`; the connection is closed).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from . import errors


class Cancellation:
    """Set once; an eventfd (made on first use) becomes readable when it is."""

    __slots__ = ("_lock", "_fd", "_callbacks", "reason")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._callbacks: list[Callable[[], None]] = []
        self.reason: str | None = None  # set when cancelled

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            fd, callbacks, self._callbacks = self._fd, self._callbacks, []
            if fd is not None:
                os.eventfd_write(fd, 1)
        for callback in callbacks:
            callback()

    def fileno(self) -> int:
        """A descriptor that is readable once the request is cancelled (closed by `close`)."""
        with self._lock:
            if self._fd is None:
                self._fd = os.eventfd(1 if self.reason is not None else 0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            return self._fd

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run `callback` when the request is cancelled (at once if it is); returns what unregisters it."""
        with self._lock:
            if self.reason is None:
                self._callbacks.append(callback)
                return lambda: self._forget(callback)
        callback()
        return lambda: None

    def _forget(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def check(self, server_id: str) -> None:
        """errors.Cancelled if the request was cancelled."""
        if self.reason is not None:
            raise errors.Cancelled(f"server '{server_id}': the request was cancelled ({self.reason})")

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
