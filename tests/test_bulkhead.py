"""A slow server cannot take the threads the others need (issue 13, gateway/bulkhead.py).

Against real gunicorn: while slow `sleep` calls hold the `slow` server (stdio,
the SDK test server), calls to a fast server (mcp-server-time) all succeed,
and calls to the slow server past its `max_concurrent` and `max_queued` get
503 with Retry-After and a JSON-RPC error. Counts, not timings: the slow
calls sleep far longer than the test needs, and each check waits until
/status shows the counts it is about.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import requests

from gateway import bulkhead, errors
from gateway.bulkhead import Bulkhead

from .harness import (
    SHARED_STATE_KEY,
    TIME_SERVER,
    Gunicorn,
    curl,
    server_command,
    wait_for,
)

SLEEP = 12.0  # what each slow call takes: longer than the checks made while they hold the server, and
# twice it (a queued call waits for one, then sleeps) within the 30 s the client waits


def servers(warm: int, **slow: Any) -> dict[str, Any]:
    """A fast and a slow server, `warm` processes of the slow one started per worker (the pool is not what is tested)."""
    return {
        "time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 4, "pool_min": 4},
        "slow": {"type": "stdio", "command": server_command("sdk_server.py", "stdio"), "pool_size": 16,
                 "pool_min": warm, "max_waiting": 64, "wait_timeout": 60,
                 "env_vars": {"TEST_SERVER_STATE_KEY": SHARED_STATE_KEY}, **slow},
    }


def warmed(gateway: Gunicorn, warm: int) -> Gunicorn:
    """Once every worker's processes have started: spawning them is not what the checks are about."""
    def ready() -> bool:
        found = gateway.status()["servers"]
        return found["time"]["idle"] == 4 * gateway.workers and found["slow"]["idle"] == warm * gateway.workers
    wait_for(ready, 60)
    return gateway


def requests_of(gateway: Gunicorn, server: str) -> list[dict[str, Any]]:
    """The bulkhead counts of `server` in each worker."""
    found = gateway.status()["servers"][server]
    views = found.get("by_worker", {"only": found}).values()
    return [view["requests"] for view in views]


@contextmanager
def slow_calls(gateway: Gunicorn, count: int) -> Iterator[list[Any]]:
    """`count` sleep calls to `slow`, running while the block runs; their answers after."""
    pool = ThreadPoolExecutor(count)
    body = {"name": "sleep", "arguments": {"seconds": SLEEP}}
    futures = [pool.submit(curl, gateway, "slow", "tools/call", body, None, n) for n in range(count)]
    try:
        yield futures
    finally:
        pool.shutdown(wait=True)


def fast_calls_all_succeed(gateway: Gunicorn, count: int) -> None:
    """`count` tools/list to the fast server, 4 at a time, each answered well before any slow call ends."""
    def one(n: int) -> int:
        response = requests.post(f"{gateway.url}/time/mcp", timeout=SLEEP / 3, headers={"Content-Type": "application/json"},
                                 data=json.dumps({"jsonrpc": "2.0", "id": n, "method": "tools/list"}))
        assert "tools" in response.json()["result"]
        return response.status_code

    with ThreadPoolExecutor(4) as pool:
        assert Counter(pool.map(one, range(count))) == {200: count}


def test_past_its_limit_and_queue_a_server_gets_503_and_the_others_keep_their_threads(gunicorn: Any) -> None:
    gateway = warmed(gunicorn(servers(3, max_concurrent=2, max_queued=1, queue_timeout=60), workers=1, threads=8), 3)
    with slow_calls(gateway, 2) as running:
        wait_for(lambda: requests_of(gateway, "slow") and requests_of(gateway, "slow")[0]["active"] == 2)
        with slow_calls(gateway, 1) as queued:
            wait_for(lambda: requests_of(gateway, "slow")[0]["queued"] == 1)
            refused = curl(gateway, "slow", "tools/call", {"name": "sleep", "arguments": {"seconds": 0}}, request_id=7)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            error = refused.json()["error"]
            assert error["code"] == errors.OVERLOADED and refused.json()["id"] == 7
            assert error["message"].startswith("server 'slow' is overloaded: 2 requests in progress")
            fast_calls_all_succeed(gateway, 20)
    # The queued call was served once a slot freed; every slot is back.
    for future in [*running, *queued]:
        assert future.result().json()["result"]["structuredContent"]["result"] == "slept"
    assert requests_of(gateway, "slow")[0] | {"refused": 1} == {
        "active": 0, "queued": 0, "refused": 1, "max_concurrent": 2, "max_queued": 1}


def test_with_the_defaults_sixteen_slow_calls_leave_threads_for_a_fast_server(gunicorn: Any) -> None:
    # The numbers: 2 workers x 8 threads, c=16 against a slow server.
    gateway = warmed(gunicorn(servers(4), workers=2, threads=8), 4)
    with slow_calls(gateway, 16) as calls:
        wait_for(lambda: sum(view["active"] for view in requests_of(gateway, "slow")) == 8)
        fast_calls_all_succeed(gateway, 20)
    answers = Counter(future.result().status_code for future in calls)
    assert answers[200] >= 8 and set(answers) <= {200, 503}, answers
    # The sibling's view is a second old at most (published by its upkeep).
    wait_for(lambda: all(view["active"] == view["queued"] == 0 for view in requests_of(gateway, "slow")))


def test_every_way_a_request_ends_gives_its_slot_back(gunicorn: Any) -> None:
    # One may queue: the slot of an answer the client has read whole is given back when the worker
    # closes the response, which can be a moment after the client sends its next request.
    gateway = gunicorn(servers(1, max_concurrent=1, max_queued=1), workers=1, threads=4)
    assert curl(gateway, "slow", "tools/list").status_code == 200
    assert requests.post(f"{gateway.url}/slow/mcp", data="{not json", timeout=10).status_code == 400
    assert curl(gateway, "slow", "nope/nope").json()["error"]["code"] == -32601
    stream = requests.post(f"{gateway.url}/slow/mcp", stream=True, timeout=10,
                           headers={"Accept": "application/json, text/event-stream", "Content-Type": "application/json"},
                           data=json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
                               "name": "slow", "arguments": {"steps": 3}, "_meta": {"progressToken": "p"}}}))
    assert stream.headers["Content-Type"].startswith("text/event-stream"), (stream.status_code, stream.text[:300])
    next(stream.iter_content(64))
    stream.close()  # gone mid-stream
    wait_for(lambda: requests_of(gateway, "slow")[0]["active"] == 0)
    assert curl(gateway, "slow", "tools/call", {"name": "add", "arguments": {"a": 1, "b": 2}}).status_code == 200
    assert requests_of(gateway, "slow")[0]["active"] == 0


# --- the bulkhead on its own -----------------------------------------------------


def test_a_queued_request_takes_the_first_freed_slot_and_none_is_lost() -> None:
    head = Bulkhead("s", max_concurrent=1, max_queued=1, queue_timeout=30)
    head.acquire()
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (head.acquire(), got.set()))
    waiter.start()
    wait_for(lambda: head.queued == 1)
    with pytest.raises(errors.Overloaded) as refused:
        head.acquire()  # the queue is full
    assert refused.value.retry_after == 1 and refused.value.http_status == 503
    head.release()
    waiter.join(10)
    assert got.is_set() and (head.active, head.queued, head.refused) == (1, 0, 1)
    head.release()
    assert head.active == 0


def test_a_queued_request_gives_its_thread_up_when_another_request_needs_one(monkeypatch: pytest.MonkeyPatch) -> None:
    head = Bulkhead("s", max_concurrent=1, max_queued=4, queue_timeout=30)
    head.acquire()
    wanted = threading.Event()
    monkeypatch.setattr(bulkhead, "threads_wanted", lambda server_id: server_id == "s" and wanted.is_set())
    outcome: list[BaseException] = []

    def queue() -> None:
        try:
            head.acquire()
        except errors.Overloaded as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=queue)
    waiter.start()
    wait_for(lambda: head.queued == 1)
    wanted.set()
    waiter.join(10)
    assert "needs the thread" in str(outcome[0]) and head.queued == 0 and head.active == 1


def test_defaults_are_half_the_worker_threads_and_the_rest_to_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulkhead, "_worker_threads", 8)
    assert Bulkhead("s").status() | {} == {"active": 0, "queued": 0, "refused": 0, "max_concurrent": 4, "max_queued": 4}
    monkeypatch.setattr(bulkhead, "_worker_threads", 1)
    assert (Bulkhead("s").max_concurrent, Bulkhead("s").max_queued) == (1, 0)
    # Outside gateway/worker.py no thread count is known: only the registry's limits apply.
    monkeypatch.setattr(bulkhead, "_worker_threads", None)
    assert Bulkhead("s").status()["max_concurrent"] is None
    assert Bulkhead("s", max_concurrent=3).status()["max_concurrent"] == 3


def test_one_busy_server_alone_is_queued_not_refused(gunicorn: Any) -> None:
    # Refusing gives a thread to another server's request; when every request waiting for a
    # thread is for the same server, a refusal helps no one, so none is made.
    gateway = gunicorn({"time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 4, "pool_min": 4}},
                       workers=1, threads=4)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as http:
            for _ in range(25):
                answer = curl(gateway, "time", "tools/list", client=http)
                with lock:
                    statuses[answer.status_code] += 1

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(client) for _ in range(8)]:
            future.result(timeout=120)
    assert statuses == Counter({200: 200})


def test_the_worker_names_the_server_a_waiting_request_is_for() -> None:
    from gateway.worker import _server_of

    assert _server_of(b"POST /time/mcp HTTP/1.1\r\nHost: x\r\n\r\n") == "time"
    assert _server_of(b"POST /time?x=1 HTTP/1.1\r\n") == "time"
    assert _server_of(b"GET /healthz HTTP/1.1\r\n") == "healthz"
    assert _server_of(b"GET / HTTP/1.1\r\n") is None
    assert _server_of(b"garbage") is None


def test_a_connection_closed_while_threads_are_busy_is_no_request_for_another_server(gunicorn: Any) -> None:
    # A client that closes its kept-alive connection leaves the worker a connection to
    # close, not a request: it must not make a queued request give its thread up (it did,
    # as if a request for another server waited: 503s on a gateway serving one server).
    gateway = warmed(gunicorn(servers(4, max_concurrent=2, max_queued=2, queue_timeout=60), workers=1, threads=4), 4)
    with slow_calls(gateway, 2) as running:
        wait_for(lambda: requests_of(gateway, "slow")[0]["active"] == 2)
        with slow_calls(gateway, 2) as queued:  # every thread is taken now: /status cannot be asked
            for _ in range(40):  # over 2 s, from when the queued calls arrive
                socket.create_connection(("127.0.0.1", gateway.port), timeout=5).close()
                time.sleep(0.05)
    answers = [call.result() for call in running + queued]
    assert [answer.status_code for answer in answers] == [200] * 4, [answer.text for answer in answers]
    assert requests_of(gateway, "slow")[0]["refused"] == 0
