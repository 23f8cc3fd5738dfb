"""Session ids: sealed (AES-GCM), bound to server and principal, rotatable, revocable.

Unit tests drive SessionSigner with an injected clock; the cross-worker
properties (principal binding, DELETE revoking an id on every worker) run
against real gunicorn with 2 workers in front of real MCP servers.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway import errors, registry, sessions
from gateway.sessions import Revocations, SessionSigner

from .harness import (
    ACCEPT_BOTH,
    TIME_SERVER,
    Clock,
    Gunicorn,
    McpHttpServer,
    rpc,
    sse_or_json,
    wait_for,
    write_registry,
)

OLD, NEW = b"the-old-secret-of-this-gateway", b"the-new-secret-of-this-gateway"
INIT = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}


WALL = 1_750_000_000.0  # a wall-clock time, as session expiry uses


def signer(*secrets: bytes, ttl: float = 3600.0, clock: Clock | None = None,
           revocations: Revocations | None = None) -> SessionSigner:
    return SessionSigner(list(secrets or (OLD,)), ttl, clock=clock or Clock(WALL), revocations=revocations)


def refused(signer_: SessionSigner, token: str, server_id: str = "github-server", principal: str | None = None) -> bool:
    try:
        signer_.verify(token, server_id, principal)
    except errors.SessionNotFound:
        return True
    return False


# --- what a client can read out of an id: nothing ------------------------------------


def encodings(text: str) -> set[str]:
    """`text` as it would appear in base64 or urlsafe base64 at any of the 3 byte alignments."""
    found = {text}
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * shift + text.encode()).decode().rstrip("=")
            found.add(encoded[4 if shift else 0 : -4])  # the characters that depend on `text` alone
    return found


def test_a_session_id_reveals_neither_instance_nor_upstream_session_nor_server_nor_principal() -> None:
    secret_parts = {"server": "github-server", "instance": "http://10.20.30.40:8080",
                    "upstream": "upstream-session-5f2c9a", "principal": "alice-the-principal"}
    token = signer().mint(secret_parts["server"], "2025-11-25", instance=secret_parts["instance"],
                          upstream_session=secret_parts["upstream"], principal=secret_parts["principal"])
    for value in secret_parts.values():
        for form in encodings(value):
            assert form not in token, (value, form)
    prefix, _, body = token.partition(".")
    assert prefix == "v1" and body
    decoded = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert b"{" not in decoded[:2] and b'":' not in decoded
    with pytest.raises(ValueError):
        json.loads(decoded)
    # Every id is different, even for the same session contents.
    assert token != signer().mint(secret_parts["server"], "2025-11-25", instance=secret_parts["instance"],
                                  upstream_session=secret_parts["upstream"], principal=secret_parts["principal"])


def test_the_sealed_session_round_trips() -> None:
    clock = Clock(WALL)
    seal = signer(clock=clock)
    token = seal.mint("github-server", "2025-06-18", instance="http://a:1", upstream_session="u-1", principal="alice")
    session = seal.verify(token, "github-server", "alice")
    assert (session.server_id, session.protocol_version, session.instance, session.upstream_session) == (
        "github-server", "2025-06-18", "http://a:1", "u-1")
    assert session.principal == "alice" and session.issued_at == clock.now
    assert session.expires_at == clock.now + 3600 and len(session.revocation_id) >= 16
    assert session.owner is None
    owned = seal.verify(seal.mint("memory", "2025-06-18", owner="worker-7"), "memory")
    assert owned.owner == "worker-7"


# --- tampering, garbage, wrong server, expiry -> 404 ---------------------------------------


def test_every_changed_character_and_every_truncation_is_refused() -> None:
    seal = signer()
    token = seal.mint("github-server", "2025-11-25", instance="http://a:1", upstream_session="u-1")
    assert not refused(seal, token)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for index, char in enumerate(token):
        other = alphabet[(alphabet.find(char) + 1) % len(alphabet)] if char in alphabet else "A"
        assert refused(seal, token[:index] + other + token[index + 1 :]), index
    for length in range(len(token)):
        assert refused(seal, token[:length]), length
    assert refused(seal, token + "A") and refused(seal, token + "AAAA")


@pytest.mark.parametrize("garbage", [
    "", "v1.", "v1", "v2." + "A" * 60, "v1.!!!!", "v1.====", "v1." + "A" * 200, "made-up",
    "eyJzIjoiZ2l0aHViLXNlcnZlciJ9.AAAA", "v1." + "\u00e9" * 40, "v1." + "A" * 100_000,
])
def test_garbage_is_refused(garbage: str) -> None:
    assert refused(signer(), garbage)


def test_a_session_of_one_server_is_refused_on_another() -> None:
    seal = signer()
    token = seal.mint("time", "2025-11-25")
    assert not refused(seal, token, "time") and refused(seal, token, "github-server")


def test_an_expired_session_is_refused() -> None:
    clock = Clock(WALL)
    seal = signer(ttl=60, clock=clock)
    token = seal.mint("time", "2025-11-25")
    clock.now += 59
    assert not refused(seal, token, "time")
    clock.now += 2
    with pytest.raises(errors.SessionNotFound, match="expired"):
        seal.verify(token, "time")


def test_a_shorter_ttl_after_minting_applies_and_a_longer_one_does_not_extend() -> None:
    clock = Clock(WALL)
    token = signer(ttl=60, clock=clock).mint("time", "2025-11-25")
    clock.now += 30
    assert refused(signer(ttl=10, clock=clock), token, "time")
    clock.now += 40  # 70 s after minting: past the ttl it was minted with
    assert refused(signer(ttl=3600, clock=clock), token, "time")


# --- key rotation ---------------------------------------------------------------------------


def test_rotation_the_first_secret_seals_and_every_secret_verifies() -> None:
    old_token = signer(OLD).mint("time", "2025-11-25")
    rotated = signer(NEW, OLD)
    assert not refused(rotated, old_token, "time")
    new_token = rotated.mint("time", "2025-11-25")
    assert not refused(signer(NEW), new_token, "time"), "sealed with the first secret"
    assert refused(signer(OLD), new_token, "time")
    assert refused(signer(NEW), old_token, "time"), "the old secret dropped: its ids are gone"


def test_secrets_of_any_length_give_distinct_keys() -> None:
    token = signer(b"x").mint("time", "2025-11-25")
    assert not refused(signer(b"x"), token, "time")
    assert refused(signer(b"x" * 1000), token, "time") and refused(signer(b"y"), token, "time")


def test_secrets_come_from_the_registry_as_a_string_or_a_list_and_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sessions.SECRET_ENV, raising=False)
    assert sessions.load_secrets("only-one-secret-here") == [b"only-one-secret-here"]
    assert sessions.load_secrets(("new-secret-0123456", "old-secret-0123456")) == [b"new-secret-0123456", b"old-secret-0123456"]
    # As `session_secret: ${MCP_GATEWAY_SESSION_SECRET}` expands a list held in the environment.
    assert sessions.load_secrets("new-secret-0123456,old-secret-0123456") == [b"new-secret-0123456", b"old-secret-0123456"]
    monkeypatch.setenv(sessions.SECRET_ENV, "new-secret, old-secret,")
    assert sessions.load_secrets(None) == [b"new-secret", b"old-secret"]


def test_the_registry_accepts_a_list_of_secrets(tmp_path: Path) -> None:
    servers = {"time": {"type": "stdio", "command": TIME_SERVER}}
    loaded = registry.load(write_registry(tmp_path, servers, {"session_secret": ["n" * 16, "o" * 16]}))
    assert sessions.load_secrets(loaded.gateway.session_secret) == [b"n" * 16, b"o" * 16]
    for bad, problem in (([], "should be non-empty"), (["short"], "is too short"), ("n" * 16 + ",short", "at least 16")):
        with pytest.raises(errors.RegistryError, match=problem):
            registry.load(write_registry(tmp_path, servers, {"session_secret": bad}))


# --- principal binding -----------------------------------------------------------------------


def test_a_session_presented_by_another_principal_is_refused() -> None:
    seal = signer()
    token = seal.mint("time", "2025-11-25", principal="alice")
    assert not refused(seal, token, "time", "alice")
    assert refused(seal, token, "time", "ci") and refused(seal, token, "time", None)
    assert refused(seal, seal.mint("time", "2025-11-25"), "time", "alice")


# --- revocation --------------------------------------------------------------------------------


def test_a_revoked_session_is_refused_in_this_process() -> None:
    seal = signer(revocations=Revocations(None))
    token = seal.mint("time", "2025-11-25")
    other = seal.mint("time", "2025-11-25")
    seal.revoke(seal.verify(token, "time"))
    with pytest.raises(errors.SessionNotFound, match="ended"):
        seal.verify(token, "time")
    assert not refused(seal, other, "time"), "only that session ends"


def test_a_revocation_record_is_seen_by_every_process_sharing_the_folder_and_kept_until_expiry(tmp_path: Path) -> None:
    clock = Clock(WALL)
    folder = tmp_path / "revoked"
    folder.mkdir()
    mine, theirs = signer(clock=clock, revocations=Revocations(folder)), signer(clock=clock, revocations=Revocations(folder))
    token = mine.mint("time", "2025-11-25")
    session = mine.verify(token, "time")
    mine.revoke(session)
    assert refused(theirs, token, "time")
    # The record is named by the random id sealed inside, not by the token's text.
    assert [p.name for p in folder.iterdir()] == [session.revocation_id]
    assert session.revocation_id not in token
    Revocations(folder).prune(clock.now + 3599)
    assert refused(theirs, token, "time"), "kept while the id could still be valid"
    Revocations(folder).prune(clock.now + 3601)
    assert list(folder.iterdir()) == []


def test_pruning_in_process_revocations_forgets_expired_ones() -> None:
    revocations = Revocations(None)
    seal = signer(revocations=revocations)
    session = seal.verify(seal.mint("time", "2025-11-25"), "time")
    seal.revoke(session)
    assert session.revocation_id in revocations
    revocations.prune(session.expires_at + 1)
    assert session.revocation_id not in revocations


# --- through the HTTP surface: 404 JSON-RPC errors, never 500 ------------------------------------


def test_tampered_and_revoked_ids_are_json_rpc_404s_through_the_app(make_app: Any) -> None:
    client = make_app({"time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 1}}).test_client()
    token = client.post("/time/mcp", json=rpc("initialize", INIT)).headers["Mcp-Session-Id"]
    session = {"Mcp-Session-Id": token, "MCP-Protocol-Version": "2025-11-25"}
    assert client.post("/time/mcp", json=rpc("tools/list"), headers=session).status_code == 200
    flipped = token[:10] + ("B" if token[10] != "B" else "C") + token[11:]
    for bad in (flipped, token[:-3], "v1." + "\x7f" * 10, "v1.%%%"):
        response = client.post("/time/mcp", json=rpc("tools/list"), headers={**session, "Mcp-Session-Id": bad})
        assert response.status_code == 404 and response.get_json()["error"]["code"] == errors.SESSION_NOT_FOUND
    assert client.delete("/time/mcp", headers=session).status_code == 204
    after = client.post("/time/mcp", json=rpc("tools/list"), headers=session)
    assert after.status_code == 404 and after.get_json()["error"]["code"] == errors.SESSION_NOT_FOUND
    assert client.delete("/time/mcp", headers=session).status_code == 404


# --- real gunicorn: principal binding and revocation across workers --------------------------------


ALICE, CI = "alice-token-0123456789", "ci-token-0123456789abc"


def post(gateway: Gunicorn, server: str, body: dict[str, Any], headers: dict[str, str]) -> requests.Response:
    # Connection: close, so that each request is a fresh connection and they spread over the workers.
    return requests.post(f"{gateway.url}/{server}/mcp", data=json.dumps(body), timeout=30,
                         headers={**ACCEPT_BOTH, "Connection": "close", **headers})


def test_another_principal_presenting_a_session_gets_404_on_real_gunicorn(gunicorn: Any) -> None:
    gateway = gunicorn({"time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 1}},
                       {"auth": {"tokens": {"alice": ALICE, "ci": CI}}})
    alice, ci = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {CI}"}
    init = post(gateway, "time", rpc("initialize", INIT), alice)
    assert init.status_code == 200, init.text
    session = {"Mcp-Session-Id": init.headers["Mcp-Session-Id"], "MCP-Protocol-Version": "2025-11-25"}
    for attempt in range(4):  # on fresh connections: both workers refuse it
        stolen = post(gateway, "time", rpc("tools/list", request_id=attempt), {**ci, **session})
        assert stolen.status_code == 404, stolen.text
        assert stolen.json()["error"]["code"] == errors.SESSION_NOT_FOUND
    stolen_delete = requests.delete(f"{gateway.url}/time/mcp", headers={**ci, **session, "Connection": "close"}, timeout=30)
    assert stolen_delete.status_code == 404
    mine = post(gateway, "time", rpc("tools/list", request_id=9), {**alice, **session})
    assert mine.status_code == 200 and sse_or_json(mine)["result"]["tools"]


def test_delete_ends_a_session_on_every_worker_of_real_gunicorn(gunicorn: Any) -> None:
    gateway = gunicorn({"time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 1}})
    init = post(gateway, "time", rpc("initialize", INIT), {})
    session = {"Mcp-Session-Id": init.headers["Mcp-Session-Id"], "MCP-Protocol-Version": "2025-11-25"}
    for attempt in range(4):
        assert post(gateway, "time", rpc("tools/list", request_id=attempt), session).status_code == 200
    ended = requests.delete(f"{gateway.url}/time/mcp", headers={**session, "Connection": "close"}, timeout=30)
    assert ended.status_code == 204
    answers = [post(gateway, "time", rpc("tools/list", request_id=n), session) for n in range(20)]
    assert [a.status_code for a in answers] == [404] * 20
    assert all(a.json()["error"]["code"] == errors.SESSION_NOT_FOUND for a in answers)


@pytest.fixture
def http_gateway(http_servers: list[McpHttpServer], tmp_path: Path) -> Iterator[Gunicorn]:
    servers = {"web": {"type": "http", "instances": [{"endpoint": s.url} for s in http_servers]}}
    with Gunicorn(write_registry(tmp_path, servers), workers=2, threads=4).serving() as instance:
        yield instance


def test_delete_of_a_passed_through_http_session_ends_it_in_the_gateway_on_every_worker(http_gateway: Gunicorn) -> None:
    init = post(http_gateway, "web", rpc("initialize", INIT), {})
    assert init.status_code == 200, init.text
    session = {"Mcp-Session-Id": init.headers["Mcp-Session-Id"], "MCP-Protocol-Version": "2025-11-25"}
    assert post(http_gateway, "web", {"jsonrpc": "2.0", "method": "notifications/initialized"}, session).status_code == 202
    assert post(http_gateway, "web", rpc("tools/list"), session).status_code == 200
    ended = requests.delete(f"{http_gateway.url}/web/mcp", headers={**session, "Connection": "close"}, timeout=30)
    assert 200 <= ended.status_code < 300
    answers = [post(http_gateway, "web", rpc("tools/list", request_id=n), session) for n in range(20)]
    assert [a.status_code for a in answers] == [404] * 20
    # Refused by the gateway before it is passed on, not because the instance forgot it.
    messages = [a.json()["error"]["message"] for a in answers]
    assert all("server 'web'" in m and "has ended" in m and "no longer knows" not in m for m in messages), messages


def test_the_runtime_directory_gets_a_revoked_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import rundir

    folder = tmp_path / "rt"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv(rundir.RUNTIME_ENV, str(folder))
    monkeypatch.setenv(rundir.METRICS_ENV, str(folder / "metrics"))
    rundir.prepare()
    assert (folder / "revoked").is_dir() and rundir.revoked_dir() == folder / "revoked"
    assert os.stat(folder / "revoked").st_mode & 0o077 == 0


def test_upkeep_forgets_revocations_of_expired_sessions(make_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import runtime, upkeep

    monkeypatch.setattr(upkeep, "PRUNE_INTERVAL", 0.0)
    app = make_app({"time": {"type": "stdio", "command": TIME_SERVER, "pool_size": 1, "pool_min": 0}})
    gateway = app.extensions[runtime.EXTENSION_KEY]
    gateway.revocations.add("a" * 32, 1.0)  # expired long ago
    gateway.revocations.add("b" * 32, 4_000_000_000.0)
    gateway.start()
    wait_for(lambda: "a" * 32 not in gateway.revocations)
    assert "b" * 32 in gateway.revocations
