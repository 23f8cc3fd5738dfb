"""JSON-RPC 2.0 messages: parsing a request body, and building replies."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import errors


def parse(body: bytes, server_id: str) -> dict[str, Any]:
    """The one JSON-RPC message in `body`, or ParseError / InvalidRequest."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.ParseError(f"request body for server '{server_id}' is not valid JSON: {exc}") from None
    if isinstance(message, list):
        raise errors.InvalidRequest(
            f"server '{server_id}': JSON-RPC batches are not supported; send one message per request"
        )
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise errors.InvalidRequest(f"server '{server_id}': body is not a JSON-RPC 2.0 message (need \"jsonrpc\": \"2.0\")")
    if "method" in message:
        if not isinstance(message["method"], str) or not message["method"]:
            raise errors.InvalidRequest(f"server '{server_id}': \"method\" must be a non-empty string")
        if "params" in message and not isinstance(message["params"], dict):
            raise errors.InvalidRequest(f"server '{server_id}': \"params\" must be an object")
        if "id" in message and not _valid_id(message["id"]):
            raise errors.InvalidRequest(f"server '{server_id}': \"id\" must be a string or an integer")
        return message
    if "id" in message and ("result" in message or "error" in message):
        return message  # a client's response to a server->client request
    raise errors.InvalidRequest(f"server '{server_id}': body has neither \"method\" nor \"result\"/\"error\"")


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def is_request(message: dict[str, Any]) -> bool:
    return "method" in message and "id" in message


def result(request_id: Any, value: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": value}


def error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        body["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": body}


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(slots=True)
class Reply:
    """One message on its way to the client; `raw` is its exact bytes when unchanged."""

    message: dict[str, Any]
    raw: bytes | None
    final: bool
    origin: str | None = None  # which process or instance answered, for the access log

    def encoded(self) -> bytes:
        return self.raw if self.raw is not None else encode(self.message)
