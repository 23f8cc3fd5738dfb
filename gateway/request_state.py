"""MRTR `requestState` envelopes: the gateway's own, naming the instance that issued the state.

A 2026-07-28 server that needs input from the client answers `resultType:
"input_required"` with an opaque `requestState`, and the client retries the
request (a new id) with `params.requestState`. The server must get back
exactly what it sent, and official SDK servers seal it with a per-process
key unless configured with shared keys: with two instances, the retry must
reach the one that issued it. So on the way out the gateway replaces the
state with an envelope of its own, sealed (sealed.py) for this server and
principal, holding the instance and the original; on the way in it opens the
envelope, puts the original back and pins the retry to that instance, as a
session id pins a session. An instance that is gone gets a clear error
telling the client to start the call again. States the gateway did not wrap
(no envelope prefix) pass as they are.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from . import errors, jsonrpc
from .sealed import Sealer

PREFIX = "mcpgw-rs1."
LABEL = b"mcp-gateway request state v1"
MAX_ENVELOPE = 256 * 1024  # servers keep a call's progress in it: allow room
MARKER = b'"requestState"'


class RequestStates:
    """Wraps and unwraps requestState for one gateway's secrets; an envelope lives `ttl` seconds."""

    def __init__(self, secrets_: Sequence[bytes], ttl: float, clock: Callable[[], float] = time.time):
        self._sealer = Sealer(secrets_, LABEL, PREFIX, MAX_ENVELOPE)
        self._ttl = ttl
        self._clock = clock

    def wrap(self, state: str, instance: str, server_id: str, principal: str | None) -> str:
        claims = {"i": instance, "s": state, "e": self._clock() + self._ttl}
        return self._sealer.seal(json.dumps(claims, separators=(",", ":")).encode(), server_id, principal)

    def unwrap(self, envelope: str, server_id: str, principal: str | None) -> tuple[str, str]:
        """(instance, original state), or RequestStateInvalid."""
        plain = self._sealer.open(envelope, server_id, principal)
        try:
            claims = json.loads(plain) if plain is not None else None
        except ValueError:
            claims = None
        if not (isinstance(claims, dict) and isinstance(claims.get("i"), str) and isinstance(claims.get("s"), str)
                and isinstance(claims.get("e"), int | float) and self._clock() <= claims["e"]):
            raise errors.RequestStateInvalid(
                f"server '{server_id}': requestState was not issued by this gateway for this caller, or has expired; "
                "start the call again without it"
            )
        return claims["i"], claims["s"]

    # --- requests -----------------------------------------------------------------

    def retry(self, message: dict[str, Any] | None, server_id: str, principal: str | None,
              available: Callable[[str], bool]) -> tuple[dict[str, Any], str] | None:
        """For a request carrying one of our envelopes: (the request with the original state, its instance)."""
        params = message.get("params") if message else None
        envelope = params.get("requestState") if isinstance(params, dict) else None
        if not (message and isinstance(params, dict) and isinstance(envelope, str) and envelope.startswith(PREFIX)):
            return None
        instance, state = self.unwrap(envelope, server_id, principal)
        if not available(instance):
            raise errors.RequestStateInvalid(f"server '{server_id}': the instance that asked for this input is no "
                                             "longer available; start the call again without requestState")
        return {**message, "params": {**params, "requestState": state}}, instance

    # --- answers ------------------------------------------------------------------

    def wrap_answer(self, body: bytes | Iterator[bytes], instance: str, server_id: str,
                    principal: str | None) -> bytes | Iterator[bytes]:
        """A JSON or SSE answer, with any input_required state wrapped."""
        if isinstance(body, bytes):
            return self.wrap_message(body, instance, server_id, principal)
        return self.wrap_stream(body, instance, server_id, principal)

    def wrap_message(self, data: bytes, instance: str, server_id: str, principal: str | None) -> bytes:
        """One JSON-RPC message's bytes, with an input_required result's state wrapped (else unchanged)."""
        if MARKER not in data:
            return data
        try:
            message = json.loads(data)
        except ValueError:
            return data
        result = message.get("result") if isinstance(message, dict) else None
        if not (isinstance(result, dict) and result.get("resultType") == "input_required"
                and isinstance(result.get("requestState"), str)):
            return data
        wrapped = self.wrap(result["requestState"], instance, server_id, principal)
        return jsonrpc.encode({**message, "result": {**result, "requestState": wrapped}})

    def wrap_stream(self, chunks: Iterator[bytes], instance: str, server_id: str,
                    principal: str | None) -> Generator[bytes, None, None]:
        """An SSE body, event by event as they complete, with input_required states wrapped."""
        buffer = b""
        try:
            for chunk in chunks:
                buffer += chunk.replace(b"\r\n", b"\n")
                end = buffer.rfind(b"\n\n")
                if end < 0:
                    continue
                complete, buffer = buffer[:end + 2], buffer[end + 2:]
                yield complete if MARKER not in complete else b"".join(
                    self._wrap_event(event, instance, server_id, principal) for event in complete.split(b"\n\n") if event
                )
            if buffer:
                yield buffer
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def wrap_event(self, instance: str, server_id: str, principal: str | None, event: bytes) -> bytes:
        """One whole SSE event (LF line ends, its blank line included), its input_required state wrapped.

        What the worker's stream relay (streams.py) applies to each event of a 2026-07-28 answer.
        """
        return event if MARKER not in event else self._wrap_event(event[:-2], instance, server_id, principal)

    def _wrap_event(self, event: bytes, instance: str, server_id: str, principal: str | None) -> bytes:
        lines = event.split(b"\n")
        data = b"\n".join(line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:"))
        wrapped = self.wrap_message(data, instance, server_id, principal)
        if wrapped is data:
            return event + b"\n\n"
        kept = [line for line in lines if not line.startswith(b"data:")]
        return b"\n".join([*kept, b"data: " + wrapped]) + b"\n\n"
