"""Era translation and request metadata, unit by unit."""

from __future__ import annotations

import pytest

from gateway import errors, protocol

ENVELOPE_KEYS = {protocol.META_PROTOCOL_VERSION, protocol.META_CLIENT_CAPABILITIES, protocol.META_CLIENT_INFO}


def test_a_legacy_request_gets_the_2026_envelope_and_keeps_its_own_meta() -> None:
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
               "params": {"name": "x", "_meta": {"progressToken": "p"}}}
    modern = protocol.request_for_server(message, protocol.LEGACY, protocol.MODERN)
    meta = modern["params"]["_meta"]
    assert set(meta) >= ENVELOPE_KEYS and meta["progressToken"] == "p" and meta[protocol.META_PROTOCOL_VERSION] == "2026-07-28"
    assert message["params"]["_meta"] == {"progressToken": "p"}, "the client's message is not changed in place"


def test_a_2026_request_loses_only_the_envelope_for_a_legacy_server() -> None:
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/list",
               "params": {"_meta": {protocol.META_PROTOCOL_VERSION: "2026-07-28", "io.modelcontextprotocol/logLevel": "info",
                                    "progressToken": 3}}}
    assert protocol.request_for_server(message, protocol.MODERN, protocol.LEGACY)["params"] == {"_meta": {"progressToken": 3}}
    bare = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"_meta": {protocol.META_PROTOCOL_VERSION: "x"}}}
    assert protocol.request_for_server(bare, protocol.MODERN, protocol.LEGACY)["params"] == {}
    assert protocol.request_for_server(message, protocol.MODERN, protocol.MODERN) is message


def test_a_legacy_result_gets_what_2026_requires() -> None:
    reply = {"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}
    listed = protocol.reply_for_client(reply, "tools/list", protocol.MODERN, protocol.LEGACY, "s")["result"]
    assert listed == {"tools": [], "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
    called = protocol.reply_for_client({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}, "tools/call",
                                       protocol.MODERN, protocol.LEGACY, "s")["result"]
    assert called == {"resultType": "complete", "content": []}, "only cacheable results carry ttlMs/cacheScope"


def test_input_required_becomes_an_error_for_a_legacy_client() -> None:
    reply = {"jsonrpc": "2.0", "id": 9, "result": {
        "resultType": "input_required", "requestState": "opaque",
        "inputRequests": {"a": {"method": "elicitation/create", "params": {}}, "b": {"method": "roots/list"}}}}
    error = protocol.reply_for_client(reply, "tools/call", protocol.LEGACY, protocol.MODERN, "srv")
    assert error["id"] == 9 and error["error"]["code"] == errors.INTERNAL_ERROR
    assert "server 'srv' needs input from the client (elicitation/create, roots/list)" in error["error"]["message"]
    # A 2026-07-28 client gets it untouched: MRTR is stateless and passes through.
    assert protocol.reply_for_client(reply, "tools/call", protocol.MODERN, protocol.MODERN, "srv") is reply


def test_hello_is_read_from_either_handshake() -> None:
    discovered = protocol.hello_from_discover({"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}},
                                               "_meta": {protocol.META_SERVER_INFO: {"name": "n"}}})
    assert discovered is not None and discovered.era == protocol.MODERN and discovered.server_info == {"name": "n"}
    assert protocol.hello_from_discover({"supportedVersions": ["2099-01-01"]}) is None
    assert protocol.hello_from_discover(None) is None
    initialized = protocol.hello_from_initialize({"protocolVersion": "2025-06-18", "serverInfo": {"name": "l"}})
    assert initialized.era == protocol.LEGACY and initialized.protocol_version == "2025-06-18"


@pytest.mark.parametrize("value", ["get_weather", "Hello, 世界", " padded ", "line1\nline2", "=?base64?literal?="])
def test_header_values_round_trip_through_the_base64_sentinel(value: str) -> None:
    encoded = protocol.encode_header_value(value)
    assert encoded.isascii() and "\n" not in encoded
    assert protocol.decode_header_value(encoded) == value
    assert (encoded == value) == (value == "get_weather")


def test_request_headers_mirror_method_and_name() -> None:
    message = {"method": "resources/read", "params": {"uri": "file:///é"}}
    headers = protocol.request_headers(message)
    assert headers["MCP-Protocol-Version"] == "2026-07-28" and headers["Mcp-Method"] == "resources/read"
    assert protocol.decode_header_value(headers["Mcp-Name"]) == "file:///é"
    assert "Mcp-Name" not in protocol.request_headers({"method": "tools/list"})


def test_a_handshake_era_sessions_log_level_rides_in_the_2026_meta() -> None:
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}
    sent = protocol.request_for_server(message, protocol.LEGACY, protocol.MODERN, "warning")
    assert sent["params"]["_meta"][protocol.META_LOG_LEVEL] == "warning"
    assert protocol.META_LOG_LEVEL not in protocol.request_for_server(message, protocol.LEGACY, protocol.MODERN)["params"]["_meta"]
    assert protocol.request_for_server(message, protocol.LEGACY, protocol.LEGACY, "warning") is message


def test_the_gateways_own_answers_claim_only_what_it_delivers() -> None:
    hello = protocol.ServerHello(protocol.MODERN, "2026-07-28", {
        "tools": {"listChanged": True}, "prompts": {"listChanged": True},
        "resources": {"listChanged": True, "subscribe": True}, "completions": {}}, {"name": "s"})
    delivered = {"tools": {}, "prompts": {}, "resources": {}, "completions": {}}
    assert protocol.initialize_result(hello, "2025-11-25")["capabilities"] == {**delivered, "logging": {}}
    assert protocol.discover_result(hello)["capabilities"] == delivered
    assert hello.capabilities["tools"] == {"listChanged": True}, "the server's own is not changed"
