"""The fallback session secret and the runtime directory are trusted only if they are ours.

Another local user can create `$TMPDIR/mcp-gateway-$UID` before the gateway
does; a gateway that adopted the secret planted there would accept session ids
that user forges. These tests plant such folders and files (as root, chown to
uid 65534 stands in for another user) and expect a refusal that names the path
and the reason; one of them starts real gunicorn and expects it to exit.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from gateway import rundir, sessions
from gateway.errors import UnsafePath

from .harness import TIME_SERVER, Gunicorn, wait_for, write_registry

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's files needs root")


@pytest.fixture
def tmpdir_(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private $TMPDIR, with no secret configured anywhere."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.delenv(sessions.SECRET_ENV, raising=False)
    return folder


def secret_folder(tmp: Path) -> Path:
    return tmp / f"mcp-gateway-{os.getuid()}"


def refusal(tmp: Path) -> str:
    with pytest.raises(UnsafePath) as caught:
        sessions.load_secrets(None)
    return str(caught.value)


def test_a_clean_start_creates_a_private_folder_and_secret_and_reuses_them(tmpdir_: Path) -> None:
    first = sessions.load_secrets(None)
    folder = secret_folder(tmpdir_)
    assert os.stat(folder).st_mode & 0o777 == 0o700
    assert os.stat(folder / "session-secret").st_mode & 0o777 == 0o600
    assert len(first) == 1 and len(first[0]) >= 32
    assert sessions.load_secrets(None) == first
    assert [p.name for p in folder.iterdir()] == ["session-secret"], "no temporary file left"


def test_a_folder_writable_by_other_users_is_refused(tmpdir_: Path) -> None:
    folder = secret_folder(tmpdir_)
    folder.mkdir()
    folder.chmod(0o777)
    (folder / "session-secret").write_text("planted")
    (folder / "session-secret").chmod(0o600)
    message = refusal(tmpdir_)
    assert str(folder) in message and "writable by other users (mode 0777)" in message
    assert "gateway.session_secret" in message


@as_root
def test_a_folder_planted_by_another_user_with_a_planted_secret_is_refused(tmpdir_: Path) -> None:
    folder = secret_folder(tmpdir_)
    folder.mkdir()
    folder.chmod(0o777)
    (folder / "session-secret").write_text("planted-by-someone-else")
    os.chown(folder / "session-secret", NOBODY, NOBODY)
    os.chown(folder, NOBODY, NOBODY)
    message = refusal(tmpdir_)
    assert str(folder) in message and f"owned by uid {NOBODY}" in message


def test_a_symlinked_folder_is_refused(tmpdir_: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / "session-secret").write_text("planted")
    (elsewhere / "session-secret").chmod(0o600)
    secret_folder(tmpdir_).symlink_to(elsewhere)
    message = refusal(tmpdir_)
    assert str(secret_folder(tmpdir_)) in message and "symbolic link" in message


def test_a_group_writable_secret_file_is_refused(tmpdir_: Path) -> None:
    sessions.load_secrets(None)
    path = secret_folder(tmpdir_) / "session-secret"
    path.chmod(0o620)
    message = refusal(tmpdir_)
    assert str(path) in message and "mode 0620" in message


def test_a_symlinked_secret_file_is_refused(tmpdir_: Path, tmp_path: Path) -> None:
    folder = secret_folder(tmpdir_)
    folder.mkdir(mode=0o700)
    target = tmp_path / "target"
    target.write_text("planted")
    target.chmod(0o600)
    (folder / "session-secret").symlink_to(target)
    message = refusal(tmpdir_)
    assert str(folder / "session-secret") in message and "symbolic link" in message


@as_root
def test_a_secret_file_of_another_user_is_refused(tmpdir_: Path) -> None:
    sessions.load_secrets(None)
    path = secret_folder(tmpdir_) / "session-secret"
    os.chown(path, NOBODY, NOBODY)
    message = refusal(tmpdir_)
    assert str(path) in message and f"owned by uid {NOBODY}" in message


# --- the runtime directory ----------------------------------------------------------------


@pytest.fixture
def runtime_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    path = tmp_path / "runtime"
    monkeypatch.setenv(rundir.RUNTIME_ENV, str(path))
    monkeypatch.setenv(rundir.METRICS_ENV, str(path / "metrics"))
    monkeypatch.delenv(rundir.OWNED_ENV, raising=False)
    return path


def test_a_given_runtime_directory_writable_by_others_is_refused(runtime_env: Path) -> None:
    runtime_env.mkdir()
    runtime_env.chmod(0o777)
    with pytest.raises(UnsafePath, match=r"runtime is writable by other users \(mode 0777\)") as caught:
        rundir.prepare()
    assert str(runtime_env) in str(caught.value) and rundir.RUNTIME_ENV in str(caught.value)


@as_root
def test_a_given_runtime_directory_of_another_user_is_refused(runtime_env: Path) -> None:
    runtime_env.mkdir(mode=0o700)
    os.chown(runtime_env, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=f"owned by uid {NOBODY}"):
        rundir.prepare()


def test_a_symlinked_runtime_directory_is_refused(runtime_env: Path, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    runtime_env.symlink_to(tmp_path / "real")
    with pytest.raises(UnsafePath, match="symbolic link"):
        rundir.prepare()


def test_a_missing_runtime_directory_is_created_private(runtime_env: Path) -> None:
    rundir.prepare()
    assert os.stat(runtime_env).st_mode & 0o777 == 0o700
    assert (runtime_env / "status").is_dir() and (runtime_env / "revoked").is_dir()


# --- real gunicorn refuses to start ----------------------------------------------------------------


def gateway_processes(port: int) -> list[int]:
    """Live processes whose command line binds `port`: the master and its workers."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if f"127.0.0.1:{port}".encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def test_gunicorn_refuses_to_start_on_a_planted_secret_folder(tmp_path: Path) -> None:
    planted_tmp = tmp_path / "tmp"
    folder = planted_tmp / f"mcp-gateway-{os.getuid()}"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    (folder / "session-secret").write_text("planted")
    registry = write_registry(tmp_path, {"time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 1}})
    gateway = Gunicorn(registry, env={sessions.SECRET_ENV: "", "TMPDIR": str(planted_tmp)})
    try:
        code = gateway.process.wait(timeout=30)
    finally:
        if gateway.process.poll() is None:
            gateway.process.kill()
            gateway.process.wait()
        gateway._log.close()
    log = gateway.log()
    assert code != 0, log
    assert f"{folder} is writable by other users (mode 0777)" in log
    assert "Traceback" not in log
    wait_for(lambda: gateway_processes(gateway.port) == [], 5, "every gateway process gone")
