"""The access line: one per request, with request id, server, MCP method, upstream, status, time."""

from __future__ import annotations

import json
import logging
import shlex
from typing import Any

import pytest
import responses

from .harness import TIME_SERVER

LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.access"]


def test_each_request_gets_one_line_and_an_id(make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = make_app({"time": {"type": "stdio", "command": TIME_SERVER}}).test_client()
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        response = client.post("/time/mcp", json=LIST)
        response.close()
        given = client.post("/time/mcp", json=LIST, headers={"X-Request-Id": "trace-42"})
        given.close()
        bad = client.post("/nope/mcp", json=LIST, headers={"X-Request-Id": "bad id with spaces"})
        bad.close()
    generated = response.headers["X-Request-Id"]
    assert len(generated) == 32 and given.headers["X-Request-Id"] == "trace-42"
    assert bad.headers["X-Request-Id"] != "bad id with spaces"
    lines = access_lines(caplog)
    assert len(lines) == 3
    first = dict(part.split("=", 1) for part in shlex.split(lines[0]))
    assert first["request_id"] == generated and first["server"] == "time" and first["mcp_method"] == "tools/list"
    assert first["http"] == "POST /time/mcp" and first["upstream"].startswith("pid ")
    assert first["status"] == "200" and float(first["duration_ms"]) > 0
    assert "request_id=trace-42" in lines[1] and "status=404" in lines[2] and "server=nope" in lines[2]


def test_json_lines_on_request(make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = make_app({"time": {"type": "stdio", "command": TIME_SERVER}}, {"log_format": "json"}).test_client()
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        client.post("/time/mcp", json=LIST, headers={"Authorization": "Bearer secret-value-not-logged"}).close()
    entry = json.loads(access_lines(caplog)[0])
    assert entry["server"] == "time" and entry["mcp_method"] == "tools/list" and entry["status"] == 200
    assert entry["upstream"].startswith("pid ") and entry["http"] == "POST /time/mcp"
    assert all("secret-value-not-logged" not in r.getMessage() for r in caplog.records)


@responses.activate
def test_request_id_reaches_http_upstreams(make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    def answer(request: Any) -> tuple[int, dict[str, str], str]:  # as a server does: the request's own id
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"jsonrpc": "2.0", "id": json.loads(request.body).get("id"), "result": {"tools": []}})

    responses.add_callback(responses.POST, "http://up.test/mcp", callback=answer)
    client = make_app({"web": {"type": "http", "instances": [{"endpoint": "http://up.test"}]}}).test_client()
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        client.post("/web/mcp", json=LIST, headers={"X-Request-Id": "abc-123"}).close()
    # (the upkeep thread's health probe may also reach the instance, without an id)
    sent = [call.request for call in responses.calls
            if call.request.url == "http://up.test/mcp" and b'"tools/list"' in (call.request.body or b"")]
    assert len(sent) == 1 and sent[0].headers["X-Request-Id"] == "abc-123"
    assert "upstream=http://up.test" in access_lines(caplog)[0]
