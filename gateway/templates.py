"""Server templates: MCP servers a registry entry can name instead of spelling out.

A template (YAML or JSON) says how to run a server over stdio and/or HTTP
(an argv list, never a shell string), the JSON Schema of its `config`, and
how each config key reaches the server (an environment variable or an
argument), with defaults taken from the schema. Built-in templates live in
gateway/catalog/; user folders named in the registry come after them, so a
user template with the same name wins.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import TemplateError
from .settings import HTTP

TEMPLATE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Launch:
    """A template resolved with one entry's config: what to run and how to reach it."""

    transport: str
    command: tuple[str, ...]  # {host} and {port} still to fill for http
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    mcp_path: str = HTTP.default("mcp_path")
    health_check: str | None = None


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    transport: str
    run: Mapping[str, Mapping[str, Any]]
    config_schema: Mapping[str, Any]
    config_map: Mapping[str, Mapping[str, str]]
    source: str

    def defaults(self) -> dict[str, Any]:
        properties = self.config_schema.get("properties") or {}
        return {key: spec["default"] for key, spec in properties.items() if isinstance(spec, dict) and "default" in spec}

    def config_problems(self, config: Any, where: str) -> list[str]:
        """Problems of `config` against this template's schema, as `where.key: problem`."""
        validator = jsonschema.Draft202012Validator(self.config_schema or {"type": "object"})
        return [
            f"{'.'.join([where, *(str(p) for p in error.absolute_path)])}: {error.message}"
            for error in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
        ]

    def launch(self, config: Mapping[str, Any], transport: str | None = None) -> Launch:
        """Map `config` (already valid) onto argv and environment for `transport`."""
        chosen = transport or self.transport
        run = self.run[chosen]
        command = [sys.executable if part == "{python}" else part for part in run["command"]]
        env: dict[str, str] = {}
        for key, value in {**self.defaults(), **config}.items():
            how = self.config_map.get(key)
            if how is None:
                continue
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            if "env" in how:
                env[how["env"]] = text
            else:
                command += [how["arg"], text]
        return Launch(
            transport=chosen, command=tuple(command), env=env, working_dir=run.get("working_dir"),
            mcp_path=run.get("mcp_path", HTTP.default("mcp_path")), health_check=run.get("health_check"),
        )

    def describe(self) -> dict[str, Any]:
        keys = {}
        for key, spec in (self.config_schema.get("properties") or {}).items():
            how = self.config_map.get(key, {})
            keys[key] = {"default": spec.get("default"), "description": spec.get("description", ""),
                         "reaches_server_as": f"env {how['env']}" if "env" in how else f"arg {how.get('arg', '-')}"}
        return {"name": self.name, "description": self.description, "transports": sorted(self.run),
                "default_transport": self.transport, "config": keys, "source": self.source}


@cache
def _template_schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        resources.files("gateway").joinpath("schema/template.schema.json").read_text("utf-8"))
    return loaded


def parse_template(name: str, text: str, source: str) -> Template:
    try:
        data = json.loads(text) if source.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise TemplateError([f"{source}: not valid {'JSON' if source.endswith('.json') else 'YAML'}: {exc}"]) from None
    validator = jsonschema.Draft202012Validator(_template_schema())
    problems = [f"{source}: {'.'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}"
                for e in validator.iter_errors(data)]
    if not problems:
        if data["transport"] not in data["run"]:
            problems.append(f"{source}: transport: '{data['transport']}' has no entry under run")
        for key in data.get("config_map", {}):
            if key not in (data.get("config_schema", {}).get("properties") or {}):
                problems.append(f"{source}: config_map.{key}: not a property of config_schema")
    if problems:
        raise TemplateError(problems)
    return Template(
        name=name, description=data["description"], transport=data["transport"], run=data["run"],
        config_schema=data.get("config_schema") or {"type": "object", "additionalProperties": False},
        config_map=data.get("config_map") or {}, source=source,
    )


def builtin_templates() -> dict[str, Template]:
    folder = resources.files("gateway").joinpath("catalog")
    return {
        Path(item.name).stem: parse_template(Path(item.name).stem, item.read_text("utf-8"), f"(built-in) {item.name}")
        for item in sorted(folder.iterdir(), key=lambda i: i.name)
        if item.name.endswith(TEMPLATE_SUFFIXES)
    }


def catalog(user_dirs: Iterable[Path] = ()) -> dict[str, Template]:
    """Built-in templates, then each user folder in order; a later one wins a name."""
    templates = builtin_templates()
    problems: list[str] = []
    for folder in user_dirs:
        if not folder.is_dir():
            problems.append(f"{folder}: template folder does not exist")
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix in TEMPLATE_SUFFIXES:
                try:
                    templates[path.stem] = parse_template(path.stem, path.read_text("utf-8"), str(path))
                except TemplateError as exc:
                    problems.extend(exc.problems)
    if problems:
        raise TemplateError(problems)
    return templates
