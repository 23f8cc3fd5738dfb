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

from .. import errors, jsonrpc, metrics, protocol, scope, sse, streams
from ..cancel import Cancellation
from ..dedicated import Sessions
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
# The failure a request leaves its process with while mid-exchange: wound down by _abandon.
ABANDONED = "abandoned"
# How long the loop's thread may wait to refuse a server->client request (a few bytes to a pipe).
REFUSE_WAIT = 1.0


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
        # session_mode dedicated: a process per handshake-era client session (gateway/dedicated.py), beside
        # the pool, which still serves requests outside a session (and 2026-07-28 clients).
        self.sessions: Sessions | None = (Sessions(entry.id, entry.stdio)
                                          if entry.stdio.session_mode == "dedicated" else None)

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
        if self.sessions is not None:
            self.sessions.maintain()

    def close(self) -> None:
        # A start-up under way is cut short by signal; its spawn thread, which owns
        # the pipes, sees the exit and closes the process (pool.close waits for it).
        with self._starting_lock:
            self._closing = True
            starting = list(self._starting)
        for process in starting:
            process.kill()
        self.pool.close()
        if self.sessions is not None:
            self.sessions.close()

    def hello(self) -> ServerHello:
        if self.pool.hello is None:
            self.pool.release(self.pool.acquire())  # starts a process if none has yet
        assert self.pool.hello is not None
        return self.pool.hello

    def status(self) -> dict[str, Any]:
        shown = {"type": self.type, **self.shown, **self.pool.stats()}
        if self.sessions is not None:
            shown["sessions"] = self.sessions.stats()
        return shown

    def passes_through(self, era: str) -> bool:
        return False  # the gateway ends MCP HTTP itself: a process speaks JSON-RPC lines

    def call(self, message: dict[str, Any], body: bytes, client: ClientContext,
             request_id: str | None = None, cancel: Cancellation | None = None) -> StdioReplies:
        """Serve one request; retry once on a fresh process where that is safe (see `_replies`)."""
        return StdioReplies(self, message, body, client, cancel)

    def _replies(self, message: dict[str, Any], body: bytes, client: ClientContext, cancel: Cancellation | None,
                 holder: StdioReplies) -> Generator[Reply, None, None]:
        """The replies, from one process or (once) another.

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
                # The generator runs at once (the for below), so the process is always released
                # (or, once handed over, left to the feed that owns it).
                with closing(self._call_once(process, message, body, client, policy.deadline, cancel, holder)) as replies:
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
        self, process: StdioProcess, message: dict[str, Any], body: bytes, client: ClientContext, deadline: float,
        cancel: Cancellation | None, holder: StdioReplies,
    ) -> Generator[Reply, None, None]:
        call = _Call(self, process, message, client, deadline, cancel)
        holder.current = call
        try:
            translated_request = protocol.request_for_server(message, client.era, process.era, client.log_level)
            # Only what the protocol ties to this request reaches its client (see scope.py); a
            # handshake-era process is never told a log level, the gateway filters for it.
            requested = client.log_level or scope.requested_level(message)
            outgoing, call.scope = scope.scope(translated_request, process.era, requested)
            if call.request_id is not message["id"]:
                outgoing = {**outgoing, "id": call.request_id}
            # Bytes pass through untouched when no translation was needed and the
            # body is already one line (stdio framing forbids embedded newlines).
            data = body if outgoing is message and b"\n" not in body and b"\r" not in body else jsonrpc.encode(outgoing)
            if cancel is not None:
                cancel.check(self.server_id)  # cancelled while it waited for a process: nothing was sent
            call.failure = ABANDONED  # from here until its response is read, the process is mid-exchange
            try:
                process.send(data, deadline, cancel)
            except errors.ProcessFailed as exc:
                raise errors.RequestNotSent(exc.message) from None
            for received, raw in process.messages(call.request_id, deadline, cancel):
                reply = call.reply(received, raw)
                if reply is not None:
                    yield reply
                    if reply.final:
                        return
        except errors.UpstreamError as exc:
            call.failed(exc)
            raise
        finally:
            if not call.handed:  # once handed over, the feed releases the process
                call.finish()

    def _dropped(self, process: StdioProcess, notification: dict[str, Any], reason: str) -> None:
        metrics.NOTIFICATIONS_DROPPED.labels(self.server_id, reason).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("server %s pid %s: dropped %s (%s): not tied to the request being served",
                      self.server_id, process.pid, notification.get("method"), reason)


def _reuses_cancelled(process: StdioProcess, client_id: Any) -> bool:
    return hashable_id(client_id) and client_id in process.cancelled


def _abandon(process: StdioProcess, request_id: Any, deadline: float, reason: str) -> str | None:
    """The client left mid-answer (or cancelled): cancel, and keep the process unless it misbehaves.

    Cancellation is not a failure. A server that then says nothing within
    CANCEL_GRACE, or answers the cancelled request within it (read and
    dropped), goes back to the pool. One that writes garbage, or is still
    writing for the request when the grace ends, is replaced (the failure
    returned). A late answer after the grace is dropped by process.messages.
    """
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled",
              "params": {"requestId": request_id, "reason": reason}}
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
        return f"{exc.message} (after the request was cancelled: {reason})"
    if not hashable_id(request_id):
        return None
    process.cancelled.add(request_id)
    if len(process.cancelled) > MAX_CANCELLED:
        return (f"server '{process.server_id}': process {process.pid} left {len(process.cancelled)} cancelled "
                "requests unanswered")
    return None


class _Call:
    """One request on one checked-out process: how what it writes back is given to the client, and its end.

    `reply` is the one place a message of the process becomes the client's
    (a request thread's iteration and the relay's StdioFeed both use it);
    `finish` gives the process back once, wound down if left mid-exchange.
    """

    __slots__ = ("cancel", "client", "deadline", "done", "failure", "finished", "handed", "message", "origin",
                 "process", "request_id", "scope", "upstream")

    def __init__(self, upstream: StdioUpstream, process: StdioProcess, message: dict[str, Any],
                 client: ClientContext, deadline: float, cancel: Cancellation | None):
        self.upstream = upstream
        self.process = process
        self.message = message
        self.client = client
        self.deadline = deadline
        self.cancel = cancel
        client_id = message["id"]
        self.request_id = scope.process_request_id(client_id)
        if process.cancelled and self.request_id is client_id and _reuses_cancelled(process, client_id):
            # A late answer to the cancelled request with this id may still come: send this one
            # under an id no one else uses, so that answer can never be taken for this one's.
            self.request_id = scope.fresh_request_id()
        self.scope = scope.RequestScope()
        self.origin = f"pid {process.pid}"
        self.failure: str | None = None  # until the request is written, the process is as clean as it came
        self.done = False  # the response was read
        self.handed = False  # a StdioFeed owns the rest
        self.finished = False

    def reply(self, message: dict[str, Any], raw: bytes) -> Reply | None:
        """A message the process wrote for this request as the client gets it; None when it is dropped."""
        if "method" in message:
            dropped = self.scope.drop_reason(message)
            if dropped is not None:
                self.upstream._dropped(self.process, message, dropped)
                return None
            delivered = self.scope.for_client(message)
            return Reply(delivered, raw if delivered is message else None, final=False, origin=self.origin)
        self.failure = None  # the response is read: the process is between messages whatever follows
        self.done = True
        client_id = self.message["id"]
        answer = message if self.request_id is client_id else {**message, "id": client_id}
        translated = protocol.reply_for_client(answer, self.message["method"], self.client.era, self.process.era,
                                               self.upstream.server_id)
        return Reply(translated, raw if translated is message else None, final=True, origin=self.origin)

    def failed(self, exc: errors.UpstreamError) -> None:
        """The process failed. A client's error (a ClientError, Cancelled too) says nothing about it:
        `failure` then stays as the exchange left it (kept, or wound down if mid-message)."""
        self.failure = exc.message
        metrics.UPSTREAM_ERRORS.labels(self.upstream.server_id, metrics.error_kind(exc)).inc()

    def finish(self) -> None:
        """Give the process back (once): wound down if mid-exchange, replaced if it failed. May block."""
        if self.finished:
            return
        self.finished = True
        failure = self.failure
        try:
            if failure == ABANDONED:  # the client left or cancelled, or the gateway failed, mid-exchange
                reason = self.cancel.reason if self.cancel is not None and self.cancel.reason else "client disconnected"
                failure = _abandon(self.process, self.request_id, self.deadline, reason)
        except Exception as exc:  # noqa: BLE001  # whatever happens, the process goes back
            failure = f"{type(exc).__name__} while winding down an abandoned request"
        self.upstream.pool.release(self.process, failure=failure)


class StdioReplies:
    """What StdioUpstream.call returns (upstreams.Replies): iterated by a thread, or handed to the relay."""

    def __init__(self, upstream: StdioUpstream, message: dict[str, Any], body: bytes, client: ClientContext,
                 cancel: Cancellation | None):
        self.current: _Call | None = None  # the call under way (_call_once sets it)
        self._replies = upstream._replies(message, body, client, cancel, self)

    def __iter__(self) -> StdioReplies:
        return self

    def __next__(self) -> Reply:
        return next(self._replies)

    def close(self) -> None:
        self._replies.close()

    def hand_over(self) -> StdioFeed | None:
        """The rest of the answer as a feed over the process's stdout (after a reply that is not final)."""
        call = self.current
        if call is None or call.done or call.finished or call.failure != ABANDONED:
            return None
        call.handed = True
        self._replies.close()  # its `finally` leaves the process to the feed
        return StdioFeed(call)


class StdioFeed:
    """The rest of a stdio answer relayed by the worker's loop (streams.Feed): whole lines read without blocking.

    Each line is sorted by the process and made the client's by the call,
    as a thread would, then sent as an SSE event. It ends itself on the
    response, on a failure of the process (an error event), or at the
    request's deadline (-32001); the process is given back off the loop.
    """

    __slots__ = ("call",)

    def __init__(self, call: _Call):
        self.call = call

    def fileno(self) -> int:
        return self.call.process.stdout

    def start(self, limit: int) -> streams.Fed:
        return self._lines(read=False)  # what a thread read already and has not sorted

    def readable(self) -> streams.Fed:
        return self._lines(read=True)

    def tick(self, now: float) -> streams.Fed:
        if now < self.call.deadline:
            return streams.NOTHING
        upstream = self.call.upstream
        error = errors.UpstreamTimeout(f"server '{upstream.server_id}': no answer within "
                                       f"{upstream.settings.request_timeout:g}s")
        metrics.UPSTREAM_ERRORS.labels(upstream.server_id, metrics.error_kind(error)).inc()
        streams.in_background(self.call.finish)  # still ABANDONED: cancelled, and kept or replaced by _abandon
        return streams.Fed(self._error_event(error), True, error.message)

    def abandon(self, reason: str) -> None:
        streams.in_background(self.call.finish)  # mid-exchange: notifications/cancelled, its grace, off the loop

    def _lines(self, read: bool) -> streams.Fed:
        call = self.call
        process = call.process
        out = bytearray()
        try:
            ended = process.fill() if read else False
            while (raw := process.next_line()) is not None:
                message = process.sort(raw, call.request_id, time.monotonic() + REFUSE_WAIT)
                reply = None if message is None else call.reply(message, raw)
                if reply is None:
                    continue
                out += sse.event(reply.encoded())
                if reply.final:
                    streams.in_background(call.finish)  # clean: back to the pool
                    return streams.Fed(bytes(out), True)
            if ended:
                raise process.exited("before it answered", wait=0)
        except errors.UpstreamError as exc:
            call.failed(exc)
            streams.in_background(call.finish)  # a failed process is closed, which blocks
            return streams.Fed(bytes(out) + self._error_event(exc), True, exc.message)
        return streams.Fed(bytes(out))

    def _error_event(self, exc: errors.GatewayError) -> bytes:
        # The failure travels as the final event, as a thread's stream sends it (carry_out._sse).
        return sse.event(jsonrpc.encode(jsonrpc.error(self.call.message["id"], exc.code, exc.message, exc.data)))
