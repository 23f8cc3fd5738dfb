"""The lease table: lookup and counting of the requests holding each upstream, across a swap (no processes)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway import errors, registry
from gateway.leases import Draining, Leases


class FakeUpstream:
    """Stands in for an upstream: the table only keys on it and hands it out."""

    def __init__(self, server_id: str):
        self.server_id = server_id


class FakeExchange:
    served = False
    release: Any = None


def upstream(server_id: str) -> Any:
    return FakeUpstream(server_id)


def exchange() -> Any:
    return FakeExchange()


def parsed(servers: dict[str, Any]) -> registry.Registry:
    return registry.parse(json.dumps({"servers": servers}), "/nonexistent/registry.json")


def entry(**settings: Any) -> dict[str, Any]:
    return {"type": "stdio", "command": ["mcp-server-time"], **settings}


def test_checkout_hands_out_the_upstream_and_counts_the_lease_until_released() -> None:
    a = upstream("a")
    leases = Leases(parsed({"a": entry()}), {"a": a})
    held = exchange()
    assert leases.checkout("a", held) is a
    assert held.served and leases.holding(a) == 1
    held.release()
    assert leases.holding(a) == 0


def test_an_unknown_server_is_refused_and_nothing_is_held() -> None:
    leases = Leases(parsed({"a": entry()}), {"a": upstream("a")})
    held = exchange()
    with pytest.raises(errors.UnknownServer, match="no MCP server 'b'"):
        leases.checkout("b", held)
    assert held.release is None and not held.served


def test_a_server_at_its_limit_is_overloaded() -> None:
    leases = Leases(parsed({"a": entry(max_concurrent=1, max_queued=0)}), {"a": upstream("a")})
    leases.checkout("a", exchange())
    with pytest.raises(errors.Overloaded):
        leases.checkout("a", exchange())


def test_a_swap_keeps_unchanged_upstreams_counts_and_drains_replaced_ones_until_released() -> None:
    kept, old = upstream("keep"), upstream("change")
    first = parsed({"keep": entry(), "change": entry()})
    leases = Leases(first, {"keep": kept, "change": old})
    on_kept, on_old = exchange(), exchange()
    leases.checkout("keep", on_kept)
    leases.checkout("change", on_old)

    new = upstream("change")
    second = parsed({"keep": entry(), "change": entry(description="v2")})
    leases.swap(second, {"keep": kept, "change": new}, [Draining("change", old, deadline=100.0)])
    assert leases.table.registry is second and leases.checkout("change", exchange()) is new
    assert leases.holding(kept) == 1, "an unchanged upstream keeps its bulkhead, and its count"
    assert leases.holding(old) == 1 and [d.upstream for d in leases.table.draining] == [old]
    assert leases.drained(now=50.0) == [], "held, and before its deadline"

    on_old.release()  # the request on the replaced upstream ends: its slot goes back to its own bulkhead
    [(done, holding)] = leases.drained(now=50.0)
    assert done.upstream is old and holding == 0
    assert not leases.table.draining and old not in leases.table.bulkheads
    assert leases.drained(now=50.0) == [], "forgotten once drained"


def test_a_replaced_upstream_still_held_at_its_deadline_is_handed_back_with_its_holders() -> None:
    old = upstream("a")
    leases = Leases(parsed({"a": entry()}), {"a": old})
    leases.checkout("a", exchange())
    leases.swap(parsed({"a": entry(description="v2")}), {"a": upstream("a")},
                [Draining("a", old, deadline=10.0)])
    [(done, holding)] = leases.drained(now=10.0)
    assert done.upstream is old and holding == 1
