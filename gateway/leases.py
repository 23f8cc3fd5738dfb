"""Leases: which upstream serves each server id, and the requests that hold each upstream.

A request leases its server's upstream for as long as its response is open
(`checkout`; the exchange's `release` hands it back). A reload swaps in the
upstreams of a new registry; the ones it replaced go on draining: no
server id leads to them any more, but the requests holding them finish
there, and each is closed once none holds it (or its deadline passed).

Everything a reader needs is one immutable `Table` (the registry, its
upstreams, each upstream's bulkhead, what drains), replaced whole under one
lock and read without any: `checkout`, on every request, is one dict
lookup and the bulkhead's acquire, and whatever version of the table it
sees is consistent.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from . import errors
from .bulkhead import Bulkhead
from .logtext import quoted
from .registry import Registry, ServerEntry
from .supervisor import Supervisor
from .upstreams import MessageUpstream
from .upstreams.http import HttpUpstream

if TYPE_CHECKING:
    from .exchange import Exchange

AnyUpstream = MessageUpstream | HttpUpstream


@dataclass(frozen=True)
class Draining:
    """An upstream a reload replaced, closed when the requests holding it end."""

    server_id: str
    upstream: AnyUpstream
    deadline: float  # time.monotonic(): closed then even if requests still hold it
    supervisor: Supervisor | None = None  # its http template's processes, when this worker runs them

    def close(self) -> None:
        self.upstream.close()
        if self.supervisor is not None:
            self.supervisor.stop()


@dataclass(frozen=True)
class Table:
    """One version of the leases, never changed once made."""

    registry: Registry
    upstreams: Mapping[str, AnyUpstream]
    # What checkout needs, in one lookup.
    routes: Mapping[str, tuple[AnyUpstream, Bulkhead]]
    # Each upstream's share of the worker's threads, which also counts the requests holding it;
    # a draining upstream keeps its own until it is closed, so its requests still give their slot back.
    bulkheads: Mapping[AnyUpstream, Bulkhead]
    draining: tuple[Draining, ...] = ()


class Leases:
    def __init__(self, registry: Registry, upstreams: Mapping[str, AnyUpstream]):
        self._lock = threading.Lock()  # writers only: swap and drained
        self.table = _table(registry, dict(upstreams), {}, ())

    def checkout(self, server_id: str, exchange: Exchange) -> AnyUpstream:
        """The upstream serving `server_id`, held by `exchange` until its response closes."""
        route = self.table.routes.get(server_id)
        if route is None:
            raise errors.UnknownServer(f"no MCP server {quoted(server_id)} in this gateway's registry")
        exchange.served = True
        upstream, bulkhead = route
        bulkhead.acquire()  # errors.Overloaded when the server has all the threads it may have
        exchange.release = bulkhead.release
        return upstream

    def holding(self, upstream: AnyUpstream) -> int:
        """Requests that hold `upstream` now."""
        bulkhead = self.table.bulkheads.get(upstream)
        return bulkhead.active if bulkhead is not None else 0

    def swap(self, registry: Registry, upstreams: Mapping[str, AnyUpstream], draining: Sequence[Draining]) -> None:
        """Serve `registry` with `upstreams`; `draining` (the upstreams they replace) go on counting their holders."""
        with self._lock:
            old = self.table
            self.table = _table(registry, dict(upstreams), old.bulkheads, (*old.draining, *draining))

    def drained(self, now: float) -> list[tuple[Draining, int]]:
        """The draining upstreams to close now, each with the requests that still hold it (past its deadline);
        they are forgotten, and closing them is the caller's."""
        with self._lock:
            table = self.table
            done = [(item, self.holding(item.upstream)) for item in table.draining]
            done = [(item, holding) for item, holding in done if not holding or now >= item.deadline]
            if not done:
                return []
            gone = {item.upstream for item, _ in done}
            self.table = replace(table, draining=tuple(item for item in table.draining if item.upstream not in gone),
                                 bulkheads={u: b for u, b in table.bulkheads.items() if u not in gone})
        return done


def _table(registry: Registry, upstreams: dict[str, AnyUpstream], bulkheads: Mapping[AnyUpstream, Bulkhead],
           draining: tuple[Draining, ...]) -> Table:
    """A table serving `upstreams`: an upstream kept from `bulkheads` keeps its bulkhead, a new one gets its own."""
    routes = {sid: (upstream, bulkheads.get(upstream) or _bulkhead(registry.servers[sid]))
              for sid, upstream in upstreams.items()}
    kept = {item.upstream: bulkheads[item.upstream] for item in draining}
    return Table(registry, upstreams, routes, {**kept, **dict(routes.values())}, draining)


def _bulkhead(entry: ServerEntry) -> Bulkhead:
    return Bulkhead(entry.id, entry.max_concurrent, entry.max_queued, entry.queue_timeout)
