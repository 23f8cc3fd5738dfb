"""Tokens, allow-lists, the custom hook and operator endpoints (Host and Origin: test_rebinding.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from gateway import errors, registry
from gateway.auth import Authenticator
from gateway.errors import RegistryError

from .harness import TIME_SERVER, Gunicorn, write_registry

CI, ALICE, OWN = "ci-token-0123456789abcdef", "alice-token-0123456789abcd", "own-token-0123456789abcdef"
LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}


def servers(**extra: Any) -> dict[str, Any]:
    return {
        "time": {"type": "stdio", "command": TIME_SERVER, **extra},
        "restricted": {"type": "stdio", "command": TIME_SERVER, "allow": ["ci"]},
    }


@pytest.fixture
def client(make_app: Any) -> Any:
    return make_app(servers(), {"auth": {"tokens": {"ci": CI, "alice": ALICE}, "protect_operator_endpoints": True}}).test_client()


def post(client: Any, server: str, **headers: str) -> Any:
    return client.post(f"/{server}/mcp", data=json.dumps(LIST), headers=headers)


def test_missing_or_wrong_token_is_401_with_www_authenticate(client: Any) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {CI}"}, {"X-API-Key": "nope"}):
        response = post(client, "time", **headers)
        assert response.status_code == 401, headers
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="mcp-gateway"'
        body = response.get_json()
        assert body["error"]["code"] == errors.UNAUTHORIZED and "server 'time'" in body["error"]["message"]


def test_bearer_token_or_api_key_gets_through(client: Any) -> None:
    assert post(client, "time", Authorization=f"Bearer {CI}").status_code == 200
    assert post(client, "time", **{"X-API-Key": ALICE}).status_code == 200


def test_allow_list_limits_which_tokens_reach_a_server(client: Any) -> None:
    assert post(client, "restricted", Authorization=f"Bearer {CI}").status_code == 200
    denied = post(client, "restricted", Authorization=f"Bearer {ALICE}")
    assert denied.status_code == 403 and "may not reach this server" in denied.get_json()["error"]["message"]


def test_unknown_server_ids_cannot_be_probed_without_a_token(client: Any) -> None:
    assert post(client, "nope").status_code == 401
    assert post(client, "nope", Authorization=f"Bearer {CI}").status_code == 404


def test_operator_endpoints_can_be_protected_but_liveness_stays_open(client: Any) -> None:
    for endpoint in ("/status", "/metrics"):
        assert client.get(endpoint).status_code == 401
        assert client.get(endpoint, headers={"Authorization": f"Bearer {CI}"}).status_code == 200
    assert client.get("/healthz").status_code == 200


def test_per_server_tokens_protect_only_their_server(make_app: Any) -> None:
    client = make_app({"open": {"type": "stdio", "command": TIME_SERVER},
                       "own": {"type": "stdio", "command": TIME_SERVER, "auth_tokens": {"mine": OWN}}}).test_client()
    assert post(client, "open").status_code == 200
    assert post(client, "own").status_code == 401
    assert post(client, "own", Authorization=f"Bearer {OWN}").status_code == 200
    # Tokens are configured, so the operator endpoints want a gateway-wide one by default.
    assert client.get("/status").status_code == 401
    opened = make_app({"own": {"type": "stdio", "command": TIME_SERVER, "auth_tokens": {"mine": OWN}}},
                      {"auth": {"protect_operator_endpoints": False}}).test_client()
    assert opened.get("/status").status_code == 200 and opened.get("/metrics").status_code == 200


def test_operator_endpoints_are_protected_by_default_once_tokens_are_configured(make_app: Any) -> None:
    client = make_app(servers(), {"auth": {"tokens": {"ci": CI}}}).test_client()
    for endpoint in ("/status", "/metrics"):
        assert client.get(endpoint).status_code == 401
        assert client.get(endpoint, headers={"X-API-Key": CI}).status_code == 200
    assert client.get("/healthz").status_code == 200
    open_app = make_app({"time": {"type": "stdio", "command": TIME_SERVER}})
    assert open_app.test_client().get("/status").status_code == 200  # no tokens: open, as before


def test_custom_hook_can_let_a_request_in(make_app: Any) -> None:
    client = make_app(servers(), {"auth": {"tokens": {"ci": CI}, "hook": "tests.auth_hook:team_header"}}).test_client()
    assert post(client, "time", **{"X-Team": "blue"}).status_code == 200
    assert post(client, "time", **{"X-Team": "red"}).status_code == 401
    assert post(client, "time", Authorization=f"Bearer {CI}").status_code == 200


def test_registry_checks_allow_names_and_the_hook(tmp_path: Path) -> None:
    document = {"servers": {"a": {"type": "stdio", "command": ["x"], "allow": ["nobody"]}},
                "gateway": {"auth": {"tokens": {"ci": CI}, "hook": "tests.auth_hook:NOT_CALLABLE"}}}
    with pytest.raises(RegistryError) as caught:
        registry.parse(json.dumps(document), "r.json", {})
    assert "servers.a.allow: 'nobody' is not a token in gateway.auth.tokens" in caught.value.problems
    assert any(p.startswith("gateway.auth.hook: cannot use 'tests.auth_hook:NOT_CALLABLE'") for p in caught.value.problems)
    short = {"servers": {}, "gateway": {"auth": {"tokens": {"ci": "short"}}}}
    with pytest.raises(RegistryError, match="gateway.auth.tokens.ci: 'short' is too short"):
        registry.parse(json.dumps(short), "r.json", {})


def test_tokens_come_from_the_environment_and_never_reach_the_log(tmp_path: Path) -> None:
    path = write_registry(tmp_path, servers(), {"auth": {"tokens": {"ci": "${GATEWAY_CI_TOKEN}", "alice": ALICE}}})
    gateway = Gunicorn(path, workers=2, env={"GATEWAY_CI_TOKEN": CI})
    try:
        gateway.wait_ready()
        url = f"{gateway.url}/time/mcp"
        assert requests.post(url, json=LIST, headers={"Authorization": f"Bearer {CI}"}, timeout=30).status_code == 200
        assert requests.post(url, json=LIST, headers={"Authorization": "Bearer not-the-token-at-all"}, timeout=30).status_code == 401
        assert requests.post(f"{gateway.url}/restricted/mcp", json=LIST, headers={"X-API-Key": ALICE}, timeout=30).status_code == 403
    finally:
        gateway.stop_and_check()
    log = gateway.log()
    assert "POST /time/mcp" in log
    for secret in (CI, ALICE, "not-the-token-at-all"):
        assert secret not in log


def test_the_authenticator_takes_auth_settings_and_server_access_not_the_registry() -> None:
    """What it needs and nothing more: `gateway.auth` and each server's auth_tokens and allow."""
    access = {"open": SimpleNamespace(auth_tokens={}, allow=None),
              "restricted": SimpleNamespace(auth_tokens={"own": OWN}, allow=("ci",))}
    auth = Authenticator({"tokens": {"ci": CI, "alice": ALICE}, "hook": "tests.auth_hook:team_header"}, access)
    assert auth.check_server("open", {"Authorization": f"Bearer {ALICE}"}) == "alice"
    assert auth.check_server("restricted", {"X-API-Key": OWN}) == "own"
    assert auth.check_server("restricted", {"X-Team": "blue"}) == "blue-team"
    with pytest.raises(errors.Forbidden):
        auth.check_server("restricted", {"Authorization": f"Bearer {ALICE}"})
    with pytest.raises(errors.Unauthorized):
        auth.check_operator({})
    assert auth.hook_credential_headers == {"x-team"}
