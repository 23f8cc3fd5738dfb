"""Bad input is answered, never absorbed.

Whatever a client sends — JSON the gateway cannot re-encode, params its era
translation cannot read, nesting no server should have to parse, bodies over
the limit, HTTP that gunicorn's parser refuses — it gets a JSON-RPC error
with a 4xx status, and every process or lease the request held goes back.
Most tests run against real gunicorn (2 workers) with raw sockets where the
client must misbehave; the stage-by-stage failure injection runs in-process.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import errors, jsonrpc, metrics, protocol, sse, stdio_process
from gateway.runtime import EXTENSION_KEY

from .harness import (
    TIME_SERVER,
    Gunicorn,
    parse_answer,
    server_command,
    wait_for,
    write_registry,
)

# pool_size 1 per worker, so that the few requests which would leak a process
# today are enough to jam a server; wait_timeout short, so a jammed one says so soon.
SERVERS = {
    "time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 1, "wait_timeout": 5},
    "legacy": {"type": "stdio", "command": server_command("legacy_server.py"), "pool_size": 1, "wait_timeout": 5},
}
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
MODERN_HEADERS = {**JSON_HEADERS, "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"}
LIMIT = 4 * 1024 * 1024  # the default max_body_bytes
# What a log line of the gateway's or of gunicorn's own looks like (gateway/__init__.py, gunicorn's glogging).
RECORD = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S"
    r"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] \S"
)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    registry = write_registry(tmp_path_factory.mktemp("bad-input"), SERVERS)
    with Gunicorn(registry, workers=2, threads=4).serving() as instance:
        # Every worker's process of every server started (a slow start is not what is tested here).
        wait_for(lambda: all(pool(instance, server)["idle"] == instance.workers for server in SERVERS), 60)
        yield instance


def post(gateway: Gunicorn, server: str, body: bytes, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{gateway.url}/{server}/mcp", data=body, headers=headers or JSON_HEADERS, timeout=30)


def rpc_error(response: requests.Response, status: int, code: int, rpc_id: Any = None) -> str:
    """The message of the JSON-RPC error `response` must be."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json", response.text
    body = response.json()
    assert body["jsonrpc"] == "2.0" and body["id"] == rpc_id and body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    return message


def pool(gateway: Gunicorn, server: str) -> dict[str, Any]:
    """The server's pools now, added up over the workers.

    /status gives its own worker's view fresh and the others' as published up
    to a second ago, so each worker's view is taken from an answer of its own.
    """
    fresh: dict[int, dict[str, Any]] = {}
    for _ in range(200):
        status = gateway.status()
        own, view = status["answered_by"], status["servers"][server]
        fresh[own] = view.get("by_worker", {}).get(str(own), view)
        if len(fresh) == gateway.workers:
            break
    assert len(fresh) == gateway.workers, "not every worker answered /status"
    views = fresh.values()
    return {"busy": sum(v["busy"] for v in views), "idle": sum(v["idle"] for v in views),
            "restarts": sum(v["restarts"] for v in views),
            "pids": sorted(pid for v in views for pid in v["pids"]), "capacity": sum(v["pool_size"] for v in views)}


def assert_still_serving(gateway: Gunicorn, server: str, headers: dict[str, str] | None = None) -> None:
    body = {"jsonrpc": "2.0", "id": 99, "method": "tools/list"}
    if headers is not None and "MCP-Protocol-Version" in headers:
        body["params"] = {"_meta": ENVELOPE}
    response = post(gateway, server, json.dumps(body).encode(), headers)
    assert response.status_code == 200 and "tools" in response.json()["result"], response.text


class LogWatch:
    """The lines the gateway's log gained since it was made."""

    def __init__(self, gateway: Gunicorn):
        self.gateway = gateway
        self.start = len(gateway.log())

    def lines(self) -> list[str]:
        return self.gateway.log()[self.start:].splitlines()

    def assert_only_records(self) -> None:
        """Every new line is one log record: no traceback, no stray text, no control character."""
        for line in self.lines():
            assert RECORD.match(line) and not CONTROL.search(line), f"not a plain log record: {line!r}"


# --- a lone surrogate ------------------------------------------------------------

# (where, body text with \ud800 escaped as JSON allows, JSON-RPC code, the id the answer carries)
SURROGATES = [
    ("id", '{"jsonrpc":"2.0","id":"\\ud800","method":"tools/list"}', errors.INVALID_REQUEST, None),
    ("method", '{"jsonrpc":"2.0","id":1,"method":"tools/list\\udc00"}', errors.INVALID_REQUEST, 1),
    ("params", '{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"cursor":"\\ud800"}}', errors.INVALID_PARAMS, 1),
    ("_meta", '{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"k\\udfff":1}}}', errors.INVALID_PARAMS, 1),
]


@pytest.mark.parametrize("server", ["time", "legacy"])
@pytest.mark.parametrize(("where", "body", "code", "rpc_id"), SURROGATES, ids=[s[0] for s in SURROGATES])
def test_a_lone_surrogate_is_400_and_the_process_goes_back(gateway: Gunicorn, server: str, where: str, body: str,
                                                          code: int, rpc_id: Any) -> None:
    watch = LogWatch(gateway)
    before = pool(gateway, server)
    # More than every process of the server: one leaked per request would jam it for good.
    for _ in range(before["capacity"] + 1):
        message = rpc_error(post(gateway, server, body.encode()), 400, code, rpc_id)
        assert "lone UTF-16 surrogate" in message and where.strip("_") in message, message
    assert_still_serving(gateway, server)
    after = pool(gateway, server)
    assert after["busy"] == 0 and after["restarts"] == before["restarts"] and set(before["pids"]) <= set(after["pids"])
    watch.assert_only_records()


def test_a_surrogate_pair_is_a_character_and_passes(gateway: Gunicorn) -> None:
    # Python's json.dumps escapes non-BMP characters as pairs by default: those are fine.
    response = post(gateway, "time", b'{"jsonrpc":"2.0","id":"\\ud83d\\ude00","method":"tools/list"}')
    assert response.status_code == 200 and response.json()["id"] == "\U0001f600", response.text


# --- params the era translation cannot read ----------------------------------------

BAD_META = ['"abc"', "5", "[]", "null", '{"io.modelcontextprotocol/protocolVersion": 5}',
            '{"io.modelcontextprotocol/clientCapabilities": "all"}', '{"io.modelcontextprotocol/clientInfo": []}']


@pytest.mark.parametrize("era", ["legacy", "modern"])
@pytest.mark.parametrize("server", ["time", "legacy"])
@pytest.mark.parametrize("meta", BAD_META)
def test_malformed_meta_is_400_invalid_params_at_once(gateway: Gunicorn, meta: str, server: str, era: str) -> None:
    headers = MODERN_HEADERS if era == "modern" else JSON_HEADERS
    before = pool(gateway, server)
    body = f'{{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{{"_meta":{meta}}}}}'.encode()
    message = rpc_error(post(gateway, server, body, headers), 400, errors.INVALID_PARAMS, 1)
    assert message.startswith("params._meta") and "must be" in message, message
    # Refused before it reached a process: none was killed, none is left busy.
    after = pool(gateway, server)
    assert after["busy"] == 0 and after["restarts"] == before["restarts"] and set(before["pids"]) <= set(after["pids"])
    assert_still_serving(gateway, server, headers)


# --- nesting depth -------------------------------------------------------------------


def nested(depth: int, method: str = "tools/list") -> bytes:
    """A request whose JSON nests `depth` levels (the message itself is level 1)."""
    inner = depth - 3  # message, params, then the list levels
    return (f'{{"jsonrpc":"2.0","id":1,"method":"{method}","params":{{"cursor_of":' + "[" * (inner + 1)
            + "]" * (inner + 1) + "}}").encode()


@pytest.mark.parametrize("depth", [65, 200, 990, 100_000])
def test_nesting_deeper_than_max_json_depth_is_400_naming_the_limit(gateway: Gunicorn, depth: int) -> None:
    watch = LogWatch(gateway)
    before = pool(gateway, "time")
    message = rpc_error(post(gateway, "time", nested(depth)), 400, errors.INVALID_REQUEST)
    assert message == "server 'time': the request nests deeper than the gateway's limit of 64 levels (gateway.max_json_depth)"
    after = pool(gateway, "time")
    assert after["busy"] == 0 and after["restarts"] == before["restarts"]
    watch.assert_only_records()


@pytest.mark.parametrize("server", ["time", "legacy"])
def test_nesting_at_the_limit_and_brackets_in_strings_reach_the_server(gateway: Gunicorn, server: str) -> None:
    assert json.loads(nested(64))["params"]["cursor_of"] is not None
    response = post(gateway, server, nested(64))
    assert response.status_code == 200 and response.json()["id"] == 1, response.text
    in_strings = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/list",
                             "params": {"_meta": {"note": "[{" * 500 + '\\"[' * 100}}}).encode()
    response = post(gateway, server, in_strings)
    assert response.status_code == 200 and "tools" in response.json()["result"], response.text


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n\u00e9'),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=3), inner, max_size=4),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.integers(min_value=1, max_value=12), st.booleans())
def test_the_depth_scan_agrees_with_the_parsed_depth(value: Any, limit: int, ascii_only: bool) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "m", "params": {"v": value}}, ensure_ascii=ascii_only).encode()
    deep = depth_of(json.loads(body)) > limit
    if deep:
        with pytest.raises(errors.InvalidRequest, match="max_json_depth"):
            jsonrpc.parse(body, "s", max_depth=limit)
    else:
        jsonrpc.parse(body, "s", max_depth=limit)


# --- bodies over the limit -------------------------------------------------------------


def send_and_read(gateway: Gunicorn, head: bytes, chunks: Iterator[bytes]) -> tuple[bytes, BaseException | None]:
    """Send a request in one thread while reading the answer in this one, as a browser does."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
    failure: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(head)
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError as exc:
            failure.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError as exc:
        failure.append(exc)
    sender.join(30)
    sock.close()
    return answer, failure[0] if failure else None


def assert_jsonrpc_answer(raw: bytes, status: int, message_part: str) -> None:
    got, headers, body = parse_answer(raw)
    assert got == status and headers["content-type"] == "application/json", raw[:500]
    error = json.loads(body)
    assert error["jsonrpc"] == "2.0" and error["id"] is None and error["error"]["code"] == errors.INVALID_REQUEST, error
    assert message_part in error["error"]["message"], error


@pytest.mark.parametrize("size", [5 * 1024 * 1024, 10 * 1024 * 1024], ids=["5MB", "10MB"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_over_the_limit_gets_a_readable_413(gateway: Gunicorn, framing: str, size: int) -> None:
    piece = b'{"pad":"' + b"x" * (64 * 1024 - 10) + b'"}'
    count = size // len(piece)
    if framing == "chunked":
        head = b"POST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunks = iter([b"%x\r\n%s\r\n" % (len(piece), piece)] * count + [b"0\r\n\r\n"])
    else:
        head = (b"POST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (len(piece) * count))
        chunks = iter([piece] * count)
    answer, failure = send_and_read(gateway, head, chunks)
    assert failure is None, f"the connection failed while the body was sent: {failure!r}"
    assert_jsonrpc_answer(answer, 413, f"request body is over the gateway's limit of {LIMIT} bytes")
    assert_still_serving(gateway, "time")


def test_a_client_sending_its_body_slowly_reads_the_413_too(gateway: Gunicorn) -> None:
    # The rest of the body arrives after the answer, in pauses longer than the worker takes to answer.
    piece = b"x" * (64 * 1024)

    def paced() -> Iterator[bytes]:
        for _ in range(80):
            time.sleep(0.005)
            yield piece

    head = b"POST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (80 * len(piece))
    answer, failure = send_and_read(gateway, head, paced())
    assert failure is None, f"the connection failed while the body was sent: {failure!r}"
    assert_jsonrpc_answer(answer, 413, f"request body is over the gateway's limit of {LIMIT} bytes")


def test_a_client_that_sends_the_whole_body_first_reads_the_413(gateway: Gunicorn) -> None:
    # http.client (and requests, curl) send the body to its end before they read anything.
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=20)
    connection.request("POST", "/time/mcp", body=b"x" * (10 * 1024 * 1024), headers=JSON_HEADERS)
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == 413 and body["error"]["code"] == errors.INVALID_REQUEST, body


def test_an_invalid_chunk_size_is_400_with_a_jsonrpc_error(gateway: Gunicorn) -> None:
    watch = LogWatch(gateway)
    head = b"POST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer, failure = send_and_read(gateway, head, iter([b"zz\r\n{}\r\n0\r\n\r\n"]))
    assert failure is None
    assert_jsonrpc_answer(answer, 400, "server 'time': the request body could not be read: Invalid chunk size")
    watch.assert_only_records()


# --- HTTP that gunicorn's parser refuses -----------------------------------------------

REFUSED = [
    ("nul-in-header-value", b"POST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Note: a\x00b\r\nContent-Length: 2\r\n\r\n{}", 400),
    ("escape-in-header-value", b"POST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Note: \x1b[31mred\r\n\r\n", 400),
    ("invalid-header-name", b"POST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX Note: b\r\n\r\n", 400),
    ("invalid-request-line", b"GARBAGE\r\n\r\n", 400),
    ("control-in-request-line", b"POST /time/\x1b[2Jmcp\x00 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    ("invalid-http-version", b"POST /time/mcp HTTP/7.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    ("invalid-method", b"P\x01ST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    ("request-line-too-long", b"POST /time/" + b"m" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414),
    ("too-many-headers", b"POST /time/mcp HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n", 431),
    ("unknown-transfer-coding", b"POST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
]


@pytest.mark.parametrize(("request_bytes", "status"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_requests_gunicorn_refuses_get_a_jsonrpc_error(gateway: Gunicorn, request_bytes: bytes, status: int) -> None:
    watch = LogWatch(gateway)
    answer, failure = send_and_read(gateway, request_bytes, iter([]))
    assert failure is None
    got, headers, body = parse_answer(answer)
    assert got == status and headers["content-type"] == "application/json" and headers["connection"] == "close", answer
    error = json.loads(body)
    assert error["jsonrpc"] == "2.0" and error["id"] is None and error["error"]["code"] == errors.INVALID_REQUEST, error
    assert error["error"]["message"].startswith("the gateway could not read this HTTP request: "), error
    assert not CONTROL.search(error["error"]["message"]), error
    watch.assert_only_records()
    assert any("could not read an HTTP request from 127.0.0.1" in line for line in watch.lines()), watch.lines()


# --- a failure at each stage returns what the request held (in-process) ----------------------


@pytest.fixture
def app(make_app: Any) -> Any:
    return make_app({
        "time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 1},  # 2026-07-28: both ways translated
        "legacy": {"type": "stdio", "command": server_command("legacy_server.py"), "pool_size": 1},
    })


def requests_counted(server: str) -> float:
    return sum(sample.value for family in metrics.REQUESTS.collect() for sample in family.samples
               if sample.name.endswith("_total") and sample.labels["server"] == server)


def fail_once(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, when: Any = None) -> None:
    """Replace `owner.name` (a function or method) so that its first call matching `when` raises."""
    real = getattr(owner, name)
    fired: list[bool] = []

    def replacement(*args: Any, **kwargs: Any) -> Any:
        if not fired and (when is None or when(*args, **kwargs)):
            fired.append(True)
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, replacement)


def _failing_messages(real: Any) -> Any:
    fired: list[bool] = []

    def messages(process: Any, request_id: Any, deadline: float, cancel: Any = None) -> Iterator[Any]:
        if request_id == 1 and not fired:  # the client's request, after it was written: the answer is unread
            fired.append(True)
            raise RuntimeError("injected failure")
        yield from real(process, request_id, deadline, cancel)
    return messages


# Where a request can fail, from its body to the last byte of its answer.
STAGES = ["parse", "client_context", "request translation", "request encoding", "reading the answer",
          "reply translation", "answer encoding", "sse event encoding", "writing the answer"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_failure_at_any_stage_returns_the_process_and_the_lease(app: Any, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture, stage: str) -> None:
    gateway = app.extensions[EXTENSION_KEY]
    client = app.test_client()
    server = "legacy" if stage in ("sse event encoding", "writing the answer") else "time"
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {"Accept": "application/json"}
    if server == "legacy":  # notifications first, so the answer is a stream
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "progress", "arguments": {"steps": 2}, "_meta": {"progressToken": "t"}}}
        headers = {"Accept": "application/json, text/event-stream"}
    assert client.post(f"/{server}/mcp", json={**body, "id": 0}, headers=headers,
                       buffered=True).status_code == 200  # warm
    upstream = gateway.upstreams[server]
    pids = upstream.pool.stats()["pids"]
    counted = requests_counted(server)

    if stage == "parse":
        fail_once(monkeypatch, jsonrpc, "parse")
    elif stage == "client_context":
        fail_once(monkeypatch, protocol, "client_context")
    elif stage == "request translation":
        fail_once(monkeypatch, protocol, "request_for_server")
    elif stage == "request encoding":
        fail_once(monkeypatch, jsonrpc, "encode", when=lambda message: message.get("method") == "tools/list")
    elif stage == "reading the answer":
        monkeypatch.setattr(stdio_process.StdioProcess, "messages", _failing_messages(stdio_process.StdioProcess.messages))
    elif stage == "reply translation":
        fail_once(monkeypatch, protocol, "reply_for_client")
    elif stage == "answer encoding":
        fail_once(monkeypatch, jsonrpc.Reply, "encoded")
    elif stage == "sse event encoding":
        fail_once(monkeypatch, sse, "event")

    with caplog.at_level(logging.INFO, logger="gateway.access"):
        if stage == "writing the answer":
            # The client hangs up after the first event: the server closes the stream.
            response = client.post(f"/{server}/mcp", json=body, headers=headers, buffered=False)
            assert response.status_code == 200 and next(iter(response.response)).startswith(b"event: message")
            response.close()
        else:
            response = client.post(f"/{server}/mcp", json=body, headers=headers, buffered=True)
            if stage == "sse event encoding":  # headers were sent: the failure is the stream's last event
                events = [json.loads(e.split(b"data: ", 1)[1]) for e in response.get_data().split(b"\n\n") if e]
                assert events[-1]["error"]["code"] == errors.INTERNAL_ERROR and events[-1]["id"] == 1, events
            else:
                assert response.status_code == 500 and response.mimetype == "application/json", response.data
                error = response.get_json()
                assert error["error"]["code"] == errors.INTERNAL_ERROR, error
    stats = upstream.pool.stats()
    assert stats["busy"] == 0 and stats["idle"] == 1, stats
    if stage != "reading the answer":  # between messages: the very process is reused
        assert stats["pids"] == pids and stats["restarts"] == 0, stats
    assert all(gateway.leases.holding(held) == 0 for held in gateway.upstreams.values())  # every lease was handed back
    assert [r for r in caplog.records if r.name == "gateway.access" and f"server={server}" in r.getMessage()]
    assert requests_counted(server) == counted + 1
    # And the server serves on.
    assert client.post(f"/{server}/mcp", json=body, headers=headers, buffered=True).status_code == 200



def test_a_servers_malformed_input_request_becomes_an_error_not_a_crash() -> None:
    # A handshake-era client cannot answer input_required; a server's garbled list of what it needs
    # must still become that clear error, not an AttributeError.
    reply = {"jsonrpc": "2.0", "id": 3, "result": {"resultType": "input_required", "inputRequests": ["not", "a", "map"]}}
    answer = protocol.reply_for_client(reply, "tools/call", protocol.LEGACY, protocol.MODERN, "s")
    assert answer["id"] == 3 and answer["error"]["code"] == errors.INTERNAL_ERROR and "needs input" in answer["error"]["message"]
