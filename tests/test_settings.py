"""Every setting declared once (gateway/settings.py): what is generated from the tables, and the copies, agree.

The shipped schema, the README's reference, the settings objects' defaults
(and their copies elsewhere) and the deployment files' values that must match
a setting are each compared with the tables; a last test edits one table entry
and checks that every comparison then fails.
"""

from __future__ import annotations

import ast
import configparser
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway import balancer, bulkhead, health, registry, settings, templates
from gateway.settings import COMMON, GATEWAY, HTTP, HTTP_INSTANCE, STDIO, TEMPLATE
from gateway.upstreams.http import HttpUpstream

from .harness import ROOT

README = ROOT / "README.md"
REGENERATE = "regenerate with: python -m gateway.settings --write-schema --write-readme"

# Each settings object and the table its defaults come from; fields that are no setting of their own.
OBJECTS: dict[type, tuple[tuple[settings.Section, ...], frozenset[str]]] = {
    registry.StdioSettings: ((STDIO,), frozenset()),
    registry.HttpSettings: ((HTTP,), frozenset()),
    registry.HttpInstanceSettings: ((HTTP_INSTANCE,), frozenset({"authorization"})),
    registry.GatewaySettings: ((GATEWAY,), frozenset()),
    registry.ServerEntry: ((COMMON, TEMPLATE), frozenset({"id", "type", "raw", "stdio", "http", "template", "launch",
                                                          "shown"})),
}
# Template settings a ServerEntry holds as something else (the template's name, its launch, its
# stdio settings: session_mode, session_idle_timeout, max_sessions are StdioSettings fields).
NOT_FIELDS = frozenset({"template_name", "config", "transport"})
HELD_BY_STDIO = frozenset(s.name for s in settings.SESSION_SETTINGS)


# --- the checks (each returns its problems, so the last test can see them fail) --------------

def schema_drift() -> list[str]:
    shipped = settings.SCHEMA_FILE.read_text("utf-8")
    return [] if shipped == settings.schema_text() else [f"{settings.SCHEMA_FILE} differs from the tables; {REGENERATE}"]


def readme_drift() -> list[str]:
    block = settings.readme_block_in(README.read_text("utf-8"))
    return [] if block == settings.readme_block() else [f"README.md's settings block differs from the tables; {REGENERATE}"]


def field_default(item: dataclasses.Field[Any]) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


def object_drift() -> list[str]:
    """Each settings object's field defaults against the tables, and no field without a setting."""
    problems = []
    for cls, (sections, derived) in OBJECTS.items():
        fields = {item.name: item for item in dataclasses.fields(cls)}
        names = {s.name for section in sections for s in section if s.name not in NOT_FIELDS
                 and not (section is TEMPLATE and s.name in HELD_BY_STDIO)}
        problems += [f"{cls.__name__}.{name}: in no table (a setting belongs in gateway/settings.py)"
                     for name in sorted(set(fields) - names - derived)]
        problems += [f"{cls.__name__}: no field for setting {name}" for name in sorted(names - set(fields))]
        for section in sections:
            for setting in section:
                item = fields.get(setting.name)
                if item is None or setting.name in NOT_FIELDS or (section is TEMPLATE and setting.name in HELD_BY_STDIO):
                    continue
                given = field_default(item)
                if given is dataclasses.MISSING:
                    continue  # built from the file every time (ServerEntry.description)
                if given != setting.default or type(given) is not type(setting.default):
                    problems.append(f"{cls.__name__}.{setting.name}: default {given!r}, the table says {setting.default!r}")
    return problems


def parameter_default(function: Any, name: str) -> Any:
    return inspect.signature(function).parameters[name].default


def copy_drift() -> list[str]:
    """Defaults written outside registry.py that are settings' defaults."""
    copies = {
        "health.HealthPolicy.rise": (health.HealthPolicy().rise, HTTP.default("health_check_rise")),
        "health.HealthPolicy.fall": (health.HealthPolicy().fall, HTTP.default("health_check_fall")),
        "health.HealthPolicy.max_fails": (health.HealthPolicy().max_fails, HTTP.default("max_fails")),
        "health.HealthPolicy.ejection_time": (health.HealthPolicy().ejection_time, HTTP.default("ejection_time")),
        "HttpUpstream(check_interval)": (parameter_default(HttpUpstream.__init__, "check_interval"),
                                         GATEWAY.default("health_check_interval")),
        "templates.Launch.mcp_path": (templates.Launch("http", ()).mcp_path, HTTP.default("mcp_path")),
        "bulkhead.Bulkhead(queue_timeout)": (parameter_default(bulkhead.Bulkhead.__init__, "queue_timeout"),
                                             COMMON.default("queue_timeout")),
        "balancer.STRATEGIES": (list(balancer.STRATEGIES), HTTP["load_balancing"].schema["enum"]),
        "balancer.Balancer(strategy)": (parameter_default(balancer.Balancer.__init__, "strategy"),
                                        HTTP.default("load_balancing")),
    }
    return [f"{where}: {given!r}, the table says {table!r}" for where, (given, table) in copies.items() if given != table]


# --- the tests -------------------------------------------------------------------------------------

def test_the_shipped_schema_is_what_the_tables_generate() -> None:
    assert schema_drift() == []
    assert registry.schema() == json.loads(settings.schema_text())


def test_the_readme_reference_is_what_the_tables_generate() -> None:
    assert readme_drift() == []


def test_every_settings_object_default_is_the_tables() -> None:
    assert object_drift() == []


def test_defaults_copied_elsewhere_are_the_tables() -> None:
    assert copy_drift() == []


def test_a_registry_without_settings_gets_every_default() -> None:
    loaded = registry.parse(json.dumps({"servers": {
        "s": {"type": "stdio", "command": ["x"]}, "h": {"type": "http", "instances": [{"endpoint": "http://a"}]}}}),
        "r.json", {})
    stdio, http = loaded.servers["s"].stdio, loaded.servers["h"].http
    assert stdio is not None and http is not None
    for section, built in ((STDIO, stdio), (HTTP, http), (GATEWAY, loaded.gateway)):
        for setting in section:
            if not setting.required and setting.name != "auth":
                assert getattr(built, setting.name) == setting.default, setting.name
    assert loaded.servers["s"].queue_timeout == COMMON.default("queue_timeout")


def schema_properties(schema: Mapping[str, Any], where: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    for key, value in schema.items():
        if key == "properties" and isinstance(value, Mapping):
            for name, prop in value.items():
                yield f"{where}.{name}", prop
                yield from schema_properties(prop, f"{where}.{name}")
        elif isinstance(value, Mapping):
            yield from schema_properties(value, f"{where}.{key}" if key != "$defs" else where)


def test_every_schema_property_has_a_doc_line() -> None:
    shipped = json.loads(settings.SCHEMA_FILE.read_text("utf-8"))
    found = list(schema_properties(shipped))
    assert len(found) > 60
    for where, prop in found:
        doc = prop.get("description")
        assert isinstance(doc, str) and doc.strip() and "\n" not in doc, f"{where} has no one-line description"


def test_every_default_is_valid_for_its_setting() -> None:
    defs = settings.schema()["$defs"]
    for section in settings.SECTIONS:
        for setting in section:
            if setting.required or setting.default is None:
                continue
            value = json.loads(json.dumps(setting.default))  # as it would be written in the file
            jsonschema.Draft202012Validator({**setting.schema, "$defs": defs}).validate(value)


def test_the_readme_example_is_a_valid_registry() -> None:
    text = README.read_text("utf-8")
    section = text[text.index("## The registry"):text.index(settings.README_BEGIN)]
    examples = re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    assert examples
    for example in examples:
        assert registry.validate(yaml.safe_load(example)) == []


def test_each_check_fails_when_one_place_is_edited(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table default changed alone: the schema, the README and the objects' defaults all disagree."""
    edited = settings.Section(STDIO.name, STDIO.title, tuple(
        dataclasses.replace(s, default=s.default + 1) if s.name == "pool_size" else s for s in STDIO), STDIO.server_type)
    monkeypatch.setattr(settings, "STDIO", edited)
    monkeypatch.setattr(settings, "SECTIONS", tuple(edited if s is STDIO else s for s in settings.SECTIONS))
    monkeypatch.setattr(settings, "SERVER_SECTIONS", tuple(edited if s is STDIO else s for s in settings.SERVER_SECTIONS))
    monkeypatch.setitem(OBJECTS, registry.StdioSettings, ((edited,), frozenset()))
    assert schema_drift() and readme_drift() and object_drift()
    monkeypatch.undo()
    # A doc line changed alone in the shipped schema.
    monkeypatch.setattr(settings, "schema_text", lambda: settings.SCHEMA_FILE.read_text("utf-8").replace("argv", "arg v"))
    assert schema_drift()


def test_a_field_default_or_copy_changed_alone_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = registry.StdioSettings.__dataclass_fields__
    table = STDIO.default("pool_size")
    monkeypatch.setattr(fields["pool_size"], "default", table + 1)
    assert object_drift() == [f"StdioSettings.pool_size: default {table + 1}, the table says {table}"]
    monkeypatch.undo()
    monkeypatch.setattr(balancer, "STRATEGIES", ("round_robin",))
    assert copy_drift()


# --- values in the deployment files that must agree with the gateway's -----------------------------

NGINX_CONF = ROOT / "conf" / "nginx.conf"


def proxy_directives() -> dict[str, str]:
    """conf/nginx.conf's simple `name value;` directives (each is set once in that file)."""
    found: dict[str, str] = {}
    for line in NGINX_CONF.read_text().splitlines():
        match = re.match(r"\s*([a-z_]+)\s+([^;{]+);", line.split("#", 1)[0])
        if match:
            assert match[1] not in found or match[1].startswith("proxy_set_header"), f"{match[1]} is set twice"
            found[match[1]] = match[2].strip()
    return found


def proxy_seconds(value: str) -> float:
    """The proxy's time syntax: 30, 30s, 5m, 1h, 500ms."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[unit]


def proxy_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG])?", value).groups()  # type: ignore[union-attr]
    return int(number) * {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit.lower() if unit else None]


def test_the_proxy_waits_for_an_upstream_longer_than_the_gateway_does() -> None:
    """The gateway, not the proxy in front, decides when an upstream is too slow: its timeouts are above every default."""
    directives = proxy_directives()
    longest = max(HTTP.default("request_timeout"), HTTP.default("read_timeout"), STDIO.default("request_timeout"))
    assert proxy_seconds(directives["proxy_read_timeout"]) >= longest
    assert proxy_seconds(directives["proxy_send_timeout"]) >= longest


def test_the_proxy_cuts_clients_where_the_gateway_would() -> None:
    directives = proxy_directives()
    assert proxy_bytes(directives["client_max_body_size"]) == GATEWAY.default("max_body_bytes")
    assert proxy_seconds(directives["client_header_timeout"]) == GATEWAY.default("header_timeout")
    assert proxy_seconds(directives["client_body_timeout"]) == GATEWAY.default("body_timeout")


def test_the_proxy_config_parser_reads_what_it_checks() -> None:
    assert proxy_seconds("330s") == 330 and proxy_seconds("5m") == 300 and proxy_seconds("30") == 30
    assert proxy_bytes("4m") == 4 * 1024 * 1024 and proxy_bytes("64k") == 65536
    assert set(proxy_directives()) >= {"proxy_read_timeout", "proxy_send_timeout", "client_max_body_size"}


def gunicorn_setting(name: str) -> Any:
    """A literal assignment in conf/gunicorn.conf.py (read, not run: running it loads the registry)."""
    tree = ast.parse((ROOT / "conf/gunicorn.conf.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(name)


def test_gunicorns_graceful_timeout_is_the_drain_the_gateway_allows() -> None:
    from gateway.runtime import DRAIN_TIMEOUT

    assert gunicorn_setting("graceful_timeout") == DRAIN_TIMEOUT


def test_systemd_waits_longer_than_gunicorns_graceful_timeout() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((ROOT / "conf/mcp-gateway.service").read_text())
    assert int(unit["Service"]["TimeoutStopSec"]) > gunicorn_setting("graceful_timeout")


def test_gunicorns_worker_connections_leave_room_for_max_streams(tmp_path: Path) -> None:
    """Derived in conf/gunicorn.conf.py from the registry: streams past worker_connections would be refused."""
    registry = tmp_path / "registry.yaml"
    registry.write_text("servers: {}\ngateway: {max_streams: 5000, session_secret: " + "s" * 32 + "}\n")
    env = {**os.environ, "MCP_GATEWAY_REGISTRY": str(registry), "MCP_GATEWAY_RUNTIME_DIR": str(tmp_path / "run"),
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "run" / "metrics")}
    done = subprocess.run([sys.executable, "-c", "import runpy; print(runpy.run_path('conf/gunicorn.conf.py')"
                           "['worker_connections'])"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == 5000 + 1000
