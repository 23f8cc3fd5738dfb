"""Credentials never leave the gateway: not in forwarded headers, not in /status, /metrics or logs.

The MCP spec forbids token passthrough: whichever header carried the caller's
credential (Authorization, X-API-Key, or one the auth hook names) is dropped
before a request goes upstream. Secrets the registry pulls from the
environment (`${VAR}`) and URL userinfo (`user:pass@`) are shown masked.
Real gunicorn in front of a recording HTTP MCP server and real stdio servers.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from .harness import Gunicorn, free_port, server_command, write_registry

CI = "ci-token-0123456789abcdef"
SECRET = "s3cr3t-from-the-environment"
PASSWORD = "instance-password-42"
MODERN = "2026-07-28"


class RecordingServer(ThreadingHTTPServer):
    """A 2026-07-28 MCP server over HTTP that records the headers of every request it gets."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        recording = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                message = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                recording.seen.append({k.lower(): v for k, v in self.headers.items()})
                if message.get("method") == "server/discover":
                    result: dict[str, Any] = {"supportedVersions": [MODERN], "capabilities": {"tools": {}},
                                              "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
                else:
                    result = {"tools": [], "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
                body = json.dumps({"jsonrpc": "2.0", "id": message.get("id"), "result": result}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture
def recorder() -> Iterator[RecordingServer]:
    server = RecordingServer()
    yield server
    server.shutdown()
    server.server_close()


def tools_list(headers: dict[str, str]) -> dict[str, str]:
    return {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/list", **headers}


BODY = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list",
                   "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                                        "io.modelcontextprotocol/clientCapabilities": {}}}})


def test_no_credential_header_reaches_an_http_upstream(tmp_path: Any, recorder: RecordingServer) -> None:
    registry = write_registry(tmp_path, {"web": {"type": "http", "instances": [{"endpoint": recorder.url}],
                                                 "headers": {"X-Upstream-Key": "from-the-registry"}}},
                              {"auth": {"tokens": {"ci": CI}, "hook": "tests.auth_hook:team_header"}})
    with Gunicorn(registry).serving() as gateway:
        for credential in ({"Authorization": f"Bearer {CI}"}, {"X-API-Key": CI}, {"X-Team": "blue"},
                           {"x-api-key": CI, "X-Team": "blue"}):
            recorder.seen.clear()
            answer = requests.post(f"{gateway.url}/web/mcp", data=BODY, timeout=30,
                                   headers=tools_list({**credential, "X-Trace": "kept"}))
            assert answer.status_code == 200, answer.text
            calls = [seen for seen in recorder.seen if seen.get("mcp-method") == "tools/list"]
            assert calls, recorder.seen
            for seen in calls:
                assert seen.get("x-trace") == "kept"  # other headers pass
                assert seen.get("x-upstream-key") == "from-the-registry"
                assert not {"authorization", "x-api-key", "x-team"} & set(seen), (credential, seen)


def test_client_credentials_are_not_passed_through_when_the_gateway_asks_for_none(tmp_path: Any,
                                                                                 recorder: RecordingServer) -> None:
    registry = write_registry(tmp_path, {"web": {"type": "http", "instances": [{"endpoint": recorder.url}]}})
    with Gunicorn(registry).serving() as gateway:
        answer = requests.post(f"{gateway.url}/web/mcp", data=BODY, timeout=30,
                               headers=tools_list({"Authorization": "Bearer someone-elses", "X-API-Key": "k"}))
        assert answer.status_code == 200
    assert recorder.seen and not any({"authorization", "x-api-key"} & set(seen) for seen in recorder.seen)


def test_url_userinfo_authenticates_upstream_and_is_never_shown(tmp_path: Any, recorder: RecordingServer) -> None:
    endpoint = recorder.url.replace("http://", f"http://gateway:{PASSWORD}@")
    registry = write_registry(tmp_path, {"web": {"type": "http", "instances": [{"endpoint": endpoint}]}})
    with Gunicorn(registry).serving() as gateway:
        answer = requests.post(f"{gateway.url}/web/mcp", data=BODY, headers=tools_list({}), timeout=30)
        assert answer.status_code == 200
        shown = json.dumps(gateway.status()) + requests.get(f"{gateway.url}/metrics", timeout=10).text
    expected = "Basic " + base64.b64encode(f"gateway:{PASSWORD}".encode()).decode()
    assert recorder.seen and all(seen.get("authorization") == expected for seen in recorder.seen)
    assert recorder.url in shown  # the instance is still named, without its password
    for text in (shown, gateway.log()):
        assert PASSWORD not in text


def test_expanded_secrets_are_masked_in_status_metrics_and_logs(tmp_path: Any) -> None:
    server = {"type": "stdio", "command": server_command("sdk_server.py", "stdio", "--token=${TIME_API_KEY}-x"),
              "env_vars": {"API_KEY": "${TIME_API_KEY}", "PLAIN": "literal-value-in-file"}}
    demo = {"type": "template", "template_name": "demo", "instances": 1, "config": {"hello_from": "${TIME_API_KEY}"}}
    registry = write_registry(tmp_path, {"time": server, "demo": demo})
    with Gunicorn(registry, env={"TIME_API_KEY": SECRET}).serving() as gateway:
        status = gateway.status()
        page = requests.get(f"{gateway.url}/metrics", timeout=10).text
    time_server = status["servers"]["time"]
    assert "--token=${TIME_API_KEY}-x" in time_server["command"]  # the variable is named, its value is not
    assert sorted(time_server["env_vars"]) == ["API_KEY", "PLAIN"]
    for text in (json.dumps(status), page, gateway.log()):
        assert SECRET not in text
        assert "literal-value-in-file" not in text
