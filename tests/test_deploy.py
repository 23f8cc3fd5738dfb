"""Deployment files: the systemd unit verifies and says what the README promises."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from .harness import ROOT

UNIT = ROOT / "conf/mcp-gateway.service"


def installed_copy(folder: Path, text: str) -> Path:
    """The unit as installed from this checkout (systemd-analyze checks ExecStart exists)."""
    path = folder / "mcp-gateway.service"
    lines = []
    for line in text.replace("/opt/mcp-gateway", str(ROOT)).splitlines():
        # The test machine has no mcp-gateway user.
        lines.append(line.split("=")[0] + "=root" if line.startswith(("User=", "Group=")) else line)
    path.write_text("\n".join(lines) + "\n")
    return path


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    return subprocess.run([tool, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False)


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    done = verify(installed_copy(tmp_path, UNIT.read_text()))
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_a_broken_unit_does_not_verify(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("ExecStart=/opt/mcp-gateway/.venv/bin/gunicorn", "ExecStart=/opt/mcp-gateway/no-such-binary")
    assert verify(installed_copy(tmp_path, broken)).returncode != 0


def test_unit_runs_gunicorn_hardened_with_reload_and_restart() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert "gunicorn --config /opt/mcp-gateway/conf/gunicorn.conf.py wsgi:app" in service["ExecStart"]
    assert service["ExecReload"] == "/bin/kill -s HUP $MAINPID"
    assert service["User"] == "mcp-gateway" and service["Restart"] == "on-failure"
    for option in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert service[option] == "yes", option
    assert service["ProtectSystem"] == "strict" and service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) > 30, "above gunicorn's graceful_timeout"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # Metrics and status of every worker meet in a directory systemd makes and empties.
    assert service["RuntimeDirectory"] == "mcp-gateway"
    assert "\nEnvironment=MCP_GATEWAY_RUNTIME_DIR=/run/mcp-gateway\n" in UNIT.read_text()
