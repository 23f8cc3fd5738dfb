"""Live registry reload on real gunicorn: the file watched by every worker, and HUP.

What a reload must keep (pools, sessions of unchanged servers), what it must
drain (in-flight calls of changed servers finish, then their processes
stop), what it must refuse (an invalid file, in one log line, the old
registry serving on), and that under steady load it fails no request.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import requests
import yaml

from gateway.registry import text_digest

from .harness import (
    ACCEPT_BOTH,
    TIME_SERVER,
    Gunicorn,
    McpHttpServer,
    curl,
    descendants,
    server_command,
    sse_or_json,
    wait_for,
    write_registry,
)

NOW = {"name": "get_current_time", "arguments": {"timezone": "UTC"}}
WATCH = {"reload_registry": True}


def time_server(description: str = "time", **settings: Any) -> dict[str, Any]:
    return {"type": "stdio", "command": TIME_SERVER, "description": description, "pool_size": 2, **settings}


def rewrite(gateway: Gunicorn, servers: dict[str, Any], gateway_settings: dict[str, Any] | None = None) -> str:
    """Replace the registry file the way an editor saving it would; return the new text's digest."""
    data: dict[str, Any] = {"servers": servers, **({"gateway": gateway_settings} if gateway_settings else {})}
    text = yaml.safe_dump(data)
    staged = gateway.registry.with_suffix(".saving")
    staged.write_text(text)
    staged.replace(gateway.registry)
    return text_digest(text)


def served_digests(gateway: Gunicorn) -> set[str]:
    return {worker["registry_digest"] for worker in gateway.status()["workers"]}


def every_worker_serves(gateway: Gunicorn, digest: str) -> None:
    wait_for(lambda: served_digests(gateway) == {digest} and len(gateway.status()["workers"]) == gateway.workers, 30)


def running(gateway: Gunicorn, pids: list[int]) -> set[int]:
    below = {pid for pid, _ in descendants(gateway.process.pid)}
    return set(pids) & below


def hup(gateway: Gunicorn) -> None:
    """gunicorn's own reload; returns when only new workers serve."""
    old_workers = gateway.worker_pids()
    gateway.remember()
    gateway.process.send_signal(signal.SIGHUP)
    wait_for(lambda: not (gateway.worker_pids() & old_workers) and len(gateway.worker_pids()) == gateway.workers, 60)
    gateway.wait_ready()


def call_ok(gateway: Gunicorn, server: str, request_id: int = 1) -> bool:
    answer = curl(gateway, server, "tools/call", NOW, request_id=request_id)
    return answer.status_code == 200 and "result" in answer.json()


def whole_status(gateway: Gunicorn, ready: Any) -> dict[str, Any]:
    """The servers of a /status answer that combined every worker's view (a sibling's file can be a
    moment late), once `ready(servers)` holds."""
    found: dict[str, Any] = {}

    def settled() -> bool:
        nonlocal found
        status = gateway.status()
        found = status["servers"]
        return len(status["workers"]) == gateway.workers and bool(ready(found))

    wait_for(settled)
    return found


def test_a_changed_file_reaches_every_worker_and_unchanged_servers_keep_their_state(
        tmp_path: Path, http_servers: list[McpHttpServer]) -> None:
    web = {"type": "http", "instances": [{"endpoint": http_servers[0].url}]}
    first = {"keep": time_server(pool_min=1), "change": time_server(pool_min=1),
             "remove": time_server(pool_min=1), "web": web}
    with Gunicorn(write_registry(tmp_path, first, WATCH), workers=2).serving() as gateway:
        before = whole_status(gateway, lambda found: all(len(found[sid]["pids"]) == 2
                                                         for sid in ("keep", "change", "remove")))
        # A session held by the HTTP instance, through the gateway.
        init = requests.post(f"{gateway.url}/web/mcp", headers=ACCEPT_BOTH, timeout=30, data=json.dumps({
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}))
        session = {**ACCEPT_BOTH, "Mcp-Session-Id": init.headers["Mcp-Session-Id"], "MCP-Protocol-Version": "2025-11-25"}

        second = {"keep": time_server(pool_min=1), "change": time_server("changed", pool_min=1),
                  "added": time_server(), "web": web}
        every_worker_serves(gateway, rewrite(gateway, second, WATCH))

        after = whole_status(gateway, lambda found: "added" in found and "remove" not in found)
        assert set(after) == {"keep", "change", "added", "web"}
        assert after["keep"]["pids"] == before["keep"]["pids"], "an unchanged server keeps its processes"
        assert after["change"]["description"] == "changed"
        # The replaced pools drain (nothing holds them) and their processes stop.
        wait_for(lambda: not running(gateway, before["change"]["pids"] + before["remove"]["pids"]))
        assert call_ok(gateway, "change") and call_ok(gateway, "added") and call_ok(gateway, "keep")
        assert curl(gateway, "remove", "tools/call", NOW).status_code == 404
        listed = requests.post(f"{gateway.url}/web/mcp", headers=session, timeout=30,
                               data=json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        assert listed.status_code == 200 and "tools" in sse_or_json(listed)["result"], "the session survived"
        assert gateway.log().count("reloaded (") == 2, "each worker reloaded once"


def test_an_invalid_file_is_refused_in_one_line_and_the_old_registry_serves_on(tmp_path: Path) -> None:
    with Gunicorn(write_registry(tmp_path, {"time": time_server()}, WATCH), workers=2).serving() as gateway:
        digest = served_digests(gateway).pop()
        rewrite(gateway, {"time": {"type": "stdio"}}, WATCH)  # no command

        def refusals() -> float:
            page = requests.get(f"{gateway.url}/metrics", timeout=10).text
            return sum(float(line.split()[-1]) for line in page.splitlines()
                       if line.startswith('mcp_gateway_registry_reloads_total{outcome="rejected"}'))

        wait_for(lambda: refusals() == 2, 30)  # both workers have looked at it
        lines = [line for line in gateway.log().splitlines() if "changed but is invalid" in line]
        assert len(lines) == 1, lines
        assert "servers.time" in lines[0] and "command" in lines[0]
        assert served_digests(gateway) == {digest}
        assert call_ok(gateway, "time")
        # Fixing the file is picked up as usual.
        every_worker_serves(gateway, rewrite(gateway, {"time": time_server(), "more": time_server()}, WATCH))
        assert call_ok(gateway, "more")


def test_in_flight_calls_of_a_changed_server_finish_before_its_processes_stop(tmp_path: Path) -> None:
    slow = {"type": "stdio", "command": server_command("sdk_server.py", "stdio"), "pool_size": 2}
    with Gunicorn(write_registry(tmp_path, {"slow": slow}, WATCH), workers=1).serving() as gateway:
        answers: list[requests.Response] = []
        call = threading.Thread(target=lambda: answers.append(
            curl(gateway, "slow", "tools/call", {"name": "sleep", "arguments": {"seconds": 4}})))
        call.start()
        wait_for(lambda: gateway.status()["servers"]["slow"]["busy"] == 1)
        busy = gateway.status()["servers"]["slow"]["pids"]
        every_worker_serves(gateway, rewrite(gateway, {"slow": {**slow, "description": "v2"}}, WATCH))
        draining = gateway.status()["workers"][0]["draining"]
        assert draining == [{"server": "slow", "in_flight": 1}]
        assert running(gateway, busy), "the old process keeps serving the call it holds"
        call.join(30)
        assert answers and answers[0].status_code == 200 and "result" in answers[0].json()
        wait_for(lambda: not running(gateway, busy) and not gateway.status()["workers"][0]["draining"])


def test_a_replaced_upstream_still_held_is_closed_after_gunicorns_graceful_timeout(tmp_path: Path) -> None:
    # The drain timeout is gunicorn's graceful_timeout (what a request may still take after a HUP),
    # read from the worker's config: here set on gunicorn's command line, over conf/gunicorn.conf.py.
    slow = {"type": "stdio", "command": server_command("sdk_server.py", "stdio"), "pool_size": 1}
    env = {"GUNICORN_CMD_ARGS": "--graceful-timeout 2"}
    with Gunicorn(write_registry(tmp_path, {"slow": slow}, WATCH), workers=1, env=env).serving() as gateway:
        answers: list[requests.Response] = []
        call = threading.Thread(target=lambda: answers.append(
            curl(gateway, "slow", "tools/call", {"name": "sleep", "arguments": {"seconds": 20}})))
        call.start()
        wait_for(lambda: gateway.status()["servers"]["slow"]["busy"] == 1)
        busy = gateway.status()["servers"]["slow"]["pids"]
        every_worker_serves(gateway, rewrite(gateway, {"slow": {**slow, "description": "v2"}}, WATCH))
        wait_for(lambda: "1 requests still hold the replaced upstream after 2s; closing it" in gateway.log(), 15)
        wait_for(lambda: not running(gateway, busy) and not gateway.status()["workers"][0]["draining"])
        call.join(30)
        assert answers and answers[0].status_code == 502 and "killed" in answers[0].json()["error"]["message"]
        assert "tools" in curl(gateway, "slow", "tools/list").json()["result"], "the new entry serves"


def test_reloads_and_hup_under_steady_load_fail_no_request(tmp_path: Path) -> None:
    servers = {"steady": time_server(pool_min=1), "moving": time_server(pool_min=1)}
    gateway = Gunicorn(write_registry(tmp_path, servers, WATCH), workers=2, threads=4)
    stop = threading.Event()
    failures: list[str] = []
    done = [0]

    def load(server: str) -> None:
        with requests.Session() as http:  # keep-alive, like a real client
            for n in range(3000):  # bounded in count, and in time below
                if stop.is_set():
                    return
                try:
                    answer = http.post(f"{gateway.url}/{server}/mcp", timeout=30, json={
                        "jsonrpc": "2.0", "id": n, "method": "tools/call", "params": NOW})
                    if answer.status_code != 200 or "result" not in answer.json():
                        failures.append(f"{server}: {answer.status_code} {answer.text[:200]}")
                except requests.RequestException as exc:
                    failures.append(f"{server}: {exc}")
                done[0] += 1

    try:
        gateway.wait_ready()
        clients = [threading.Thread(target=load, args=(server,)) for server in ("steady", "moving", "moving")]
        for client in clients:
            client.start()
        wait_for(lambda: done[0] >= 50, 30)
        every_worker_serves(gateway, rewrite(gateway, {**servers, "moving": time_server("v2", pool_min=1)}, WATCH))
        every_worker_serves(gateway, rewrite(gateway, {**servers, "moving": time_server("v3", pool_min=2)}, WATCH))
        hup(gateway)  # gunicorn's own reload: new workers, old ones drain
        settled = done[0]
        wait_for(lambda: done[0] >= settled + 50, 30)  # the new workers carry the load
        stop.set()
        for client in clients:
            client.join(60)
        assert not failures, failures[:5]
        assert done[0] > 150
    finally:
        stop.set()
        gateway.stop_and_check()


def test_hup_reloads_the_file_and_refuses_an_invalid_one(tmp_path: Path) -> None:
    # No file watching: only HUP reloads.
    with Gunicorn(write_registry(tmp_path, {"time": time_server()}), workers=2).serving() as gateway:
        digest = rewrite(gateway, {"time": time_server(), "added": time_server()})
        hup(gateway)
        every_worker_serves(gateway, digest)
        assert call_ok(gateway, "added")

        gateway.registry.write_text("servers: [this is not a registry")
        hup(gateway)
        assert gateway.process.poll() is None, "the master lives on"
        assert gateway.log().count("not reloaded, the running one stays") == 1
        every_worker_serves(gateway, digest)  # the new workers booted from the last good registry
        assert call_ok(gateway, "added")


def test_changing_an_http_template_restarts_workers_and_its_processes(tmp_path: Path) -> None:
    def demo(hello_from: str) -> dict[str, Any]:
        return {"demo-http": {"type": "template", "template_name": "demo", "transport": "http", "instances": 1,
                              "config": {"hello_from": hello_from}}}

    def greeting() -> str:
        answer = curl(gateway, "demo-http", "tools/call", {"name": "say_hello", "arguments": {"name": "Ada"}})
        return str(sse_or_json(answer)["result"]["content"][0]["text"]) if answer.status_code == 200 else ""

    with Gunicorn(write_registry(tmp_path, demo("First"), WATCH), workers=2).serving() as gateway:
        assert greeting() == "Hello, Ada! Greetings from First."
        workers = gateway.worker_pids()
        template_pids = [pid for pid, _ in descendants(gateway.process.pid) if pid not in workers]
        gateway.remember()
        every_worker_serves(gateway, rewrite(gateway, demo("Second"), WATCH))
        assert not (gateway.worker_pids() & workers), "the master reloaded (HUP): new workers"
        wait_for(lambda: greeting() == "Hello, Ada! Greetings from Second.", 30)
        wait_for(lambda: not running(gateway, template_pids), 40)  # once the old workers are gone
        assert gateway.log().count("asking gunicorn for a graceful reload (HUP)") == 1


def test_a_reload_asks_unchanged_http_servers_their_era_again(make_app: Any, tmp_path: Path) -> None:
    from gateway import registry, runtime

    web = {"type": "http", "instances": [{"endpoint": "http://127.0.0.1:9"}]}
    app = make_app({"web": web})
    gateway = app.extensions[runtime.EXTENSION_KEY]
    kept = gateway.upstreams["web"]
    kept.bridge._speaks["2026-07-28"] = False  # learned from an instance that may since have been redeployed
    text = json.dumps({"servers": {"web": web, "time": {"type": "stdio", "command": TIME_SERVER}},
                       "gateway": {"session_secret": "x" * 32}})
    gateway.reload(registry.parse(text, str(tmp_path / "new.json")), text)
    assert gateway.upstreams["web"] is kept and kept.bridge._speaks == {}
