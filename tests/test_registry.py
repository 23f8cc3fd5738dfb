"""The registry: the seed's example validates, and every mistake is named precisely."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import registry
from gateway.errors import RegistryError

from .harness import ROOT, write_registry

SEED_EXAMPLE = ROOT / "conf/example-registry.json"


def problems(text: str, source: str = "r.yaml", environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(RegistryError) as caught:
        registry.parse(text, source, environ or {})
    return caught.value.problems


def test_seed_example_registry_validates_as_written() -> None:
    loaded = registry.load(SEED_EXAMPLE)
    assert {s.raw["type"] for s in loaded.servers.values()} == {"http", "stdio", "template"}
    demo = loaded.servers["demo-server"]
    assert demo.template == "demo" and demo.type == "stdio" and demo.stdio is not None
    assert demo.stdio.pool_size == 3 and demo.stdio.env_vars["MCP_DEMO_HELLO_FROM"] == "Gateway"
    fs = loaded.servers["filesystem-server"].stdio
    assert fs is not None and fs.pool_size == 5 and fs.command == ("mcp-filesystem-server", "--dir", "/data")
    assert fs.env_vars == {"LOG_LEVEL": "info"} and fs.working_dir == "/app"
    assert loaded.gateway.port == 8000 and loaded.gateway.reload_registry is True


def test_default_registry_serves_mcp_server_time() -> None:
    loaded = registry.load(ROOT / "conf/registry.yaml")
    assert loaded.servers["time"].stdio is not None
    assert loaded.servers["time"].stdio.command == ("mcp-server-time",)
    demo = loaded.servers["demo-server"]
    assert demo.template == "demo" and demo.stdio is not None and demo.stdio.pool_size == 3
    assert demo.stdio.env_vars["MCP_DEMO_HELLO_FROM"] == "Gateway"


def test_json_and_yaml_are_chosen_by_extension(tmp_path: Path) -> None:
    servers = {"t": {"type": "stdio", "command": ["x"]}}
    assert registry.load(write_registry(tmp_path, servers, name="a.json")).servers["t"].type == "stdio"
    assert registry.load(write_registry(tmp_path, servers, name="a.yml")).servers["t"].type == "stdio"
    (tmp_path / "b.json").write_text("servers: {}")
    with pytest.raises(RegistryError, match="not valid JSON"):
        registry.load(tmp_path / "b.json")


def test_out_of_range_value_names_file_path_and_problem() -> None:
    found = problems("servers:\n  filesystem-server: {type: stdio, command: [x], pool_size: -1}\n")
    assert found == ["servers.filesystem-server.pool_size: -1 is less than the minimum of 1"]
    with pytest.raises(RegistryError) as caught:
        registry.parse("servers:\n  fs: {type: stdio, command: [x], pool_size: -1}\n", "conf/x.yaml", {})
    assert str(caught.value) == "conf/x.yaml: servers.fs.pool_size: -1 is less than the minimum of 1"


def test_unknown_keys_are_errors_at_every_level() -> None:
    found = problems(
        "servers:\n  fs: {type: stdio, command: [x], pool_sise: 3}\n"
        "gateway: {prot: 1}\ntypo: true\n"
    )
    assert any("'typo' was unexpected" in p for p in found)
    assert any(p.startswith("servers.fs:") and "'pool_sise' was unexpected" in p for p in found)
    assert any(p.startswith("gateway:") and "'prot' was unexpected" in p for p in found)


def test_unknown_server_type_and_strategy_are_rejected() -> None:
    found = problems(
        "servers:\n  a: {type: ftp}\n"
        "  b: {type: http, instances: [{endpoint: 'http://h:1'}], load_balancing: random}\n"
    )
    assert "servers.a.type: 'ftp' is not one of ['http', 'stdio', 'template']" in found
    assert any(p.startswith("servers.b.load_balancing: 'random' is not one of") for p in found)


def test_command_must_be_an_argv_list_not_a_shell_string() -> None:
    found = problems("servers:\n  a: {type: stdio, command: 'mcp-server-time --x'}\n")
    assert found == ["servers.a.command: 'mcp-server-time --x' is not of type 'array'"]


@pytest.mark.parametrize("server_id", ["status", "healthz", "metrics", "Status"])
def test_ids_of_the_gateways_own_routes_are_reserved(server_id: str) -> None:
    found = problems(f"servers:\n  {server_id}: {{type: stdio, command: [x]}}\n")
    assert found == [f"servers.{server_id}: the id '{server_id}' is reserved for the gateway's own routes"]


@pytest.mark.parametrize("server_id", ["has space", "-lead", "a/b", "x" * 65])
def test_server_ids_must_match_the_safe_pattern(server_id: str) -> None:
    found = problems(f'{{"servers": {{"{server_id}": {{"type": "stdio", "command": ["x"]}}}}}}', "r.json")
    assert len(found) == 1 and "does not match" in found[0]


def test_env_references_expand_and_unset_ones_are_named() -> None:
    text = (
        "servers:\n  a:\n    type: stdio\n    command: [x, '${ARG}', '$${LITERAL}']\n"
        "    env_vars: {TOKEN: '${SECRET}', LEVEL: '${LEVEL:-info}'}\n"
    )
    loaded = registry.parse(text, "r.yaml", {"ARG": "--dir", "SECRET": "s3cret"})
    stdio = loaded.servers["a"].stdio
    assert stdio is not None
    assert stdio.command == ("x", "--dir", "${LITERAL}")
    assert stdio.env_vars == {"TOKEN": "s3cret", "LEVEL": "info"}
    found = problems(text, environ={"ARG": "1"})
    assert found == ["servers.a.env_vars.TOKEN: environment variable SECRET is not set"]


def test_http_instances_must_have_distinct_endpoints() -> None:
    found = problems("servers:\n  a: {type: http, instances: [{endpoint: 'http://h:1'}, {endpoint: 'http://h:1/'}]}\n")
    assert found == ["servers.a.instances.1.endpoint: same as instance 0"]


def test_http_settings_are_read_with_defaults() -> None:
    loaded = registry.parse(
        "servers:\n  a:\n    type: http\n    instances: [{endpoint: 'http://h:1/', weight: 3}]\n"
        "    headers: {Authorization: 'Bearer ${TOKEN}'}\n    load_balancing: weighted\n", "r.yaml", {"TOKEN": "t0k"})
    http = loaded.servers["a"].http
    assert http is not None and http.instances[0].endpoint == "http://h:1" and http.instances[0].weight == 3
    assert http.headers == {"Authorization": "Bearer t0k"} and http.load_balancing == "weighted"
    assert http.mcp_path == "/mcp" and http.max_fails == 3


def test_pool_min_may_not_exceed_pool_size() -> None:
    found = problems("servers:\n  a: {type: stdio, command: [x], pool_size: 2, pool_min: 3}\n")
    assert found == ["servers.a.pool_min: 3 is more than pool_size 2"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_validate_command_exits_0_for_a_valid_file() -> None:
    done = run_cli("validate", str(SEED_EXAMPLE))
    assert done.returncode == 0, done.stderr
    assert "valid (3 servers" in done.stdout


def test_validate_command_prints_problems_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers:\n  filesystem-server: {type: stdio, command: [x], pool_size: -1}\n")
    done = run_cli("validate", str(bad))
    assert done.returncode == 1
    assert f"{bad}: servers.filesystem-server.pool_size: -1 is less than the minimum of 1" in done.stderr


def test_gunicorn_refuses_to_start_on_an_invalid_registry(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers:\n  fs: {type: stdio, command: [x], pool_size: 0}\n")
    done = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "--bind", "127.0.0.1:0", "wsgi:app"],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=60, env={**os.environ, "MCP_GATEWAY_REGISTRY": str(bad)},
    )
    assert done.returncode != 0
    assert f"{bad}: servers.fs.pool_size: 0 is less than the minimum of 1" in done.stderr
