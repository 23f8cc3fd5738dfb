"""Child processes the gateway starts: spawning, logging their output, stopping them.

Every child gets an argv list (never a shell), a minimal environment plus
its own variables, its own process group (so the group can be killed as
one), and PDEATHSIG (so it dies if the gateway process that started it is
SIGKILLed). The kernel sends PDEATHSIG when the *thread* that forked the child
exits, not the process, so every child is forked by one long-lived thread per
process (the forker); request and upkeep threads that come and go would
otherwise take their children with them, past the staged stop. Its output lines are copied into the log, tagged. Stopping is
staged: close stdin, wait; SIGTERM the group, wait; SIGKILL the group; reap.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import IO, Any, TypeVar

from . import errors

# Variables a child gets from the gateway's environment unless the registry adds more.
ENV_ALLOWLIST = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL", "TERM")
_PR_SET_PDEATHSIG = 1
_libc: Any = None

T = TypeVar("T")


class _Forker:
    """The one thread of this process that forks children, so their death signal follows the process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="mcp-gateway-forker", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            job, future = self._jobs.get()
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, never kills the forker
                future.set_exception(exc)

    def run(self, job: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return job()
        future: Future[T] = Future()
        self._jobs.put((job, future))
        return future.result()


_forker: _Forker | None = None
_forker_lock = threading.Lock()


def _forget_forker() -> None:
    # A forked child (a gunicorn worker) has only the thread that forked: it starts its own forker.
    global _forker, _forker_lock
    _forker, _forker_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_forker)


def _the_forker() -> _Forker:
    global _forker
    forker = _forker
    if forker is None or forker.pid != os.getpid():
        with _forker_lock:
            if _forker is None or _forker.pid != os.getpid():
                _forker = _Forker()
            forker = _forker
    return forker


def environment(own: Mapping[str, str], inherit: Iterable[str] = (), environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The allowlisted part of the gateway's environment, `inherit`ed names, then `own`."""
    env = {name: environ[name] for name in (*ENV_ALLOWLIST, *inherit) if name in environ}
    env.update(own)
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # PDEATHSIG is per direct child; grandchildren are reached by killing the group.
    if _libc:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(
    server_id: str, argv: Iterable[str], *, env: Mapping[str, str], cwd: str | None = None,
    stdin: int | None = None, stdout: int | None = None, stderr: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start a child in its own process group; an OS failure is SpawnFailed."""
    global _libc
    argv = list(argv)
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:  # pragma: no cover - not glibc/Linux
            _libc = False
    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=dict(env), close_fds=True,
            start_new_session=True,
            # Only a prctl() call runs in the child, with no Python lock taken.
            preexec_fn=_die_with_parent if _libc else None,  # noqa: PLW1509
        )

    try:
        return _the_forker().run(start)
    except OSError as exc:
        where = f" in working directory {cwd!r}" if cwd and exc.filename == cwd else ""
        raise errors.SpawnFailed(f"server '{server_id}': cannot start {argv[0]!r}{where}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:  # a NUL in argv or the environment, a non-string part
        raise errors.SpawnFailed(f"server '{server_id}': cannot start {argv[0]!r}: {exc}") from None


def log_lines(stream: IO[bytes], server_id: str, pid: int) -> threading.Thread:
    """Copy a child's output into the log, tagged, on a thread of its own."""
    thread = threading.Thread(target=_drain, args=(stream, server_id, pid), daemon=True, name=f"output-{server_id}-{pid}")
    thread.start()
    return thread


def _drain(stream: IO[bytes], server_id: str, pid: int) -> None:
    child_log = logging.getLogger(f"gateway.stdio.{server_id}")
    try:
        # Bounded reads: one endless line must not grow the gateway's memory.
        for line in iter(lambda: stream.readline(4096), b""):
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                child_log.info("[%s pid %s] %s", server_id, pid, text)
    except (OSError, ValueError):
        pass
    finally:
        stream.close()


def stop(popen: subprocess.Popen[bytes], grace: float) -> None:
    """Close stdin, wait; SIGTERM the group, wait; SIGKILL the group; reap. `grace` 0 kills at once."""
    try:
        if popen.stdin is not None:
            popen.stdin.close()  # EOF: a well-behaved stdio server exits on it
    except OSError:
        pass
    if grace > 0 and popen.stdin is not None and _reaped_within(popen, grace / 2):
        _kill_group(popen.pid, signal.SIGKILL)  # stray grandchildren of a clean exit
    elif grace > 0:
        _kill_group(popen.pid, signal.SIGTERM)
        if not _reaped_within(popen, grace / 2):
            _kill_group(popen.pid, signal.SIGKILL)
    else:
        _kill_group(popen.pid, signal.SIGKILL)
    _reaped_within(popen, 5.0)


def _reaped_within(popen: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        popen.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def kill(popen: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's group, touching none of its pipes (another thread may be reading them)."""
    if popen.returncode is None:
        _kill_group(popen.pid, signal.SIGKILL)


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
