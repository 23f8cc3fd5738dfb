"""Pools through real gunicorn: growth without waiting for one's own spawn, start-up
apart from request_timeout, cancellation that keeps a process, shutdown that reaches
every child.

One worker each, so /status is that worker's live view of its pool.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import requests

from .harness import ACCEPT_BOTH, curl, server_command, wait_for


def pool(instance: Any, server: str = "srv") -> dict[str, Any]:
    result: dict[str, Any] = instance.status()["servers"][server]
    return result


def result_of(response: requests.Response) -> Any:
    return response.json()["result"]["structuredContent"]["result"]


def test_a_request_is_served_by_the_first_process_that_frees_not_by_its_own_spawn(gunicorn: Any) -> None:
    # Each process takes 4 s to start; the one warm process frees after 0.3 s.
    instance = gunicorn({"srv": {"type": "stdio", "command": server_command("sdk_server.py", "stdio"),
                                 "pool_size": 2, "pool_min": 1, "env_vars": {"TEST_SERVER_START_SECONDS": "4"}}},
                        workers=1)
    wait_for(lambda: pool(instance)["idle"] == 1, 30)
    [warm] = pool(instance)["pids"]
    first: list[requests.Response] = []
    holder = threading.Thread(target=lambda: first.append(
        curl(instance, "srv", "tools/call", {"name": "sleep", "arguments": {"seconds": 0.3}})))
    holder.start()
    try:
        wait_for(lambda: pool(instance)["busy"] == 1)
        second = curl(instance, "srv", "tools/call", {"name": "whoami", "arguments": {}}, request_id=2)
        grown = pool(instance)
    finally:
        holder.join(30)
    assert result_of(first[0]) == "slept"
    assert result_of(second) == warm  # the warm process, once it freed
    assert grown["pids"] == [warm] and grown["starting"] == 1  # the new one was still starting
    wait_for(lambda: len(pool(instance)["pids"]) == 2 and pool(instance)["starting"] == 0, 30)
    assert pool(instance)["restarts"] == 0


def test_request_timeout_starts_at_the_write_and_start_up_has_its_own(gunicorn: Any) -> None:
    instance = gunicorn({"srv": {"type": "stdio", "command": server_command("faulty_server.py", "slow-start"),
                                 "pool_size": 2, "pool_min": 0, "request_timeout": 1, "startup_timeout": 20,
                                 "env_vars": {"FAULTY_START_SECONDS": "2"}}}, workers=1)
    answers: list[requests.Response] = []
    callers = [threading.Thread(target=lambda n=n: answers.append(
        curl(instance, "srv", "tools/call", {"name": "work", "arguments": {}}, request_id=n))) for n in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(60)
    assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
    assert all(r.json()["result"]["content"][0]["text"].startswith("ok from pid") for r in answers)
    status = pool(instance)
    assert status["restarts"] == 0 and 1 <= status["spawned"] <= 2


def _start_and_hang_up(instance: Any, tool: str, arguments: dict[str, Any]) -> None:
    """A client (curl-style, no session) starts a call answered as SSE, reads the first event, disconnects."""
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": {"progressToken": "p"}}}
    with requests.post(f"{instance.url}/srv/mcp", data=json.dumps(body), headers=ACCEPT_BOTH, stream=True,
                       timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream"), response.text
        assert b"notifications/progress" in next(response.iter_content(chunk_size=None))
    # Leaving the block closed the connection mid-call.


def test_a_client_that_disconnects_mid_call_leaves_the_process_in_the_pool(gunicorn: Any) -> None:
    instance = gunicorn({"srv": {"type": "stdio", "command": server_command("sdk_server.py", "stdio"),
                                 "pool_size": 1, "pool_min": 1}}, workers=1)
    wait_for(lambda: pool(instance)["idle"] == 1, 30)
    [pid] = pool(instance)["pids"]
    _start_and_hang_up(instance, "slow", {"steps": 100})  # 20 s of progress if not cancelled
    wait_for(lambda: pool(instance)["busy"] == 0)
    status = pool(instance)
    assert status["pids"] == [pid] and status["restarts"] == 0
    assert result_of(curl(instance, "srv", "tools/call", {"name": "whoami", "arguments": {}})) == pid
    assert pool(instance)["restarts"] == 0


def test_a_process_that_writes_garbage_after_the_cancel_is_replaced(gunicorn: Any) -> None:
    instance = gunicorn({"srv": {"type": "stdio", "command": server_command("faulty_server.py", "cancel-garbage"),
                                 "pool_size": 1, "pool_min": 1}}, workers=1)
    wait_for(lambda: pool(instance)["idle"] == 1, 30)
    [pid] = pool(instance)["pids"]
    _start_and_hang_up(instance, "work", {})
    wait_for(lambda: pool(instance)["restarts"] == 1)
    assert pid not in pool(instance)["pids"]
    assert curl(instance, "srv", "tools/list").status_code == 200


def test_term_during_a_slow_call_answers_it_and_stops_every_child(gunicorn: Any) -> None:
    instance = gunicorn({"srv": {"type": "stdio", "command": server_command("sdk_server.py", "stdio"),
                                 "pool_size": 1, "pool_min": 1}}, workers=1)
    wait_for(lambda: pool(instance)["idle"] == 1, 30)
    answer: list[requests.Response] = []
    caller = threading.Thread(target=lambda: answer.append(
        curl(instance, "srv", "tools/call", {"name": "sleep", "arguments": {"seconds": 2}})))
    caller.start()
    wait_for(lambda: pool(instance)["busy"] == 1)
    instance.remember()
    instance.process.send_signal(signal.SIGTERM)
    caller.join(40)
    assert answer and answer[0].status_code == 200 and result_of(answer[0]) == "slept"
    instance.process.wait(40)  # the fixture then checks: exit 0, no process left


def test_shutdown_closes_stdin_then_terms_children_started_by_upkeep_and_requests(gunicorn: Any,
                                                                                  tmp_path: Path) -> None:
    record = tmp_path / "seen"
    instance = gunicorn({"srv": {"type": "stdio", "command": server_command("faulty_server.py", "record-shutdown",
                                                                            str(record)),
                                 "pool_size": 2, "pool_min": 1}}, workers=1)
    wait_for(lambda: pool(instance)["idle"] == 1, 30)  # started by the upkeep thread
    assert curl(instance, "srv", "tools/list").status_code == 200  # served from a request thread
    pids = set(pool(instance)["pids"])
    instance.stop_and_check()
    seen: dict[int, list[str]] = {}
    for line in record.read_text().splitlines():
        pid, what = line.split()
        seen.setdefault(int(pid), []).append(what)
    for pid in pids:
        # It saw stdin close, ignored it, got SIGTERM: never SIGKILLed from under the worker.
        assert seen.get(pid) == ["record-shutdown", "eof", "term"], seen
