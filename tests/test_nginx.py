"""conf/nginx.conf for real: nginx on loopback in front of real gunicorn.

JSON-RPC calls and SSE streams pass through it, and X-Forwarded-For is
believed only from it (nginx connects from 127.0.0.2, the proxy the registry
trusts; clients come from 127.0.0.3).
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    ROOT,
    SHARED_STATE_KEY,
    TIME_SERVER,
    Gunicorn,
    descendants,
    free_port,
    server_command,
    still_running,
    wait_for,
    wait_for_port,
    write_registry,
)

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("nginx")
    servers = {"time": {"type": "stdio", "command": TIME_SERVER},
               "sdk": {"type": "stdio", "command": server_command("sdk_server.py", "stdio"),
                       "env_vars": {"TEST_SERVER_STATE_KEY": SHARED_STATE_KEY}}}
    gateway = Gunicorn(write_registry(folder, servers, {"trusted_proxies": ["127.0.0.2"]}), workers=2)
    nginx = None
    try:
        gateway.wait_ready()
        port = free_port()
        site = (ROOT / "conf/nginx.conf").read_text()
        site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{gateway.port};")
        site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
        # Test only: nginx connects from 127.0.0.2, the address the registry trusts.
        site = site.replace("proxy_pass http://mcp_gateway;", "proxy_pass http://mcp_gateway;\n        proxy_bind 127.0.0.2;")
        (folder / "site.conf").write_text(site)
        temp = "".join(f"{kind}_temp_path {folder}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (folder / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log;\n"
            f"events {{ worker_connections 64; }}\nhttp {{\n access_log off;\n{temp} include {folder}/site.conf;\n}}\n")
        assert Path(NGINX).exists(), "nginx is needed; `make test` installs it"
        with open(folder / "nginx.out", "wb") as output:
            nginx = subprocess.Popen([NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf")],
                                     stdout=output, stderr=subprocess.STDOUT)
        wait_for_port(port, nginx, 15, "nginx",
                      lambda: (folder / "nginx.out").read_text() + (folder / "error.log").read_text())
        yield {"gateway": gateway, "port": port, "nginx": nginx}
    finally:
        if nginx is not None:
            children = descendants(nginx.pid)
            nginx.send_signal(signal.SIGTERM)
            nginx.wait(15)
            assert not still_running(children), "nginx workers left behind"
        gateway.stop_and_check()


@contextmanager
def post(port: int, server: str, body: dict[str, Any], headers: dict[str, str] | None = None,
         source: str = "127.0.0.3") -> Iterator[http.client.HTTPResponse]:
    """POST from `source` (a loopback address) and close the connection afterwards."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        connection.request("POST", f"/{server}/mcp", body=json.dumps(body),
                           headers={"Content-Type": "application/json", **(headers or {})})
        yield connection.getresponse()
    finally:
        connection.close()


def test_jsonrpc_calls_pass_through_nginx(stack: dict[str, Any]) -> None:
    with post(stack["port"], "time", LIST) as response:
        assert response.status == 200
        assert {t["name"] for t in json.loads(response.read())["result"]["tools"]} == {"get_current_time", "convert_time"}


def test_sse_events_pass_through_nginx_as_they_happen(stack: dict[str, Any]) -> None:
    body = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "slow", "arguments": {"steps": 3}, "_meta": {"progressToken": "t"}}}
    with post(stack["port"], "sdk", body, {"Accept": "application/json, text/event-stream"}) as response:
        assert response.status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream")
        first = response.read1(65536)
        while b"notifications/progress" not in first:
            first += response.read1(65536)
        assert b'"result"' not in first, "nginx held the stream back"
        assert b'"result"' in response.read()


def access_clients(gateway: Gunicorn, request_id: str) -> list[str]:
    return re.findall(rf"request_id={re.escape(request_id)} client=(\S+)", gateway.log())


def test_x_forwarded_for_is_believed_only_from_the_trusted_proxy(stack: dict[str, Any]) -> None:
    gateway: Gunicorn = stack["gateway"]
    spoof = {"X-Forwarded-For": "203.0.113.9"}
    with post(stack["port"], "time", LIST, {**spoof, "X-Request-Id": "via-nginx"}) as response:
        response.read()
    with post(gateway.port, "time", LIST, {**spoof, "X-Request-Id": "direct"}) as response:
        response.read()
    wait_for(lambda: access_clients(gateway, "via-nginx") and access_clients(gateway, "direct"), 10, "both access lines")
    # Through nginx: the address nginx saw (it appended it), not what the client claimed.
    assert access_clients(gateway, "via-nginx") == ["127.0.0.3"]
    # Straight to gunicorn from an untrusted peer: the header is ignored.
    assert access_clients(gateway, "direct") == ["127.0.0.3"]
    assert "client=203.0.113.9" not in gateway.log()


def test_slow_request_bodies_through_nginx_hold_no_gateway_thread(stack: dict[str, Any]) -> None:
    # 2 workers x 4 threads: 8 clients sending their body a byte a second would take every thread
    # if nginx passed the body on as it came (proxy_request_buffering off) and the gateway read it in one.
    held: list[socket.socket] = []
    try:
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", stack["port"]), timeout=10, source_address=("127.0.0.3", 0))
            held.append(sock)
            sock.sendall(b"POST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{")
        for _ in range(3):  # a byte a second
            time.sleep(1)
            for sock in held:
                sock.sendall(b" ")
        for _ in range(3):
            connection = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=4, source_address=("127.0.0.3", 0))
            try:
                connection.request("POST", "/time/mcp", body=json.dumps(LIST), headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                assert response.status == 200 and "tools" in json.loads(response.read())["result"]
            finally:
                connection.close()
    finally:
        for sock in held:
            sock.close()


def test_a_websocket_client_is_served_through_nginx(stack: dict[str, Any]) -> None:
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{stack['port']}/sdk/ws", subprotocols=["mcp"], open_timeout=10) as ws:  # type: ignore[list-item]
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                            "params": {"name": "slow", "arguments": {"steps": 2}, "_meta": {"progressToken": "t"}}}))
        seen = []
        while not seen or seen[-1].get("id") != 1:
            seen.append(json.loads(ws.recv(timeout=30)))
        assert [m.get("method") for m in seen[:-1]].count("notifications/progress") == 2, seen
        assert seen[-1]["result"]["content"][0]["text"] == "done", seen
