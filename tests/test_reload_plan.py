"""The reload plan: what a new registry changes against the running one, as a pure diff (no processes)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from gateway import registry
from gateway.reload import ReloadPlan, plan_reload

TIME = {"type": "stdio", "command": ["mcp-server-time"]}
WEB = {"type": "http", "instances": [{"endpoint": "http://127.0.0.1:9"}]}
HTTP_TEMPLATE = {"type": "template", "template_name": "demo", "transport": "http", "instances": 1}
STDIO_TEMPLATE = {"type": "template", "template_name": "demo"}


def parsed(servers: dict[str, Any], gateway: dict[str, Any] | None = None) -> registry.Registry:
    text = json.dumps({"servers": servers, **({"gateway": gateway} if gateway else {})})
    return registry.parse(text, "/nonexistent/registry.json")


def test_servers_are_sorted_into_added_changed_removed_and_unchanged() -> None:
    old = parsed({"keep": TIME, "change": TIME, "remove": TIME, "web": WEB})
    new = parsed({"keep": TIME, "change": {**TIME, "description": "v2"}, "added": TIME, "web": WEB})
    plan = plan_reload(old, new)
    assert plan.added == {"added"}
    assert plan.changed == {"change"}
    assert plan.removed == {"remove"}
    assert plan.unchanged == {"keep", "web"}
    assert plan.rebuilt == {"added", "change"}, "added and changed servers get new upstreams"
    assert plan.draining == ("change", "remove"), "replaced upstreams drain, in a stable order"
    assert not plan.templates and not plan.moves_listener


def test_the_same_registry_plans_nothing() -> None:
    old = parsed({"a": TIME, "web": WEB})
    plan = plan_reload(old, parsed({"a": TIME, "web": WEB}))
    assert plan == ReloadPlan(added=frozenset(), changed=frozenset(), removed=frozenset(),
                              unchanged=frozenset({"a", "web"}), templates=frozenset(), moves_listener=False)


def test_a_gateway_section_only_change_keeps_every_server() -> None:
    old = parsed({"a": TIME}, {"max_body_bytes": 1024})
    plan = plan_reload(old, parsed({"a": TIME}, {"max_body_bytes": 2048, "allowed_hosts": ["gw.example"]}))
    assert plan.unchanged == {"a"} and not (plan.added or plan.changed or plan.removed or plan.draining)
    assert not plan.moves_listener
    assert plan_reload(old, parsed({"a": TIME}, {"max_body_bytes": 1024, "port": 8001})).moves_listener
    assert plan_reload(old, parsed({"a": TIME}, {"max_body_bytes": 1024, "host": "127.0.0.2"})).moves_listener


def test_a_server_changing_type_is_changed_and_drains() -> None:
    plan = plan_reload(parsed({"s": TIME}), parsed({"s": WEB}))
    assert plan.changed == {"s"} and plan.draining == ("s",) and plan.rebuilt == {"s"}
    assert not plan.templates, "neither side is an http template: this worker rebuilds it"


@pytest.mark.parametrize(("before", "after"), [
    ({"t": HTTP_TEMPLATE}, {"t": {**HTTP_TEMPLATE, "config": {"hello_from": "Second"}}}),  # changed
    ({}, {"t": HTTP_TEMPLATE}),  # added
    ({"t": HTTP_TEMPLATE}, {}),  # removed
    ({"t": TIME}, {"t": HTTP_TEMPLATE}),  # a stdio server becomes an http template
    ({"t": HTTP_TEMPLATE}, {"t": WEB}),  # and back to a plain http server
])
def test_a_change_touching_an_http_template_is_the_masters(before: dict[str, Any], after: dict[str, Any]) -> None:
    plan = plan_reload(parsed({"other": TIME, **before}), parsed({"other": TIME, **after}))
    assert plan.templates == {"t"}, "its processes are gunicorn's master's: a HUP, not this worker"
    assert "other" in plan.unchanged


def test_unchanged_http_templates_and_changed_stdio_templates_are_not_the_masters() -> None:
    old = parsed({"h": HTTP_TEMPLATE, "s": STDIO_TEMPLATE})
    plan = plan_reload(old, parsed({"h": HTTP_TEMPLATE, "s": {**STDIO_TEMPLATE, "description": "v2"}}))
    assert plan.changed == {"s"} and plan.unchanged == {"h"} and not plan.templates


def test_a_plan_is_an_immutable_value() -> None:
    plan = plan_reload(parsed({"a": TIME}), parsed({"b": TIME}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.added = frozenset()  # type: ignore[misc]
    assert plan == plan_reload(parsed({"a": TIME}), parsed({"b": TIME})), "the same two registries, the same plan"
