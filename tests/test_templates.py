"""Templates, the built-in demo server, registry generation and mcpServers import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
import requests
import yaml
from mcp import Client

from gateway import registry, templates
from gateway.errors import RegistryError

from .harness import (
    ROOT,
    Gunicorn,
    descendants,
    parent_of,
    server_command,
    write_registry,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def problems(document: dict[str, Any], folder: Path = ROOT, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(RegistryError) as caught:
        registry.parse(json.dumps(document), str(folder / "r.json"), environ or {})
    return caught.value.problems


# --- the catalog ---------------------------------------------------------------


def test_built_in_demo_template_declares_its_config_with_defaults() -> None:
    demo = templates.catalog()["demo"]
    assert set(demo.run) == {"stdio", "http"} and demo.transport == "stdio"
    assert demo.defaults() == {"hello_from": "the MCP gateway demo", "log_level": "info"}
    launch = demo.launch({"hello_from": "Gateway"})
    assert launch.command == (sys.executable, "-m", "gateway.demo_server", "--transport", "stdio")
    assert launch.env == {"MCP_DEMO_HELLO_FROM": "Gateway", "MCP_DEMO_LOG_LEVEL": "info"}


def test_config_errors_name_server_key_and_problem() -> None:
    found = problems({"servers": {
        "d1": {"type": "template", "template_name": "demo", "config": {"hello_from": 5}},
        "d2": {"type": "template", "template_name": "demo", "config": {"log_level": "loud", "colour": "red"}},
        "d3": {"type": "template", "template_name": "nope"},
    }})
    assert "servers.d1.config.hello_from: 5 is not of type 'string'" in found
    assert "servers.d2.config.log_level: 'loud' is not one of ['debug', 'info', 'warning', 'error']" in found
    assert any(p.startswith("servers.d2.config: Additional properties are not allowed ('colour'") for p in found)
    assert "servers.d3.template_name: no template 'nope' (known: demo)" in found


def test_config_values_reach_the_server_as_env_or_arguments_without_a_shell(tmp_path: Path) -> None:
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "echoer.yaml").write_text(yaml.safe_dump({
        "description": "x", "transport": "stdio", "run": {"stdio": {"command": ["prog", "--fixed"]}},
        "config_schema": {"type": "object", "properties": {"root": {"type": "string", "default": "/srv"},
                                                            "verbose": {"type": "boolean", "default": False},
                                                            "token": {"type": "string"}}},
        "config_map": {"root": {"arg": "--root"}, "verbose": {"env": "VERBOSE"}, "token": {"env": "TOKEN"}},
    }))
    loaded = registry.parse(json.dumps({
        "servers": {"e": {"type": "template", "template_name": "echoer",
                          "config": {"root": "/a b; rm -rf /", "token": "${SECRET}"}}},
        "gateway": {"template_dirs": ["tpl"]},
    }), str(tmp_path / "r.json"), {"SECRET": "s3"})
    stdio = loaded.servers["e"].stdio
    assert stdio is not None
    assert stdio.command == ("prog", "--fixed", "--root", "/a b; rm -rf /")  # one argv item, no shell
    assert stdio.env_vars == {"VERBOSE": "false", "TOKEN": "s3"}


def test_user_template_with_the_same_name_wins(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "demo.yaml").write_text(yaml.safe_dump({
        "description": "my own demo", "transport": "stdio",
        "run": {"stdio": {"command": server_command("legacy_server.py")}},
    }))
    (tmp_path / "r.json").write_text(json.dumps({"servers": {"d": {"type": "template", "template_name": "demo"}},
                                                 "gateway": {"template_dirs": ["mine"]}}))
    loaded = registry.load(tmp_path / "r.json", {})
    entry = loaded.servers["d"]
    assert entry.description == "my own demo" and entry.stdio is not None
    assert entry.stdio.command == tuple(server_command("legacy_server.py"))
    listed = cli("templates", "--registry", str(tmp_path / "r.json"))
    assert "demo: my own demo" in listed.stdout and str(tmp_path / "mine" / "demo.yaml") in listed.stdout


def test_broken_user_template_is_reported_with_its_file(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "bad.yaml").write_text("description: x\ntransport: ftp\nrun: {}\n")
    found = problems({"servers": {"b": {"type": "template", "template_name": "bad"}},
                      "gateway": {"template_dirs": ["t"]}}, tmp_path)
    assert any(str(tmp_path / "t" / "bad.yaml") in p and "transport: 'ftp' is not one of" in p for p in found), found
    assert problems({"servers": {"b": {"type": "template", "template_name": "demo"}},
                     "gateway": {"template_dirs": ["missing"]}}, tmp_path) == [
        f"gateway.template_dirs: {tmp_path / 'missing'}: template folder does not exist"]


# --- registry generation -------------------------------------------------------


def test_templates_command_lists_keys_and_defaults() -> None:
    done = cli("templates")
    assert done.returncode == 0
    assert 'config hello_from = "the MCP gateway demo"  (env MCP_DEMO_HELLO_FROM)' in done.stdout
    listed = json.loads(cli("templates", "--json").stdout)
    assert listed[0]["name"] == "demo" and listed[0]["config"]["log_level"]["default"] == "info"


def test_from_template_prints_an_entry_that_validates(tmp_path: Path) -> None:
    done = cli("registry", "from-template", "demo", "--id", "demo-server", "--instances", "3", "--config", "hello_from=Gateway")
    assert done.returncode == 0, done.stderr
    document = yaml.safe_load(done.stdout)
    assert document == {"servers": {"demo-server": {"type": "template", "template_name": "demo", "instances": 3,
                                                    "config": {"hello_from": "Gateway"}}}}
    (tmp_path / "r.yaml").write_text(done.stdout)
    assert cli("validate", str(tmp_path / "r.yaml")).returncode == 0
    as_json = cli("registry", "from-template", "demo", "--id", "x", "--format", "json")
    assert json.loads(as_json.stdout)["servers"]["x"]["template_name"] == "demo"
    bad = cli("registry", "from-template", "demo", "--id", "x", "--config", "log_level=loud")
    assert bad.returncode == 1 and "servers.x.config.log_level: 'loud' is not one of" in bad.stderr


# --- mcpServers files ----------------------------------------------------------------


def test_import_turns_a_desktop_config_into_a_registry() -> None:
    done = cli("registry", "import", str(FIXTURES / "claude_desktop_config.json"))
    assert done.returncode == 0, done.stderr
    servers = yaml.safe_load(done.stdout)["servers"]
    assert servers["filesystem"] == {"type": "stdio", "command": [
        "npx", "-y", "@modelcontextprotocol/server-filesystem", "/Users/ada/Desktop", "/Users/ada/Downloads"]}
    assert servers["github"]["env_vars"] == {"GITHUB_PERSONAL_ACCESS_TOKEN": "${GITHUB_TOKEN}"}
    assert servers["sqlite-db"]["working_dir"] == "/Users/ada" and "sqlite db" in servers["sqlite-db"]["description"]


def test_import_of_url_entries_and_what_cannot_be_imported() -> None:
    done = cli("registry", "import", str(FIXTURES / "cursor_mcp.json"), "--format", "json")
    servers = json.loads(done.stdout)["servers"]
    assert servers["linear"] == {"type": "http", "instances": [{"endpoint": "https://mcp.linear.app"}], "mcp_path": "/mcp",
                                 "headers": {"Authorization": "Bearer ${LINEAR_API_KEY}"}}
    assert servers["local-dev"]["mcp_path"] == "/v1/mcp" and "retired" not in servers and "old-sse" not in servers
    assert done.returncode == 1 and "old-sse: the deprecated HTTP+SSE transport is not supported" in done.stderr


def test_an_mcp_servers_file_works_as_the_registry_itself() -> None:
    loaded = registry.load(FIXTURES / "claude_desktop_config.json", {"GITHUB_TOKEN": "t"})
    assert set(loaded.servers) == {"filesystem", "github", "time", "sqlite-db"}
    github = loaded.servers["github"].stdio
    assert github is not None and github.env_vars == {"GITHUB_PERSONAL_ACCESS_TOKEN": "t"}
    with pytest.raises(RegistryError, match="environment variable GITHUB_TOKEN is not set"):
        registry.load(FIXTURES / "claude_desktop_config.json", {})


# --- the demo server through real gunicorn ----------------------------------------


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_demo_template_through_gunicorn_in_both_eras(tmp_path: Path, mode: str) -> None:
    entry = {"type": "template", "template_name": "demo", "instances": 2, "config": {"hello_from": "Gateway"}}
    gateway = Gunicorn(write_registry(tmp_path, {"demo-server": entry}), workers=2)
    try:
        gateway.wait_ready()

        async def scenario() -> tuple[str | None, set[str], str, Any]:
            async with Client(f"{gateway.url}/demo-server/mcp", mode=mode) as client:
                tools = {tool.name for tool in (await client.list_tools()).tools}
                hello = await client.call_tool("say_hello", {"name": "Ada"})
                info = await client.call_tool("get_server_info", {})
                assert isinstance(hello.content[0], types.TextContent)
                return client.protocol_version, tools, hello.content[0].text, info.structured_content

        version, tools, hello, info = anyio.run(scenario)
        assert version == ("2026-07-28" if mode == "auto" else "2025-11-25")
        assert tools == {"say_hello", "echo_message", "get_server_info"}
        assert hello == "Hello, Ada! Greetings from Gateway."
        assert info["hello_from"] == "Gateway" and info["name"] == "demo"
        status = gateway.status()["servers"]["demo-server"]
        assert status["type"] == "stdio" and status["template"] == "demo" and status["pool_size"] == 2
    finally:
        gateway.stop_and_check()


def demo_processes(under: int) -> dict[int, int]:
    """pid -> port of the http demo servers whose parent is `under`."""
    found = {}
    for pid, _ in descendants(under):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gateway.demo_server" in argv and parent_of(pid) == under:
            found[pid] = int(argv[argv.index(b"--port") + 1])
    return found


def test_http_template_runs_once_per_gateway_balanced_and_supervised(tmp_path: Path) -> None:
    entry = {"type": "template", "template_name": "demo", "transport": "http", "instances": 2,
             "config": {"hello_from": "Gateway"}}
    gateway = Gunicorn(write_registry(tmp_path, {"demo-http": entry}), workers=2)
    try:
        gateway.wait_ready()
        started = demo_processes(gateway.process.pid)
        assert len(started) == 2, "instances run under the gunicorn master, not once per worker"
        assert all(not demo_processes(worker) for worker in gateway.worker_pids())

        async def scenario(mode: str) -> str:
            async with Client(f"{gateway.url}/demo-http/mcp", mode=mode) as client:
                hello = await client.call_tool("say_hello", {"name": "Ada"})
                assert isinstance(hello.content[0], types.TextContent)
                return hello.content[0].text

        assert anyio.run(scenario, "auto") == anyio.run(scenario, "legacy") == "Hello, Ada! Greetings from Gateway."
        with requests.Session() as http:  # keep-alive: one worker, its round-robin
            served = {modern_info(http, gateway)["pid"] for _ in range(4)}
        assert served == set(started)

        victim, port = next(iter(started.items()))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and port not in {p for pid, p in demo_processes(gateway.process.pid).items()
                                                           if pid != victim}:
            time.sleep(0.1)
        restarted = demo_processes(gateway.process.pid)
        assert victim not in restarted and sorted(restarted.values()) == sorted(started.values()), "same port, new process"
        gateway.remember()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the restarted instance answers again
            with requests.Session() as http:
                # A call that reached the instance while it restarted may fail (and is not
                # replayed); recovery means both instances answer again.
                answered = {info["pid"] for info in (modern_info(http, gateway, tolerate=True) for _ in range(4)) if info}
                if answered == set(restarted):
                    break
            time.sleep(0.2)
        else:
            raise AssertionError("the restarted instance did not come back into rotation")
    finally:
        gateway.stop_and_check()


def modern_info(http: requests.Session, gateway: Gunicorn, tolerate: bool = False) -> dict[str, Any]:
    envelope = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    response = http.post(f"{gateway.url}/demo-http/mcp", timeout=30, json={
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "get_server_info", "arguments": {}, "_meta": envelope}},
        headers={"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "get_server_info",
                 "Accept": "application/json, text/event-stream"})
    body = response.text
    if response.headers["Content-Type"].startswith("text/event-stream"):
        body = [line[6:] for line in body.splitlines() if line.startswith("data: ") and line[6:]][-1]
    answer = json.loads(body)
    if tolerate and "result" not in answer:
        return {}
    info: dict[str, Any] = answer["result"]["structuredContent"]
    return info


def test_a_stdio_template_takes_the_session_settings() -> None:
    loaded = registry.parse(json.dumps({"servers": {
        "d": {"type": "template", "template_name": "demo", "session_mode": "dedicated", "session_idle_timeout": 30,
              "max_sessions": 3},
        "p": {"type": "template", "template_name": "demo"}}}), "r.json", {})
    dedicated, pooled = loaded.servers["d"].stdio, loaded.servers["p"].stdio
    assert dedicated is not None and pooled is not None
    assert (dedicated.session_mode, dedicated.session_idle_timeout, dedicated.max_sessions) == ("dedicated", 30, 3)
    assert pooled.session_mode == "pooled"
    with pytest.raises(RegistryError):
        registry.parse(json.dumps({"servers": {"d": {"type": "template", "template_name": "demo",
                                                     "session_mode": "private"}}}), "r.json", {})
