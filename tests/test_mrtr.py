"""MRTR through balanced instances: a retry with `requestState` reaches the instance that asked.

Official SDK servers seal `requestState` with a per-process key by default, so
two instances cannot read each other's: the gateway wraps the state in an
envelope of its own naming the instance and routes the retry there. Real
gunicorn (2 workers), two real SDK servers with their own keys, the official
SDK client in 2026-07-28 mode, and raw HTTP for tampering and a gone instance.
"""

from __future__ import annotations

import json
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

from gateway import errors, request_state

from .harness import ACCEPT_BOTH, Gunicorn, McpHttpServer, sse_or_json, write_registry

MODERN = "2026-07-28"
HEADERS = {**ACCEPT_BOTH, "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "ask"}
META = {"io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {"form": {}}}}


@pytest.fixture
def own_keys(tmp_path: Path) -> Iterator[tuple[list[McpHttpServer], Gunicorn]]:
    servers = [McpHttpServer(tmp_path, shared_state_key=False) for _ in range(2)]
    registry = write_registry(tmp_path, {"web": {"type": "http", "instances": [{"endpoint": s.url} for s in servers]}})
    try:
        with Gunicorn(registry, workers=2).serving() as gateway:
            yield servers, gateway
    finally:
        for server in servers:
            server.stop()


def ask(gateway: Gunicorn, request_id: int, **params: Any) -> Any:
    body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": "ask", "arguments": {}, "_meta": META, **params}}
    return requests.post(f"{gateway.url}/web/mcp", data=json.dumps(body), headers=HEADERS, timeout=30)


def test_every_mrtr_retry_reaches_the_instance_that_asked(own_keys: tuple[list[McpHttpServer], Gunicorn]) -> None:
    _, gateway = own_keys
    answers: list[str] = []

    async def on_elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async def scenario() -> None:
        async with (
            httpx2.AsyncClient(timeout=httpx2.Timeout(30), limits=httpx2.Limits(max_keepalive_connections=0)) as http,
            Client(streamable_http_client(f"{gateway.url}/web/mcp", http_client=http), mode=MODERN,
                   elicitation_callback=on_elicit) as client,
        ):
            for _ in range(8):  # round robin would send half the retries to the other instance
                result = await client.call_tool("ask", {})
                assert isinstance(result.content[0], types.TextContent), result
                answers.append(result.content[0].text)

    anyio.run(scenario)
    assert answers == ["hello Ada"] * 8


def test_the_client_sees_only_the_gateways_sealed_envelope(own_keys: tuple[list[McpHttpServer], Gunicorn]) -> None:
    servers, gateway = own_keys
    first = sse_or_json(ask(gateway, 1))["result"]
    assert first["resultType"] == "input_required"
    envelope = first["requestState"]
    assert envelope.startswith(request_state.PREFIX)
    assert all(server.url not in envelope for server in servers)
    key = next(iter(first["inputRequests"]))
    retried = sse_or_json(ask(gateway, 2, requestState=envelope,
                              inputResponses={key: {"action": "accept", "content": {"name": "Bo"}}}))
    assert retried["result"]["content"][0]["text"] == "hello Bo"


def test_a_tampered_envelope_is_a_clear_400(own_keys: tuple[list[McpHttpServer], Gunicorn]) -> None:
    _, gateway = own_keys
    envelope = sse_or_json(ask(gateway, 1))["result"]["requestState"]
    tampered = envelope[:-4] + ("AAAA" if not envelope.endswith("AAAA") else "BBBB")
    answer = ask(gateway, 2, requestState=tampered, inputResponses={})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == errors.INVALID_PARAMS and "start the call again" in error["message"]


def test_a_retry_for_an_instance_that_is_gone_tells_the_client_to_start_again(
        own_keys: tuple[list[McpHttpServer], Gunicorn]) -> None:
    servers, gateway = own_keys
    asked = [sse_or_json(ask(gateway, n))["result"] for n in range(1, 7)]  # round robin: both instances asked
    servers[0].stop()
    outcomes = []
    for n, result in enumerate(asked):
        key = next(iter(result["inputRequests"]))
        answer = ask(gateway, 20 + n, requestState=result["requestState"],
                     inputResponses={key: {"action": "accept", "content": {"name": "Cy"}}})
        body = sse_or_json(answer)
        if "error" in body:
            assert answer.status_code == 400 and body["error"]["code"] == errors.INVALID_PARAMS, body
            assert "start the call again" in body["error"]["message"]
            outcomes.append("start again")
        else:
            assert body["result"]["content"][0]["text"] == "hello Cy"
            outcomes.append("answered")
    assert set(outcomes) == {"start again", "answered"}
