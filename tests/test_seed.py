"""The design's whole example registry (http, stdio and template entries) served as written.

Its http and stdio entries name hosts and commands this machine does not
have: they must show as failing in /status and keep being retried with
back-off, while the template server answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .harness import ROOT


def test_seed_registry_as_written_serves_its_template_and_reports_the_rest(tmp_path: Path) -> None:
    # A fresh network namespace has only loopback: the seed's hosts cannot resolve,
    # and no DNS query leaves this machine.
    script = f"ip link set lo up && exec {sys.executable} -m tests.seed_driver {tmp_path}"
    done = subprocess.run(["unshare", "--net", "--", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=150, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    log = report["log"]

    assert report["say_hello"]["result"]["content"][0]["text"] == "Hello, Ada! Greetings from Gateway.", log
    assert report["github"]["error"]["message"].startswith("server 'github-server': instance http://github-server-")

    servers = report["status"]
    fs = servers["filesystem-server"]
    assert fs["healthy"] is False and fs["spawn_failures"] >= 3, fs  # retried, with back-off
    assert "cannot start 'mcp-filesystem-server' in working directory '/app'" in fs["last_error"]["message"]
    github = servers["github-server"]
    assert github["healthy"] is False and github["routable"] == 0, github
    for instance in github["instances"]:
        assert instance["healthy"] is False and instance["failed_checks"] >= 3
        assert "health check failed" in instance["last_error"]["message"]
    demo = servers["demo-server"]
    assert demo["template"] == "demo" and demo["healthy"] is True and demo["alive"] >= 1

    assert report["exit_code"] == 0 and report["left_behind"] == [], log
