"""Processes the bench starts: free loopback ports, start in an own process group, stop by PID.

Every process is started with `start_new_session=True`, so the bench can stop it
and everything below it by the process group id it holds, never by name. Every
process ever seen below a started one is remembered with its start time, so the
end of the run can say whether any is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..harness import (
    free_port as free_port,  # one way to pick a port, for the tests and the bench
)

# (pid, start time) of everything the bench started or saw below what it started.
_seen: set[tuple[int, str]] = set()
_started: list[Child] = []


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1]), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None


def descendants(pid: int) -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child in children.get(parent, []):
            found[child] = parent
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def rss_kb(pid: int) -> int:
    """Resident set size from /proc/<pid>/status (0 if the process is gone)."""
    return _proc_kb(pid, "status", "VmRSS:")


def pss_kb(pid: int) -> int:
    """Proportional set size (shared pages split between sharers), from smaps_rollup."""
    return _proc_kb(pid, "smaps_rollup", "Pss:")


def _proc_kb(pid: int, name: str, key: str) -> int:
    """The kB figure on the line of /proc/<pid>/<name> starting with `key` (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def remember(pid: int) -> None:
    """Note `pid` and everything below it, to check at the end that all are gone."""
    for each in [pid, *descendants(pid)]:
        started = start_time(each)
        if started is not None:
            _seen.add((each, started))


class Child:
    """A process the bench started, in its own process group, output to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
            )
        self.pid = self.process.pid
        _started.append(self)
        remember(self.pid)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_port(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited at start (code {self.process.returncode}):\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not listen on 127.0.0.1:{port} within {timeout:g}s") from None
                time.sleep(0.05)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process (a master stops its own workers), wait up to `grace`; SIGKILL its group."""
        if self.alive():
            remember(self.pid)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.process.wait(5)
        # Anything of its group still there (a child that ignored TERM) goes too.
        _signal_group(self.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def still_running() -> list[tuple[int, str]]:
    """(pid, command line) of processes the bench saw that still run (same pid and start time)."""
    left = []
    for pid, started in sorted(_seen):
        fields = _stat(pid)
        if fields and fields[19] == started and fields[0] != "Z":
            left.append((pid, cmdline(pid)))
    return left


def stop_all() -> list[tuple[int, str]]:
    """Stop every child still running, then kill by PID whatever is left; returns what was left."""
    for child in reversed(_started):
        child.stop()
    deadline = time.monotonic() + 5
    while still_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = still_running()
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def foreign_cpu() -> dict[tuple[int, str], int]:
    """CPU ticks (user+system) of every process outside the bench's own tree, keyed by (pid, start time).

    Sampled before and after a run, the difference says how busy the rest of the
    machine (another engineer's tests, say) was while the bench measured.
    """
    own = {os.getpid(), *descendants(os.getpid())}
    ticks: dict[tuple[int, str], int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in own:
            fields = _stat(int(entry))
            if fields:
                ticks[(int(entry), fields[19])] = int(fields[11]) + int(fields[12])
    return ticks


def foreign_cpu_percent(before: dict[tuple[int, str], int], seconds: float) -> float:
    """Percent of one core that processes outside the bench used since `before` was sampled."""
    if seconds <= 0:
        return 0.0
    after = foreign_cpu()
    used = sum(ticks - before.get(key, 0) for key, ticks in after.items())
    return 100.0 * used / os.sysconf("SC_CLK_TCK") / seconds
