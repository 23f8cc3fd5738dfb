"""How a request is served, decided once (gateway/serving.py): a table of every branch, no process.

Each row is one request: its HTTP method, the upstream (stdio: no instances,
nothing passes through; http: instances speaking the named eras), the
session it names (none, one the gateway minted itself, one an instance
holds), the client's era and the JSON-RPC message. It says the plan and,
since asking an HTTP upstream which eras it speaks probes an instance, which
eras the decision asked (only where the gateway always asked).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway import errors, serving
from gateway.protocol import LEGACY, MODERN, ClientContext
from gateway.sessions import Session

BOTH = frozenset({MODERN, LEGACY})
LEGACY_ONLY = frozenset({LEGACY})
MODERN_ONLY = frozenset({MODERN})
NEITHER: frozenset[str] = frozenset()


@dataclass
class FakeUpstream:
    """What the decision reads of an upstream: its id, and which eras pass through (each question recorded)."""

    speaks: frozenset[str]
    server_id: str = "srv"
    asked: list[str] = field(default_factory=list)

    def passes_through(self, era: str) -> bool:
        self.asked.append(era)
        return era in self.speaks


LEG = ClientContext(LEGACY, "2025-06-18")
MOD = ClientContext(MODERN, "2026-07-28")
MINTED = Session("srv", "2025-06-18", 0.0)  # the gateway's own: no instance holds it
HELD = Session("srv", "2025-06-18", 0.0, instance="http://127.0.0.1:1", upstream_session="s-1")


def rpc(method: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": method}


def note(method: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method}


ANSWER = {"jsonrpc": "2.0", "id": 7, "result": {}}  # a client's response to a server's request

# (method, instances, speaks, session, client, message) -> (plan, eras asked)
POST_CASES: list[tuple[str, bool, frozenset[str], Session | None, ClientContext, dict[str, Any], Any, list[str]]] = [
    # stdio: the gateway ends MCP HTTP for every request
    ("stdio legacy initialize", False, NEITHER, None, LEG, rpc("initialize"), serving.INITIALIZE, []),
    ("stdio legacy ping in a session", False, NEITHER, MINTED, LEG, rpc("ping"), serving.PING, []),
    ("stdio legacy ping, no session", False, NEITHER, None, LEG, rpc("ping"), serving.PING, []),
    ("stdio legacy tools/list", False, NEITHER, None, LEG, rpc("tools/list"), serving.BRIDGE, []),
    ("stdio legacy tools/list in a session", False, NEITHER, MINTED, LEG, rpc("tools/list"), serving.BRIDGE, []),
    ("stdio legacy server/discover goes on", False, NEITHER, None, LEG, rpc("server/discover"), serving.BRIDGE, []),
    ("stdio modern server/discover", False, NEITHER, None, MOD, rpc("server/discover"), serving.DISCOVER, []),
    ("stdio modern ping goes on", False, NEITHER, None, MOD, rpc("ping"), serving.BRIDGE, []),
    ("stdio modern initialize goes on", False, NEITHER, None, MOD, rpc("initialize"), serving.BRIDGE, []),
    ("stdio modern tools/call", False, NEITHER, None, MOD, rpc("tools/call"), serving.BRIDGE, []),
    # logging/setLevel of a handshake-era client: kept by the gateway, never sent to a shared process
    ("stdio legacy setLevel in a session", False, NEITHER, MINTED, LEG, rpc("logging/setLevel"),
     serving.SET_LEVEL, []),
    ("stdio legacy setLevel, no session", False, NEITHER, None, LEG, rpc("logging/setLevel"), serving.SET_LEVEL, []),
    ("stdio modern setLevel goes on", False, NEITHER, None, MOD, rpc("logging/setLevel"), serving.BRIDGE, []),
    ("stdio legacy notification", False, NEITHER, None, LEG, note("notifications/initialized"), serving.ACCEPTED, []),
    ("stdio legacy notification in a session", False, NEITHER, MINTED, LEG, note("notifications/cancelled"),
     serving.ACCEPTED, []),
    ("stdio modern notification", False, NEITHER, None, MOD, note("notifications/cancelled"), serving.ACCEPTED, []),
    ("stdio client response", False, NEITHER, None, LEG, ANSWER, serving.ACCEPTED, []),
    ("stdio modern client response", False, NEITHER, None, MOD, ANSWER, serving.ACCEPTED, []),
    # a session an instance held, presented after a reload made the server stdio: nothing to pass it to
    ("stdio legacy, an instance's session", False, NEITHER, HELD, LEG, rpc("tools/list"), serving.BRIDGE, []),
    # http, 2026-07-28 client: passed through when the instances speak 2026-07-28
    ("http modern client, modern server", True, BOTH, None, MOD, rpc("tools/list"), serving.PASS_THROUGH, [MODERN]),
    ("http modern client, modern-only server", True, MODERN_ONLY, None, MOD, rpc("tools/call"),
     serving.PASS_THROUGH, [MODERN]),
    ("http modern notification passes", True, BOTH, None, MOD, note("notifications/cancelled"),
     serving.PASS_THROUGH, [MODERN]),
    ("http modern discover passes", True, BOTH, None, MOD, rpc("server/discover"), serving.PASS_THROUGH, [MODERN]),
    ("http modern listen passes", True, MODERN_ONLY, None, MOD, rpc("subscriptions/listen"),
     serving.PASS_THROUGH, [MODERN]),
    ("http modern client, legacy server", True, LEGACY_ONLY, None, MOD, rpc("tools/list"), serving.BRIDGE, [MODERN]),
    # the instances answer discover as they do (an error), so a client that can falls back to initialize
    ("http modern discover, legacy server", True, LEGACY_ONLY, None, MOD, rpc("server/discover"),
     serving.PASS_THROUGH, [MODERN]),
    ("http modern notification, legacy server", True, LEGACY_ONLY, None, MOD, note("notifications/cancelled"),
     serving.ACCEPTED, [MODERN]),
    ("http modern ping, legacy server", True, LEGACY_ONLY, None, MOD, rpc("ping"), serving.BRIDGE, [MODERN]),
    # http, handshake-era client in an instance's session: passed through, eras not asked
    ("http legacy, instance session", True, BOTH, HELD, LEG, rpc("tools/list"), serving.PASS_THROUGH, []),
    ("http legacy, instance session, ping", True, NEITHER, HELD, LEG, rpc("ping"), serving.PASS_THROUGH, []),
    ("http legacy, instance session, notification", True, BOTH, HELD, LEG, note("notifications/initialized"),
     serving.PASS_THROUGH, []),
    ("http legacy, instance session, response", True, BOTH, HELD, LEG, ANSWER, serving.PASS_THROUGH, []),
    ("http legacy, instance session, setLevel", True, BOTH, HELD, LEG, rpc("logging/setLevel"),
     serving.PASS_THROUGH, []),
    ("http legacy, instance session, listen", True, MODERN_ONLY, HELD, LEG, rpc("subscriptions/listen"),
     serving.PASS_THROUGH, []),
    # http, handshake-era client in a session the gateway minted: bridged, eras not asked
    ("http legacy, minted session", True, BOTH, MINTED, LEG, rpc("tools/list"), serving.BRIDGE, []),
    ("http legacy, minted session, ping", True, BOTH, MINTED, LEG, rpc("ping"), serving.PING, []),
    ("http legacy, minted session, setLevel", True, MODERN_ONLY, MINTED, LEG, rpc("logging/setLevel"),
     serving.SET_LEVEL, []),
    ("http legacy, minted session, initialize", True, BOTH, MINTED, LEG, rpc("initialize"), serving.INITIALIZE, []),
    ("http legacy, minted session, notification", True, BOTH, MINTED, LEG, note("notifications/initialized"),
     serving.ACCEPTED, []),
    # http, handshake-era client without a session: only initialize may pass through, if the instances speak it
    ("http legacy initialize, legacy server", True, LEGACY_ONLY, None, LEG, rpc("initialize"),
     serving.PASS_THROUGH, [LEGACY]),
    ("http legacy initialize, modern-only server", True, MODERN_ONLY, None, LEG, rpc("initialize"),
     serving.INITIALIZE, [LEGACY]),
    ("http legacy tools/list, no session (curl)", True, BOTH, None, LEG, rpc("tools/list"), serving.BRIDGE, []),
    ("http legacy ping, no session", True, BOTH, None, LEG, rpc("ping"), serving.PING, []),
    ("http legacy discover, no session", True, BOTH, None, LEG, rpc("server/discover"), serving.BRIDGE, []),
    ("http legacy notification, no session", True, BOTH, None, LEG, note("notifications/initialized"),
     serving.ACCEPTED, []),
    ("http legacy response, no session", True, BOTH, None, LEG, ANSWER, serving.ACCEPTED, []),
]


@pytest.mark.parametrize(("instances", "speaks", "session", "client", "message", "plan", "asked"),
                         [case[1:] for case in POST_CASES], ids=[case[0] for case in POST_CASES])
def test_post(instances: bool, speaks: frozenset[str], session: Session | None, client: ClientContext,
              message: dict[str, Any], plan: Any, asked: list[str]) -> None:
    upstream = FakeUpstream(speaks)
    assert serving.decide("POST", upstream, instances, session, client, message) == plan
    assert upstream.asked == asked


# Refused: (instances, speaks, session, client) for subscriptions/listen
LISTEN_REFUSED = [
    ("stdio legacy", False, NEITHER, None, LEG),
    ("stdio modern", False, NEITHER, None, MOD),
    ("stdio legacy in a session", False, NEITHER, MINTED, LEG),
    ("http modern client, legacy server", True, LEGACY_ONLY, None, MOD),
    ("http legacy, minted session", True, BOTH, MINTED, LEG),
    ("http legacy, no session", True, BOTH, None, LEG),
]


@pytest.mark.parametrize(("instances", "speaks", "session", "client"), [case[1:] for case in LISTEN_REFUSED],
                         ids=[case[0] for case in LISTEN_REFUSED])
def test_a_long_lived_request_the_gateway_would_end_is_refused(instances: bool, speaks: frozenset[str],
                                                               session: Session | None, client: ClientContext) -> None:
    plan = serving.decide("POST", FakeUpstream(speaks), instances, session, client, rpc("subscriptions/listen"))
    assert isinstance(plan, serving.Refuse) and type(plan.error) is errors.NotSupported
    where = "it is bridged across protocol eras" if instances else "its processes are pooled"
    assert plan.error.message == (f"server 'srv': subscriptions/listen needs a server session of the client's own, "
                                  f"and {where}; a stdio server serves it with session_mode: dedicated")


NO_STREAM = "server 'srv': the gateway offers no server-to-client SSE stream; use POST"
NO_SESSION = "server 'srv': DELETE needs the Mcp-Session-Id header of the session to end"

# (method, instances, session) -> plan, or (error class, message)
STREAM_AND_END_CASES: list[tuple[str, str, bool, Session | None, Any]] = [
    ("GET stdio, no session", "GET", False, None, (errors.MethodNotAllowed, NO_STREAM)),
    ("GET stdio, minted session", "GET", False, MINTED, (errors.MethodNotAllowed, NO_STREAM)),
    ("GET stdio, stale instance session", "GET", False, HELD, (errors.MethodNotAllowed, NO_STREAM)),
    ("GET http, no session", "GET", True, None, serving.PASS_THROUGH),
    ("GET http, instance session", "GET", True, HELD, serving.PASS_THROUGH),
    ("GET http, minted session", "GET", True, MINTED, (errors.MethodNotAllowed, NO_STREAM)),
    ("DELETE stdio, no session", "DELETE", False, None, (errors.ClientError, NO_SESSION)),
    ("DELETE stdio, minted session", "DELETE", False, MINTED, serving.END_SESSION),
    ("DELETE stdio, stale instance session", "DELETE", False, HELD, serving.END_SESSION),
    ("DELETE http, no session", "DELETE", True, None, serving.PASS_THROUGH),
    ("DELETE http, instance session", "DELETE", True, HELD, serving.PASS_THROUGH_ENDING_SESSION),
    ("DELETE http, minted session", "DELETE", True, MINTED, serving.END_SESSION),
]


@pytest.mark.parametrize(("method", "instances", "session", "expected"), [case[1:] for case in STREAM_AND_END_CASES],
                         ids=[case[0] for case in STREAM_AND_END_CASES])
@pytest.mark.parametrize("speaks", [BOTH, NEITHER], ids=["speaks both", "speaks neither"])
def test_get_and_delete(method: str, instances: bool, session: Session | None, expected: Any,
                        speaks: frozenset[str]) -> None:
    upstream = FakeUpstream(speaks if instances else NEITHER)
    plan = serving.decide(method, upstream, instances, session)
    if isinstance(expected, tuple):
        error_class, message = expected
        assert isinstance(plan, serving.Refuse) and type(plan.error) is error_class
        assert plan.error.message == message
    else:
        assert plan == expected
    assert upstream.asked == []  # a stream or an end is passed on whatever era the instances speak


def test_only_a_delete_of_an_instance_session_asks_for_the_revocation() -> None:
    assert serving.PASS_THROUGH_ENDING_SESSION.ends_session and not serving.PASS_THROUGH.ends_session


def test_the_hot_paths_return_module_level_plans() -> None:
    # No allocation per request: a stdio call and a pass-through get the same plan value every time.
    stdio, http = FakeUpstream(NEITHER), FakeUpstream(BOTH)
    assert serving.decide("POST", stdio, False, None, LEG, rpc("tools/call")) is serving.BRIDGE
    assert serving.decide("POST", stdio, False, None, MOD, rpc("tools/call")) is serving.BRIDGE
    assert serving.decide("POST", http, True, HELD, LEG, rpc("tools/call")) is serving.PASS_THROUGH
    assert serving.decide("POST", http, True, None, MOD, rpc("tools/call")) is serving.PASS_THROUGH


def test_every_plan_is_one_of_four_kinds() -> None:
    plans = [plan for *_, plan, _ in POST_CASES] + [case[-1] for case in STREAM_AND_END_CASES
                                                    if not isinstance(case[-1], tuple)]
    kinds = (serving.PassThrough, serving.Bridge, serving.Answer, serving.Refuse)
    assert all(isinstance(plan, kinds) for plan in plans)
    assert {answer.what for answer in plans if isinstance(answer, serving.Answer)} == set(serving.Local)


GATEWAY = Path(__file__).resolve().parent.parent / "gateway"


@pytest.mark.parametrize("module", ["views.py", "post.py", "serving.py", "carry_out.py"])
def test_the_views_know_no_upstream_class(module: str) -> None:
    # They see upstreams through the Protocols of gateway/upstreams/__init__.py only.
    tree = ast.parse((GATEWAY / module).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name and name.startswith("upstreams.")}
    assert "HttpUpstream" not in ast.dump(tree) and "StdioUpstream" not in ast.dump(tree)


# --- dedicated sessions (session_mode: dedicated on a stdio server) ------------------------


@dataclass
class DedicatedUpstream(FakeUpstream):
    sessions: object = field(default_factory=object)  # what marks a stdio server of dedicated sessions


OWN = Session("srv", "2025-06-18", 0.0, upstream_session="k-1", owner="w-1")  # names its process
DEDICATED_CASES: list[tuple[str, Session | None, ClientContext | None, dict[str, Any] | None, Any]] = [
    ("POST", None, LEG, rpc("initialize"), serving.DEDICATED[serving.Held.START]),
    ("POST", OWN, LEG, rpc("tools/call"), serving.DEDICATED[serving.Held.REQUEST]),
    ("POST", OWN, LEG, rpc("ping"), serving.DEDICATED[serving.Held.REQUEST]),
    ("POST", OWN, LEG, rpc("logging/setLevel"), serving.DEDICATED[serving.Held.REQUEST]),
    ("POST", OWN, LEG, note("notifications/cancelled"), serving.DEDICATED[serving.Held.DELIVER]),
    ("POST", OWN, LEG, ANSWER, serving.DEDICATED[serving.Held.DELIVER]),
    ("GET", OWN, None, None, serving.DEDICATED[serving.Held.STREAM]),
    ("DELETE", OWN, None, None, serving.DEDICATED[serving.Held.END]),
    ("POST", None, MOD, rpc("tools/call"), serving.DEDICATED[serving.Held.CORRELATED]),
    ("POST", None, MOD, rpc("server/discover"), serving.DISCOVER),  # the server's, as on a pooled server
    ("POST", None, LEG, rpc("tools/call"), serving.BRIDGE),  # no session (curl): the pool
    ("POST", MINTED, LEG, rpc("tools/call"), serving.BRIDGE),  # a pooled session of the gateway's own
    ("DELETE", MINTED, None, None, serving.END_SESSION),
]


@pytest.mark.parametrize(("method", "session", "client", "message", "plan"), DEDICATED_CASES)
def test_dedicated_plans(method: str, session: Session | None, client: ClientContext | None,
                         message: dict[str, Any] | None, plan: Any) -> None:
    upstream = DedicatedUpstream(NEITHER)
    assert serving.decide(method, upstream, False, session, client, message) == plan  # type: ignore[arg-type]
    assert upstream.asked == []


def test_a_pooled_stdio_server_never_gets_a_dedicated_plan() -> None:
    assert serving.decide("POST", FakeUpstream(NEITHER), False, None, LEG, rpc("initialize")) == serving.INITIALIZE  # type: ignore[arg-type]
