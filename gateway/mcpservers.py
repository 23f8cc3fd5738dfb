"""The `mcpServers` JSON of desktop MCP clients, turned into a registry.

Entries with `command`/`args`/`env` (and optional `cwd`) become stdio servers;
entries with `url` (and optional `headers`) become HTTP servers whose single
instance is the URL's origin and whose MCP path is the URL's path. Names that
are not valid server ids are made into ones.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def is_mcp_servers(data: Any) -> bool:
    return isinstance(data, dict) and "mcpServers" in data and "servers" not in data


def server_id(name: str) -> str:
    cleaned = _UNSAFE.sub("-", name).strip("-.") or "server"
    return cleaned[:64]


def to_registry(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A registry dict for `data`, and the entries that could not be converted (as problems)."""
    servers: dict[str, Any] = {}
    problems: list[str] = []
    entries = data.get("mcpServers")
    if not isinstance(entries, dict):
        return {"servers": servers}, ["mcpServers: must be an object of named servers"]
    for name, entry in entries.items():
        where = f"mcpServers.{name}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be an object")
            continue
        if entry.get("disabled") is True:
            continue
        sid = server_id(str(name))
        if sid in servers:
            problems.append(f"{where}: its id '{sid}' is already taken by another entry")
            continue
        if "command" in entry:
            server: dict[str, Any] = {"type": "stdio", "command": [str(entry["command"]), *map(str, entry.get("args") or [])]}
            if entry.get("env"):
                server["env_vars"] = {str(k): str(v) for k, v in entry["env"].items()}
            if entry.get("cwd"):
                server["working_dir"] = str(entry["cwd"])
        elif "url" in entry:
            kind = str(entry.get("type") or entry.get("transport") or "http").lower()
            if kind == "sse":
                problems.append(f"{where}: the deprecated HTTP+SSE transport is not supported; use Streamable HTTP")
                continue
            url = urlsplit(str(entry["url"]))
            if url.scheme not in ("http", "https") or not url.netloc:
                problems.append(f"{where}.url: '{entry['url']}' is not an http(s) URL")
                continue
            server = {"type": "http", "instances": [{"endpoint": f"{url.scheme}://{url.netloc}"}],
                      "mcp_path": url.path or "/"}
            if entry.get("headers"):
                server["headers"] = {str(k): str(v) for k, v in entry["headers"].items()}
        else:
            problems.append(f"{where}: has neither \"command\" nor \"url\"")
            continue
        if sid != name:
            server["description"] = f"imported from mcpServers entry '{name}'"
        servers[sid] = server
    return {"servers": servers}, problems
