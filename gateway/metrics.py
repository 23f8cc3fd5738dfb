"""Prometheus metrics: what the gateway counts, and the /metrics page.

Counters and histograms are recorded where things happen (a request ends, a
process is replaced, an instance is ejected). Under gunicorn every worker
writes them to prometheus_client's multiprocess files in the runtime
directory (see rundir.py), so the worker that answers /metrics adds up the
whole gateway, dead workers' counts included. Gauges (pool processes, waiting
requests, instance health) are not kept in those files: they are read at
scrape time from the whole-gateway status, the same numbers /status shows,
so a server removed by a reload leaves no stale series behind.

Label values are bounded: `server` is a registry id ("unknown" for others),
`method` is a known MCP method, "other", or the HTTP verb of a GET/DELETE. `reason` is one of scope.py's
three reasons.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from flask import Response
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .rundir import METRICS_ENV

if TYPE_CHECKING:
    from .exchange import Exchange

REQUESTS = Counter(
    "mcp_gateway_requests_total", "Requests to MCP servers, by server, MCP method and outcome.",
    ["server", "method", "outcome"],
)
REQUEST_SECONDS = Histogram(
    "mcp_gateway_request_duration_seconds", "Time from request to the end of its answer (a stream to its last byte).",
    ["server", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UPSTREAM_ERRORS = Counter(
    "mcp_gateway_upstream_errors_total", "Failures of upstream processes and instances, by kind.", ["server", "kind"],
)
RETRIES = Counter("mcp_gateway_retries_total", "Requests tried again on another process or instance.", ["server"])
EJECTIONS = Counter(
    "mcp_gateway_ejections_total", "Instances ejected after consecutive failures of real traffic.", ["server", "instance"],
)
PROCESS_STARTS = Counter("mcp_gateway_process_starts_total", "stdio processes started.", ["server"])
PROCESS_START_FAILURES = Counter(
    "mcp_gateway_process_start_failures_total", "stdio processes that failed to start or to answer the handshake.",
    ["server"],
)
PROCESS_RESTARTS = Counter(
    "mcp_gateway_process_restarts_total", "stdio processes replaced because they exited, hung or misbehaved.", ["server"],
)
NOTIFICATIONS_DROPPED = Counter(
    "mcp_gateway_notifications_dropped_total",
    "Notifications of pooled stdio processes not delivered: not tied to the request being served (see scope.py).",
    ["server", "reason"],
)
STREAMS_STARTED = Counter("mcp_gateway_streams_started_total", "Pass-through streams handed to a worker's relay.")
STREAMS_ENDED = Counter(
    "mcp_gateway_streams_ended_total", "Relayed streams ended, by why: ended, client_gone, slow_client, "
    "upstream_broken, cancelled, shutdown, error, refused (past max_streams).", ["reason"],
)
RELOADS = Counter(
    "mcp_gateway_registry_reloads_total", "Registry changes seen by a worker, applied or rejected.", ["outcome"],
)

KNOWN_METHODS = frozenset({
    "initialize", "ping", "server/discover", "tools/list", "tools/call", "resources/list",
    "resources/templates/list", "resources/read", "resources/subscribe", "resources/unsubscribe", "prompts/list",
    "prompts/get", "completion/complete", "logging/setLevel", "subscriptions/listen", "tasks/get", "tasks/list",
    "tasks/result", "tasks/cancel", "notifications/initialized", "notifications/cancelled",
    "notifications/progress", "notifications/roots/list_changed",
})


def method_label(http_method: str, mcp_method: str | None) -> str:
    if http_method != "POST":
        return http_method
    if mcp_method is None:
        return "none"  # a client's reply to a server's request, or a body that did not parse
    return mcp_method if mcp_method in KNOWN_METHODS else "other"


def outcome(status: int, rpc_error: bool = False) -> str:
    if status < 400:
        return "rpc_error" if rpc_error else "ok"
    if status in (401, 403):
        return "denied"
    if status < 500:
        return "rejected"
    return {502: "upstream_error", 503: "unavailable", 504: "timeout"}.get(status, "error")


def error_kind(exc: BaseException) -> str:
    """A bounded label for an upstream failure: its class's `kind`."""
    return str(getattr(exc, "kind", "failed"))


def record(exchange: Exchange, status: int) -> None:
    """Count and time a finished request to an MCP server (exchange.py calls this)."""
    server = exchange.server_id if exchange.served and exchange.server_id else "unknown"
    method = method_label(exchange.method, exchange.mcp_method)
    REQUESTS.labels(server, method, outcome(status, exchange.rpc_error)).inc()
    REQUEST_SECONDS.labels(server, method).observe(time.perf_counter() - exchange.started)


# --- the page ------------------------------------------------------------------


class StatusGauges:
    """Gauges read from a whole-gateway status (see status.py) at scrape time."""

    def __init__(self, gateway_status: Mapping[str, Any]):
        self.status = gateway_status

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily("mcp_gateway_workers", "gunicorn workers serving this gateway.")
        workers.add_metric([], len(self.status["workers"]))
        streams = GaugeMetricFamily("mcp_gateway_streams_open", "Pass-through streams open, over all workers.")
        streams.add_metric([], sum(worker.get("streams", 0) for worker in self.status["workers"]))
        up = GaugeMetricFamily("mcp_gateway_server_up", "1 when the server can serve (in every worker).", labels=["server"])
        processes = GaugeMetricFamily(
            "mcp_gateway_pool_processes", "stdio processes, by state, over all workers.", labels=["server", "state"],
        )
        limit = GaugeMetricFamily(
            "mcp_gateway_pool_max_processes", "Most stdio processes the pools may hold, over all workers.",
            labels=["server"],
        )
        waiting = GaugeMetricFamily(
            "mcp_gateway_pool_waiting_requests", "Requests waiting for a free stdio process.", labels=["server"],
        )
        instance_up = GaugeMetricFamily(
            "mcp_gateway_instance_up", "1 when an HTTP instance is up and not ejected in every worker.",
            labels=["server", "instance"],
        )
        in_flight = GaugeMetricFamily(
            "mcp_gateway_instance_in_flight_requests", "Requests an HTTP instance is answering now.",
            labels=["server", "instance"],
        )
        sessions = GaugeMetricFamily(
            "mcp_gateway_dedicated_sessions", "Dedicated stdio sessions (a process each), by owner worker.",
            labels=["server", "owner"],
        )
        for server_id, server in self.status["servers"].items():
            for owner, count in (server.get("sessions") or {}).get("by_owner", {}).items():
                sessions.add_metric([server_id, owner], count)
            up.add_metric([server_id], 1.0 if server.get("healthy") else 0.0)
            if "pool_size" in server:
                for state in ("idle", "busy", "starting"):
                    processes.add_metric([server_id, state], server[state])
                limit.add_metric([server_id], server["capacity"])
                waiting.add_metric([server_id], server["waiting"])
            for instance in server.get("instances", ()):
                routable = instance["healthy"] and not instance["ejected"]
                instance_up.add_metric([server_id, instance["endpoint"]], 1.0 if routable else 0.0)
                in_flight.add_metric([server_id, instance["endpoint"]], instance["in_flight"])
        yield from (workers, streams, up, processes, limit, waiting, instance_up, in_flight, sessions)


def render(gateway_status: Mapping[str, Any]) -> Response:
    gauges = CollectorRegistry()
    gauges.register(StatusGauges(gateway_status))
    if os.environ.get(METRICS_ENV):  # every worker's files, dead ones included
        multiprocess.MultiProcessCollector(gauges)  # type: ignore[no-untyped-call]
        page = generate_latest(gauges)
    else:  # outside gunicorn's master: this process's own samples
        page = generate_latest(REGISTRY) + generate_latest(gauges)
    return Response(page, content_type=CONTENT_TYPE_LATEST)
