"""Trusting folders and files in places other local users can write to, such as /tmp.

Another user can create `/tmp/mcp-gateway-<uid>` (or a symlink by that name)
before the gateway does, and plant a secret in it. So a folder or file found
there is used only if it is ours: owned by the gateway's uid, not a symbolic
link, and not writable by anyone else (a secret file: no group or other bits
at all). Anything else is refused with an UnsafePath naming the path and the
reason; start-up stops on it. Checks are made on open descriptors (O_NOFOLLOW,
fstat), so what was checked is what is used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from .errors import UnsafePath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _problem(path: Path, info: os.stat_result, kind: str, forbidden_bits: int) -> str | None:
    uid = os.geteuid()
    if info.st_uid != uid:
        return f"{path} is owned by uid {info.st_uid}, not by the gateway's uid {uid}"
    if info.st_mode & forbidden_bits:
        mode = stat.S_IMODE(info.st_mode)
        who = "other users" if mode & 0o002 else "its group"
        if kind == "file" and not mode & 0o022:
            return f"{path} has mode {mode:04o}: a secret file must have no group or other bits (0600)"
        return f"{path} is writable by {who} (mode {mode:04o})"
    return None


def open_dir(path: Path, advice: str, create: bool = True) -> int:
    """A descriptor of the folder at `path`, made 0700 if missing; UnsafePath if it is not ours."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise UnsafePath(f"{path} cannot be created ({exc.strerror}); {advice}") from None
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise UnsafePath(f"{path} is a symbolic link; {advice}") from None
        if exc.errno == errno.ENOTDIR:
            raise UnsafePath(f"{path} is not a folder; {advice}") from None
        raise UnsafePath(f"{path} cannot be opened ({exc.strerror}); {advice}") from None
    problem = _problem(path, os.fstat(fd), "folder", 0o022)
    if problem:
        os.close(fd)
        raise UnsafePath(f"{problem}; {advice}")
    return fd


def check_dir(path: Path, advice: str, create: bool = True) -> None:
    os.close(open_dir(path, advice, create))


def read_or_create_secret(folder: Path, name: str, advice: str) -> str:
    """The secret in `folder/name`, created (mode 0600) if missing; UnsafePath if either is not ours.

    A new secret is written to a temporary file and linked into place, so a
    process racing this one reads either nothing (and creates its own, which
    loses the link race) or the whole secret.
    """
    folder_fd = open_dir(folder, advice)
    try:
        for _ in range(3):
            try:
                return _read(folder_fd, folder / name, advice)
            except FileNotFoundError:
                _create(folder_fd, name)
        raise UnsafePath(f"{folder / name} keeps disappearing; {advice}")
    finally:
        os.close(folder_fd)


def _read(folder_fd: int, path: Path, advice: str) -> str:
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{path} is a symbolic link; {advice}") from None
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(str(path)) from None
        raise UnsafePath(f"{path} cannot be read ({exc.strerror}); {advice}") from None
    with os.fdopen(fd, "r") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePath(f"{path} is not a regular file; {advice}")
        problem = _problem(path, info, "file", 0o077)
        if problem:
            raise UnsafePath(f"{problem}; {advice}")
        value = handle.read().strip()
    if not value:
        raise UnsafePath(f"{path} is empty; {advice}")
    return value


def _create(folder_fd: int, name: str) -> None:
    temporary = f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=folder_fd)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        with contextlib.suppress(FileExistsError):  # another worker made it first: read theirs
            os.link(temporary, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    finally:
        os.unlink(temporary, dir_fd=folder_fd)


def prune_expired(folder: Path, now: float) -> int:
    """Remove the files of `folder` whose mtime (their expiry) is before `now`; how many went.

    For records that expire (revoked session ids, session log levels): every
    worker of the host prunes, so one already gone is another's work done.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.stat(follow_symlinks=False).st_mtime < now:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue  # another worker pruned it first
    return removed
