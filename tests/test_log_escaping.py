"""Logs cannot be forged: a client's or child's value never starts a line of its own, nor fills the log.

Against real gunicorn, reading its log file: requests whose path, JSON-RPC
method or headers carry CR, LF, other control characters or Unicode line
separators each write exactly one access line, with the value escaped and
bounded, in both log formats. Plus the escaping function itself, for any text.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import time
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import logtext

from .harness import TIME_SERVER, Gunicorn, raw_exchange, server_command, wait_for

# Every line of the log is one of ours (asctime first) or one of gunicorn's ([asctime]).
LINE_START = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] [A-Z]+ [\w.-]+: |\[\d{4}-\d\d-\d\d )")
LINE_BOUND = 8192  # a log line: the gateway's words plus a few bounded values
FORGED = "request_id=FORGED"
SEPARATORS = "\r\n\x00\x1b[31m\x7f\x85\u2028\u2029"


def raw_request(gateway: Gunicorn, head: str, body: bytes = b"") -> bytes:
    """Send the head's bytes as they are, with this body; the answer's bytes."""
    return raw_exchange(gateway.port, head.encode("latin-1") + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)


def post(gateway: Gunicorn, request_id: str, body: Any, path: str = "/time/mcp", **headers: str) -> requests.Response:
    return requests.post(f"{gateway.url}{path}", data=json.dumps(body), timeout=60,
                         headers={"Content-Type": "application/json", "Accept": "application/json",
                                  "X-Request-Id": request_id, **headers})


def access_lines(gateway: Gunicorn, request_id: str, log_format: str) -> list[str]:
    mark = f'"request_id": "{request_id}"' if log_format == "json" else f"request_id={request_id} "
    return [line for line in gateway.log().splitlines() if " gateway.access: " in line and mark in line]


def one_line_each(gateway: Gunicorn, ids: list[str], log_format: str) -> list[str]:
    wait_for(lambda: all(access_lines(gateway, i, log_format) for i in ids))
    found = []
    for request_id in ids:
        lines = access_lines(gateway, request_id, log_format)
        assert len(lines) == 1, f"request {request_id}: {len(lines)} access lines"
        found.append(lines[0])
    for line in gateway.log().splitlines():
        assert LINE_START.match(line), f"a line no logger wrote (forged?): {line[:300]!r}"
        assert len(line) < LINE_BOUND, f"a log line of {len(line)} characters: {line[:300]!r}"
        assert not line.lstrip().startswith(("FORGED", FORGED, "/mcp"))
    return found


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_client_values_write_one_escaped_bounded_line_each(gunicorn: Any, log_format: str) -> None:
    gateway = gunicorn({"time": {"type": "stdio", "command": TIME_SERVER}},
                       {"log_format": log_format, "max_body_bytes": 16 * 1024 * 1024})
    list_body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
    # A decoded path with CR LF: sent raw, as requests would re-quote it.
    answer = raw_request(gateway, "POST /nope%0d%0arequest_id=FORGED%0d%0a/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  "Content-Type: application/json\r\nX-Request-Id: forged-path\r\n", list_body)
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    # The same with every kind of separator, percent-encoded.
    encoded = "".join(f"%{b:02x}" for b in SEPARATORS.encode())
    answer = raw_request(gateway, f"POST /time{encoded}FORGED/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  "Content-Type: application/json\r\nX-Request-Id: forged-separators\r\n", list_body)
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
    # A JSON method with CR LF and a fake field inside, and one with every separator.
    post(gateway, "forged-method", {"jsonrpc": "2.0", "id": 2, "method": "tools/list\r\nrequest_id=FORGED status=200"})
    post(gateway, "separator-method", {"jsonrpc": "2.0", "id": 3, "method": f"x{SEPARATORS}FORGED"})
    # A 4 MiB method name: not logged whole.
    huge = post(gateway, "huge-method", {"jsonrpc": "2.0", "id": 4, "method": "m" * (4 * 1024 * 1024)})
    assert huge.status_code < 500  # (the server's own error echoes it back: the client sent it)
    # An X-Request-Id with CR (LF would end the header): not taken as the id, not logged.
    answer = raw_request(gateway, "POST /time/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                  "X-Request-Id: x\rrequest_id=FORGED\x0b\r\n", list_body)
    assert b" 500 " not in answer.split(b"\r\n", 1)[0]
    lines = one_line_each(gateway, ["forged-path", "forged-separators", "forged-method", "separator-method",
                                    "huge-method"], log_format)
    path_line, separators_line, method_line, separator_method_line, huge_line = lines
    if log_format == "text":
        fields = [dict(part.split("=", 1) for part in shlex.split(line.split(" gateway.access: ", 1)[1]))
                  for line in (path_line, separators_line, method_line)]
        assert fields[0]["http"] == "POST /nope\\r\\nrequest_id=FORGED\\r\\n/mcp"
        assert fields[1]["http"] == "POST /time\\r\\n\\x00\\x1b[31m\\x7f\\x85\\u2028\\u2029FORGED/mcp"
        # A method that is not printable text is refused (400) before it is taken as the method.
        assert fields[2]["mcp_method"] == "-" and fields[2]["status"] == "400"
    else:
        entries = [json.loads(line.split(" gateway.access: ", 1)[1]) for line in (path_line, separators_line, method_line)]
        assert entries[0]["http"] == "POST /nope\r\nrequest_id=FORGED\r\n/mcp"
        assert entries[1]["http"] == f"POST /time{SEPARATORS}FORGED/mcp"
        assert entries[2]["mcp_method"] is None and entries[2]["status"] == 400
    assert "\x7f" not in separator_method_line and "\u2028" not in separator_method_line
    assert len(huge_line) < 2048 and "more characters]" in huge_line

    # A header echoed in an error message: a 2026-07-28 request whose Mcp-Method disagrees with its body.
    mismatch = post(gateway, "header-echo", {"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}},
        **{"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "a" * 8000})
    assert mismatch.status_code == 400 and len(mismatch.text) < 4096, mismatch.text[:300]
    one_line_each(gateway, ["header-echo"], log_format)


def test_a_childs_stderr_cannot_forge_lines(gunicorn: Any, tmp_path: Any) -> None:
    script = tmp_path / "stderr_forger.py"
    script.write_text(
        "import sys\n"
        f"sys.stderr.write('one\\rrequest_id=FORGED\\x1b[2K\\u2028FORGED still one line\\n'); sys.stderr.flush()\n"
        f"sys.path.insert(0, {str(server_command('sdk_server.py')[1].rsplit('/', 1)[0])!r})\n"
        "import sdk_server; sdk_server.main(['stdio'])\n"
    )
    gateway = gunicorn({"sdk": {"type": "stdio", "command": [sys.executable, str(script)], "pool_min": 1}}, workers=1)
    wait_for(lambda: "still one line" in gateway.log())
    time.sleep(0.2)  # the rest of that record, had it been split
    forged = [line for line in gateway.log().splitlines() if "FORGED" in line]
    assert len(forged) == 1 and "one\\rrequest_id=FORGED\\x1b[2K\\u2028FORGED still one line" in forged[0], forged
    for line in gateway.log().splitlines():
        assert LINE_START.match(line), f"a line no logger wrote: {line[:300]!r}"


# --- the escaping itself --------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(), st.integers(min_value=1, max_value=400))
def test_cleaned_text_is_one_printable_bounded_line(text: str, limit: int) -> None:
    cleaned = logtext.clean(text, limit)
    assert cleaned.isprintable(), "no control, separator or other invisible character is left"
    assert not any(char in cleaned for char in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x7f")
    assert len(cleaned) <= limit * len("\\U0010ffff") + len(f"…[{len(text)} more characters]")
    if len(text) > limit:
        assert cleaned.endswith(f"…[{len(text) - limit} more characters]")
    elif text.isprintable():
        assert cleaned == text, "clean values are left as they are"


def test_escapes_are_the_familiar_ones() -> None:
    assert logtext.clean("a\r\nb\tc\x00d\x7fe\x85f\u2028g\u2029h\U000e0001") == (
        "a\\r\\nb\\tc\\x00d\\x7fe\\x85f\\u2028g\\u2029h\\U000e0001")
    assert logtext.clean("x" * 300) == "x" * 256 + "…[44 more characters]"
    assert logtext.clean("plain /time/mcp café") == "plain /time/mcp café"


def test_the_formatter_makes_each_message_one_line_and_keeps_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    formatter = logtext.OneLineFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("gateway.x", logging.WARNING, __file__, 1, "got %s", ("a\r\nFORGED b",), None)
    assert formatter.format(record) == "WARNING got a\\r\\nFORGED b"
    try:
        raise ValueError("a real bug")
    except ValueError:
        record = logging.LogRecord("gateway.x", logging.ERROR, __file__, 1, "boom %s", ("x\ny",), sys.exc_info())
    text = formatter.format(record)
    assert text.startswith("ERROR boom x\\ny\nTraceback (most recent call last):") and "ValueError: a real bug" in text
    long = logging.LogRecord("gateway.x", logging.INFO, __file__, 1, "m" * 10_000, None, None)
    assert len(formatter.format(long)) < logtext.MESSAGE_LIMIT + 100
