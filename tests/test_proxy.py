"""HTTP forwarding policy: retries, failover, ejection, health, header hygiene.

`responses` plays sequences of upstream statuses; raw sockets on 127.0.0.1
play the faults it cannot (refused, accept-then-hang, reset after the request
was sent, half a response). Each test asserts what was retried and what the
client was given.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import responses

from gateway import errors, registry
from gateway.balancer import Balancer, Instance
from gateway.health import HealthPolicy, InstanceHealth
from gateway.upstreams.http import HttpUpstream, ProxyRequest

from .harness import Clock, free_port

A, B = "http://a.test", "http://b.test"
OK_BODY = {"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}


def make_upstream(endpoints: list[str], **settings: Any) -> HttpUpstream:
    entry = {"type": "http", "instances": [{"endpoint": e} for e in endpoints], **settings}
    loaded = registry.parse(json.dumps({"servers": {"web": entry}}), "test.json", {})
    return HttpUpstream(loaded.servers["web"])


def request(method: str = "tools/list", **overrides: Any) -> ProxyRequest:
    message = {"jsonrpc": "2.0", "id": 1, "method": method}
    fields: dict[str, Any] = {
        "method": "POST", "path": "/mcp", "query": b"", "body": json.dumps(message).encode(), "message": message,
        "headers": {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"},
    }
    fields.update(overrides)
    return ProxyRequest(**fields)


def body_of(answer: Any) -> Any:
    return json.loads(answer.body if isinstance(answer.body, bytes) else b"".join(answer.body))


# --- status sequences (responses) ---------------------------------------------


@responses.activate
def test_read_only_method_fails_over_after_a_503() -> None:
    responses.post(f"{A}/mcp", status=503, body="busy")
    responses.post(f"{B}/mcp", json=OK_BODY)
    upstream = make_upstream([A, B])
    answer = upstream.forward(request("tools/list"))
    assert answer.status == 200 and answer.instance == B and body_of(answer) == OK_BODY
    assert upstream.retries == 1 and len(responses.calls) == 2


@responses.activate
def test_tools_call_is_not_replayed_and_the_instances_503_passes_through() -> None:
    responses.post(f"{A}/mcp", status=503, body="try later", headers={"Retry-After": "7"})
    responses.post(f"{B}/mcp", json=OK_BODY)
    upstream = make_upstream([A, B])
    answer = upstream.forward(request("tools/call"))
    assert answer.status == 503 and answer.body == b"try later" and ("Retry-After", "7") in answer.headers
    assert [call.request.url for call in responses.calls] == [f"{A}/mcp"]


@responses.activate
def test_consecutive_failures_eject_an_instance_but_never_the_last(caplog: pytest.LogCaptureFixture) -> None:
    responses.post(f"{A}/mcp", status=502)
    responses.post(f"{B}/mcp", status=502)
    upstream = make_upstream([A, B], max_fails=2, ejection_time=30)
    a, b = upstream.balancer.instances
    for _ in range(2):
        assert upstream.forward(request("tools/call")).status == 502  # A, then B: one failure each
    for _ in range(2):
        upstream.forward(request("tools/call"))
    assert a.health.ejected and not b.health.ejected, "B is the last routable instance"
    assert any(f"ejected instance {A} for 30s after 2 failures" in r.getMessage() for r in caplog.records)
    status = upstream.status()
    assert status["routable"] == 1 and status["instances"][0]["ejected"] is True
    assert status["instances"][0]["times_ejected"] == 1 and "answered HTTP 502" in status["instances"][0]["last_error"]["message"]
    responses.calls.reset()
    upstream.forward(request("tools/call"))
    assert [call.request.url for call in responses.calls] == [f"{B}/mcp"], "ejected instances get no traffic"


@responses.activate
def test_request_and_response_headers_are_cleaned() -> None:
    responses.post(f"{A}/mcp", json=OK_BODY, headers={
        "Set-Cookie": "s=1", "Mcp-Session-Id": "upstream-sid", "Keep-Alive": "timeout=5", "X-Upstream": "kept"})
    upstream = make_upstream([A], headers={"Authorization": "Bearer registry-token", "X-Api-Key": "k"})
    client_headers = {
        "Content-Type": "application/json", "Authorization": "Bearer client-token", "Cookie": "c=1", "Host": "gw",
        "Connection": "keep-alive, X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5", "TE": "trailers",
        "Proxy-Authorization": "x", "Upgrade": "h2c", "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call",
        "Mcp-Name": "echo", "Mcp-Param-Region": "eu", "Last-Event-ID": "7", "User-Agent": "curl/8",
    }
    answer = upstream.forward(request("tools/call", headers=client_headers, upstream_session="sid-1"))
    sent = responses.calls[0].request.headers
    assert sent["Authorization"] == "Bearer registry-token" and sent["X-Api-Key"] == "k"
    for name in ("Cookie", "X-Hop", "Keep-Alive", "TE", "Proxy-Authorization", "Upgrade"):
        assert name not in sent, name
    assert sent.get("Host") in (None, "a.test")
    for name in ("MCP-Protocol-Version", "Mcp-Method", "Mcp-Name", "Mcp-Param-Region", "Last-Event-ID", "User-Agent"):
        assert sent[name] == client_headers[name], name
    assert sent["Mcp-Session-Id"] == "sid-1" and sent["Accept-Encoding"] == "identity"
    returned = dict(answer.headers)
    assert "Set-Cookie" not in returned and "Keep-Alive" not in returned and returned["X-Upstream"] == "kept"
    assert answer.upstream_session == "upstream-sid" and "Mcp-Session-Id" not in returned


@responses.activate
def test_the_path_and_query_reach_the_instance_quoted_and_the_body_with_its_length() -> None:
    responses.post(f"{A}/mcp/a%20b", json=OK_BODY)
    upstream = make_upstream([A])
    answer = upstream.forward(request("tools/list", path="/mcp/a b", query=b"x=1"))
    sent = responses.calls[0].request
    assert answer.status == 200 and sent.url == f"{A}/mcp/a%20b?x=1"
    assert sent.headers["Content-Length"] == str(len(sent.body)) and b'"tools/list"' in sent.body


@responses.activate
def test_session_pinned_to_an_ejected_instance_is_404() -> None:
    upstream = make_upstream([A, B])
    upstream.balancer.instances[0].health.ejected_until = float("inf")
    with pytest.raises(errors.SessionNotFound, match="no longer available"):
        upstream.forward(request("tools/list", instance=A, upstream_session="s"))
    with pytest.raises(errors.SessionNotFound):
        upstream.forward(request("tools/list", instance="http://gone.test", upstream_session="s"))
    assert not responses.calls


# --- faults responses cannot express (raw sockets) ----------------------------


class FaultServer:
    """A TCP server on 127.0.0.1 that misbehaves in one way; counts requests received."""

    def __init__(self, mode: str):
        self.mode = mode
        self.requests = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            self.requests += 1
            if self.mode == "hang":
                self._held.append(conn)  # never answer
                continue
            if self.mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif self.mode == "half":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"jsonrpc\"")
            elif self.mode == "garbage":
                conn.sendall(b"this is not HTTP at all\r\n\r\n")
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._sock.close()


class GoodServer(ThreadingHTTPServer):
    """A correct upstream that counts requests and answers a JSON-RPC result."""

    def __init__(self) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.requests += 1
                self.rfile.read(int(self.headers["Content-Length"]))
                body = json.dumps(OK_BODY).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)


@pytest.fixture
def good() -> Iterator[GoodServer]:
    server = GoodServer()
    yield server
    server.close()


@pytest.fixture
def fault() -> Iterator[Any]:
    made: list[FaultServer] = []

    def make(mode: str) -> FaultServer:
        made.append(FaultServer(mode))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_connection_refused_is_retried_elsewhere_even_for_tools_call(good: GoodServer) -> None:
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    upstream = make_upstream([refused, good.url])
    answer = upstream.forward(request("tools/call"))
    assert answer.status == 200 and answer.instance == good.url and good.requests == 1
    assert "Connection refused" in upstream.status()["instances"][0]["last_error"]["message"]


@pytest.mark.parametrize("mode, error, cause", [
    ("hang", errors.UpstreamReadTimeout, "did not answer within 0.5s"),
    ("reset", errors.UpstreamFailed, "failed: "),
    ("half", errors.UpstreamFailed, "failed: "),
    ("garbage", errors.UpstreamFailed, "failed: "),
])
def test_failure_after_the_request_was_sent_is_not_replayed_for_tools_call(
    fault: Any, good: GoodServer, mode: str, error: type[errors.GatewayError], cause: str
) -> None:
    bad = fault(mode)
    upstream = make_upstream([bad.url, good.url], read_timeout=0.5)
    with pytest.raises(error) as caught:
        upstream.forward(request("tools/call"))
    assert caught.value.message.startswith(f"server 'web': instance {bad.url} ") and cause in caught.value.message
    assert bad.requests == 1 and good.requests == 0
    assert upstream.balancer.instances[0].in_flight == 0


@pytest.mark.parametrize("mode", ["hang", "reset", "half", "garbage"])
def test_failure_after_the_request_was_sent_is_retried_for_read_only_methods(fault: Any, good: GoodServer, mode: str) -> None:
    bad = fault(mode)
    upstream = make_upstream([bad.url, good.url], read_timeout=0.5)
    answer = upstream.forward(request("tools/list"))
    assert answer.status == 200 and body_of(answer) == OK_BODY
    assert bad.requests == 1 and good.requests == 1 and upstream.retries == 1


def test_one_deadline_covers_every_try(fault: Any) -> None:
    slow = [fault("hang"), fault("hang")]
    upstream = make_upstream([s.url for s in slow], read_timeout=0.4, request_timeout=0.6)
    with pytest.raises(errors.UpstreamReadTimeout):
        upstream.forward(request("tools/list"))
    # The second try got only what was left of the deadline, and no third try happened.
    assert [s.requests for s in slow] == [1, 1]


def test_active_checks_take_an_instance_down_and_bring_it_back(good: GoodServer, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    upstream = make_upstream([f"http://127.0.0.1:{port}", good.url], health_check_rise=2, health_check_fall=2)
    down, up = upstream.balancer.instances
    upstream.check_all()
    assert down.health.up and down.health.checked, "one failed check is not enough (fall is 2)"
    upstream.check_all()
    assert not down.health.up and up.health.up
    revived = GoodServer.__new__(GoodServer)
    ThreadingHTTPServer.__init__(revived, ("127.0.0.1", port), type(good.RequestHandlerClass.__name__, (good.RequestHandlerClass,), {}))
    revived.requests = 0
    thread = threading.Thread(target=revived.serve_forever, daemon=True)
    thread.start()
    try:
        upstream.check_all()
        assert not down.health.up, "rise is 2"
        upstream.check_all()
        assert down.health.up and upstream.status()["routable"] == 2
        messages = [r.getMessage() for r in caplog.records]
        assert any(f"instance http://127.0.0.1:{port} is down: health check failed" in m for m in messages)
        assert any(f"instance http://127.0.0.1:{port} is healthy again" in m for m in messages)
    finally:
        revived.shutdown()
        revived.server_close()


# --- policies with an injected clock --------------------------------------------


def test_rise_and_fall_thresholds_are_exact() -> None:
    health = InstanceHealth(HealthPolicy(rise=2, fall=3))
    assert health.up and not health.checked  # routable before the first check
    assert [health.check_failed("booting") for _ in range(2)] == [False, False] and health.up
    health.check_passed()  # one good check at boot is enough, and resets the count
    assert health.up
    assert [health.check_failed("x") for _ in range(3)] == [False, False, True] and not health.up
    health.check_failed("x")
    assert [health.check_passed() for _ in range(2)] == [False, True] and health.up
    health.check_failed("x")
    health.check_passed()  # a good check resets the fall count
    assert [health.check_failed("x") for _ in range(3)] == [False, False, True]


def test_ejection_time_grows_with_each_ejection() -> None:
    clock = Clock(0.0)
    health = InstanceHealth(HealthPolicy(max_fails=2, ejection_time=10), clock)
    assert [health.request_failed("x", True) for _ in range(2)] == [False, True]
    assert health.ejected and health.ejected_until == 10
    clock.now = 10
    assert not health.ejected and health.routable
    health.request_failed("x", True)
    health.request_succeeded()  # success resets the count
    health.request_failed("x", True)
    assert not health.ejected
    health.request_failed("x", True)
    assert health.ejected_until == 10 + 20 and health.times_ejected == 2


def instances(*weights: int) -> list[Instance]:
    return [Instance(f"http://i{n}", w, InstanceHealth(HealthPolicy())) for n, w in enumerate(weights)]


def test_weighted_strategy_follows_the_weights_smoothly() -> None:
    balancer = Balancer("s", instances(3, 1), "weighted")
    picks = [balancer.pick().endpoint for _ in range(8)]
    assert picks.count("http://i0") == 6 and picks.count("http://i1") == 2
    assert "http://i1" in picks[:4], "smooth: the light instance is not starved to the end"


def test_least_connections_prefers_the_least_loaded() -> None:
    balancer = Balancer("s", instances(1, 1, 1), "least_connections")
    balancer.instances[0].in_flight = 3
    balancer.instances[2].in_flight = 1
    assert balancer.pick().endpoint == "http://i1"


def test_retries_never_pick_an_instance_already_tried() -> None:
    balancer = Balancer("s", instances(1, 1, 1))
    first = balancer.pick()
    second = balancer.pick(exclude=[first])
    third = balancer.pick(exclude=[first, second])
    assert len({first, second, third}) == 3
    with pytest.raises(errors.NoInstance):
        balancer.pick(exclude=[first, second, third])


def test_below_half_routable_the_balancer_panics_and_uses_all() -> None:
    balancer = Balancer("s", instances(1, 1, 1, 1))
    for instance in balancer.instances[:3]:
        instance.health.up = False
    assert {i.endpoint for i in balancer.candidates()} == {f"http://i{n}" for n in range(4)}
    balancer.instances[0].health.up = True  # 2 of 4 routable: no panic
    assert {i.endpoint for i in balancer.candidates()} == {"http://i0", "http://i3"}


def test_sticky_keys_map_the_same_way_in_every_process() -> None:
    one, two = Balancer("s", instances(1, 1, 1)), Balancer("s", instances(1, 1, 1))
    keys = [f"user-{n}" for n in range(30)]
    assert [one.pick(sticky_key=k).endpoint for k in keys] == [two.pick(sticky_key=k).endpoint for k in keys]
    assert len({one.pick(sticky_key=k).endpoint for k in keys}) == 3


def test_a_good_active_check_ends_an_ejection() -> None:
    clock = Clock(0.0)
    health = InstanceHealth(HealthPolicy(max_fails=1, ejection_time=30), clock)
    health.request_failed("reset", True)
    assert health.ejected and not health.settled
    health.check_passed()
    assert not health.ejected and health.routable and health.settled


def test_era_probe_asks_another_instance_when_one_is_down(good: GoodServer) -> None:
    # The probe (server/discover) is how the gateway learns whether to bridge; a dead
    # instance must not turn it into the client's error.
    refused = f"http://127.0.0.1:{free_port()}"
    upstream = make_upstream([refused, good.url])
    # GoodServer answers a result for another id: not an answer to learn an era from.
    with pytest.raises(errors.UpstreamFailed, match="no JSON-RPC response"):
        upstream.bridge.speaks_era("2026-07-28")
    assert good.requests == 1


def test_keep_alive_pool_size_is_set_per_server(good: GoodServer) -> None:
    upstream = make_upstream([good.url], max_connections=3)
    adapter = upstream.transport.session.get_adapter(good.url)
    assert adapter._pool_maxsize == 3 and upstream.transport.session.trust_env is False  # type: ignore[attr-defined]
    assert upstream.forward(request("tools/list")).status == 200


# --- era learning and ejection under faults ------------------------------------


@responses.activate
@pytest.mark.parametrize("first", [
    {"status": 500, "body": "<html>Internal Server Error</html>", "content_type": "text/html"},
    {"status": 200, "body": "<html>booting</html>", "content_type": "text/html"},
    {"status": 503, "body": "starting"},
])
def test_a_failed_era_probe_is_not_learned(first: dict[str, Any]) -> None:
    # One bad answer to the first probe (a booting instance, a proxy's error page) must
    # not fix the server's era for the worker's lifetime.
    discovered = {"jsonrpc": "2.0", "id": "mcp-gateway-discover",
                  "result": {"supportedVersions": ["2026-07-28"], "capabilities": {}}}
    responses.post(f"{A}/mcp", **first)
    responses.post(f"{A}/mcp", json=discovered)
    upstream = make_upstream([A])
    with pytest.raises(errors.UpstreamError):
        upstream.bridge.speaks_era("2026-07-28")
    assert upstream.bridge.speaks_era("2026-07-28") is True


@responses.activate
def test_a_refused_initialize_after_a_500_is_learned_only_from_the_real_answer() -> None:
    responses.post(f"{A}/mcp", status=500, body="oops")
    responses.post(f"{A}/mcp", json={"jsonrpc": "2.0", "id": "mcp-gateway-initialize",
                                     "result": {"protocolVersion": "2025-11-25", "capabilities": {}, "serverInfo": {}}},
                   headers={"Mcp-Session-Id": "s1"})
    responses.post(f"{A}/mcp", status=202)
    upstream = make_upstream([A])
    with pytest.raises(errors.UpstreamError):
        upstream.bridge.speaks_era("legacy")
    assert upstream.bridge.speaks_era("legacy") is True


@responses.activate
def test_eras_are_learned_again_when_an_instance_comes_back() -> None:
    responses.post(f"{A}/mcp", json={"jsonrpc": "2.0", "id": "mcp-gateway-discover", "error": {"code": -32601, "message": "no"}})
    upstream = make_upstream([A])
    assert upstream.bridge.speaks_era("2026-07-28") is False
    upstream.relearn()
    responses.replace(responses.POST, f"{A}/mcp", json={
        "jsonrpc": "2.0", "id": "mcp-gateway-discover", "result": {"supportedVersions": ["2026-07-28"], "capabilities": {}}})
    assert upstream.bridge.speaks_era("2026-07-28") is True


def test_two_instances_failing_at_once_are_never_both_ejected(monkeypatch: pytest.MonkeyPatch) -> None:
    upstream = make_upstream([A, B], max_fails=1)
    decide = Balancer.may_eject

    def slow_decision(self: Balancer, instance: Instance) -> bool:
        allowed = decide(self, instance)
        time.sleep(0.05)  # both failures are being judged at once
        return allowed

    monkeypatch.setattr(Balancer, "may_eject", slow_decision)
    start = threading.Barrier(2)

    def fail(instance: Instance) -> None:
        start.wait()
        upstream.transport.failed(instance, errors.UpstreamFailed("reset"))

    threads = [threading.Thread(target=fail, args=(instance,)) for instance in upstream.balancer.instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert upstream.balancer.routable_count() == 1
