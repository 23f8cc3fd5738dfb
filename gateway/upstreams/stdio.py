"""Stdio upstreams: a stdio server (stdio templates included) served from a per-worker process pool.

One client JSON-RPC request becomes the stream of messages that answers it
(notifications first, the response last): a process is checked out of the
pool, the request written to it under the gateway's own id, the messages
that belong to the request (scope.py) read back, and the process returned,
kept or replaced after a cancellation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator
from contextlib import closing
from typing import Any

from .. import errors, jsonrpc, metrics, protocol, scope
from ..cancel import Cancellation
from ..jsonrpc import Reply
from ..pool import StdioPool
from ..protocol import ClientContext, ServerHello
from ..registry import ServerEntry, StdioSettings
from ..stdio_process import StdioProcess, hashable_id
from .failover import Failover, retrying

log = logging.getLogger(__name__)

# After `notifications/cancelled` a server should not answer (basic/utilities/
# cancellation); how long the gateway reads what a process still writes for the
# cancelled request before deciding: silence, or a late answer, and it is reused.
CANCEL_GRACE = 1.0
# A process that wrote for the cancelled request this shortly before the grace
# ended is still working on it: it is replaced, not handed to the next request.
CANCEL_QUIET = 0.25
# More cancelled requests than this left unanswered on one process: it is replaced.
MAX_CANCELLED = 16


class StdioUpstream:
    """A stdio server: requests go to pooled processes, translated between eras."""

    type = "stdio"

    def __init__(self, entry: ServerEntry):
        assert entry.stdio is not None
        self.server_id = entry.id
        self.settings: StdioSettings = entry.stdio
        self.shown = entry.shown  # command and environment with secrets masked
        self.pool: StdioPool[StdioProcess] = StdioPool(entry.id, entry.stdio, self._spawn)
        # Processes still in their handshake (on spawn threads), for close() to stop.
        self._starting: set[StdioProcess] = set()
        self._starting_lock = threading.Lock()
        self._closing = False
        # Once more on a fresh process, where safe; one deadline from the first write to a process.
        self.failover = Failover(tries=2, timeout=self.settings.request_timeout, retry_on=(errors.ProcessFailed,))

    def _spawn(self) -> StdioProcess:
        """A started, handshaken process; any failure kills the child and is SpawnFailed."""
        process = StdioProcess(self.server_id, self.settings)
        with self._starting_lock:
            self._starting.add(process)
            closing = self._closing
        try:
            if closing:
                raise errors.SpawnFailed(f"server '{self.server_id}' is shutting down")
            process.handshake(time.monotonic() + self.settings.startup_timeout)
        except errors.GatewayError as exc:
            process.close(0)
            raise errors.SpawnFailed(f"{exc.message} (during start-up)") from None
        except Exception as exc:  # noqa: BLE001 - a malformed handshake answer (TypeError, KeyError, ...)
            process.close(0)
            raise errors.SpawnFailed(
                f"server '{self.server_id}': process {process.pid} failed its start-up: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            with self._starting_lock:
                self._starting.discard(process)
        return process

    def maintain(self) -> None:
        self.pool.maintain()

    def close(self) -> None:
        # A start-up under way is cut short by signal; its spawn thread, which owns
        # the pipes, sees the exit and closes the process (pool.close waits for it).
        with self._starting_lock:
            self._closing = True
            starting = list(self._starting)
        for process in starting:
            process.kill()
        self.pool.close()

    def hello(self) -> ServerHello:
        if self.pool.hello is None:
            self.pool.release(self.pool.acquire())  # starts a process if none has yet
        assert self.pool.hello is not None
        return self.pool.hello

    def status(self) -> dict[str, Any]:
        return {"type": self.type, **self.shown, **self.pool.stats()}

    def passes_through(self, era: str) -> bool:
        return False  # the gateway ends MCP HTTP itself: a process speaks JSON-RPC lines

    def call(self, message: dict[str, Any], body: bytes, client: ClientContext,
             request_id: str | None = None, cancel: Cancellation | None = None) -> Generator[Reply, None, None]:
        """Serve one request; retry once on a fresh process where that is safe.

        Safe means the request never reached the failed process, or its method
        changes nothing by protocol; never once a message went to the client.
        One deadline (request_timeout) covers both tries; it starts when the
        request is first written to a process, not while one starts up.
        """
        policy = self.failover
        while True:
            process = self.pool.acquire()
            policy = policy.begin()  # at the first try only: later ones keep its deadline
            started = False
            try:
                # The generator runs at once (the for below), so the process is always released.
                with closing(self._call_once(process, message, body, client, policy.deadline)) as replies:
                    for reply in replies:
                        started = True
                        yield reply
                return
            except errors.GatewayError as exc:
                retry = None if started else policy.retry(exc, message["method"])
                if retry is None:
                    raise
                policy = retry
                retrying(self.server_id, message["method"], "another process", exc)

    def _call_once(
        self, process: StdioProcess, message: dict[str, Any], body: bytes, client: ClientContext, deadline: float
    ) -> Generator[Reply, None, None]:
        client_id = message["id"]
        request_id = scope.process_request_id(client_id)
        if process.cancelled and request_id is client_id and _reuses_cancelled(process, client_id):
            # A late answer to the cancelled request with this id may still come: send this one
            # under an id no one else uses, so that answer can never be taken for this one's.
            request_id = scope.fresh_request_id()
        failure: str | None = None  # until the request is written, the process is as clean as it came
        try:
            translated_request = protocol.request_for_server(message, client.era, process.era)
            # Only what the protocol ties to this request reaches its client (see scope.py).
            outgoing, request_scope = scope.scope(translated_request, process.era)
            if request_id is not client_id:
                outgoing = {**outgoing, "id": request_id}
            # Bytes pass through untouched when no translation was needed and the
            # body is already one line (stdio framing forbids embedded newlines).
            data = body if outgoing is message and b"\n" not in body and b"\r" not in body else jsonrpc.encode(outgoing)
            failure = "abandoned"  # from here until its response is read, the process is mid-exchange
            try:
                process.send(data, deadline)
            except errors.ProcessFailed as exc:
                raise errors.RequestNotSent(exc.message) from None
            origin = f"pid {process.pid}"
            for reply, raw in process.messages(request_id, deadline):
                if "method" in reply:
                    dropped = request_scope.drop_reason(reply)
                    if dropped is None:
                        delivered = request_scope.for_client(reply)
                        yield Reply(delivered, raw if delivered is reply else None, final=False, origin=origin)
                    else:
                        self._dropped(process, reply, dropped)
                    continue
                failure = None  # the response is read: the process is between messages whatever follows
                answer = reply if request_id is client_id else {**reply, "id": client_id}
                translated = protocol.reply_for_client(answer, message["method"], client.era, process.era, self.server_id)
                yield Reply(translated, raw if translated is reply else None, final=True, origin=origin)
                return
        except errors.UpstreamError as exc:
            # The process failed. A client's error (a ClientError) says nothing about it:
            # `failure` then stays as the exchange left it (kept, or wound down if mid-message).
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

    def _dropped(self, process: StdioProcess, notification: dict[str, Any], reason: str) -> None:
        metrics.NOTIFICATIONS_DROPPED.labels(self.server_id, reason).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("server %s pid %s: dropped %s (%s): not tied to the request being served",
                      self.server_id, process.pid, notification.get("method"), reason)


def _reuses_cancelled(process: StdioProcess, client_id: Any) -> bool:
    return hashable_id(client_id) and client_id in process.cancelled


def _abandon(process: StdioProcess, request_id: Any, deadline: float) -> str | None:
    """The client left mid-answer: cancel, and keep the process unless it misbehaves.

    Cancellation is not a failure. A server that then says nothing within
    CANCEL_GRACE, or answers the cancelled request within it (read and
    dropped), goes back to the pool. One that writes garbage, or is still
    writing for the request when the grace ends, is replaced (the failure
    returned). A late answer after the grace is dropped by process.messages.
    """
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled",
              "params": {"requestId": request_id, "reason": "client disconnected"}}
    if process.era == protocol.MODERN:
        cancel = protocol.to_modern_request(cancel)
    grace_ends = time.monotonic() + CANCEL_GRACE
    last_output: float | None = None
    try:
        process.send(jsonrpc.encode(cancel), min(deadline, grace_ends))
        for message, _ in process.messages(request_id, grace_ends):
            if "method" not in message:
                return None  # answered anyway: the answer is dropped, the process is free
            last_output = time.monotonic()
    except errors.UpstreamTimeout:
        if last_output is not None and time.monotonic() - last_output < CANCEL_QUIET:
            return (f"server '{process.server_id}': process {process.pid} was still writing for request "
                    f"{request_id!r} {CANCEL_GRACE:g}s after it was cancelled")
    except errors.GatewayError as exc:
        return f"{exc.message} (after the client disconnected)"
    if not hashable_id(request_id):
        return None
    process.cancelled.add(request_id)
    if len(process.cancelled) > MAX_CANCELLED:
        return (f"server '{process.server_id}': process {process.pid} left {len(process.cancelled)} cancelled "
                "requests unanswered")
    return None
