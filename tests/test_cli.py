"""The mcp-gateway command against a real gateway: servers, status, call, and --help."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from .harness import (
    ROOT,
    SHARED_STATE_KEY,
    TIME_SERVER,
    Gunicorn,
    server_command,
    write_registry,
)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    servers = {
        "time": {"type": "stdio", "command": TIME_SERVER},
        "sdk": {"type": "stdio", "command": server_command("sdk_server.py", "stdio"),
                "env_vars": {"TEST_SERVER_STATE_KEY": SHARED_STATE_KEY}},
        "broken": {"type": "stdio", "command": ["/nonexistent/server"]},
    }
    with Gunicorn(write_registry(tmp_path_factory.mktemp("cli"), servers), workers=2).serving() as instance:
        yield instance


@pytest.mark.parametrize("command", [[], ["validate"], ["serve"], ["templates"], ["servers"], ["status"], ["call"],
                                     ["registry", "from-template"], ["registry", "import"]])
def test_every_command_has_help(command: list[str]) -> None:
    done = cli(*command, "--help")
    assert done.returncode == 0 and "usage: mcp-gateway" in done.stdout


def test_servers_lists_a_registry_without_a_running_gateway() -> None:
    done = cli("servers", "--registry", "conf/example-registry.json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "github-server  http   round_robin  http://github-server-1:8080, http://github-server-2:8080" in lines
    assert any(line.startswith("filesystem-server  stdio  pool 1-5  mcp-filesystem-server --dir /data") for line in lines)
    assert any(line.startswith("demo-server  stdio  pool 1-3") and line.endswith("(template demo)") for line in lines)


def test_status_summarises_a_running_gateway(gateway: Gunicorn) -> None:
    # Every worker's upkeep tries to start `broken` (pool_min 1), so any worker reports it.
    deadline = time.monotonic() + 20
    while True:
        done = cli("status", "--url", gateway.url)
        if "broken  stdio  FAILING" in done.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert done.returncode == 0, done.stderr
    assert f"gateway {gateway.url}" in done.stdout
    assert "  time  stdio  healthy" in done.stdout
    failing = next(line for line in done.stdout.splitlines() if line.startswith("  broken  stdio  FAILING"))
    assert "last error: server 'broken': cannot start '/nonexistent/server': No such file or directory" in failing
    as_json = json.loads(cli("status", "--url", gateway.url, "--json").stdout)
    assert set(as_json["servers"]) == {"time", "sdk", "broken"}


def test_call_prints_the_result_and_exits_0(gateway: Gunicorn) -> None:
    done = cli("call", "time", "tools/call", '{"name": "get_current_time", "arguments": {"timezone": "UTC"}}',
               "--url", gateway.url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["structuredContent"]["timezone"] == "UTC"
    legacy = cli("call", "time", "tools/list", "--protocol", "legacy", "--url", gateway.url)
    assert legacy.returncode == 0 and "get_current_time" in legacy.stdout


def test_call_streams_sse_events_line_by_line(gateway: Gunicorn) -> None:
    done = cli("call", "sdk", "tools/call", '{"name": "slow", "arguments": {"steps": 2}, "_meta": {"progressToken": "p"}}',
               "--url", gateway.url)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e.get("method") for e in events] == ["notifications/progress", "notifications/progress", None]
    assert events[-1]["result"]["content"][0]["text"] == "done"


def test_call_exits_1_on_a_jsonrpc_error_or_bad_params(gateway: Gunicorn) -> None:
    done = cli("call", "time", "tools/call", '{"name": "nope", "arguments": {}}', "--url", gateway.url)
    assert done.returncode == 1 and "Unknown tool: nope" in done.stdout
    assert cli("call", "time", "tools/list", "{not json", "--url", gateway.url).returncode == 1
    unreachable = cli("call", "time", "tools/list", "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 1 and "call to http://127.0.0.1:9/time/mcp failed" in unreachable.stderr


def test_url_defaults_to_the_registrys_host_and_port(gateway: Gunicorn, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("cli-default")
    path = write_registry(folder, {"time": {"type": "stdio", "command": TIME_SERVER}},
                          {"host": "0.0.0.0", "port": gateway.port})
    done = cli("status", env={"MCP_GATEWAY_REGISTRY": str(path)})
    assert done.returncode == 0 and f"gateway http://127.0.0.1:{gateway.port}" in done.stdout
