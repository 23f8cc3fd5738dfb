"""The runtime directory one gateway's processes share.

gunicorn's workers are separate processes, yet /metrics and /status must
answer for the whole gateway, and a worker started late must serve the same
registry as its siblings. So the master names one directory
(MCP_GATEWAY_RUNTIME_DIR; the systemd unit puts it under /run) and every
process of the gateway leaves there what the others need:

- `metrics/`: prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR);
- `status/<pid>.json`: each worker's view of its upstreams, rewritten every second;
- `registry.json`: the last registry that passed validation, which workers boot from;
- `claims/`: one-shot markers, so that one worker, not all of them, does a thing;
- `owners/<pid>.<nonce>.sock`: each worker's Unix socket, on which requests of the sessions
  it holds are relayed to it by its siblings (owners.py);
- `revoked/`: one empty file per session ended by DELETE (sessions.py), kept until
  the session would have expired, so that no worker of this host takes it again.

A directory the gateway is given is used only if it is ours (private.py): a
symlink, or one another user owns or may write to, stops the start with the reason.

Without the directory (the app outside gunicorn's master, tests) each
process answers for itself and reads its registry file directly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from . import private
from . import registry as registry_module
from .errors import RegistryError
from .registry import Registry

RUNTIME_ENV = "MCP_GATEWAY_RUNTIME_DIR"
OWNED_ENV = "MCP_GATEWAY_RUNTIME_DIR_OWNED"  # set when the gateway made the directory, and removes it
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A status file not rewritten for this long belongs to a worker that is gone or stuck
# (upkeep may wait out a slow process start or health check, so not too short).
STATUS_STALE_AFTER = 60.0


def directory() -> Path | None:
    value = os.environ.get(RUNTIME_ENV)
    return Path(value) if value else None


def prepare() -> Path:
    """In gunicorn's master, before anything imports prometheus_client: name and empty the directory.

    Files left by an earlier run (metrics of dead pids, stale status) are
    removed, as prometheus_client's multiprocess mode requires. Revocation
    records stay: the sessions they end may still be presented. UnsafePath
    if a given directory is not ours.
    """
    path = directory()
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="mcp-gateway-"))  # private by construction (0700, ours)
        os.environ[RUNTIME_ENV] = str(path)
        os.environ[OWNED_ENV] = "1"
    elif not os.environ.get(OWNED_ENV):
        path.parent.mkdir(parents=True, exist_ok=True)
        private.check_dir(path, f"fix it or point {RUNTIME_ENV} elsewhere")
    os.environ.setdefault(METRICS_ENV, str(path / "metrics"))
    for folder in (path / "status", path / "claims", Path(os.environ[METRICS_ENV])):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if stale.is_file():
                stale.unlink(missing_ok=True)
    (path / "revoked").mkdir(mode=0o700, exist_ok=True)
    owners = path / "owners"
    owners.mkdir(mode=0o700, exist_ok=True)
    for stale in owners.iterdir():  # of an earlier run's workers: none of them lives on
        stale.unlink(missing_ok=True)
    return path


def revoked_dir() -> Path | None:
    """Where this gateway's workers record ended sessions (None: each process keeps its own)."""
    path = directory()
    return path / "revoked" if path is not None else None


def remove() -> None:
    """At the master's exit: remove the directory if the gateway made it."""
    path = directory()
    if path is not None and os.environ.get(OWNED_ENV):
        shutil.rmtree(path, ignore_errors=True)


def _write_atomically(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(payload))
    os.replace(temporary, path)


# --- the last good registry ------------------------------------------------------


def save_registry(source: str, text: str) -> None:
    """Record `text` (read from `source`) as the registry workers boot from."""
    path = directory()
    if path is not None:
        _write_atomically(path / "registry.json", {"source": source, "text": text})


def saved_registry(source: str) -> str | None:
    """The last good text of the registry at `source`, if this gateway saved one."""
    path = directory()
    if path is None:
        return None
    try:
        saved = json.loads((path / "registry.json").read_text())
    except (OSError, ValueError):
        return None
    text: str | None = saved.get("text") if saved.get("source") == source else None
    return text


def serving_registry(path: str | None = None) -> Registry:
    """The registry this gateway serves: the last one it accepted (saved here), else the file."""
    source = str(registry_module.registry_path(path))
    saved = saved_registry(source)
    if saved is not None:
        try:
            return registry_module.parse(saved, source)
        except RegistryError:
            pass  # the environment it referred to changed; read the file
    return registry_module.load(source)


# --- one worker, not all of them --------------------------------------------------


def claim(name: str) -> bool:
    """True for the first process of this gateway to claim `name`; always True without a directory."""
    path = directory()
    if path is None:
        return True
    try:
        os.close(os.open(path / "claims" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True  # no shared directory to agree in: act alone
    return True


# --- every worker's status ---------------------------------------------------------


def publish_status(payload: dict[str, Any]) -> None:
    path = directory()
    if path is not None:
        _write_atomically(path / "status" / f"{os.getpid()}.json", {**payload, "updated": time.time()})


def sibling_statuses() -> list[dict[str, Any]]:
    """The published status of every other live worker of this gateway."""
    path = directory()
    if path is None:
        return []
    found = []
    for file in sorted((path / "status").glob("*.json")):
        pid = int(file.stem)
        if pid == os.getpid():
            continue
        try:
            payload: dict[str, Any] = json.loads(file.read_text())
        except (OSError, ValueError):
            continue  # gone or being replaced right now
        if time.time() - payload.get("updated", 0) <= STATUS_STALE_AFTER and alive(pid):
            found.append(payload)
    return found


def forget_worker(pid: int) -> None:
    """In the master, when a worker exited: drop its status and its live gauges."""
    path = directory()
    if path is None:
        return
    (path / "status" / f"{pid}.json").unlink(missing_ok=True)
    for socket in (path / "owners").glob(f"{pid}.*.sock"):  # a worker killed could not remove its own
        socket.unlink(missing_ok=True)
    if os.environ.get(METRICS_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def alive(pid: int) -> bool:
    """Whether a process of this pid exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
