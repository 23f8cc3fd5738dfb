"""Sessions routed to their owner (gateway/owners.py), on real gunicorn with 2 workers, and across replicas.

A session id names the worker holding its state (`Session.owner`). Until
dedicated sessions mint such ids, the tests mint them with the gateway's
secret, naming a worker found in /status. Which worker serves a call is told
by the stdio process that answers `whoami` (its pid, whose parent is the worker).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway import owners
from gateway.sessions import SessionSigner, load_secrets

from .harness import (
    GUNICORN_SECRET,
    ROOT,
    Gunicorn,
    descendants,
    free_port,
    parent_of,
    server_command,
    sse_or_json,
    still_running,
    wait_for,
    wait_for_port,
    write_registry,
)

VERSION = "2025-06-18"
SERVERS = {"legacy": {"type": "stdio", "command": server_command("legacy_server.py"), "pool_size": 1}}
# A process per session: its whoami is the pid of the session's own process.
DEDICATED = {"own": {"type": "stdio", "command": server_command("sdk_server.py", "stdio"), "session_mode": "dedicated",
                     "pool_min": 0}}
NGINX = "/usr/sbin/nginx"
TRIES = 120  # fresh connections tried until one lands on the other worker


def signer() -> SessionSigner:
    return SessionSigner([GUNICORN_SECRET.encode()], 3600)


def mint(owner: str | None) -> str:
    return signer().mint("legacy", VERSION, owner=owner)


def call(url: str, session_id: str, tool: str = "whoami", request_id: int = 1,
         extra: dict[str, str] | None = None) -> requests.Response:
    """tools/call on a fresh connection (requests opens one per call without a Session)."""
    body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": tool, "arguments": {}}}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "Mcp-Session-Id": session_id, "MCP-Protocol-Version": VERSION, "Connection": "close", **(extra or {})}
    return requests.post(f"{url}/legacy/mcp", data=json.dumps(body), headers=headers, timeout=30)


def answering_worker(response: requests.Response) -> int:
    """The worker whose stdio process answered `whoami`."""
    text = response.text
    if text.startswith("event:") or "data:" in text[:20]:
        text = next(line[5:] for line in text.splitlines() if line.startswith("data:"))
    pid = int(json.loads(text)["result"]["content"][0]["text"])
    return parent_of(pid)


def worker_owners(gateway: Gunicorn) -> dict[int, str]:
    """pid -> owner name of every worker, once each has published its status."""
    found: dict[int, str] = {}

    def every_worker_listed() -> bool:
        for _ in range(6):
            for worker in gateway.status()["workers"]:
                if worker.get("owner"):
                    found[worker["pid"]] = worker["owner"]
        return set(found) >= gateway.worker_pids()

    wait_for(every_worker_listed, 20, "every worker's owner name in /status")
    return {pid: found[pid] for pid in gateway.worker_pids()}


def relayed_lines(gateway: Gunicorn, owner: str) -> list[str]:
    return [line for line in gateway.log().splitlines() if f"owner={owner}" in line]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gunicorn]:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    with Gunicorn(write_registry(tmp_path, SERVERS), workers=2, threads=4,
                  env={"MCP_GATEWAY_RUNTIME_DIR": str(run)}).serving() as instance:
        instance.runtime_dir = run  # type: ignore[attr-defined]
        yield instance


def test_every_request_of_an_owned_session_is_served_by_its_owner(gateway: Gunicorn) -> None:
    names = worker_owners(gateway)
    for owner_pid, owner in names.items():
        session_id = mint(owner)
        for attempt in range(TRIES):
            response = call(gateway.url, session_id, request_id=attempt)
            assert response.status_code == 200, response.text
            assert answering_worker(response) == owner_pid
            if relayed_lines(gateway, owner):
                break
        else:
            pytest.fail(f"no request of {TRIES} landed on the worker that is not {owner}")
        line = relayed_lines(gateway, owner)[0]
        assert "status=200" in line and "mcp_method=tools/call" in line
    # A session without an owner is served wherever it lands.
    assert call(gateway.url, mint(None)).status_code == 200


def test_a_relayed_sse_answer_comes_back_event_by_event(gateway: Gunicorn) -> None:
    owner = next(iter(worker_owners(gateway).values()))
    session_id = mint(owner)
    body = {"jsonrpc": "2.0", "id": 5, "method": "tools/call",
            "params": {"name": "progress", "arguments": {"steps": 3}, "_meta": {"progressToken": "tok"}}}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "Mcp-Session-Id": session_id, "MCP-Protocol-Version": VERSION, "Connection": "close"}
    for attempt in range(TRIES):
        tag = f"sse-{attempt}"
        with requests.post(f"{gateway.url}/legacy/mcp", data=json.dumps(body), timeout=30, stream=True,
                           headers={**headers, "X-Request-Id": tag}) as response:
            assert response.status_code == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = [json.loads(line[5:]) for line in response.iter_lines(decode_unicode=True)
                      if line.startswith("data:")]
        assert [e["params"]["progress"] for e in events if e.get("method") == "notifications/progress"] == [1, 2, 3]
        assert events[-1]["id"] == 5 and "result" in events[-1]
        if any(f"request_id={tag} " in line for line in relayed_lines(gateway, owner)):
            return
    pytest.fail(f"no request of {TRIES} landed on the worker that is not {owner}")


def test_a_forwarding_header_is_good_for_its_owner_method_path_session_and_window_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, other = owners.keys([b"a-secret-of-sixteen-chars", b"an-older-secret-still-opens"])
    header = owners.sign(key, owners.WORKER, "7.ab", "POST", "/legacy/mcp", "v1.x")
    assert owners.verify([key], header, "7.ab", "POST", "/legacy/mcp", "v1.x") == owners.WORKER
    assert owners.verify([other, key], header, "7.ab", "POST", "/legacy/mcp", "v1.x") == owners.WORKER  # rotation
    for target, method, path, session_id in [("7.ac", "POST", "/legacy/mcp", "v1.x"), ("7.ab", "GET", "/legacy/mcp", "v1.x"),
                                             ("7.ab", "POST", "/other/mcp", "v1.x"), ("7.ab", "POST", "/legacy/mcp", "v1.y"),
                                             ("7.ab", "POST", "/legacy/mcp", "")]:
        assert owners.verify([key], header, target, method, path, session_id) is None
    assert owners.verify([other], header, "7.ab", "POST", "/legacy/mcp", "v1.x") is None
    kind, stamp, mac = header.split(".")
    assert owners.verify([key], f"{owners.REPLICA}.{stamp}.{mac}", "7.ab", "POST", "/legacy/mcp", "v1.x") is None
    old = str(int(stamp) - int(owners.FORWARD_WINDOW) - 5)
    assert owners.verify([key], f"{kind}.{old}.{mac}", "7.ab", "POST", "/legacy/mcp", "v1.x") is None
    assert owners.split("7.ab@http://10.0.0.5:8000") == ("7.ab", "http://10.0.0.5:8000")
    monkeypatch.setenv("MCP_GATEWAY_RUNTIME_DIR", str(tmp_path))
    assert owners.socket_path("7.ab") == tmp_path / "owners" / "7.ab.sock"
    assert owners.socket_path("../../etc/x") is None and owners.socket_path(".hidden") is None


def test_a_delete_reaches_the_owner_and_ends_the_session(gateway: Gunicorn) -> None:
    owner = next(iter(worker_owners(gateway).values()))
    session_id = mint(owner)
    headers = {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": VERSION, "Connection": "close"}
    assert requests.delete(f"{gateway.url}/legacy/mcp", headers=headers, timeout=10).status_code == 204
    for attempt in range(4):
        assert call(gateway.url, session_id, request_id=attempt).status_code == 404


def test_sessions_of_a_killed_owner_get_404_and_the_others_go_on(gateway: Gunicorn) -> None:
    names = worker_owners(gateway)
    (victim, victim_owner), (survivor, survivor_owner) = names.items()
    doomed, living = mint(victim_owner), mint(survivor_owner)
    assert call(gateway.url, doomed).status_code == 200
    socket_file = gateway.runtime_dir / "owners" / f"{owners.split(victim_owner)[0]}.sock"  # type: ignore[attr-defined]
    assert socket_file.exists()
    gateway.remember()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(gateway.worker_pids() - {victim}) == 2, 30, "a new worker in place of the one killed")
    wait_for(lambda: not socket_file.exists(), 15, "the killed worker's socket removed")
    seen_404 = 0
    for attempt in range(10):
        gone = call(gateway.url, doomed, request_id=attempt)
        assert gone.status_code == 404, gone.text
        assert "start a new session" in gone.json()["error"]["message"]
        seen_404 += 1
        fine = call(gateway.url, living, request_id=attempt)
        assert fine.status_code == 200, fine.text
        assert answering_worker(fine) == survivor
    assert seen_404 == 10


def _raw_on_socket(path: Path, headers: dict[str, str]) -> tuple[int, bytes]:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(15)
    try:
        sock.connect(str(path))
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall((f"POST /legacy/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"Accept: application/json\r\nConnection: close\r\n{head}Content-Length: {len(body)}\r\n\r\n"
                      f"{body}").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    status = int(data.split(b" ", 2)[1])
    return status, data


def test_an_owner_socket_takes_only_authenticated_forwarded_requests(gateway: Gunicorn) -> None:
    pid, owner = next(iter(worker_owners(gateway).items()))
    local = owners.split(owner)[0]
    path = gateway.runtime_dir / "owners" / f"{local}.sock"  # type: ignore[attr-defined]
    assert path.stat().st_mode & 0o777 == 0o600
    session_id = mint(owner)
    base = {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": VERSION}
    key = owners.keys(load_secrets(GUNICORN_SECRET))[0]
    other_key = owners.keys([b"not-the-gateway-secret-at-all"])[0]
    refused = [
        base,  # no forwarding header
        {**base, owners.FORWARD_HEADER: "worker.1.00"},  # garbage
        {**base, owners.FORWARD_HEADER: owners.sign(other_key, owners.WORKER, local, "POST", "/legacy/mcp", session_id)},
        {**base, owners.FORWARD_HEADER: owners.sign(key, owners.WORKER, "1.other", "POST", "/legacy/mcp", session_id)},
        {**base, owners.FORWARD_HEADER: owners.sign(key, owners.WORKER, local, "POST", "/legacy/mcp", mint(owner))},
        {**base, owners.FORWARD_HEADER: f"worker.{int(time.time()) - 3600}.{'0' * 64}"},
    ]
    for headers in refused:
        status, data = _raw_on_socket(path, headers)
        assert status == 403, data
        assert b"relayed by the gateway" in data
    genuine = {**base, owners.FORWARD_HEADER: owners.sign(key, owners.WORKER, local, "POST", "/legacy/mcp", session_id)}
    status, data = _raw_on_socket(path, genuine)
    assert status == 200, data
    whoami = int(re.findall(rb'"text": ?"(\d+)"', data)[0])
    assert parent_of(whoami) == pid
    # On the TCP port a forwarding header grants nothing: the request is served or relayed as any.
    assert call(gateway.url, session_id, extra={owners.FORWARD_HEADER: "worker.1.00"}).status_code == 200


# --- two replicas behind nginx ------------------------------------------------------


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[dict[str, Any]]:
    assert Path(NGINX).exists(), "nginx is needed; `make test` installs it"
    gateways: list[Gunicorn] = []
    nginx = None
    try:
        for name in ("a", "b"):
            folder = tmp_path / name
            folder.mkdir()
            port = free_port()
            registry = write_registry(folder, {**SERVERS, **DEDICATED}, {"advertise_url": f"http://127.0.0.1:{port}"})
            gateways.append(Gunicorn(registry, workers=2, port=port))
        for gateway in gateways:
            gateway.wait_ready()
        port = free_port()
        site = (ROOT / "conf/nginx.conf").read_text()
        site = site.replace("server 127.0.0.1:8000;", "".join(f"server 127.0.0.1:{g.port};\n" for g in gateways))
        site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
        (tmp_path / "site.conf").write_text(site)
        temp = "".join(f"{kind}_temp_path {tmp_path}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (tmp_path / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
            f"events {{ worker_connections 64; }}\nhttp {{\n access_log off;\n{temp} include {tmp_path}/site.conf;\n}}\n")
        with open(tmp_path / "nginx.out", "wb") as output:
            nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                                     stdout=output, stderr=subprocess.STDOUT)
        wait_for_port(port, nginx, 15, "nginx",
                      lambda: (tmp_path / "nginx.out").read_text() + (tmp_path / "error.log").read_text())
        yield {"gateways": gateways, "url": f"http://127.0.0.1:{port}"}
    finally:
        if nginx is not None:
            children = descendants(nginx.pid)
            nginx.send_signal(signal.SIGTERM)
            nginx.wait(15)
            assert not still_running(children), "nginx workers left behind"
        for gateway in gateways:
            gateway.stop_and_check()


def test_an_owned_session_alternating_replicas_reaches_its_owner_every_time(replicas: dict[str, Any]) -> None:
    a, b = replicas["gateways"]
    owner_pid, owner = next(iter(worker_owners(a).items()))
    assert owner.endswith(f"@http://127.0.0.1:{a.port}")
    session_id = mint(owner)
    for attempt in range(12):
        response = call(replicas["url"], session_id, request_id=attempt)
        assert response.status_code == 200, response.text
        assert answering_worker(response) == owner_pid
    assert relayed_lines(b, owner), "nginx never sent a request of the session to the other replica"
    # The owner's replica gone: 404 from the other one, which tells the client to start again.
    a.stop_and_check()
    gone = call(f"http://127.0.0.1:{b.port}", session_id)
    assert gone.status_code == 404 and "start a new session" in gone.json()["error"]["message"]


def test_a_real_dedicated_session_alternating_replicas_keeps_its_process(replicas: dict[str, Any]) -> None:
    """initialize through nginx starts a process on one replica; every later request, on either, reaches it."""
    url = f"{replicas['url']}/own/mcp"
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "Connection": "close"}
    init = requests.post(url, headers=headers, timeout=30, data=json.dumps({
        "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}))
    assert init.status_code == 200, init.text
    headers.update({"Mcp-Session-Id": init.headers["Mcp-Session-Id"], "MCP-Protocol-Version": VERSION})
    done = requests.post(url, headers=headers, timeout=10,
                         data=json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    assert done.status_code == 202, done.text
    pids = set()
    for attempt in range(1, 13):
        answer = requests.post(url, headers=headers, timeout=30, data=json.dumps(
            {"jsonrpc": "2.0", "id": attempt, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}))
        assert answer.status_code == 200, answer.text
        pids.add(sse_or_json(answer)["result"]["structuredContent"]["result"])
    assert len(pids) == 1, f"the session's requests reached {len(pids)} processes"
    logs = "".join(gateway.log() for gateway in replicas["gateways"]).splitlines()
    relayed = [line for line in logs if "server=own" in line and " owner=" in line and " owner=-" not in line]
    assert relayed, "nginx never sent a request of the session to the replica that does not hold its process"
    ended = requests.delete(url, headers=headers, timeout=10)
    assert ended.status_code == 204, ended.text


def test_a_relayed_request_is_never_relayed_to_a_third_replica(replicas: dict[str, Any]) -> None:
    a, b = replicas["gateways"]
    owner = "1.abc@http://127.0.0.1:9"  # a replica that is neither
    session_id = mint(owner)
    key = owners.keys(load_secrets(GUNICORN_SECRET))[0]
    forwarded = {owners.FORWARD_HEADER: owners.sign(key, owners.REPLICA, owner, "POST", "/legacy/mcp", session_id)}
    looped = call(f"http://127.0.0.1:{b.port}", session_id, extra=forwarded)
    assert looped.status_code == 508, looped.text
    # Not forwarded: relayed, and the replica named is unreachable, so the session is gone.
    assert call(f"http://127.0.0.1:{a.port}", session_id).status_code == 404


# --- a handshake-era client's cancel reaches the worker serving the call -----------------------


def test_a_cancel_posted_to_the_other_worker_reaches_the_long_stdio_call(tmp_path: Path) -> None:
    record = tmp_path / "record"
    servers = {"srv": {"type": "stdio", "command": server_command("faulty_server.py", "cancel-silent", str(record)),
                       "pool_size": 2, "pool_min": 0}}
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    with Gunicorn(write_registry(tmp_path, servers), workers=2, threads=4,
                  env={"MCP_GATEWAY_RUNTIME_DIR": str(run)}).serving() as gateway:
        wait_for(lambda: len(owners_listening(run)) == 2, 15, "both workers' owner sockets")
        hello = requests.post(f"{gateway.url}/srv/mcp", timeout=30, headers={
            "Content-Type": "application/json", "Accept": "application/json, text/event-stream"},
            data=json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}))
        session_id = hello.headers["Mcp-Session-Id"]
        session = {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": VERSION}
        crossed = False
        for request_id in range(100, 106):  # a new call whenever the cancel landed on the worker holding it
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=15)
            try:
                body = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {
                    "name": "work", "arguments": {}, "_meta": {"progressToken": f"p-{request_id}"}}}).encode()
                head = "".join(f"{name}: {value}\r\n" for name, value in session.items())
                sock.sendall(f"POST /srv/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             f"Accept: application/json, text/event-stream\r\n{head}Content-Length: {len(body)}\r\n"
                             f"\r\n".encode() + body)
                data = read_progress(sock)
                holder = busy_worker(gateway)
                tag = f"cancel-{request_id}"
                cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                          "params": {"requestId": request_id, "reason": "test"}}
                answer = requests.post(f"{gateway.url}/srv/mcp", data=json.dumps(cancel), timeout=10, headers={
                    "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                    "Connection": "close", "X-Request-Id": tag, **session})
                assert answer.status_code == 202
                wait_for(lambda rid=str(request_id): rid in cancelled(record), 15, f"call {request_id} cancelled at its process")
                # The call's stream ends (its last chunk), without a response: the request was cancelled.
                while not data.endswith(b"0\r\n\r\n"):
                    chunk = sock.recv(65536)
                    assert chunk, "the stream was cut instead of ended"
                    data += chunk
                assert b'"result"' not in data
                if access_pid(gateway, tag) != holder:
                    crossed = True
                    break
            finally:
                sock.close()
        assert crossed, "no cancel of 6 landed on the worker that did not hold the call"
        wait_for(lambda: requests.get(f"{gateway.url}/status", timeout=5).json()["servers"]["srv"]["busy"] == 0,
                 10, "the processes free again")


def owners_listening(run: Path) -> list[Path]:
    return list((run / "owners").glob("*.sock")) if (run / "owners").exists() else []


def read_progress(sock: socket.socket) -> bytes:
    data = b""
    deadline = time.monotonic() + 20
    while b"notifications/progress" not in data:
        assert time.monotonic() < deadline, data
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def busy_worker(gateway: Gunicorn) -> int:
    found: list[int] = []

    def one_busy() -> bool:
        by_worker = requests.get(f"{gateway.url}/status", timeout=5).json()["servers"]["srv"].get("by_worker", {})
        found[:] = [int(pid) for pid, view in by_worker.items() if view.get("busy")]
        return len(found) == 1

    wait_for(one_busy, 10, "one worker holding the call")
    return found[0]


def access_pid(gateway: Gunicorn, request_id: str) -> int:
    lines = [line for line in gateway.log().splitlines() if f"request_id={request_id} " in line]
    assert lines, f"no access line for {request_id}"
    return int(re.search(r"\[(\d+)\] INFO gateway.access", lines[-1]).group(1))  # type: ignore[union-attr]


def cancelled(record: Path) -> list[str]:
    if not record.exists():
        return []
    return [line.split(" ", 2)[2] for line in record.read_text().splitlines() if " cancelled " in line]
