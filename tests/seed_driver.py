"""Serve the design's example registry exactly as written, and report what a client sees.

Run by tests/test_seed.py inside a fresh network namespace (`unshare -n`, only
loopback up), so the example's made-up hosts (github-server-1, …) fail to
resolve on this machine without any lookup leaving it. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import requests

from tests.harness import ROOT, Gunicorn, still_running

CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "say_hello", "arguments": {"name": "Ada"}}}


def main(folder: str) -> int:
    report: dict[str, Any] = {}
    gateway = Gunicorn(ROOT / "conf/example-registry.json", workers=2, log_dir=Path(folder))
    try:
        gateway.wait_ready()
        report["say_hello"] = requests.post(f"{gateway.url}/demo-server/mcp", json=CALL, timeout=60).json()
        report["github"] = requests.post(f"{gateway.url}/github-server/mcp", timeout=60,
                                         json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).json()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # let checks and start attempts repeat a few times
            status = gateway.status()["servers"]
            github = status["github-server"]
            # The whole gateway's view: every worker has taken both instances down.
            if (status["filesystem-server"]["spawn_failures"] >= 3 and github["routable"] == 0
                    and all(not i["healthy"] and i["failed_checks"] >= 3 for i in github["instances"])):
                break
            time.sleep(0.2)
        report["status"] = status
    finally:
        code = gateway.stop()
        time.sleep(1)
        report["exit_code"] = code
        report["left_behind"] = sorted(still_running(gateway.seen))
        report["log"] = gateway.log()[-4000:]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
