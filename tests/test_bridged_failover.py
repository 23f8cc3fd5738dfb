"""Bridged requests: they fail over by the same rules as requests passed through, and never cross.

curl with no MCP headers, and 2026-07-28 clients of handshake-era servers, are
served through the gateway's own session with an instance. When one of two
instances dies, those requests must go to the other one (connection refused is
safe for every method), not fail until the dead instance is ejected. Real
gunicorn, two real SDK servers over HTTP, one stopped.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import requests

from .harness import CURL_HEADERS, Gunicorn, McpHttpServer, write_registry


def test_killing_one_of_two_instances_fails_no_bridged_curl_call(tmp_path: Path) -> None:
    servers = [McpHttpServer(tmp_path) for _ in range(2)]
    try:
        # Passive ejection and active checks are out of reach here: failover alone must hide the death.
        registry = write_registry(tmp_path, {"web": {
            "type": "http", "instances": [{"endpoint": s.url} for s in servers], "max_fails": 1000,
            "health_check_fall": 1000}}, {"health_check_interval": 3600})
        with Gunicorn(registry, workers=2).serving() as gateway:
            def call(method: str, params: dict[str, object] | None = None) -> requests.Response:
                body = {"jsonrpc": "2.0", "id": 1, "method": method, **({"params": params} if params else {})}
                return requests.post(f"{gateway.url}/web/mcp", data=json.dumps(body), headers=CURL_HEADERS, timeout=30)

            for _ in range(4):  # both workers open their sessions with both instances
                assert call("tools/list").status_code == 200
            servers[0].stop()
            answers = [call("tools/list") for _ in range(12)]
            answers += [call("tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}}) for _ in range(12)]
            failed = [(a.status_code, a.text[:200]) for a in answers if a.status_code != 200 or "error" in a.json()]
            assert not failed
            retried = sum(server["retries"] for server in [gateway.status()["servers"]["web"]])
            assert retried >= 1
    finally:
        for server in servers:
            server.stop()


def test_concurrent_bridged_calls_with_the_same_id_each_get_their_own_answer(tmp_path: Path) -> None:
    # curl's ids are all 1, and a worker's bridged requests share one session with an
    # instance: the instance must not see two requests of one session with the same id.
    server = McpHttpServer(tmp_path)
    outcomes: list[str] = []
    try:
        registry = write_registry(tmp_path, {"web": {"type": "http", "instances": [{"endpoint": server.url}]}})
        with Gunicorn(registry, workers=1, threads=4).serving() as gateway:

            def client(number: int) -> None:
                with requests.Session() as http:
                    for n in range(40):
                        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                "params": {"name": "add", "arguments": {"a": number, "b": n}}}
                        try:
                            answer = http.post(f"{gateway.url}/web/mcp", data=json.dumps(body), headers=CURL_HEADERS,
                                               timeout=10).json()
                            outcomes.append("ok" if answer["result"]["structuredContent"]["result"] == number + n
                                            else f"wrong answer {answer}")
                        except (requests.RequestException, KeyError, ValueError) as exc:
                            outcomes.append(repr(exc))

            threads = [threading.Thread(target=client, args=(1000 * k,)) for k in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
    finally:
        server.stop()
    assert len(outcomes) == 160 and set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:5]
