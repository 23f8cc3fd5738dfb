"""Fixtures: registries written to tmp files, the Flask app, real gunicorn, real MCP servers over HTTP.

The helpers behind them live in tests/harness.py; the collection hook at the end
marks the tests that start processes (`make test-unit` leaves those out).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import Gunicorn, McpHttpServer, write_registry


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Any]:
    """Factory: gunicorn(servers, **options) -> a started Gunicorn, checked at teardown."""
    started: list[Gunicorn] = []

    def start(servers: dict[str, Any], gateway: dict[str, Any] | None = None, **options: Any) -> Gunicorn:
        registry = write_registry(tmp_path, servers, gateway, name=f"registry-{len(started)}.yaml")
        instance = Gunicorn(registry, **options)
        started.append(instance)
        instance.wait_ready()
        return instance

    yield start
    for instance in started:
        instance.stop_and_check()


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Any]:
    """Factory: make_app(servers, gateway=None) -> a Flask app; its children are stopped after."""
    from gateway import create_app, runtime

    apps = []

    def make(servers: dict[str, Any], gateway: dict[str, Any] | None = None) -> Any:
        registry = write_registry(tmp_path, servers, {"session_secret": "x" * 32, **(gateway or {})}, name=f"r{len(apps)}.json")
        app = create_app({"TESTING": True, "REGISTRY_PATH": str(registry)})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions[runtime.EXTENSION_KEY].close()


@pytest.fixture(scope="module")
def http_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[McpHttpServer]]:
    """Two instances of the SDK test server over HTTP, stopped (by PID) after the module."""
    folder = tmp_path_factory.mktemp("http-servers")
    servers: list[McpHttpServer] = []
    try:
        servers = [McpHttpServer(folder) for _ in range(2)]
        yield servers
    finally:
        for server in servers:
            server.stop()
        assert all(server.process.poll() is not None for server in servers)


# --- unit and integration tests ----------------------------------------------------------
# `make test-unit` runs the tests that start no process (gunicorn, nginx, an MCP server) and so
# take milliseconds (`-m "not integration"`): the fast loop. A test is integration when it, or a
# fixture it uses, names what starts one.
_STARTS_SERVERS = ("Gunicorn(", "McpHttpServer(", "gunicorn(", "make_app", "TIME_SERVER", "server_command(",
                   "subprocess.", "StdioProcess(", "StdioUpstream(", "spawn(")


def _starts_servers(function: Any, seen: set[Any]) -> bool:
    import inspect

    if function in seen:
        return False
    seen.add(function)
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return any(marker in source for marker in _STARTS_SERVERS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        seen: set[Any] = set()
        functions = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        for definitions in (info.name2fixturedefs.values() if info is not None else ()):
            functions += [definition.func for definition in definitions]
        if any(_starts_servers(function, seen) for function in functions if function is not None):
            item.add_marker(pytest.mark.integration)
