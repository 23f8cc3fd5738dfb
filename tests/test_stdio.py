"""Real stdio children behind StdioUpstream: era detection, bridging and every fault.

Each fault test asserts the error the caller gets, that the pool's capacity
comes back (the next call is served), and that no child is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import errors, protocol, registry
from gateway.jsonrpc import Reply
from gateway.protocol import ClientContext
from gateway.upstreams.stdio import StdioUpstream

from .harness import TIME_SERVER, server_command, wait_for

MODERN = ClientContext(protocol.MODERN, "2026-07-28")
LEGACY = ClientContext(protocol.LEGACY, "2025-11-25")
ENVELOPE = {protocol.META_PROTOCOL_VERSION: "2026-07-28", protocol.META_CLIENT_CAPABILITIES: {}}


def make_upstream(command: list[str], **settings: Any) -> StdioUpstream:
    entry = {"type": "stdio", "command": command, "pool_size": 2, "pool_min": 0, "request_timeout": 5, **settings}
    loaded = registry.parse(json.dumps({"servers": {"srv": entry}}), "test.json", {})
    return StdioUpstream(loaded.servers["srv"])


@pytest.fixture
def upstreams() -> Iterator[Any]:
    made: list[StdioUpstream] = []

    def make(command: list[str], **settings: Any) -> StdioUpstream:
        made.append(make_upstream(command, **settings))
        return made[-1]

    yield make
    for upstream in made:
        pids = set(upstream.pool.stats()["pids"])
        upstream.close()
        assert not _alive(pids), "children left after the pool closed"


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def call(upstream: StdioUpstream, method: str, params: dict[str, Any] | None = None,
         client: ClientContext = MODERN, request_id: Any = 1) -> list[Reply]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None or client is MODERN:
        message["params"] = dict(params or {})
        if client is MODERN:
            message["params"]["_meta"] = {**ENVELOPE, **message["params"].get("_meta", {})}
    return list(start(upstream, message, client))


def start(upstream: StdioUpstream, message: dict[str, Any], client: ClientContext) -> Iterator[Reply]:
    return upstream.call(message, json.dumps(message).encode(), client)


def tool(upstream: StdioUpstream, name: str, arguments: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    replies = call(upstream, "tools/call", {"name": name, "arguments": arguments or {}}, **kw)
    assert replies[-1].final
    return replies[-1].message


# --- eras ---------------------------------------------------------------------


def test_modern_server_is_detected_and_bytes_pass_through_unchanged(upstreams: Any) -> None:
    upstream = upstreams(TIME_SERVER)
    replies = call(upstream, "tools/call", {"name": "get_current_time", "arguments": {"timezone": "UTC"}}, request_id="abc")
    assert upstream.pool.hello is not None and upstream.pool.hello.era == protocol.MODERN
    assert upstream.pool.hello.server_info["name"] == "mcp-time"
    final = replies[-1]
    assert final.raw is not None and json.loads(final.raw) == final.message  # no re-encoding
    assert final.message["id"] == "abc" and final.message["result"]["structuredContent"]["timezone"] == "UTC"


def test_legacy_client_reaches_a_modern_server_through_the_envelope(upstreams: Any) -> None:
    upstream = upstreams(TIME_SERVER)
    reply = tool(upstream, "get_current_time", {"timezone": "Europe/Paris"}, client=LEGACY)
    assert reply["result"]["structuredContent"]["timezone"] == "Europe/Paris"


def test_legacy_only_server_is_initialized_once_per_process(upstreams: Any) -> None:
    upstream = upstreams(server_command("legacy_server.py"))
    for _ in range(3):
        assert tool(upstream, "echo", {"text": "hi"}, client=LEGACY)["result"]["content"][0]["text"] == "hi"
    hello = upstream.pool.hello
    assert hello is not None and hello.era == protocol.LEGACY and hello.protocol_version == "2025-11-25"
    assert upstream.pool.stats()["spawned"] == 1


def test_modern_client_reaches_a_legacy_server_with_the_envelope_stripped(upstreams: Any) -> None:
    # legacy_server.py answers -32602 to any io.modelcontextprotocol/ key in _meta.
    upstream = upstreams(server_command("legacy_server.py"))
    listed = call(upstream, "tools/list")[-1].message["result"]
    assert {t["name"] for t in listed["tools"]} >= {"echo", "whoami"}
    assert listed["resultType"] == "complete" and listed["ttlMs"] == 0 and listed["cacheScope"] == "private"
    reply = tool(upstream, "echo", {"text": "bridged"})
    assert reply["result"]["content"][0]["text"] == "bridged" and reply["result"]["resultType"] == "complete"


@pytest.mark.parametrize("mode, client, era", [
    ("discover-silent", LEGACY, protocol.LEGACY),  # never answers discover: a handshake-era server
    # Answers discover after the silence window (slow to start), then refuses initialize:
    # the gateway asks again instead of killing it.
    ("slow-start", MODERN, protocol.MODERN),
])
def test_era_detection_after_a_silent_discover(upstreams: Any, monkeypatch: pytest.MonkeyPatch, mode: str,
                                               client: ClientContext, era: str) -> None:
    monkeypatch.setattr("gateway.stdio_process.DISCOVER_TIMEOUT", 0.3)
    upstream = upstreams(server_command("faulty_server.py", mode))
    assert "result" in tool(upstream, "work", client=client)
    assert upstream.pool.hello is not None and upstream.pool.hello.era == era


def test_notifications_stream_before_the_response(upstreams: Any) -> None:
    upstream = upstreams(server_command("legacy_server.py"))
    replies = call(upstream, "tools/call", {"name": "progress", "arguments": {"steps": 3}, "_meta": {"progressToken": "t1"}},
                   client=LEGACY)
    methods = [r.message.get("method") for r in replies]
    # The process's log message is not passed on: handshake-era logging is the
    # connection's, and a pooled process's connection is not this client's (scope.py).
    assert methods == ["notifications/progress"] * 3 + [None]
    assert [r.final for r in replies] == [False] * 3 + [True]
    # The process was sent a token of the gateway's; the client gets its own back.
    assert [r.message["params"]["progressToken"] for r in replies[:3]] == ["t1"] * 3


def test_a_client_id_in_the_gateways_namespace_is_swapped_on_the_way_to_the_process(upstreams: Any) -> None:
    """A late answer to the gateway's own handshake request can never be taken for a client's."""
    upstream = upstreams(server_command("faulty_server.py", "stale-answer"))
    replies = call(upstream, "tools/call", {"name": "work", "arguments": {}}, request_id="mcp-gateway-discover")
    final = replies[-1]
    assert final.final and final.message["id"] == "mcp-gateway-discover"
    assert "stale" not in final.message["result"] and final.message["result"]["content"][0]["text"].startswith("ok")


def test_server_to_client_request_is_refused_at_once_not_hung(upstreams: Any) -> None:
    upstream = upstreams(server_command("legacy_server.py"))
    reply = tool(upstream, "elicit", client=LEGACY)
    assert reply["error"]["code"] == errors.METHOD_NOT_FOUND
    assert "elicitation/create is not available" in reply["error"]["message"]
    assert tool(upstream, "echo", {"text": "still fine"}, client=LEGACY)["result"]["content"][0]["text"] == "still fine"


def test_elicitation_is_refused_for_a_legacy_client_and_passed_through_for_a_modern_one(upstreams: Any) -> None:
    upstream = upstreams(server_command("sdk_server.py", "stdio"))
    # The gateway declares no client capabilities on a legacy client's behalf,
    # so the server refuses to elicit, at once, with a clear error.
    reply = tool(upstream, "ask", client=LEGACY)
    assert "elicitation capability" in reply["error"]["message"]
    asking = {"_meta": {protocol.META_CLIENT_CAPABILITIES: {"elicitation": {"form": {}}}}}
    replies = call(upstream, "tools/call", {"name": "ask", "arguments": {}, **asking})
    modern = replies[-1].message  # a 2026-07-28 client gets the MRTR result untouched
    assert modern["result"]["resultType"] == "input_required" and modern["result"]["requestState"]


# --- faults -------------------------------------------------------------------


def assert_recovers(upstream: StdioUpstream, failed_pid: int) -> None:
    """Capacity came back: the failed child is gone and a new one serves."""
    assert not _alive({failed_pid})
    stats = upstream.pool.stats()
    assert stats["restarts"] >= 1 and failed_pid not in stats["pids"] and stats["busy"] == 0


def only_pid(upstream: StdioUpstream) -> int:
    pids: list[int] = upstream.pool.stats()["pids"]
    assert len(pids) == 1
    return pids[0]


@pytest.mark.parametrize("mode, settings, error, cause", [
    ("hang", {"request_timeout": 1}, errors.UpstreamTimeout, "did not answer in time"),
    ("garbage", {}, errors.ProcessFailed, "wrote non-JSON to stdout: b'this is not json'"),
    ("die", {}, errors.ProcessFailed, "exited with code 7 before it answered"),
    ("long-line", {"max_line_bytes": 1024 * 1024}, errors.ProcessFailed, "wrote a line over 1048576 bytes"),
])
def test_misbehaving_child_is_killed_replaced_and_named_in_the_error(
    upstreams: Any, mode: str, settings: dict[str, Any], error: type[errors.GatewayError], cause: str
) -> None:
    upstream = upstreams(server_command("faulty_server.py", mode), **settings)
    call(upstream, "tools/list")
    pid = only_pid(upstream)
    with pytest.raises(error) as caught:
        tool(upstream, "work")
    assert caught.value.message == f"server 'srv': process {pid} {cause}"
    assert caught.value.http_status == (504 if mode == "hang" else 502)
    assert_recovers(upstream, pid)
    assert "tools" in call(upstream, "tools/list")[-1].message["result"]


def test_child_killed_by_a_signal_mid_call(upstreams: Any) -> None:
    upstream = upstreams(server_command("sdk_server.py", "stdio"))
    pid = int(tool(upstream, "whoami")["result"]["structuredContent"]["result"])
    replies = start(upstream, {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                               "params": {"name": "sleep", "arguments": {"seconds": 30}, "_meta": ENVELOPE}}, MODERN)
    # Kill the child from outside while the call is in flight (by the PID we hold).
    threading.Timer(0.5, os.kill, (pid, 9)).start()
    with pytest.raises(errors.ProcessFailed, match=f"process {pid} was killed by signal 9 before it answered"):
        list(replies)
    assert_recovers(upstream, pid)
    assert tool(upstream, "add", {"a": 2, "b": 3})["result"]["structuredContent"]["result"] == 5


def test_child_that_exits_at_start_backs_off_and_reports(upstreams: Any, caplog: pytest.LogCaptureFixture) -> None:
    upstream = upstreams(server_command("faulty_server.py", "exit-at-start"))
    with caplog.at_level(logging.INFO):
        with pytest.raises(errors.SpawnFailed) as first:
            call(upstream, "tools/list")
        assert first.value.http_status == 503 and first.value.retry_after
        assert "exited with code 2" in first.value.message
        # Inside the back-off window: an immediate answer, no new process.
        with pytest.raises(errors.SpawnFailed, match="has no running process: .*exited with code 2.*next start attempt in"):
            call(upstream, "tools/list")
    stats = upstream.pool.stats()
    assert stats["spawn_failures"] == 1 and stats["healthy"] is False and stats["processes"] == 0
    assert "exited with code 2" in stats["last_error"]["message"] and stats["last_error"]["at"]
    # stderr of the child went to the log, tagged with the server id.
    assert any("[srv pid" in r.getMessage() and "fatal: cannot start" in r.getMessage() for r in caplog.records)


def test_command_that_does_not_exist_is_a_spawn_failure_not_a_crash(upstreams: Any) -> None:
    upstream = upstreams(["/nonexistent/mcp-server"])
    with pytest.raises(errors.SpawnFailed, match="cannot start '/nonexistent/mcp-server': No such file or directory"):
        call(upstream, "tools/list")


def test_stderr_flood_is_drained_and_the_call_still_answers(upstreams: Any, caplog: pytest.LogCaptureFixture) -> None:
    upstream = upstreams(server_command("faulty_server.py", "stderr-flood"))
    with caplog.at_level(logging.INFO, logger="gateway.stdio.srv"):
        reply = tool(upstream, "work")
        wait_for(lambda: sum(1 for r in caplog.records if r.name == "gateway.stdio.srv") >= 20000, 10,
                 "20000 stderr lines logged")
    assert "result" in reply
    assert sum(1 for r in caplog.records if r.name == "gateway.stdio.srv") >= 20000


def test_client_hanging_up_mid_stream_cancels_and_keeps_the_process(upstreams: Any) -> None:
    upstream = upstreams(server_command("legacy_server.py"))
    replies = start(upstream, {"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                               "params": {"name": "progress", "arguments": {"steps": 3}, "_meta": {"progressToken": 1}}}, LEGACY)
    assert next(replies).message["method"] == "notifications/progress"
    pid = only_pid(upstream)
    replies.close()  # what the view does when the client disconnects
    stats = upstream.pool.stats()
    assert stats["busy"] == 0 and stats["idle"] == 1 and stats["restarts"] == 0 and stats["pids"] == [pid]


def test_children_get_a_minimal_environment_plus_their_own(upstreams: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.stdio_process import child_environment

    monkeypatch.setenv("GATEWAY_SECRET_SHOULD_NOT_LEAK", "x")
    monkeypatch.setenv("WANTED", "y")
    settings = make_upstream(["x"], env_vars={"LOG_LEVEL": "info"}, inherit_env=["WANTED"]).settings
    env = child_environment(settings)
    assert env["LOG_LEVEL"] == "info" and env["WANTED"] == "y" and "PATH" in env
    assert "GATEWAY_SECRET_SHOULD_NOT_LEAK" not in env


def test_each_child_runs_in_its_own_process_group(upstreams: Any) -> None:
    upstream = upstreams(TIME_SERVER)
    call(upstream, "tools/list")
    pid = only_pid(upstream)
    assert os.getpgid(pid) == pid != os.getpgid(0)
    upstream.close()
    assert not _alive({pid})


def test_read_only_method_is_retried_once_on_a_fresh_process(upstreams: Any) -> None:
    upstream = upstreams(server_command("faulty_server.py", "die-on-list"))
    with pytest.raises(errors.ProcessFailed, match="exited with code 7"):
        call(upstream, "tools/list")
    stats = upstream.pool.stats()
    assert stats["restarts"] == 2 and stats["spawned"] == 2  # tried on two processes, then gave up


def test_tools_call_is_not_replayed_after_it_reached_the_process(upstreams: Any) -> None:
    upstream = upstreams(server_command("faulty_server.py", "die"))
    with pytest.raises(errors.ProcessFailed, match="exited with code 7"):
        tool(upstream, "work")
    stats = upstream.pool.stats()
    assert stats["restarts"] == 1 and stats["spawned"] == 1


# --- pool lifecycle: start-up, cancellation, threads ---------------------------


def _pids_in(path: Path) -> list[int]:
    return [int(line.split()[0]) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_malformed_discover_answer_is_a_spawn_failure_the_child_killed_and_the_slot_freed(
    upstreams: Any, tmp_path: Path
) -> None:
    from gateway import metrics

    pidfile = tmp_path / "pids"
    upstream = upstreams(server_command("faulty_server.py", "bad-discover", str(pidfile)), pool_size=1)
    before = metrics.PROCESS_START_FAILURES.labels("srv")._value.get()
    with pytest.raises(errors.SpawnFailed, match="AttributeError") as caught:
        call(upstream, "tools/list")
    assert caught.value.http_status == 503
    [child] = _pids_in(pidfile)
    assert not _alive({child})
    stats = upstream.pool.stats()
    assert stats["spawn_failures"] == 1 and stats["starting"] == 0 and stats["processes"] == 0
    assert metrics.PROCESS_START_FAILURES.labels("srv")._value.get() == before + 1
    time.sleep(stats["next_spawn_in"])  # the back-off window (0.5 s)
    with pytest.raises(errors.SpawnFailed, match="AttributeError"):
        call(upstream, "tools/list")  # the slot came back: a new process was tried
    assert len(_pids_in(pidfile)) == 2 and not _alive(set(_pids_in(pidfile)))
    assert upstream.pool.stats()["spawn_failures"] == 2


def test_a_nul_in_the_environment_is_a_spawn_failure_not_a_leaked_slot(upstreams: Any) -> None:
    import dataclasses

    upstream = upstreams(TIME_SERVER, pool_size=1)
    upstream.settings = dataclasses.replace(upstream.settings, env_vars={"BAD": "a\0b"})
    with pytest.raises(errors.SpawnFailed, match="null byte"):
        call(upstream, "tools/list")
    assert upstream.pool.stats()["starting"] == 0 and upstream.pool.stats()["spawn_failures"] == 1


def test_request_timeout_counts_from_the_write_not_from_start_up(upstreams: Any) -> None:
    upstream = upstreams(server_command("faulty_server.py", "slow-start"), request_timeout=1,
                         env_vars={"FAULTY_START_SECONDS": "2"})
    assert "result" in tool(upstream, "work")
    stats = upstream.pool.stats()
    assert stats["restarts"] == 0 and stats["spawned"] == 1


def _cancelled_mid_call(upstream: StdioUpstream, request_id: Any = 5) -> int:
    """Start tools/call work with a progress token, take the first event, hang up."""
    replies = start(upstream, {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                               "params": {"name": "work", "arguments": {}, "_meta": {**ENVELOPE, "progressToken": "t"}}},
                    MODERN)
    assert next(replies).message["method"] == "notifications/progress"
    pid = only_pid(upstream)
    replies.close()  # what the view does when the client disconnects
    return pid


@pytest.mark.parametrize("mode, kept", [
    ("cancel-silent", True),    # the spec's behaviour: no answer after the cancel
    ("cancel-answers", True),   # answers anyway within the grace: read and dropped
    ("cancel-garbage", False),  # writes non-JSON: replaced
    ("cancel-busy", False),     # keeps writing for the cancelled request past the grace: replaced
])
def test_a_cancelled_call_keeps_a_process_that_behaves(upstreams: Any, mode: str, kept: bool) -> None:
    upstream = upstreams(server_command("faulty_server.py", mode))
    pid = _cancelled_mid_call(upstream)
    stats = upstream.pool.stats()
    assert stats["busy"] == 0
    if kept:
        assert stats["pids"] == [pid] and stats["restarts"] == 0
        assert "tools" in call(upstream, "tools/list")[-1].message["result"]
        assert only_pid(upstream) == pid
    else:
        assert pid not in stats["pids"] and stats["restarts"] == 1 and not _alive({pid})


def test_an_answer_to_a_cancelled_id_after_the_grace_never_reaches_the_next_request(
    upstreams: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.upstreams.stdio.CANCEL_GRACE", 0.3)
    upstream = upstreams(server_command("faulty_server.py", "cancel-answers"), env_vars={"FAULTY_LATE_SECONDS": "1"})
    pid = _cancelled_mid_call(upstream, request_id=5)
    assert upstream.pool.stats()["pids"] == [pid]  # silent within the grace: kept
    # The same id again, while the late "answer" to the cancelled request is on its way.
    listed = call(upstream, "tools/list", request_id=5)[-1].message
    assert listed["id"] == 5 and "tools" in listed["result"]
    assert only_pid(upstream) == pid


def test_a_child_started_from_a_short_lived_thread_outlives_that_thread() -> None:
    """PR_SET_PDEATHSIG follows the thread that forked: children are forked by one that lives on."""
    import subprocess
    import sys

    from gateway import processes

    started: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(target=lambda: started.append(processes.spawn(
        "srv", [sys.executable, "-c", "import time; time.sleep(30)"], env={})))
    thread.start()
    thread.join(10)
    [popen] = started
    try:
        time.sleep(0.5)  # a death signal would have arrived by now
        assert popen.poll() is None, f"child died with {popen.returncode} when the thread that started it exited"
    finally:
        processes.stop(popen, 0)


def test_closing_stops_a_process_still_starting(upstreams: Any, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    upstream = upstreams(server_command("faulty_server.py", "slow-start", str(pidfile)),
                         pool_min=1, env_vars={"FAULTY_START_SECONDS": "20"})
    upstream.maintain()  # upkeep tops the pool up: a spawn in the background
    wait_for(lambda: _pids_in(pidfile), 10, "the slow process started")
    [child] = _pids_in(pidfile)
    assert upstream.pool.stats()["starting"] == 1
    upstream.close()
    assert not _alive({child}) and upstream.pool.stats()["starting"] == 0


def test_a_client_error_before_the_request_is_written_keeps_the_process(upstreams: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The process never saw the request: refusing it says nothing about the process.
    upstream = upstreams(TIME_SERVER)
    call(upstream, "tools/list")
    before = upstream.pool.stats()

    def refuse(*args: Any) -> Any:
        raise errors.InvalidParams("params the translation cannot use")

    monkeypatch.setattr(protocol, "request_for_server", refuse)
    with pytest.raises(errors.InvalidParams):
        call(upstream, "tools/list")
    monkeypatch.undo()
    after = upstream.pool.stats()
    assert after["pids"] == before["pids"] and after["restarts"] == 0 and after["busy"] == 0


def test_a_cancellation_cuts_a_threads_wait_short_and_the_process_is_told(upstreams: Any, tmp_path: Path) -> None:
    from gateway.cancel import Cancellation

    record = tmp_path / "record"
    upstream = upstreams(server_command("faulty_server.py", "cancel-silent", str(record)), pool_size=1)
    cancel = Cancellation()
    message = {"jsonrpc": "2.0", "id": 31, "method": "tools/call",
               "params": {"name": "work", "arguments": {}, "_meta": {**ENVELOPE, "progressToken": "p"}}}
    replies = upstream.call(message, json.dumps(message).encode(), MODERN, cancel=cancel)
    assert next(replies).message["method"] == "notifications/progress"
    timer = threading.Timer(0.3, cancel.cancel, ("the client cancelled it",))
    timer.start()
    with pytest.raises(errors.Cancelled):
        for _ in replies:  # the process writes progress until it is told: only the cancel ends this
            pass
    timer.join()
    lines = record.read_text().splitlines()
    assert lines[-1].endswith(" cancelled 31"), lines
    stats = upstream.pool.stats()
    assert stats["busy"] == 0 and stats["restarts"] == 0  # cancelled, silent after it: kept
    cancel.close()
