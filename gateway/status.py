"""The whole gateway's status, combined from every worker's own view.

Each gunicorn worker has its own pools, health checks and counters; its
upkeep thread publishes them to the runtime directory every second. The
worker answering /status (or /metrics) takes its own view fresh and the
others' from there, and combines them server by server: process counts add
up (`capacity` is pool_size, which is per worker, times the workers), a
server is healthy when it is healthy in every worker, an HTTP instance is up
when every worker routes to it, and the latest error wins.
Each worker's own numbers stay visible under `by_worker`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# stdio pools: these add up over workers; the rest (pool_size, ...) is the same in each.
POOL_TOTALS = ("processes", "alive", "busy", "idle", "starting", "waiting", "restarts", "spawned")
POOL_WORST = ("spawn_failures", "next_spawn_in")
INSTANCE_TOTALS = ("in_flight", "times_ejected")
INSTANCE_WORST = ("consecutive_failures", "failed_checks", "ejected_for")


def combine(own: dict[str, Any], siblings: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`own` (this worker's view) and its siblings' as one gateway."""
    views = [own, *siblings]
    servers: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for view in views:
        for server_id, server in view["servers"].items():
            servers.setdefault(server_id, []).append((view["pid"], server))
    return {
        "answered_by": own["pid"],
        "registry": own["registry"],
        "workers": [
            {"pid": view["pid"], "owner": view.get("owner"), "started": view["started"], "registry_digest": view["registry"]["digest"],
             "draining": view["draining"], "streams": view.get("streams", 0),
             "websockets": view.get("websockets", 0)}
            for view in views
        ],
        "servers": {server_id: _server([s for _, s in found], found) for server_id, found in servers.items()},
    }


def _server(views: list[dict[str, Any]], found: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    merged = _pool(views, found) if "pool_size" in views[0] else _http(views) if "instances" in views[0] else dict(views[0])
    if len(views) > 1:
        merged["by_worker"] = {str(pid): view for pid, view in found}
    return merged


def _pool(views: list[dict[str, Any]], found: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    merged = _added_up(views, POOL_TOTALS, POOL_WORST)
    merged["capacity"] = sum(view["pool_size"] for view in views)  # pool_size is per worker
    merged["pids"] = sorted(pid for view in views for pid in view["pids"])
    merged["healthy"] = all(view["healthy"] for view in views)
    if "sessions" in views[0]:
        merged["sessions"] = _sessions(found)
    return merged


def _sessions(found: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Dedicated sessions over all workers; each lives in one worker, its owner (by_owner: worker pid -> count)."""
    idle = [view["sessions"]["oldest_idle"] for _, view in found if view["sessions"]["oldest_idle"] is not None]
    return {"count": sum(view["sessions"]["count"] for _, view in found),
            "max": sum(view["sessions"]["max"] for _, view in found),
            "oldest_idle": max(idle) if idle else None,
            "pids": sorted(pid for _, view in found for pid in view["sessions"]["pids"]),
            "by_owner": {str(worker): view["sessions"]["count"] for worker, view in found}}


def _http(views: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(views[0])
    merged["healthy"] = all(view["healthy"] for view in views)
    merged["routable"] = min(view["routable"] for view in views)
    merged["retries"] = sum(view["retries"] for view in views)
    instances: dict[str, list[dict[str, Any]]] = {}
    for view in views:
        for instance in view["instances"]:
            instances.setdefault(instance["endpoint"], []).append(instance)
    merged["instances"] = [_instance(seen) for seen in instances.values()]
    return merged


def _instance(views: list[dict[str, Any]]) -> dict[str, Any]:
    merged = _added_up(views, INSTANCE_TOTALS, INSTANCE_WORST)
    merged["healthy"] = all(view["healthy"] for view in views)
    merged["checked"] = all(view["checked"] for view in views)
    merged["ejected"] = any(view["ejected"] for view in views)
    return merged


def _added_up(views: list[dict[str, Any]], totals: Sequence[str], worst: Sequence[str]) -> dict[str, Any]:
    """The first view, with `totals` summed, the largest of `worst`, and the latest error."""
    merged = dict(views[0])
    for key in totals:
        merged[key] = sum(view[key] for view in views)
    for key in worst:
        values = [view[key] for view in views if key in view]
        if values:
            merged[key] = max(values)
    merged["last_error"] = _latest(view["last_error"] for view in views)
    return merged


def _latest(errors: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The most recent error (`at` is an ISO-8601 UTC time, so text order is time order)."""
    seen = [error for error in errors if error]
    return max(seen, key=lambda error: str(error["at"])) if seen else None
