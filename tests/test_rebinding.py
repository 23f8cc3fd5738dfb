"""DNS rebinding: the Host and Origin a browser page can send are checked against allow-lists.

A page on `http://rebind.example:8000` whose name resolves to 127.0.0.1 sends
its own name as both Host and Origin. The MCP spec's Streamable HTTP
"Security Warning" asks servers to refuse it; the official SDKs answer 421 for
a Host and 403 for an Origin they do not allow. These run against real
gunicorn, with raw HTTP as a browser (or curl) sends it.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from gateway import errors

from .harness import TIME_SERVER, Gunicorn

LIST = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})


def raw(gateway: Gunicorn, method: str, path: str, headers: dict[str, str], body: str | None = None) -> tuple[int, Any]:
    """One request with exactly these Host/Origin headers (http.client sends Host as given)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        data = body.encode() if body is not None else None
        if data is not None:
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(data)))
        connection.endheaders(data)
        response = connection.getresponse()
        payload = response.read()
        kind = response.getheader("Content-Type") or ""
        return response.status, json.loads(payload) if kind.startswith("application/json") else payload
    finally:
        connection.close()


@pytest.fixture(scope="module")
def default_gateway(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The default configuration: no tokens, no allow-lists."""
    folder = tmp_path_factory.mktemp("rebinding")
    path = folder / "registry.yaml"
    path.write_text(json.dumps({"servers": {"time": {"type": "stdio", "command": TIME_SERVER}}}))
    with Gunicorn(path, log_dir=folder).serving() as gateway:
        yield gateway


@pytest.fixture(scope="module")
def public_gateway(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A gateway with a public name (behind nginx) and one allowed browser origin."""
    folder = tmp_path_factory.mktemp("rebinding-public")
    path = folder / "registry.yaml"
    path.write_text(json.dumps({
        "servers": {"time": {"type": "stdio", "command": TIME_SERVER}},
        "gateway": {"allowed_hosts": ["mcp.example.com", "api.example.com:8443", "*.tools.example.com"],
                    "allowed_origins": ["https://app.example.com", "http://dev.example.com:*"]},
    }))
    with Gunicorn(path, log_dir=folder).serving() as gateway:
        yield gateway


def test_a_rebinding_page_whose_origin_equals_its_host_is_refused(default_gateway: Gunicorn) -> None:
    page = "rebind.example:8000"
    status, body = raw(default_gateway, "POST", "/time/mcp", {"Host": page, "Origin": f"http://{page}"}, LIST)
    assert status == 421
    assert body["error"]["code"] == errors.INVALID_REQUEST
    assert "rebind.example" in body["error"]["message"] and "allowed_hosts" in body["error"]["message"]


@pytest.mark.parametrize("host", ["rebind.example:8000", "rebind.example", "localhost.evil.example", "127.0.0.1.nip.io",
                                  "evil.example:80"])
def test_a_foreign_host_is_421_on_every_route(default_gateway: Gunicorn, host: str) -> None:
    for method, path, body in (("POST", "/time/mcp", LIST), ("GET", "/time/mcp", None), ("DELETE", "/time/mcp", None),
                               ("GET", "/status", None), ("GET", "/metrics", None)):
        status, answer = raw(default_gateway, method, path, {"Host": host}, body)
        assert status == 421, (method, path)
        assert "error" in answer and "is not allowed" in answer["error"]["message"], (method, path)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "127.0.0.5:9", "LOCALHOST:8000"])
def test_loopback_hosts_are_served_on_any_port(default_gateway: Gunicorn, host: str) -> None:
    status, body = raw(default_gateway, "POST", "/time/mcp", {"Host": host}, LIST)
    assert status == 200, body
    assert {tool["name"] for tool in body["result"]["tools"]} == {"get_current_time", "convert_time"}


def test_liveness_answers_whatever_host_a_probe_sends(default_gateway: Gunicorn) -> None:
    # kubelet's httpGet probe sends the pod's IP as Host; /healthz tells a page nothing.
    status, body = raw(default_gateway, "GET", "/healthz", {"Host": "10.1.2.3:8000"})
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize("origin", ["http://rebind.example:8000", "https://evil.example", "null", "file://",
                                    "http://127.0.0.1.evil.example"])
def test_an_origin_is_never_trusted_because_it_matches_the_host(default_gateway: Gunicorn, origin: str) -> None:
    host = "localhost:8000"
    status, body = raw(default_gateway, "POST", "/time/mcp", {"Host": host, "Origin": origin}, LIST)
    assert status == 403
    assert body["error"]["code"] == errors.UNAUTHORIZED and "Origin" in body["error"]["message"]


@pytest.mark.parametrize("origin", ["http://localhost:6274", "http://127.0.0.1", "https://[::1]:8443"])
def test_loopback_origins_are_allowed(default_gateway: Gunicorn, origin: str) -> None:
    status, _ = raw(default_gateway, "POST", "/time/mcp", {"Host": "127.0.0.1", "Origin": origin}, LIST)
    assert status == 200


@pytest.mark.parametrize("origin", ["http://[", "http://", "://x", "http://a b", "http://example.com:99999", "http://[::1", "http://user@example.com"])
def test_a_malformed_origin_is_403_not_500_on_every_route(default_gateway: Gunicorn, origin: str) -> None:
    for method, path, body in (("POST", "/time/mcp", LIST), ("GET", "/time/mcp", None), ("DELETE", "/time/mcp", None),
                               ("GET", "/status", None), ("GET", "/metrics", None), ("GET", "/nope", None)):
        status, answer = raw(default_gateway, method, path, {"Host": "127.0.0.1", "Origin": origin}, body)
        assert status == 403, (method, path, answer)
        assert "Origin" in answer["error"]["message"]


@pytest.mark.parametrize("host, served", [
    ("mcp.example.com", True), ("MCP.example.com:443", True), ("mcp.example.com.", True),
    ("api.example.com:8443", True), ("api.example.com", False), ("api.example.com:443", False),
    ("a.tools.example.com", True), ("tools.example.com", False), ("evil.example", False),
])
def test_configured_public_names_are_served(public_gateway: Gunicorn, host: str, served: bool) -> None:
    status, _ = raw(public_gateway, "POST", "/time/mcp", {"Host": host}, LIST)
    assert status == (200 if served else 421)


@pytest.mark.parametrize("origin, allowed", [
    ("https://app.example.com", True), ("HTTPS://APP.EXAMPLE.COM", True), ("https://app.example.com:443", True),
    ("http://app.example.com", False), ("https://app.example.com:8443", False),
    ("http://dev.example.com:3000", True), ("http://dev.example.com", True), ("https://dev.example.com:3000", False),
    ("https://mcp.example.com", False),  # the gateway's own public name is not an allowed browser origin by itself
])
def test_origins_follow_allowed_origins(public_gateway: Gunicorn, origin: str, allowed: bool) -> None:
    status, _ = raw(public_gateway, "POST", "/time/mcp", {"Host": "mcp.example.com", "Origin": origin}, LIST)
    assert status == (200 if allowed else 403)
