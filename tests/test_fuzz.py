"""Property-based fuzzing of every client-controlled byte, against real gunicorn.

Hypothesis writes requests as an attacker would: hostile Host, Origin,
Mcp-Session-Id, MCP-Protocol-Version, Mcp-Method and Mcp-Name headers, odd
paths (percent-encoded CR/LF, dot segments, long ones) and bodies from
valid JSON-RPC to garbage. They go out on raw sockets, so nothing on the
client side cleans them. Whatever is sent, the invariants hold: no 5xx, no
worker dies, no process is left busy, and every line of the log is a log
record (none forged, no traceback). Bounded in count; each request has a
timeout.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .harness import TIME_SERVER, Gunicorn, raw_exchange, wait_for, write_registry

EXAMPLES = 150
# A record of ours (gateway/__init__.py's format) or of gunicorn's own logger.
RECORD = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] [A-Z]+ |\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[[A-Z]+\] )")

# Header values as bytes: anything but CR and LF (which would end the header, not fuzz it).
header_bytes = st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
header_text = st.one_of(
    header_bytes,
    st.text(max_size=200).map(lambda t: t.replace("\r", "").replace("\n", "").encode("utf-8")),
    st.sampled_from([b"", b"2026-07-28", b"2025-11-25", b"2025-03-26", b"tools/list", b"tools/call",
                     b"=?base64?AAAA?=", b"=?base64?!!?=", b"http://[", b"null", b"http://localhost:1",
                     b"rebind.example:8000", b"localhost", b"127.0.0.1", b"x" * 5000]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
METHODS = ["initialize", "ping", "tools/list", "tools/call", "server/discover", "resources/read", "prompts/get",
           "notifications/initialized", "notifications/cancelled", "logging/setLevel", "subscriptions/listen", "",
           "tools/list\r\nrequest_id=FORGED", "tools/\u2028list", "x" * 3000]
messages = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "1.0"])},
    optional={
        "id": st.one_of(st.integers(), st.text(max_size=20), st.none(), st.booleans()),
        "method": st.one_of(st.sampled_from(METHODS), st.text(max_size=30)),
        "params": st.one_of(json_values, st.fixed_dictionaries({}, optional={
            "name": st.sampled_from(["get_current_time", "convert_time", "nope"]),
            "arguments": st.dictionaries(st.text(max_size=10), json_values, max_size=3),
            "_meta": json_values,
        })),
        "result": json_values,
    },
)
bodies = st.one_of(
    messages.map(lambda m: json.dumps(m).encode()),
    st.lists(messages, max_size=3).map(lambda m: json.dumps(m).encode()),
    st.binary(max_size=200),
    st.sampled_from([b"", b"{", b"[]", b"null", b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}' + b" " * 10,
                     b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"a":' * 50]),
)
path_parts = st.one_of(
    st.sampled_from(["time", "time/mcp", "nope", "status", "metrics", "healthz", "", "time/%0d%0aFORGED",
                     "time/../status", "%2e%2e/time", "time/mcp?x=%00", "time//mcp", "-"]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=60),
)
requests_ = st.fixed_dictionaries({
    "verb": st.sampled_from(["POST", "POST", "POST", "GET", "DELETE", "PUT", "OPTIONS"]),
    "path": path_parts.map(lambda p: "/" + p.replace(" ", "%20").replace("#", "%23")),
    "body": bodies,
    "headers": st.dictionaries(
        st.sampled_from(["Host", "Origin", "Mcp-Session-Id", "MCP-Protocol-Version", "Mcp-Method", "Mcp-Name",
                         "Accept", "Content-Type", "X-Request-Id", "Authorization", "X-API-Key", "Last-Event-ID"]),
        header_text, max_size=6,
    ),
})


LIST = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'


def hostile(verb: str, path: str, headers: dict[str, bytes], body: bytes) -> dict[str, Any]:
    """A request the attacks of issue 12 sent, run on every fuzz run whatever hypothesis draws."""
    return {"verb": verb, "path": path, "headers": headers, "body": body}


def send(port: int, verb: str, path: str, headers: dict[str, bytes], body: bytes) -> int:
    """One request on its own connection; the status code, or 0 if the gateway closed without answering."""
    head = [f"{verb} {path} HTTP/1.1".encode("latin-1", "replace")]
    if "Host" not in headers:
        head.append(b"Host: 127.0.0.1")
    head += [name.encode() + b": " + value for name, value in headers.items()]
    head += [b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    answer = raw_exchange(port, b"\r\n".join(head) + b"\r\n\r\n" + body)
    if not answer:
        return 0
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    assert match, answer[:200]
    return int(match[1])


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    folder = tmp_path_factory.mktemp("fuzz")
    registry = write_registry(folder, {"time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 2,
                                                "request_timeout": 10}})
    with Gunicorn(registry, workers=2, threads=4).serving() as gateway:
        yield gateway


def test_hostile_requests_get_no_5xx_kill_no_worker_leave_nothing_busy_and_forge_no_log_line(
        fuzzed: Gunicorn) -> None:
    workers = fuzzed.worker_pids()
    sent = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(request=requests_)
    @example(request=hostile("POST", "/nope%0d%0arequest_id=FORGED%0d%0a/mcp", {}, LIST))
    @example(request=hostile("POST", "/time/mcp", {}, json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list\r\nrequest_id=FORGED\u2028x\x85y"}).encode()))
    @example(request=hostile("POST", "/time/mcp", {"Mcp-Method": b"tools/list\x0bFORGED", "MCP-Protocol-Version": b"2026-07-28",
                                                   "X-Request-Id": b"id\x00\x1b[31m"}, LIST))
    @example(request=hostile("GET", "/status", {"Host": b"rebind.example:8000", "Origin": b"http://rebind.example:8000"}, b""))
    @example(request=hostile("DELETE", "/time/mcp", {"Mcp-Session-Id": b"A" * 4000}, b""))
    def one(request: dict[str, Any]) -> None:
        status = send(fuzzed.port, request["verb"], request["path"], request["headers"], request["body"])
        sent.append(status)
        assert 0 < status < 500, (status, request)

    one()
    assert len(sent) >= EXAMPLES // 2  # hypothesis really sent them
    assert fuzzed.worker_pids() == workers
    wait_for(lambda: fuzzed.status()["servers"]["time"]["busy"] == 0, seconds=20)
    time.sleep(0.2)  # the last access lines are written as their responses close
    lines = fuzzed.log_path.read_bytes().splitlines()
    assert len(lines) > len(sent)  # an access line per request at least
    strays = [line for line in lines if not RECORD.match(line)]
    assert not strays, strays[:5]
