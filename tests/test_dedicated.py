"""Dedicated stdio sessions end to end: real gunicorn, real npm servers over stdio, the official SDK client.

Most tests run one gunicorn worker, so that per-worker limits (max_sessions)
and counts are exact. The tests at the end run two workers with a new
connection for every request, so a session's requests land on both and
those reaching the other worker are relayed to the owner (owners.py).
"""

from __future__ import annotations

import collections
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
import requests
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.dedicated import CORRELATION_HEADER

from .harness import (
    ACCEPT_BOTH,
    EVERYTHING,
    ROOT,
    Gunicorn,
    server_command,
    sse_or_json,
    still_running,
    wait_for,
    write_registry,
)

THINKING = ROOT / "tests/node/node_modules/@modelcontextprotocol/server-sequential-thinking/dist/index.js"
VERSION = "2025-11-25"
MODERN = "2026-07-28"
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
ALICE, BOB = "alice-token-" + "a" * 24, "bob-token-" + "b" * 24

pytestmark = pytest.mark.skipif(not (EVERYTHING.exists() and THINKING.exists()),
                                reason="needs tests/node (make test installs it)")


def everything(**extra: Any) -> dict[str, Any]:
    return {"type": "stdio", "command": ["node", str(EVERYTHING), "stdio"], "session_mode": "dedicated",
            "max_concurrent": 8, "pool_min": 0, **extra}


def thinking(mode: str) -> dict[str, Any]:
    return {"type": "stdio", "command": ["node", str(THINKING)], "session_mode": mode, "pool_size": 1,
            "pool_min": 0, "env_vars": {"DISABLE_THOUGHT_LOGGING": "true"}}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    servers = {
        "every": everything(),
        "thinking": thinking("dedicated"),
        "pooled-thinking": thinking("pooled"),
        "short": everything(session_idle_timeout=2),
        "two": everything(max_sessions=2),
        "guarded-thinking": {**thinking("dedicated"), "auth_tokens": {"alice": ALICE, "bob": BOB}},
    }
    folder = tmp_path_factory.mktemp("dedicated")
    registry = write_registry(folder, servers, {"auth": {"protect_operator_endpoints": False}})
    with Gunicorn(registry, workers=1, threads=8).serving() as instance:
        yield instance


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    folder = tmp_path_factory.mktemp("dedicated-two")
    registry = write_registry(folder, {"every": everything(), "thinking": thinking("dedicated"),
                                       # speaks only 2026-07-28 (it refuses initialize)
                                       "modern-only": {"type": "stdio", "session_mode": "dedicated", "pool_min": 0,
                                                       "command": server_command("faulty_server.py", "ok")},
                                       "guarded-thinking": {**thinking("dedicated"),
                                                            "auth_tokens": {"alice": ALICE, "bob": BOB}}},
                              {"auth": {"protect_operator_endpoints": False}})
    with Gunicorn(registry, workers=2, threads=4).serving() as instance:
        yield instance


def rpc(method: str, params: dict[str, Any], request_id: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


def start(gateway: Gunicorn, server: str, name: str = "t") -> dict[str, str]:
    """A new session (initialize, initialized); the headers its later requests carry."""
    url = f"{gateway.url}/{server}/mcp"
    init = requests.post(url, json=rpc("initialize", {"protocolVersion": VERSION, "capabilities": {},
                                                      "clientInfo": {"name": name, "version": "1"}}),
                         headers=ACCEPT_BOTH, timeout=30)
    assert init.status_code == 200, init.text
    assert init.json()["result"]["serverInfo"]["name"]
    headers = {**ACCEPT_BOTH, "Mcp-Session-Id": init.headers["Mcp-Session-Id"], "MCP-Protocol-Version": VERSION}
    done = requests.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers, timeout=10)
    assert done.status_code == 202, done.text
    return headers


def call(gateway: Gunicorn, server: str, headers: dict[str, str], method: str, params: dict[str, Any],
         request_id: int = 2) -> requests.Response:
    return requests.post(f"{gateway.url}/{server}/mcp", json=rpc(method, params, request_id), headers=headers, timeout=30)


def sessions(gateway: Gunicorn, server: str) -> dict[str, Any]:
    found: dict[str, Any] = gateway.status()["servers"][server]["sessions"]
    return found


def gone(pids: set[int]) -> bool:
    return not still_running({(pid, Path(f"/proc/{pid}/stat").read_text().split()[21]) for pid in pids
                              if os.path.exists(f"/proc/{pid}/stat")})


# --- the SDK client in legacy mode: the server asks the client ----------------------------


def sdk_round_trips(gateway: Gunicorn, http: httpx2.AsyncClient | None = None) -> tuple[dict[str, str], list[str]]:
    """sampling, elicitation and roots through a dedicated server-everything: the tools' texts, and what was asked."""
    asked: list[str] = []

    async def on_sampling(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append("sampling")
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="forty-two"),
                                         model="test-model", stop_reason="endTurn")

    async def on_elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append("elicitation")
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async def on_roots(context: Any) -> types.ListRootsResult:
        asked.append("roots")
        return types.ListRootsResult(roots=[types.Root(uri="file:///work/dedicated-root", name="the-root")])

    async def scenario() -> dict[str, str]:
        texts: dict[str, str] = {}
        async with (
            http or httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60)) as client_http,
            Client(streamable_http_client(f"{gateway.url}/every/mcp", http_client=client_http), mode="legacy",
                   sampling_callback=on_sampling, elicitation_callback=on_elicit,
                   list_roots_callback=on_roots) as client,
        ):
            tools = {tool.name for tool in (await client.list_tools()).tools}
            # Capability-gated tools appear: the process saw this client's own initialize.
            assert {"trigger-sampling-request", "trigger-elicitation-request", "get-roots-list"} <= tools, tools
            for name, arguments in (("trigger-sampling-request", {"prompt": "what is six times seven?"}),
                                    ("trigger-elicitation-request", {}), ("get-roots-list", {})):
                result = await client.call_tool(name, arguments)
                texts[name] = " ".join(c.text for c in result.content if isinstance(c, types.TextContent))
        return texts

    return anyio.run(scenario), asked


def test_sampling_elicitation_and_roots_round_trips_with_the_sdk_client(gateway: Gunicorn) -> None:
    texts, asked = sdk_round_trips(gateway)
    assert "forty-two" in texts["trigger-sampling-request"], texts
    assert "Ada" in texts["trigger-elicitation-request"], texts
    assert "dedicated-root" in texts["get-roots-list"], texts
    assert {"sampling", "elicitation", "roots"} <= set(asked), asked


# --- state per session -------------------------------------------------------------------


def think(gateway: Gunicorn, server: str, headers: dict[str, str], number: int) -> dict[str, Any]:
    answer = call(gateway, server, headers, "tools/call", {"name": "sequentialthinking", "arguments": {
        "thought": f"thought {number}", "thoughtNumber": number, "totalThoughts": 10, "nextThoughtNeeded": True}},
        request_id=10 + number)
    assert answer.status_code == 200, answer.text
    result = sse_or_json(answer)["result"]
    text = result["content"][0]["text"]
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def test_two_sessions_of_a_dedicated_server_never_see_each_others_thoughts(gateway: Gunicorn) -> None:
    alice, bob = start(gateway, "thinking", "alice"), start(gateway, "thinking", "bob")
    for number in (1, 2, 3):
        assert think(gateway, "thinking", alice, number)["thoughtHistoryLength"] == number
    assert think(gateway, "thinking", bob, 1)["thoughtHistoryLength"] == 1, "bob's history is his own"
    assert think(gateway, "thinking", alice, 4)["thoughtHistoryLength"] == 4


def test_on_a_pooled_server_the_sessions_thoughts_mix(gateway: Gunicorn) -> None:
    """What the pool does with a stateful server (one process, pool_size 1): one history for everyone."""
    alice, bob = start(gateway, "pooled-thinking", "alice"), start(gateway, "pooled-thinking", "bob")
    for number in (1, 2, 3):
        think(gateway, "pooled-thinking", alice, number)
    assert think(gateway, "pooled-thinking", bob, 1)["thoughtHistoryLength"] == 4, "bob sees alice's three"


# --- the end of a session ------------------------------------------------------------------


def test_delete_ends_the_sessions_process(gateway: Gunicorn) -> None:
    before = set(sessions(gateway, "every")["pids"])
    headers = start(gateway, "every")
    (pid,) = set(sessions(gateway, "every")["pids"]) - before
    assert call(gateway, "every", headers, "ping", {}).status_code == 200
    assert requests.delete(f"{gateway.url}/every/mcp", headers=headers, timeout=10).status_code == 204
    wait_for(lambda: gone({pid}), 10, f"process {pid} gone")
    assert pid not in sessions(gateway, "every")["pids"]
    assert call(gateway, "every", headers, "tools/list", {}).status_code == 404


def test_an_idle_session_is_ended_after_session_idle_timeout(gateway: Gunicorn) -> None:
    headers = start(gateway, "short")
    (pid,) = sessions(gateway, "short")["pids"]
    wait_for(lambda: gone({pid}), 15, "the idle session's process gone")
    assert sessions(gateway, "short")["count"] == 0
    assert call(gateway, "short", headers, "tools/list", {}).status_code == 404


def test_past_max_sessions_the_oldest_idle_session_is_evicted(gateway: Gunicorn) -> None:
    first = start(gateway, "two", "first")
    (first_pid,) = sessions(gateway, "two")["pids"]
    second = start(gateway, "two", "second")
    third = start(gateway, "two", "third")
    assert sessions(gateway, "two")["count"] == 2
    wait_for(lambda: gone({first_pid}), 10, "the oldest idle session's process gone")
    assert call(gateway, "two", first, "tools/list", {}).status_code == 404
    for headers in (second, third):
        assert call(gateway, "two", headers, "tools/list", {}).status_code == 200
    for headers in (second, third):
        requests.delete(f"{gateway.url}/two/mcp", headers=headers, timeout=10)


def test_past_max_sessions_with_none_idle_a_new_session_gets_503(gateway: Gunicorn) -> None:
    held = [start(gateway, "two", name) for name in ("a", "b")]
    streams = [requests.get(f"{gateway.url}/two/mcp", headers={**headers, "Accept": "text/event-stream"},
                            stream=True, timeout=10) for headers in held]
    try:
        assert all(stream.status_code == 200 for stream in streams)
        refused = requests.post(f"{gateway.url}/two/mcp", headers=ACCEPT_BOTH, timeout=10, json=rpc("initialize", {
            "protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "c", "version": "1"}}))
        assert refused.status_code == 503, refused.text
        assert "error" in refused.json() and refused.headers["Retry-After"]
    finally:
        for stream in streams:
            stream.close()
        for headers in held:
            requests.delete(f"{gateway.url}/two/mcp", headers=headers, timeout=10)


def test_a_session_whose_process_died_gets_404(gateway: Gunicorn) -> None:
    before = set(sessions(gateway, "every")["pids"])
    headers = start(gateway, "every")
    (pid,) = set(sessions(gateway, "every")["pids"]) - before
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone({pid}), 10, f"process {pid} gone")
    answer = call(gateway, "every", headers, "tools/list", {})
    assert answer.status_code == 404, answer.text
    assert "initialize" in answer.json()["error"]["message"]


def test_status_and_metrics_show_the_sessions(gateway: Gunicorn) -> None:
    headers = start(gateway, "every")
    shown = sessions(gateway, "every")
    assert shown["count"] >= 1 and shown["max"] == 32 and shown["by_owner"]
    metrics = requests.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'mcp_gateway_dedicated_sessions{owner=' in metrics and 'server="every"' in metrics
    requests.delete(f"{gateway.url}/every/mcp", headers=headers, timeout=10)


# --- what the process sends unasked, and what the client tells it ---------------------------


def read_events(lines: Iterator[bytes], wanted: str, most: int = 50) -> list[dict[str, Any]]:
    """A GET stream's messages until one whose method is `wanted` (at most `most` lines; reads time out)."""
    seen: list[dict[str, Any]] = []
    for count, line in enumerate(lines):
        assert count < most, f"no {wanted} in {seen}"
        if line.startswith(b"data: "):
            seen.append(json.loads(line[6:]))
            if seen[-1].get("method") == wanted:
                return seen
    raise AssertionError(f"the stream ended without {wanted}: {seen}")


def test_log_messages_reach_the_get_stream_after_set_level_and_subscribe(gateway: Gunicorn) -> None:
    headers = start(gateway, "every")
    with requests.get(f"{gateway.url}/every/mcp", headers={**headers, "Accept": "text/event-stream"},
                      stream=True, timeout=20) as stream:
        assert stream.status_code == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        lines = stream.iter_lines()  # one iterator: a second would lose what the first had buffered
        level = call(gateway, "every", headers, "logging/setLevel", {"level": "debug"}, request_id=3)
        assert level.status_code == 200 and "error" not in sse_or_json(level), level.text
        subscribed = call(gateway, "every", headers, "resources/subscribe",
                          {"uri": "demo://resource/static/document/architecture.md"}, request_id=4)
        assert subscribed.status_code == 200 and "error" not in sse_or_json(subscribed), subscribed.text
        logged = read_events(lines, "notifications/message")
        assert "Subscribe" in json.dumps(logged[-1]["params"]), logged
        toggled = call(gateway, "every", headers, "tools/call", {"name": "toggle-simulated-logging", "arguments": {}}, 5)
        assert toggled.status_code == 200, toggled.text
        assert read_events(lines, "notifications/message")[-1]["params"]["level"]
    requests.delete(f"{gateway.url}/every/mcp", headers=headers, timeout=10)


def test_a_cancelled_request_ends_its_post_and_the_session_goes_on(gateway: Gunicorn) -> None:
    headers = start(gateway, "every")
    url = f"{gateway.url}/every/mcp"
    body = rpc("tools/call", {"name": "trigger-long-running-operation", "arguments": {"duration": 30, "steps": 30},
                              "_meta": {"progressToken": "long"}}, request_id=7)
    with requests.post(url, json=body, headers=headers, stream=True, timeout=20) as long:
        assert long.status_code == 200 and long.headers["Content-Type"].startswith("text/event-stream")
        lines = long.iter_lines()
        assert b"notifications/progress" in next(line for line in lines if line.startswith(b"data: "))
        cancelled = requests.post(url, headers=headers, timeout=10, json={
            "jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7, "reason": "enough"}})
        assert cancelled.status_code == 202
        # The POST ends with no answer for the cancelled id (basic/utilities/cancellation: the receiver sends none).
        rest = [json.loads(line[6:]) for line in lines if line.startswith(b"data: ")]
        assert all(event.get("method") == "notifications/progress" for event in rest), rest
    assert call(gateway, "every", headers, "ping", {}, request_id=8).status_code == 200
    requests.delete(url, headers=headers, timeout=10)


# --- 2026-07-28 clients: no session, keyed by principal or the correlation header -------------


def modern_think(gateway: Gunicorn, server: str, number: int, headers: dict[str, str]) -> requests.Response:
    body = rpc("tools/call", {"name": "sequentialthinking", "_meta": ENVELOPE, "arguments": {
        "thought": f"thought {number}", "thoughtNumber": number, "totalThoughts": 10, "nextThoughtNeeded": True}}, number)
    answer = requests.post(f"{gateway.url}/{server}/mcp", json=body, timeout=30, headers={
        **ACCEPT_BOTH, "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "sequentialthinking",
        **headers})
    assert answer.status_code == 200, answer.text
    return answer


def history(answer: requests.Response) -> int:
    length: int = json.loads(sse_or_json(answer)["result"]["content"][0]["text"])["thoughtHistoryLength"]
    return length


def test_modern_clients_are_kept_apart_by_the_correlation_header(gateway: Gunicorn) -> None:
    first = modern_think(gateway, "thinking", 1, {})
    correlation = {CORRELATION_HEADER: first.headers[CORRELATION_HEADER]}
    assert history(first) == 1
    assert history(modern_think(gateway, "thinking", 2, correlation)) == 2, "the header leads back to its process"
    other = modern_think(gateway, "thinking", 1, {})
    assert history(other) == 1 and other.headers[CORRELATION_HEADER] != correlation[CORRELATION_HEADER]
    assert history(modern_think(gateway, "thinking", 3, correlation)) == 3


def test_modern_clients_are_kept_apart_by_their_principal(gateway: Gunicorn) -> None:
    alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
    for number in (1, 2):
        assert history(modern_think(gateway, "guarded-thinking", number, alice)) == number
    answer = modern_think(gateway, "guarded-thinking", 1, bob)
    assert history(answer) == 1 and CORRELATION_HEADER not in answer.headers
    assert history(modern_think(gateway, "guarded-thinking", 3, alice)) == 3


def test_get_streams_are_relayed_by_the_loop_and_hold_no_thread(gateway: Gunicorn) -> None:
    """Nine sessions' GET streams open on a worker of eight threads, and the session's POSTs are still served."""
    held = [start(gateway, "thinking", f"s{number}") for number in range(9)]
    streams = [requests.get(f"{gateway.url}/thinking/mcp", headers={**headers, "Accept": "text/event-stream"},
                            stream=True, timeout=10) for headers in held]
    try:
        assert all(stream.status_code == 200 for stream in streams)
        wait_for(lambda: sum(w["streams"] for w in gateway.status()["workers"]) >= 9, 10, "nine relayed streams")
        assert think(gateway, "thinking", held[-1], 1)["thoughtHistoryLength"] == 1
    finally:
        for stream in streams:
            stream.close()
        for headers in held:
            requests.delete(f"{gateway.url}/thinking/mcp", headers=headers, timeout=10)


# --- two workers: a session's requests land on both, and reach its owner ---------------------


def relayed(gateway: Gunicorn, server: str) -> int:
    """Access lines of requests to `server` that a worker relayed to the session's owner."""
    return sum(1 for line in gateway.log().splitlines()
               if "gateway.access" in line and f" server={server} " in line and " owner=-" not in line
               and " owner=" in line)


def test_the_sdk_round_trips_hold_when_the_sessions_requests_land_on_both_workers(two_workers: Gunicorn) -> None:
    # No kept-alive connections: every request of the SDK client is a new one, for either worker.
    fresh = httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60), limits=httpx2.Limits(max_keepalive_connections=0))
    texts, asked = sdk_round_trips(two_workers, fresh)
    assert "forty-two" in texts["trigger-sampling-request"], texts
    assert "Ada" in texts["trigger-elicitation-request"], texts
    assert "dedicated-root" in texts["get-roots-list"], texts
    assert relayed(two_workers, "every") > 0, "some of the session's requests reached the other worker"


def test_a_sessions_thoughts_stay_its_own_whichever_worker_a_request_reaches(two_workers: Gunicorn) -> None:
    alice, bob = start(two_workers, "thinking", "alice"), start(two_workers, "thinking", "bob")
    for number in range(1, 7):  # requests.post: a new connection each, for either worker
        assert think(two_workers, "thinking", alice, number)["thoughtHistoryLength"] == number
        assert think(two_workers, "thinking", bob, number)["thoughtHistoryLength"] == number
    assert relayed(two_workers, "thinking") > 0, "some requests reached the worker that does not own the session"


def test_a_modern_clients_process_is_found_from_either_worker(two_workers: Gunicorn) -> None:
    """By its correlation header (which names the owner), or by its principal (the host's workers agree on an owner)."""
    first = modern_think(two_workers, "thinking", 1, {})
    correlation = {CORRELATION_HEADER: first.headers[CORRELATION_HEADER]}
    alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
    assert history(modern_think(two_workers, "guarded-thinking", 1, alice)) == 1
    before = relayed(two_workers, "thinking"), relayed(two_workers, "guarded-thinking")
    # requests.post: a new connection each, for either worker; the kernel favours one worker (about 9 in 10 on
    # an idle machine), so it takes some tries to land on the other.
    for number in range(2, 122):
        assert history(modern_think(two_workers, "thinking", number, correlation)) == number
        assert history(modern_think(two_workers, "guarded-thinking", number, alice)) == number
        if number >= 4 and relayed(two_workers, "thinking") > before[0] \
                and relayed(two_workers, "guarded-thinking") > before[1]:
            break
    else:
        served = collections.Counter(line.split("]")[0] for line in two_workers.log().splitlines()
                                     if "gateway.access" in line and "thinking" in line)
        pytest.fail(f"no request reached the worker that does not hold the process; access lines by worker: {served}")
    assert history(modern_think(two_workers, "guarded-thinking", 1, bob)) == 1, "bob has a process of his own"


def test_delete_with_the_correlation_header_ends_the_modern_clients_process(two_workers: Gunicorn) -> None:
    first = modern_think(two_workers, "thinking", 1, {})
    correlation = {CORRELATION_HEADER: first.headers[CORRELATION_HEADER]}
    ended = requests.delete(f"{two_workers.url}/thinking/mcp", timeout=10,
                            headers={**ACCEPT_BOTH, "MCP-Protocol-Version": MODERN, **correlation})
    assert ended.status_code == 204, ended.text
    body = rpc("tools/list", {"_meta": ENVELOPE}, 2)
    for _ in range(4):  # either worker: the header's process is gone on both
        again = requests.post(f"{two_workers.url}/thinking/mcp", json=body, timeout=10, headers={
            **ACCEPT_BOTH, "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/list", **correlation})
        assert again.status_code == 404 and "start a new session" in again.text, again.text


def test_a_handshake_era_session_of_a_2026_process_has_a_process_of_its_own(two_workers: Gunicorn) -> None:
    """The process has no initialize: the gateway answers it, and every request of the session reaches the one process."""
    url = f"{two_workers.url}/modern-only/mcp"
    init = requests.post(url, json=rpc("initialize", {"protocolVersion": VERSION, "capabilities": {},
                                                      "clientInfo": {"name": "t", "version": "1"}}),
                         headers=ACCEPT_BOTH, timeout=30)
    assert init.status_code == 200, init.text
    result = init.json()["result"]
    assert result["protocolVersion"] == VERSION and result["serverInfo"]["name"] == "faulty-server", result
    assert "logging" in result["capabilities"], "the gateway answers logging/setLevel for it"
    sessions_pids = []
    for headers in ({**ACCEPT_BOTH, "Mcp-Session-Id": init.headers["Mcp-Session-Id"], "MCP-Protocol-Version": VERSION},
                    start(two_workers, "modern-only", "other")):
        assert requests.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers,
                             timeout=10).status_code == 202
        # logging/setLevel: 2026-07-28 has no such method; the gateway answers it, the level rides on the requests.
        level = call(two_workers, "modern-only", headers, "logging/setLevel", {"level": "info"}, 1)
        assert sse_or_json(level) == {"jsonrpc": "2.0", "id": 1, "result": {}}, level.text
        bad = call(two_workers, "modern-only", headers, "logging/setLevel", {"level": "loud"}, 1)
        assert sse_or_json(bad)["error"]["code"] == -32602, bad.text
        pids = {sse_or_json(call(two_workers, "modern-only", headers, "tools/call", {"name": "work", "arguments": {}},
                                 number))["result"]["content"][0]["text"] for number in range(2, 8)}
        assert len(pids) == 1, pids
        sessions_pids.append(pids.pop())
        requests.delete(url, headers=headers, timeout=10)
    assert sessions_pids[0] != sessions_pids[1], "each session has a process of its own"
