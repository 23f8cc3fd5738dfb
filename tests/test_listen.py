"""subscriptions/listen (2026-07-28): on dedicated sessions of both process eras, passed through to http servers,
refused on pooled processes; driven by the official SDK client's `listen` and by raw HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import httpx2
import pytest
import requests
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ResourceUpdated, ServerEvent, ToolsListChanged

from gateway.dedicated import CORRELATION_HEADER, MAX_LISTENS, SUBSCRIPTION_ID

from .harness import (
    ACCEPT_BOTH,
    EVERYTHING,
    Gunicorn,
    McpHttpServer,
    server_command,
    wait_for,
    write_registry,
)

MODERN = "2026-07-28"
HEADERS = {**ACCEPT_BOTH, "MCP-Protocol-Version": MODERN}
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
WATCHED = "test://watched"
EVERY_DOCUMENT = "demo://resource/static/document/architecture.md"
# Shorter than a listen stream is held in the tests below: a listen is not a request the deadline cuts.
REQUEST_TIMEOUT = 2


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpHttpServer]:
    server = McpHttpServer(tmp_path_factory.mktemp("listen-http"))
    try:
        yield server
    finally:
        server.stop()
    assert server.process.poll() is not None


@pytest.fixture(scope="module")
def gateway(http_server: McpHttpServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    sdk = {"type": "stdio", "command": server_command("sdk_server.py", "stdio"), "pool_min": 0,
           "request_timeout": REQUEST_TIMEOUT}
    servers = {
        "modern": {**sdk, "session_mode": "dedicated"},
        "every": {"type": "stdio", "command": ["node", str(EVERYTHING), "stdio"], "session_mode": "dedicated",
                  "pool_min": 0},
        "legacy": {"type": "stdio", "command": server_command("legacy_server.py"), "session_mode": "dedicated",
                   "pool_min": 0},
        "pooled": sdk,
        "web": {"type": "http", "instances": [{"endpoint": http_server.url}], "request_timeout": REQUEST_TIMEOUT},
    }
    registry = write_registry(tmp_path_factory.mktemp("listen"), servers,
                              {"sse_keepalive_interval": 1, "auth": {"protect_operator_endpoints": False}})
    with Gunicorn(registry, workers=2, threads=4).serving() as instance:
        yield instance


def post(gateway: Gunicorn, server: str, message: dict[str, Any], headers: dict[str, str] | None = None,
         **options: Any) -> requests.Response:
    extra = {"Mcp-Method": message["method"]}
    if message["method"] == "tools/call":
        extra["Mcp-Name"] = message["params"]["name"]
    return requests.post(f"{gateway.url}/{server}/mcp", data=json.dumps(message), timeout=30,
                         headers={**HEADERS, **extra, **(headers or {})}, **options)


def listen_message(request_id: Any, **filters: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "subscriptions/listen",
            "params": {"notifications": filters, "_meta": ENVELOPE}}


def correlation(gateway: Gunicorn, server: str) -> dict[str, str]:
    """A 2026-07-28 client's process on `server`: the header that leads its later requests back to it."""
    answer = post(gateway, server, {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": ENVELOPE}})
    assert answer.status_code == 200, answer.text
    return {CORRELATION_HEADER: answer.headers[CORRELATION_HEADER]}


def sdk_listen(url: str, headers: dict[str, str], tool: str, arguments: dict[str, Any], hold: float,
               **filters: Any) -> tuple[Any, list[ServerEvent]]:
    """The SDK client's listen: held for `hold` seconds, then `tool` called; the ack and the events it brought."""
    async def scenario() -> tuple[Any, list[ServerEvent]]:
        events: list[ServerEvent] = []
        async with (
            httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60)) as http,
            Client(streamable_http_client(url, http_client=http), mode=MODERN) as client,
            client.listen(**filters) as subscription,
        ):
            await anyio.sleep(hold)
            await client.call_tool(tool, arguments)
            with anyio.fail_after(20):
                async for event in subscription:
                    events.append(event)
                    if len(events) == len([f for f in filters.values() if f]):
                        break
            return subscription.honored, events

    return anyio.run(scenario)


def session_pids(gateway: Gunicorn, server: str) -> set[int]:
    return set(gateway.status()["servers"][server]["sessions"]["pids"])


# --- a dedicated 2026-07-28 process: the request is its own --------------------------------


def test_sdk_listen_on_a_dedicated_modern_process_outlives_the_request_timeout(gateway: Gunicorn) -> None:
    honored, events = sdk_listen(f"{gateway.url}/modern/mcp", correlation(gateway, "modern"), "announce",
                                 {"uri": WATCHED}, REQUEST_TIMEOUT + 1.5, tools_list_changed=True,
                                 resource_subscriptions=[WATCHED])
    assert honored.tools_list_changed and honored.resource_subscriptions == [WATCHED]
    assert set(events) == {ToolsListChanged(), ResourceUpdated(uri=WATCHED)}, events


def test_a_raw_listen_is_stamped_and_a_client_leaving_frees_the_session(gateway: Gunicorn) -> None:
    headers = correlation(gateway, "modern")
    with post(gateway, "modern", listen_message("watch", toolsListChanged=True), headers, stream=True) as stream:
        assert stream.status_code == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.headers["X-Accel-Buffering"] == "no"
        lines = stream.iter_lines()
        ack = json.loads(next(line for line in lines if line.startswith(b"data: "))[6:])
        assert ack["method"] == "notifications/subscriptions/acknowledged", ack
        assert ack["params"]["_meta"][SUBSCRIPTION_ID] == "watch"
        # The listen's id is in flight: a request may not take it while the stream is open.
        reused = post(gateway, "modern", {"jsonrpc": "2.0", "id": "watch", "method": "tools/list",
                                          "params": {"_meta": ENVELOPE}}, headers)
        assert reused.status_code == 400 and "already in flight" in reused.text, reused.text
    # The client left: the process was told (its stream ended, the id is free again).
    wait_for(lambda: post(gateway, "modern", {"jsonrpc": "2.0", "id": "watch", "method": "tools/list",
                                              "params": {"_meta": ENVELOPE}}, headers).status_code == 200,
             10, "the listen's id free again once its client left")


def test_a_session_holds_a_bounded_number_of_listens(gateway: Gunicorn) -> None:
    headers = correlation(gateway, "modern")
    opened = [post(gateway, "modern", listen_message(f"l{n}", toolsListChanged=True), headers, stream=True)
              for n in range(MAX_LISTENS)]
    try:
        assert all(stream.status_code == 200 for stream in opened), [s.text for s in opened if s.status_code != 200]
        refused = post(gateway, "modern", listen_message("one-more", toolsListChanged=True), headers)
        assert refused.status_code == 400 and "close one first" in refused.json()["error"]["message"], refused.text
    finally:
        for stream in opened:
            stream.close()

    def one_more_opens() -> bool:
        with post(gateway, "modern", listen_message("again", toolsListChanged=True), headers, stream=True) as again:
            return again.status_code == 200

    wait_for(one_more_opens, 10, "a listen once the others closed")


def test_malformed_filters_are_invalid_params(gateway: Gunicorn) -> None:
    headers = correlation(gateway, "modern")
    for params in ({}, {"notifications": []}, {"notifications": {"toolsListChanged": "yes"}},
                   {"notifications": {"resourceSubscriptions": "test://x"}},
                   {"notifications": {"resourceSubscriptions": [1]}},
                   {"notifications": {"resourceSubscriptions": [f"test://{n}" for n in range(300)]}}):
        message = {"jsonrpc": "2.0", "id": 9, "method": "subscriptions/listen", "params": {**params, "_meta": ENVELOPE}}
        answer = post(gateway, "modern", message, headers)
        assert answer.status_code == 400, (params, answer.text)
        error = answer.json()["error"]
        assert error["code"] == -32602 and "subscriptions/listen" in error["message"], error


def test_a_listen_needs_an_event_stream_answer(gateway: Gunicorn) -> None:
    headers = {**correlation(gateway, "modern"), "Accept": "application/json"}
    answer = post(gateway, "modern", listen_message(3, toolsListChanged=True), headers)
    assert answer.status_code == 400 and "text/event-stream" in answer.json()["error"]["message"], answer.text


def test_ending_the_session_ends_its_listen_gracefully(gateway: Gunicorn) -> None:
    before = session_pids(gateway, "every")
    headers = correlation(gateway, "every")
    new: set[int] = set()
    wait_for(lambda: new.update(session_pids(gateway, "every") - before) or new, 10, "the client's process in /status")
    (pid,) = new
    with post(gateway, "every", listen_message(5, toolsListChanged=True), headers, stream=True) as stream:
        lines = stream.iter_lines()
        assert b"subscriptions/acknowledged" in next(line for line in lines if line.startswith(b"data: "))
        ended = requests.delete(f"{gateway.url}/every/mcp", headers={**HEADERS, **headers}, timeout=10)
        assert ended.status_code == 204, ended.text
        last = [json.loads(line[6:]) for line in lines if line.startswith(b"data: ")][-1]
    assert last["id"] == 5 and last["result"]["_meta"][SUBSCRIPTION_ID] == 5, last
    wait_for(lambda: pid not in session_pids(gateway, "every"), 10, "the process gone from /status")
    again = post(gateway, "every", {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"_meta": ENVELOPE}},
                 headers)
    assert again.status_code == 404 and "start a new session" in again.text, again.text


# --- a dedicated handshake-era process: the gateway listens for the client -----------------------


def test_sdk_listen_on_a_dedicated_handshake_era_process_gets_its_resource_updates(gateway: Gunicorn) -> None:
    honored, events = sdk_listen(f"{gateway.url}/every/mcp", correlation(gateway, "every"),
                                 "toggle-subscriber-updates", {}, 0, resource_subscriptions=[EVERY_DOCUMENT])
    assert honored.resource_subscriptions == [EVERY_DOCUMENT], honored
    assert events == [ResourceUpdated(uri=EVERY_DOCUMENT)], events


def acknowledged(gateway: Gunicorn, server: str, **wanted: Any) -> dict[str, Any]:
    with post(gateway, server, listen_message(6, **wanted), correlation(gateway, server), stream=True) as stream:
        ack = json.loads(next(line for line in stream.iter_lines() if line.startswith(b"data: "))[6:])
    assert ack["method"] == "notifications/subscriptions/acknowledged" and ack["params"]["_meta"][SUBSCRIPTION_ID] == 6
    honored: dict[str, Any] = ack["params"]["notifications"]
    return honored


def test_a_handshake_era_process_is_acknowledged_only_what_its_capabilities_promise(gateway: Gunicorn) -> None:
    wanted = {"toolsListChanged": True, "promptsListChanged": True, "resourcesListChanged": True,
              "resourceSubscriptions": [EVERY_DOCUMENT]}
    # server-everything promises every list change and resource subscriptions; legacy_server.py none of them
    # (tools.listChanged false, no resources), so nothing it would never send is acknowledged.
    assert acknowledged(gateway, "every", **wanted) == wanted
    assert acknowledged(gateway, "legacy", **wanted) == {}


# --- passed through to an http server, refused on a pooled process ------------------------------


def test_sdk_listen_passes_through_to_an_http_server_and_outlives_the_request_timeout(gateway: Gunicorn) -> None:
    honored, events = sdk_listen(f"{gateway.url}/web/mcp", {}, "announce", {"uri": WATCHED}, REQUEST_TIMEOUT + 1.5,
                                 tools_list_changed=True, resource_subscriptions=[WATCHED])
    assert honored.tools_list_changed, honored
    assert set(events) == {ToolsListChanged(), ResourceUpdated(uri=WATCHED)}, events


def test_a_listen_on_a_pooled_process_is_refused_clearly(gateway: Gunicorn) -> None:
    answer = post(gateway, "pooled", listen_message(4, toolsListChanged=True))
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert "pooled" in error["message"] and "session_mode: dedicated" in error["message"], error
