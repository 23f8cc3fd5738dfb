"""The reload plan: what serving a new registry changes against the running one.

A pure diff of two registries, no I/O: which servers are added, changed,
removed and unchanged, which of the changes touch http templates (their
processes are gunicorn's master's, so it must reload, HUP, instead of this
worker), what drains and whether the listening address moves. The gateway
(runtime.py) carries the plan out.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import Registry


@dataclass(frozen=True)
class ReloadPlan:
    added: frozenset[str]
    changed: frozenset[str]  # in both registries, with a different entry (a change of type included)
    removed: frozenset[str]
    unchanged: frozenset[str]  # keep their upstream: pool, connections, health and sessions go on
    templates: frozenset[str]  # added, changed or removed servers that are (or were) http templates
    moves_listener: bool  # gateway.host/port changed: only a HUP or a restart binds anew

    @property
    def rebuilt(self) -> frozenset[str]:
        """The servers that get a new upstream."""
        return self.added | self.changed

    @property
    def draining(self) -> tuple[str, ...]:
        """The servers whose running upstream is replaced, and drains."""
        return tuple(sorted(self.changed | self.removed))


def plan_reload(old: Registry, new: Registry) -> ReloadPlan:
    """What serving `new` instead of `old` takes."""
    added = frozenset(new.servers.keys() - old.servers.keys())
    removed = frozenset(old.servers.keys() - new.servers.keys())
    kept = new.servers.keys() & old.servers.keys()
    changed = frozenset(sid for sid in kept if old.servers[sid] != new.servers[sid])
    templates = frozenset(
        sid for sid in added | changed | removed
        if any(entry is not None and entry.launch is not None for entry in (old.servers.get(sid), new.servers.get(sid))))
    return ReloadPlan(added=added, changed=changed, removed=removed, unchanged=frozenset(kept - changed),
                      templates=templates,
                      moves_listener=(old.gateway.host, old.gateway.port) != (new.gateway.host, new.gateway.port))
