"""/metrics and /status answer for the whole gateway, whichever worker takes the request.

Real gunicorn with two workers, in front of real stdio servers (one healthy,
one that dies on every call) and a real HTTP server next to a port nobody
listens on. Each worker only ever sees part of the traffic, so a page that
reported one worker's numbers would fall short of the totals asserted here.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .harness import (
    TIME_SERVER,
    Gunicorn,
    McpHttpServer,
    curl,
    free_port,
    server_command,
    wait_for,
    write_registry,
)

MODERN = {"MCP-Protocol-Version": "2026-07-28", "Accept": "application/json, text/event-stream",
          "Content-Type": "application/json"}
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
NOW = {"name": "get_current_time", "arguments": {"timezone": "UTC"}}


@pytest.fixture(scope="module")
def dead_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, http_servers: list[McpHttpServer], dead_port: int) -> Iterator[Gunicorn]:
    servers = {
        "time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 2, "pool_min": 1},
        "die": {"type": "stdio", "command": server_command("faulty_server.py", "die")},
        # Active checks would take the dead instance down a few seconds after start, and the
        # balancer would then never meet it: the retry test below needs it still routable.
        "web": {"type": "http", "max_fails": 2, "ejection_time": 300, "health_check_fall": 50,
                "instances": [{"endpoint": http_servers[0].url}, {"endpoint": f"http://127.0.0.1:{dead_port}"}]},
    }
    with Gunicorn(write_registry(tmp_path_factory.mktemp("metrics"), servers), workers=2, threads=4).serving() as instance:
        yield instance


def scrape(gateway: Gunicorn) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, by (name, labels)."""
    response = requests.get(f"{gateway.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def served_by(gateway: Gunicorn, server: str) -> set[str]:
    """The worker pids whose access lines name `server`."""
    return set(re.findall(rf"\[(\d+)\] INFO gateway\.access: .*server={re.escape(server)} ", gateway.log()))


def test_request_counts_and_latency_add_up_over_every_worker(gateway: Gunicorn) -> None:
    labels = {"server": "time", "method": "tools/call"}
    before = scrape(gateway)
    sent = 0
    # New connections land on either worker; go on until both have served some (bounded).
    while sent < 200 and (sent < 20 or len(served_by(gateway, "time")) < 2):
        answer = curl(gateway, "time", "tools/call", NOW, request_id=sent)
        assert answer.status_code == 200 and "result" in answer.json()
        sent += 1
    assert len(served_by(gateway, "time")) == 2, "both workers served part of the traffic"

    def counted(samples: Any) -> float:
        return value(samples, "mcp_gateway_requests_total", **labels, outcome="ok") - value(
            before, "mcp_gateway_requests_total", **labels, outcome="ok")

    wait_for(lambda: counted(scrape(gateway)) == sent)
    for _ in range(4):  # whichever worker answers, it answers for both
        samples = scrape(gateway)
        assert counted(samples) == sent
        observed = value(samples, "mcp_gateway_request_duration_seconds_count", **labels) - value(
            before, "mcp_gateway_request_duration_seconds_count", **labels)
        assert observed == sent
        assert value(samples, "mcp_gateway_request_duration_seconds_bucket", **labels, le="+Inf") == value(
            samples, "mcp_gateway_request_duration_seconds_count", **labels)
        assert value(samples, "mcp_gateway_request_duration_seconds_sum", **labels) > 0


def test_outcomes_upstream_errors_and_restarts_are_counted(gateway: Gunicorn) -> None:
    before = scrape(gateway)
    assert curl(gateway, "die", "tools/call", {"name": "work", "arguments": {}}).status_code == 502
    assert curl(gateway, "nowhere", "tools/list").status_code == 404
    bad = requests.post(f"{gateway.url}/time/mcp", data=b"{not json", timeout=10)
    assert bad.status_code == 400
    unknown = curl(gateway, "time", "no/such/method")
    assert unknown.status_code == 200 and "error" in unknown.json()

    expected = {
        ("mcp_gateway_requests_total", ("die", "tools/call", "upstream_error")): 1,
        ("mcp_gateway_requests_total", ("unknown", "none", "rejected")): 1,  # its body is never read
        ("mcp_gateway_requests_total", ("time", "none", "rejected")): 1,
        ("mcp_gateway_requests_total", ("time", "other", "rpc_error")): 1,
    }

    def delta(samples: Any, name: str, server: str, method: str, outcome: str) -> float:
        labels = {"server": server, "method": method, "outcome": outcome}
        return value(samples, name, **labels) - value(before, name, **labels)

    wait_for(lambda: all(delta(scrape(gateway), name, *labels) == n for (name, labels), n in expected.items()))
    grown = (("mcp_gateway_upstream_errors_total", {"server": "die", "kind": "process_failed"}),
             ("mcp_gateway_process_restarts_total", {"server": "die"}),
             ("mcp_gateway_process_starts_total", {"server": "die"}))  # upkeep starts the replacement
    wait_for(lambda: all(value(samples, counter, **labels) - value(before, counter, **labels) >= 1
                         for samples in [scrape(gateway)] for counter, labels in grown))


def test_retries_ejections_and_instance_health_of_an_http_server(gateway: Gunicorn, http_servers: list[McpHttpServer],
                                                                 dead_port: int) -> None:
    dead = f"http://127.0.0.1:{dead_port}"
    with requests.Session() as http:  # one connection: one worker, whose round robin meets the dead instance
        for request_id in range(6):
            answer = http.post(f"{gateway.url}/web/mcp", timeout=10,
                               headers={**MODERN, "Mcp-Method": "tools/list"},
                               json={"jsonrpc": "2.0", "id": request_id, "method": "tools/list",
                                     "params": {"_meta": ENVELOPE}})
            assert answer.status_code == 200 and "result" in answer.json()  # read-only: failed over
    samples = scrape(gateway)
    assert value(samples, "mcp_gateway_retries_total", server="web") >= 2
    assert value(samples, "mcp_gateway_upstream_errors_total", server="web", kind="unreachable") >= 2
    assert value(samples, "mcp_gateway_ejections_total", server="web", instance=dead) >= 1
    # The dead instance is ejected (the gauge is 0 once any worker holds it down); the live one stays up.
    wait_for(lambda: value(scrape(gateway), "mcp_gateway_instance_up", server="web", instance=dead) == 0)
    samples = scrape(gateway)
    assert value(samples, "mcp_gateway_instance_up", server="web", instance=http_servers[0].url) == 1
    assert value(samples, "mcp_gateway_server_up", server="web") == 1


def every_worker_has_a_time_process(gateway: Gunicorn) -> bool:
    views = gateway.status()["servers"]["time"].get("by_worker", {})
    return len(views) == 2 and all(view["processes"] >= 1 for view in views.values())  # pool_min 1 each


def test_pool_gauges_are_the_whole_gateways(gateway: Gunicorn) -> None:
    wait_for(lambda: every_worker_has_a_time_process(gateway))

    def gauged(samples: Any) -> float:
        return sum(value(samples, "mcp_gateway_pool_processes", server="time", state=state)
                   for state in ("idle", "busy", "starting"))

    wait_for(lambda: gauged(scrape(gateway)) == gateway.status()["servers"]["time"]["processes"])
    samples = scrape(gateway)
    assert gauged(samples) >= 2  # at least one in each worker
    assert value(samples, "mcp_gateway_workers") == 2
    assert value(samples, "mcp_gateway_pool_max_processes", server="time") == 4  # pool_size 2 x 2 workers
    assert value(samples, "mcp_gateway_pool_waiting_requests", server="time") == 0
    assert value(samples, "mcp_gateway_server_up", server="die") == 1  # it starts; it dies only on calls


def test_metric_names_follow_prometheus_conventions(gateway: Gunicorn) -> None:
    text = requests.get(f"{gateway.url}/metrics", timeout=10).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for family in families.values():
        assert family.name.startswith("mcp_gateway_"), family.name
        if family.type == "counter":
            assert all(sample.name == f"{family.name}_total" for sample in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
    assert families["mcp_gateway_request_duration_seconds"].type == "histogram"
    assert {"mcp_gateway_requests", "mcp_gateway_upstream_errors", "mcp_gateway_retries", "mcp_gateway_ejections",
            "mcp_gateway_process_restarts", "mcp_gateway_pool_processes", "mcp_gateway_pool_waiting_requests",
            "mcp_gateway_instance_up"} <= set(families)


def test_status_is_the_whole_gateways_not_the_answering_workers(gateway: Gunicorn) -> None:
    workers = {str(pid) for pid in gateway.worker_pids()}
    wait_for(lambda: every_worker_has_a_time_process(gateway))
    answered = set()
    for _ in range(8):
        status = requests.get(f"{gateway.url}/status", headers={"Connection": "close"}, timeout=10).json()
        answered.add(str(status["answered_by"]))
        assert {str(worker["pid"]) for worker in status["workers"]} == workers
        time_server = status["servers"]["time"]
        assert set(time_server["by_worker"]) == workers
        views = time_server["by_worker"].values()
        assert time_server["processes"] == sum(view["processes"] for view in views) == len(time_server["pids"])
        assert time_server["capacity"] == 4 and time_server["pool_size"] == 2
        assert all(view["processes"] >= 1 for view in views)
    assert answered <= workers


def test_a_killed_worker_keeps_its_counts_and_leaves_the_status(gateway: Gunicorn) -> None:
    wait_for(lambda: len(gateway.status()["workers"]) == 2)
    total = sum(v for (name, _), v in scrape(gateway).items() if name == "mcp_gateway_requests_total")
    victim = next(iter(gateway.worker_pids()))
    gateway.remember()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in gateway.worker_pids() and len(gateway.worker_pids()) == 2, 30, "a replacement worker")
    gateway.wait_ready()
    wait_for(lambda: {w["pid"] for w in gateway.status()["workers"]} == gateway.worker_pids())
    # Counters of a dead worker stay in the sum (requests it served did happen).
    after = sum(v for (name, _), v in scrape(gateway).items() if name == "mcp_gateway_requests_total")
    assert after == total
    assert victim not in {w["pid"] for w in gateway.status()["workers"]}
