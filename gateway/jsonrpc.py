"""JSON-RPC 2.0 messages: parsing a request body, and building replies.

Parsing also refuses what the gateway could not pass on faithfully: nesting
deeper than `gateway.max_json_depth` (checked on the raw bytes, before
json.loads recurses), and strings holding a lone UTF-16 surrogate, which
JSON's `\\uD800` escape can express but UTF-8 cannot encode.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from . import errors

DEFAULT_MAX_DEPTH = 64

_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_PAIRS = (b"[]", b"{}") * 8  # the quick rounds of nests_deeper
_RUNS = re.compile(rb"([\[{]+)|([\]}]+)")
# The escape of a UTF-16 surrogate, paired or not (pairs are how non-BMP characters are escaped).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse(body: bytes, server_id: str, max_depth: int = DEFAULT_MAX_DEPTH) -> dict[str, Any]:
    """The one JSON-RPC message in `body`, or ParseError / InvalidRequest / InvalidParams."""
    if nests_deeper(body, max_depth):
        raise _too_deep(server_id, max_depth)
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.ParseError(f"request body for server '{server_id}' is not valid JSON: {exc}") from None
    except RecursionError:  # only if max_depth is near the interpreter's recursion limit
        raise _too_deep(server_id, max_depth) from None
    if isinstance(message, list):
        raise errors.InvalidRequest(
            f"server '{server_id}': JSON-RPC batches are not supported; send one message per request"
        )
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise errors.InvalidRequest(f"server '{server_id}': body is not a JSON-RPC 2.0 message (need \"jsonrpc\": \"2.0\")")
    if b"\\u" in body and _SURROGATE_ESCAPE.search(body):  # a C-speed look first: rare in practice
        _refuse_lone_surrogates(message, server_id)
    if "method" in message:
        request_id = message.get("id")
        if "id" in message and not _valid_id(request_id):
            raise errors.InvalidRequest(f"server '{server_id}': \"id\" must be a string or an integer")
        method = message["method"]
        if not isinstance(method, str) or not method:
            raise errors.InvalidRequest(f"server '{server_id}': \"method\" must be a non-empty string", rpc_id=request_id)
        if not method.isprintable():  # it is logged: no line breaks or terminal escapes
            raise errors.InvalidRequest(f"server '{server_id}': \"method\" must be printable text", rpc_id=request_id)
        if "params" in message and not isinstance(message["params"], dict):
            raise errors.InvalidRequest(f"server '{server_id}': \"params\" must be an object", rpc_id=request_id)
        return message
    if "id" in message and ("result" in message or "error" in message):
        return message  # a client's response to a server->client request
    raise errors.InvalidRequest(f"server '{server_id}': body has neither \"method\" nor \"result\"/\"error\"")


def nests_deeper(body: bytes, limit: int) -> bool:
    """Whether the JSON text in `body` nests arrays and objects more than `limit` levels deep.

    Linear in the body, in C-speed bytes operations, and nearly free for an
    ordinary request: a body with no more opening brackets than `limit`
    cannot nest deeper, and two counts say so. Otherwise only the brackets
    outside strings are kept. A few rounds of taking innermost pairs off
    clear a big but shallow body (the usual kind); what is left is measured
    run by run of opening or closing brackets.
    """
    if body.count(b"{") + body.count(b"[") <= limit:
        return False
    if b"\\" in body:  # the escapes that could hide a string's closing quote, in JSON's left-to-right order
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Quotes, brackets; then strings out: adjacent quotes first (an empty string, or two strings
    # with nothing between), then the odd pieces between the quotes left.
    structure = body.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    brackets = b"".join(structure.split(b'"')[::2]) if b'"' in structure else structure
    # One replace takes at most one level off, so a body it empties in `limit` replaces is shallow enough.
    left = brackets
    for pair in _PAIRS[:limit]:
        if not left:
            return False
        left = left.replace(pair, b"")
    if not left:
        return False
    depth = 0
    for run in _RUNS.finditer(brackets):
        depth += len(run[1]) if run[1] else -len(run[2])
        if depth > limit:
            return True
    return False


def _too_deep(server_id: str, limit: int) -> errors.InvalidRequest:
    return errors.InvalidRequest(
        f"server '{server_id}': the request nests deeper than the gateway's limit of {limit} levels (gateway.max_json_depth)"
    )


def _refuse_lone_surrogates(message: dict[str, Any], server_id: str) -> None:
    """InvalidRequest / InvalidParams naming the member whose text UTF-8 cannot encode, if one does."""
    request_id = message.get("id")
    if isinstance(request_id, str) and not _encodable(request_id):
        raise errors.InvalidRequest(_surrogate_problem(server_id, '"id"'))  # unusable: the answer's id is null
    rpc_id = request_id if _valid_id(request_id) else None
    for key, value in message.items():
        if not _encodable(key):
            raise errors.InvalidRequest(_surrogate_problem(server_id, "a member name"), rpc_id=rpc_id)
        if _encodable(value):
            continue
        if key == "params":
            where = "params._meta" if isinstance(value, dict) and not _encodable(value.get("_meta")) else "params"
            raise errors.InvalidParams(_surrogate_problem(server_id, where), rpc_id=rpc_id)
        raise errors.InvalidRequest(_surrogate_problem(server_id, json.dumps(key)), rpc_id=rpc_id)


def _surrogate_problem(server_id: str, where: str) -> str:
    return (f"server '{server_id}': {where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
            "which is not a Unicode character")


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


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
    try:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # A lone surrogate (parse refuses them from clients; a server may still send one):
        # escaped, it is valid JSON that says exactly what it was given.
        return json.dumps(message, separators=(",", ":")).encode()


@dataclass(slots=True)
class Reply:
    """One message on its way to the client; `raw` is its exact bytes when unchanged."""

    message: dict[str, Any]
    raw: bytes | None
    final: bool
    origin: str | None = None  # which process or instance answered, for the access log

    def encoded(self) -> bytes:
        return self.raw if self.raw is not None else encode(self.message)
