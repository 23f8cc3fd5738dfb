"""The log level a handshake-era session set with `logging/setLevel`, kept for the session's later requests.

A pooled stdio process, or an http server the gateway bridges, is shared by
unrelated clients, so the gateway answers `logging/setLevel` itself instead of
changing the level of a process for every client of it (serving.py), and keeps
the level here, by the session's revocation id, until the session would have
expired. A later request of the session then carries it: as the 2026-07-28
`_meta` log level to a process of that era, or as the gateway's own filter of
what a handshake-era process logs (scope.py).

Session ids are sealed and minted at initialize, so the level cannot live in
the id. Like the revocations (sessions.py), it lives in a folder of the runtime
directory that every worker of the host shares (`levels/`, one file per
session holding the level, its mtime the expiry), or in this process without
one. A WebSocket connection is its own session and keeps its level itself
(websocket.WebSocketSession). Across replicas the level is per host: a
session balanced to another replica has none there until it sets it again.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from . import errors, private
from .scope import LOG_LEVELS


def requested(message: dict[str, Any]) -> str:
    """The level a `logging/setLevel` request names; InvalidParams (-32602) unless it is one of LOG_LEVELS."""
    params = message.get("params")
    level = params.get("level") if isinstance(params, dict) else None
    if not isinstance(level, str) or level not in LOG_LEVELS:
        raise errors.InvalidParams(f"logging/setLevel: params.level must be one of {', '.join(LOG_LEVELS)}",
                                   rpc_id=message.get("id"))
    return level


class LogLevels:
    """Session log levels by revocation id, until each session would have expired."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._local: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def set(self, revocation_id: str, level: str, expires_at: float) -> None:
        assert level in LOG_LEVELS  # checked by the caller: it names the bad value to the client
        if self.folder is None:
            with self._lock:
                self._local[revocation_id] = (level, expires_at)
            return
        self.folder.mkdir(mode=0o700, exist_ok=True)
        path = self.folder / revocation_id
        # Written whole under a temporary name, then renamed: a reader sees the old level or the new.
        temporary = self.folder / f".{revocation_id}.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, level.encode("ascii"))
        finally:
            os.close(fd)
        os.utime(temporary, (expires_at, expires_at))
        os.replace(temporary, path)

    def get(self, revocation_id: str) -> str | None:
        """The level the session set, or None (it set none, or it is not ours to read)."""
        if self.folder is None:
            with self._lock:
                found = self._local.get(revocation_id)
            return found[0] if found is not None else None
        try:
            fd = os.open(self.folder / revocation_id, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            level = os.read(fd, 16).decode("ascii", "replace")
        finally:
            os.close(fd)
        return level if level in LOG_LEVELS else None

    def prune(self, now: float) -> int:
        """Forget the levels of sessions that have expired; how many went."""
        if self.folder is None:
            with self._lock:
                gone = [rid for rid, (_, until) in self._local.items() if until < now]
                for rid in gone:
                    del self._local[rid]
            return len(gone)
        return private.prune_expired(self.folder, now)
