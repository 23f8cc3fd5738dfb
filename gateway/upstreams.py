"""Upstreams: what a registry entry becomes, and the one interface views use.

A message upstream turns one client JSON-RPC request into the stream of
messages that answers it (notifications first, the response last), whatever
transport and protocol era sits behind it. `StdioUpstream` serves `stdio`
entries (stdio templates included) from a process pool; `proxy.HttpUpstream`
serves `http` entries (http templates included), passing requests through and
answering like a message upstream only for traffic it bridges between eras.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from contextlib import closing
from typing import Any, Protocol

from . import errors, jsonrpc, metrics, protocol
from .jsonrpc import Reply
from .pool import StdioPool
from .protocol import ClientContext, ServerHello
from .proxy import HttpUpstream
from .registry import ServerEntry, StdioSettings
from .stdio import StdioProcess

log = logging.getLogger(__name__)

# How long an abandoned request (the client hung up) may take to wind down
# before its process is killed instead of reused.
ABANDON_DRAIN_SECONDS = 5.0


class Upstream(Protocol):
    """What every registry entry becomes: run by upkeep, reported by /status."""

    server_id: str
    type: str

    def maintain(self) -> None: ...
    def close(self) -> None: ...
    def status(self) -> dict[str, Any]: ...


class MessageUpstream(Upstream, Protocol):
    """An upstream the gateway speaks JSON-RPC messages to (the gateway ends MCP HTTP)."""

    def hello(self) -> ServerHello: ...
    def call(self, message: dict[str, Any], body: bytes, client: ClientContext,
             request_id: str | None = None) -> Generator[Reply, None, None]: ...


class StdioUpstream:
    """A stdio server: requests go to pooled processes, translated between eras."""

    type = "stdio"

    def __init__(self, entry: ServerEntry):
        assert entry.stdio is not None
        self.server_id = entry.id
        self.settings: StdioSettings = entry.stdio
        self.pool: StdioPool[StdioProcess] = StdioPool(entry.id, entry.stdio, self._spawn)

    def _spawn(self) -> StdioProcess:
        process = StdioProcess(self.server_id, self.settings)
        try:
            process.handshake(time.monotonic() + self.settings.startup_timeout)
        except errors.GatewayError as exc:
            process.close(0)
            raise errors.SpawnFailed(f"{exc.message} (during start-up)") from None
        return process

    def maintain(self) -> None:
        self.pool.maintain()

    def close(self) -> None:
        self.pool.close()

    def hello(self) -> ServerHello:
        if self.pool.hello is None:
            self.pool.release(self.pool.acquire())  # starts a process if none has yet
        assert self.pool.hello is not None
        return self.pool.hello

    def status(self) -> dict[str, Any]:
        return {"type": self.type, "command": list(self.settings.command), **self.pool.stats()}

    def call(self, message: dict[str, Any], body: bytes, client: ClientContext,
             request_id: str | None = None) -> Generator[Reply, None, None]:
        """Serve one request; retry once on a fresh process where that is safe.

        Safe means the request never reached the failed process, or its method
        changes nothing by protocol; never once a message went to the client.
        One deadline (request_timeout) covers both tries.
        """
        deadline = time.monotonic() + self.settings.request_timeout
        for tries_left in (1, 0):
            started = False
            try:
                with closing(self._call_once(message, body, client, deadline)) as replies:
                    for reply in replies:
                        started = True
                        yield reply
                return
            except errors.ProcessFailed as exc:
                safe = exc.retry_safe or message["method"] in protocol.READ_ONLY_METHODS
                if started or not tries_left or not safe or time.monotonic() >= deadline:
                    raise
                metrics.RETRIES.labels(self.server_id).inc()
                log.info("server %s: retrying %s on another process after: %s", self.server_id, message["method"], exc.message)

    def _call_once(
        self, message: dict[str, Any], body: bytes, client: ClientContext, deadline: float
    ) -> Generator[Reply, None, None]:
        process = self.pool.acquire()
        request_id = message["id"]
        failure: str | None = None  # until the request is written, the process is as clean as it came
        try:
            outgoing = protocol.request_for_server(message, client.era, process.era)
            # Bytes pass through untouched when no translation was needed and the
            # body is already one line (stdio framing forbids embedded newlines).
            data = body if outgoing is message and b"\n" not in body and b"\r" not in body else jsonrpc.encode(outgoing)
            failure = "abandoned"  # from here until its response is read, the process is mid-exchange
            try:
                process.send(data, deadline)
            except errors.ProcessFailed as exc:
                exc.retry_safe = True  # the request never reached the process
                raise
            origin = f"pid {process.pid}"
            for reply, raw in process.messages(request_id, deadline):
                if "method" in reply:
                    yield Reply(reply, raw, final=False, origin=origin)
                    continue
                failure = None  # the response is read: the process is between messages whatever follows
                translated = protocol.reply_for_client(reply, message["method"], client.era, process.era, self.server_id)
                yield Reply(translated, raw if translated is reply else None, final=True, origin=origin)
                return
        except errors.GatewayError as exc:
            failure = exc.message
            metrics.UPSTREAM_ERRORS.labels(self.server_id, metrics.error_kind(exc)).inc()
            raise
        finally:
            try:
                if failure == "abandoned":  # the client left, or the gateway failed, mid-exchange
                    failure = _abandon(process, request_id, deadline)
            except Exception as exc:  # noqa: BLE001  # whatever happens, the process goes back
                failure = f"{type(exc).__name__} while winding down an abandoned request"
            self.pool.release(process, failure=failure)


def _abandon(process: StdioProcess, request_id: Any, deadline: float) -> str | None:
    """The client left mid-answer: cancel, drain to the response, keep the process if it behaves."""
    drain_until = min(deadline, time.monotonic() + ABANDON_DRAIN_SECONDS)
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled",
              "params": {"requestId": request_id, "reason": "client disconnected"}}
    if process.era == protocol.MODERN:
        cancel = protocol.to_modern_request(cancel)
    try:
        process.send(jsonrpc.encode(cancel), drain_until)
        for message, _ in process.messages(request_id, drain_until):
            if "method" not in message:
                return None
    except errors.GatewayError as exc:
        return f"{exc.message} (after the client disconnected)"
    return None


def build(entry: ServerEntry, check_interval: float) -> MessageUpstream | HttpUpstream:
    if entry.type == "stdio":
        return StdioUpstream(entry)
    if entry.http is not None:
        return HttpUpstream(entry, check_interval)
    raise ValueError(f"server '{entry.id}' has neither stdio nor http settings")
