"""Dedicated stdio sessions: one process per handshake-era client session, in the worker that started it.

A stdio server with `session_mode: dedicated` gives each handshake-era
client that sends `initialize` a process of its own: the client's own
initialize goes to it (its capabilities and clientInfo, so capability-gated
tools appear) and its answer back; the client's session id (sessions.py)
names the process (a key into this worker's `Sessions` table) and the owner.
Every later message of the session goes to that process with the client's
own ids (one client per process: nothing to rewrite).

One reader thread per process reads its stdout and dispatches each message:
a response to the POST waiting for that id; a server->client request
(sampling, elicitation, roots/list) to the newest POST whose SSE answer is
open, else to the session's GET stream; a progress notification to the POST
whose progressToken it names; every other notification to the GET stream.
A 2026-07-28 client, which has no session, is given a process by its
principal (auth on) or by CORRELATION_HEADER, which the gateway returns and
the client sends back; the gateway does that process's handshake and
translates between the eras as the pool does; its server->client requests
are refused (that era asks with input_required results).

A 2026-07-28 client's `subscriptions/listen` is a stream of the process's
change notifications (ListenStream): a 2026-07-28 process is sent the
request and its stream is the process's frames stamped with the listen's id;
a handshake-era process is listened to by the gateway (its resources
subscribed for the stream's URIs), which acknowledges the filter the
process's capabilities can honour and stamps each matching notification.

What is for the GET stream while none is open waits for it (the newest
STREAM_BACKLOG messages). A process that exits ends its session: the next
request gets 404.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import secrets
import select
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from . import errors, jsonrpc, log_levels, protocol, streams
from .jsonrpc import Reply
from .registry import StdioSettings
from .stdio_process import StdioProcess

log = logging.getLogger(__name__)

# How long the reader waits on stdout before it looks again whether the session was closed.
READ_POLL = 0.5
# Messages kept for a GET stream while none is open; the oldest are dropped past this.
STREAM_BACKLOG = 256
# A 2026-07-28 client has no session id: without a principal (auth off) its process is named by this
# header, a sealed id the gateway returns on the first answer and the client sends back (SEP-2567).
CORRELATION_HEADER = "Mcp-Gateway-Correlation"
# The `_meta` key every frame of a subscriptions/listen stream carries: the listen request's id.
SUBSCRIPTION_ID = "io.modelcontextprotocol/subscriptionId"
# A listen filter's flags: the notification each one asks for, and the handshake-era capability that promises it.
LISTEN_FLAGS = {
    "toolsListChanged": ("notifications/tools/list_changed", "tools", "listChanged"),
    "promptsListChanged": ("notifications/prompts/list_changed", "prompts", "listChanged"),
    "resourcesListChanged": ("notifications/resources/list_changed", "resources", "listChanged"),
}
RESOURCE_UPDATED = "notifications/resources/updated"
# Bounds on a client's listen filter: the URIs a stream may name, and each one's length.
MAX_LISTEN_URIS = 256
MAX_URI_LENGTH = 4096
# Open subscriptions/listen streams of one session at most: each holds a pipe, and past gateway.max_streams a thread.
MAX_LISTENS = 8
# Seconds a closing session's cancels may wait for room in the process's stdin.
CLOSE_SEND_TIMEOUT = 0.5
_END = object()  # put in a waiter's queue when the process is gone
_CANCELLED = object()  # put in a waiter's queue when the client cancelled its request


_DISCOVER_ID = "mcp-gateway-discover"  # the gateway's server/discover of a process that refused initialize


def _cancel(request_id: Any, reason: str) -> bytes:
    """notifications/cancelled for the process's request `request_id` (stdio's cancellation)."""
    return jsonrpc.encode({"jsonrpc": "2.0", "method": "notifications/cancelled",
                           "params": {"requestId": request_id, "reason": reason}})


def _at_once(reply: Reply) -> Generator[Reply, None, None]:
    yield reply


def _id_key(value: Any) -> str:
    """A JSON-RPC id as a dict key: 1 and "1" stay apart."""
    return json.dumps(value)


@dataclass(eq=False)
class _Waiter:
    """A POST of the session waiting for its response, and what the reader gives it meanwhile."""

    request_id: Any
    sse: bool  # its answer is an SSE stream: server->client requests may ride on it
    token: Any = None  # its progressToken
    messages: queue.Queue[Any] = field(default_factory=queue.Queue)


class SessionProcess:
    """One client session's process and the reader that shares its stdout between POST answers and the GET stream."""

    def __init__(self, server_id: str, settings: StdioSettings, client_era: str = protocol.LEGACY):
        self.server_id = server_id
        self.key = secrets.token_hex(16)
        self.client_era = client_era
        self.process = StdioProcess(server_id, settings)
        if client_era == protocol.MODERN:
            # A 2026-07-28 client sends no initialize: the gateway's handshake learns the process's era,
            # before the reader owns its stdout. Its requests are then translated as the pool's are.
            try:
                self.process.handshake(time.monotonic() + settings.startup_timeout)
            except BaseException:
                self.process.close(0)
                raise
        # A handshake-era client's logging/setLevel, when its process speaks 2026-07-28: the level rides
        # on each later request as the `_meta` log level (that era has no such method).
        self.log_level: str | None = None
        self.settings = settings
        self.started = time.monotonic()
        self.last_used = self.started
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._waiters: dict[str, _Waiter] = {}
        self._open: list[_Waiter] = []  # in-flight POSTs, oldest first
        self._stream: GetStream | None = None
        self._listens: dict[str, ListenStream] = {}  # open subscriptions/listen streams, by request id
        self._subscribed: collections.Counter[str] = collections.Counter()  # URIs the gateway subscribed for them
        self._own_ids = 0  # for the gateway's own requests to a handshake-era process (resources/subscribe)
        # For the GET stream while none is open (the client opens it after initialize: a server that asks
        # roots/list at once must still be heard); the oldest are dropped past STREAM_BACKLOG.
        self._backlog: collections.deque[dict[str, Any]] = collections.deque(maxlen=STREAM_BACKLOG)
        self.closed = False
        self._reader = threading.Thread(target=self._read, name=f"mcp-session-{server_id}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return not self.closed and self.process.alive()

    def idle(self) -> bool:
        """No request in flight and no GET stream open: it may be ended to make room."""
        with self._lock:
            return not self._open and self._stream is None and not self._listens

    # --- writing -------------------------------------------------------------

    def send(self, data: bytes, timeout: float | None = None) -> None:
        """Write one message line (`timeout`: how long a full pipe may hold it up; request_timeout unless given)."""
        self.last_used = time.monotonic()
        wait = self.settings.request_timeout if timeout is None else timeout
        with self._send_lock:  # JSON has no raw newline inside a string: one outside is only whitespace
            self.process.send(data.replace(b"\n", b" ").replace(b"\r", b" "), time.monotonic() + wait)

    def deliver(self, message: dict[str, Any], body: bytes) -> None:
        """A notification or a response from the client, written to the process.

        notifications/cancelled also ends the POST still waiting for the
        cancelled request: the process owes it no answer (basic/utilities/cancellation).
        A 2026-07-28 process had no initialize, so it is not sent notifications/initialized.
        """
        if message.get("method") == "notifications/initialized" and self.process.era == protocol.MODERN:
            return
        try:
            self.send(body)
        except errors.ProcessFailed as exc:
            raise self._gone(exc) from None
        if message.get("method") == "notifications/cancelled":
            params = message.get("params")
            if isinstance(params, dict) and "requestId" in params:
                with self._lock:
                    waiter = self._waiters.get(_id_key(params["requestId"]))
                if waiter is not None:
                    waiter.messages.put(_CANCELLED)

    def greet(self, message: dict[str, Any], body: bytes) -> dict[str, Any]:
        """A handshake-era client's initialize: the process's own answer.

        A process that refuses it and answers server/discover speaks only
        2026-07-28, which has no initialize: the gateway answers from its
        discover result (only what it can deliver, as for a pooled process)
        and translates the session's requests. A process of both eras keeps
        the handshake era, with all it offers.
        """
        answer = self._final(message, body)
        if "result" in answer:
            return answer
        discover = protocol.discover_request(_DISCOVER_ID)
        discovered = self._final(discover, jsonrpc.encode(discover))
        hello = protocol.hello_from_discover(discovered.get("result"))
        if hello is None:
            return answer  # the process's refusal of initialize
        self.process.hello = hello
        params = message.get("params")
        requested = params.get("protocolVersion") if isinstance(params, dict) else None
        return jsonrpc.result(message["id"], protocol.initialize_result(hello, requested))

    def _final(self, message: dict[str, Any], body: bytes) -> dict[str, Any]:
        with contextlib.closing(self.call(message, body, sse=False)) as replies:
            return next(reply for reply in replies if reply.final).message

    def call(self, message: dict[str, Any], body: bytes, sse: bool) -> Generator[Reply, None, None]:
        """The replies to one client request: what the process writes for it, its response last."""
        if message["method"] == "logging/setLevel" and self.client_era == protocol.LEGACY \
                and self.process.era == protocol.MODERN:
            self.log_level = log_levels.requested(message)
            return _at_once(Reply(jsonrpc.result(message["id"], {}), None, final=True, origin=f"pid {self.pid}"))
        key = _id_key(message["id"])
        meta = (message.get("params") or {}).get("_meta") if isinstance(message.get("params"), dict) else None
        waiter = _Waiter(message["id"], sse, meta.get("progressToken") if isinstance(meta, dict) else None)
        if self.client_era != self.process.era:
            translated = protocol.request_for_server(message, self.client_era, self.process.era, self.log_level)
            body = jsonrpc.encode(translated)
        return self._replies(waiter, key, body, message["method"])

    def _replies(self, waiter: _Waiter, key: str, body: bytes, method: str) -> Generator[Reply, None, None]:
        # Registered here, in the generator, so that its `finally` is sure to take the waiter out again:
        # a waiter left behind would keep the session from ever being idle.
        with self._lock:
            if key in self._waiters or key in self._listens:
                raise errors.InvalidRequest(f"server '{self.server_id}': request id {waiter.request_id!r} is "
                                            "already in flight in this session", rpc_id=waiter.request_id)
            self._waiters[key] = waiter
            self._open.append(waiter)
        origin = f"pid {self.pid}"
        answered = False
        try:
            try:
                self.send(body)
            except errors.ProcessFailed as exc:
                raise self._gone(exc) from None
            deadline = time.monotonic() + self.settings.request_timeout
            while True:
                remaining = deadline - time.monotonic()
                try:
                    if remaining <= 0:
                        raise queue.Empty
                    item = waiter.messages.get(timeout=remaining)
                except queue.Empty:
                    raise errors.UpstreamTimeout(f"server '{self.server_id}': process {self.pid} did not answer "
                                                 f"within {self.settings.request_timeout:g}s") from None
                if item is _END:
                    raise self._gone(self.process.exited("before it answered", wait=0))
                if item is _CANCELLED:
                    answered = True  # the process was told already, by the client's own notification
                    raise errors.Cancelled(f"server '{self.server_id}': the client cancelled the request")
                final = "method" not in item
                answered = final
                if final and self.client_era != self.process.era:
                    item = protocol.reply_for_client(item, method, self.client_era, self.process.era, self.server_id)
                yield Reply(item, None, final=final, origin=origin)
                if final:
                    return
        finally:
            with self._lock:
                self._waiters.pop(key, None)
                if waiter in self._open:
                    self._open.remove(waiter)
            self.last_used = time.monotonic()
            if not answered and self.alive():  # the client left (or the wait ran out): the process stops too
                with contextlib.suppress(errors.GatewayError):
                    self.send(_cancel(waiter.request_id, "client disconnected"))

    def _gone(self, exc: errors.ProcessFailed) -> errors.SessionNotFound:
        """The process exited: its session with it (404, so the client starts a new one)."""
        self.closed = True
        return errors.SessionNotFound(f"{exc.message}; the session ended with it: start a new session with initialize")

    # --- subscriptions/listen (2026-07-28) ---------------------------------------

    def listen(self, message: dict[str, Any], body: bytes) -> ListenStream:
        """A 2026-07-28 client's subscriptions/listen: the stream of this process's change notifications.

        A 2026-07-28 process serves the request itself; for a handshake-era one
        the gateway acknowledges what the process's capabilities promise,
        subscribes its resources for the stream's URIs and stamps what it sends.
        """
        request_id = message["id"]
        flags, uris = _listen_filter(message.get("params"), self.server_id, request_id)
        key = _id_key(request_id)
        emulated = self.process.era == protocol.LEGACY
        methods: frozenset[str] = frozenset()
        if emulated:
            capabilities = self.process.hello.capabilities if self.process.hello else {}
            honored: dict[str, Any] = {flag: True for flag in flags
                                       if _promised(capabilities, *LISTEN_FLAGS[flag][1:])}
            if uris and _promised(capabilities, "resources", "subscribe"):
                honored["resourceSubscriptions"] = list(uris)
            else:
                uris = ()
            methods = frozenset(LISTEN_FLAGS[flag][0] for flag in honored if flag in LISTEN_FLAGS)
        stream = ListenStream(self, request_id, methods, frozenset(uris))
        with self._lock:
            if key in self._waiters or key in self._listens:
                stream.close_pipe()
                raise errors.InvalidRequest(f"server '{self.server_id}': request id {request_id!r} is already in "
                                            "flight in this session", rpc_id=request_id)
            if len(self._listens) >= MAX_LISTENS:
                stream.close_pipe()
                raise errors.InvalidRequest(f"server '{self.server_id}': this session has {MAX_LISTENS} "
                                            "subscriptions/listen streams open already; close one first",
                                            rpc_id=request_id)
            self._listens[key] = stream
            new_uris = [uri for uri in stream.uris if not self._subscribed[uri]]
            self._subscribed.update(stream.uris)
        try:
            if not emulated:
                self.send(body)  # the process's acknowledgment and frames come stamped with the id already
            else:
                stream.put_nowait({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
                                   "params": {"notifications": honored}})
                for uri in new_uris:
                    self._ask("resources/subscribe", {"uri": uri})
        except errors.ProcessFailed as exc:
            stream.abandon("process gone")
            raise self._gone(exc) from None
        self.last_used = time.monotonic()
        return stream

    def _ask(self, method: str, params: dict[str, Any]) -> None:
        """A request of the gateway's own to the process; its response has no waiter, and is dropped."""
        with self._lock:
            self._own_ids += 1
            request_id = f"mcp-gateway-{self._own_ids}"
        self.send(jsonrpc.encode({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}))

    def _unlisten(self, stream: ListenStream) -> None:
        """A listen stream ended (the client left, or the session ends): the process stops serving it."""
        with self._lock:
            if self._listens.get(_id_key(stream.request_id)) is not stream:
                return
            del self._listens[_id_key(stream.request_id)]
            self._subscribed.subtract(stream.uris)
            unused = [uri for uri in stream.uris if self._subscribed[uri] <= 0]
            for uri in unused:
                del self._subscribed[uri]
        if self.closed or not self.process.alive():
            return
        if self.process.era == protocol.LEGACY:
            jobs = [partial(self._ask, "resources/unsubscribe", {"uri": uri}) for uri in unused]
        else:  # on stdio a request is cancelled by notification (basic/utilities/cancellation)
            jobs = [partial(self.send, _cancel(stream.request_id, "the client closed the stream"))]
        for job in jobs:  # off the worker's loop: a write to a process may wait for room in its pipe
            streams.in_background(job)

    def _listeners(self, message: dict[str, Any]) -> list[ListenStream]:
        """The listen streams a notification of the process is for (each stamps it as it sends it)."""
        if not self._listens:
            return []
        params = _object(message.get("params"))
        meta = params.get("_meta")
        if isinstance(meta, dict) and SUBSCRIPTION_ID in meta:  # a 2026-07-28 process's own stamp
            stream = self._listens.get(_id_key(meta[SUBSCRIPTION_ID]))
            return [stream] if stream is not None else []
        if self.process.era != protocol.LEGACY:
            return []
        method = message.get("method")
        uri = params.get("uri")
        return [stream for stream in self._listens.values()
                if method in stream.methods or (method == RESOURCE_UPDATED and uri in stream.uris)]

    # --- the GET stream --------------------------------------------------------

    def stream(self) -> GetStream:
        """The session's GET stream (one at a time: a newer GET takes over, a client reconnecting)."""
        mine = GetStream(self)
        with self._lock:
            old, self._stream = self._stream, mine
            backlog = list(self._backlog)
            self._backlog.clear()
        if old is not None:
            old.end()
        for message in backlog:
            mine.put_nowait(message)
        if not self.alive():
            mine.end()
        return mine

    def _let_go(self, stream: GetStream) -> None:
        if isinstance(stream, ListenStream):
            self._unlisten(stream)
            return
        with self._lock:
            if self._stream is stream:
                self._stream = None

    # --- reading -------------------------------------------------------------

    def _read(self) -> None:
        process = self.process
        poller = select.poll()
        poller.register(process.stdout, select.POLLIN | select.POLLHUP | select.POLLERR)
        try:
            while not self.closed:
                if not poller.poll(READ_POLL * 1000):
                    continue
                ended = process.fill()
                while (raw := process.next_line()) is not None:
                    self._dispatch(raw)
                if ended:
                    return
        except errors.GatewayError as exc:
            log.warning("server %s: session process %s failed: %s", self.server_id, self.pid, exc.message)
        except Exception:  # a bug must not leave the session's requests waiting forever
            log.exception("server %s: the reader of session process %s failed", self.server_id, self.pid)
        finally:
            self.closed = True
            with self._lock:
                targets = [w.messages for w in self._waiters.values()]
                left: list[GetStream] = [self._stream] if self._stream else []
                left.extend(self._listens.values())
            for target in targets:
                target.put_nowait(_END)
            for stream in left:  # an abrupt end: the client's listen is lost, as the process is
                stream.end()

    def _dispatch(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            log.warning("server %s pid %s: dropped a line that is not a JSON-RPC message: %r",
                        self.server_id, self.pid, raw[:200])
            return
        refuse = False
        target: queue.Queue[Any] | GetStream | None
        listeners: list[ListenStream] = []
        with self._lock:
            if "method" not in message:  # a response
                waiter = self._waiters.get(_id_key(message.get("id")))
                # A 2026-07-28 process ends a listen it serves with its result, the last frame (the gateway's
                # own listens of a handshake-era process were never sent to it: an answer to one is stray).
                listen = None if waiter or self.process.era == protocol.LEGACY else self._listens.pop(
                    _id_key(message.get("id")), None)
                target = waiter.messages if waiter else listen
            elif "id" in message:  # a server->client request: on the newest open SSE answer, else the GET stream
                if self.client_era != protocol.LEGACY:
                    refuse = True  # a 2026-07-28 client is asked with input_required results, not requests
                sse = [w for w in self._open if w.sse]
                target = sse[-1].messages if sse else self._stream
            else:
                listeners = self._listeners(message)
                target = None if listeners else self._notification_target(message)
            if not refuse and not listeners and target is None and "method" in message:
                self._backlog.append(message)  # until the client opens its GET stream
                return
        for stream in listeners:
            stream.put_nowait(message)
        if listeners:
            return
        if refuse:
            self._refuse(message)
            return
        if target is None:
            log.debug("server %s pid %s: dropped a response to unknown id %r", self.server_id, self.pid,
                      message.get("id"))
            return
        target.put_nowait(message)
        if isinstance(target, ListenStream):
            target.end()

    def _notification_target(self, message: dict[str, Any]) -> queue.Queue[Any] | GetStream | None:
        params = message.get("params")
        token = params.get("progressToken") if isinstance(params, dict) else None
        if token is not None:
            for waiter in self._open:
                if waiter.token == token:
                    return waiter.messages
        if message.get("method") == "notifications/message" and (self._stream is None
                                                                 or self.client_era == protocol.MODERN):
            # A log line while a request is in flight, and no GET stream to take it (a 2026-07-28 client has
            # none): the newest SSE answer's, as stdio cannot say which request a line is of.
            sse = [waiter for waiter in self._open if waiter.sse]
            if sse:
                return sse[-1].messages
        return self._stream

    def _refuse(self, message: dict[str, Any]) -> None:
        """A server->client request of a 2026-07-28 client's process: no client to ask it of."""
        reply = jsonrpc.error(message["id"], errors.METHOD_NOT_FOUND,
                              f"{message['method']} is not available: this client speaks 2026-07-28, "
                              "which the gateway cannot ask it of")
        with contextlib.suppress(errors.GatewayError):
            self.send(jsonrpc.encode(reply))

    def close(self) -> None:
        with self._lock:
            listens = list(self._listens.values())
            in_flight = [waiter.request_id for waiter in self._open]
        for listen in listens:  # the session ends on purpose: a graceful end of its listen streams
            listen.put_nowait({"jsonrpc": "2.0", "id": listen.request_id, "result": {}})
            listen.end()
        if self.process.alive():
            # Requests still in flight end with the session: the process is told, as for a client that left
            # (a client's own cancel may still be on its way: it and the DELETE travel apart). A process
            # that does not read is not waited for: it is being closed.
            for request_id in in_flight:
                with contextlib.suppress(errors.GatewayError):
                    self.send(_cancel(request_id, "the session ended"), timeout=CLOSE_SEND_TIMEOUT)
        self.closed = True
        # The reader lets the stdout go first (it looks at `closed` every READ_POLL): its
        # descriptor is closed below, and must not be polled once its number can be reused.
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=READ_POLL * 4)
        self.process.close()


class GetStream:
    """A session's GET stream: the reader writes SSE events into a pipe, the worker's loop relays it (a streams.Feed).

    The pipe is the stream's buffer: a client that stops reading fills it
    and further messages are dropped (logged), never the reader blocked.
    Without a relay claim a request thread iterates it instead (`events`).
    """

    def __init__(self, session: SessionProcess):
        self.session = session
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._writing = True
        self._reading = True

    # the reader's side (any thread)

    def put_nowait(self, message: dict[str, Any]) -> None:
        self._write(b"event: message\ndata: " + jsonrpc.encode(message) + b"\n\n", message.get("method"))

    def end(self) -> None:
        """No more messages: the client sees the stream end once it has read what is there."""
        with self._lock:
            if self._writing:
                self._writing = False
                os.close(self._write_fd)

    def _write(self, data: bytes, what: Any) -> None:
        with self._lock:
            if not self._writing:
                return
            try:
                written = os.write(self._write_fd, data)
            except BlockingIOError:
                written = 0
            except OSError:  # the relay let the stream go
                written = -1
        if written != len(data):
            log.warning("server %s pid %s: the GET stream's client is not reading; dropped %s",
                        self.session.server_id, self.session.pid, what)
            if written > 0:  # half an event would corrupt the stream: end it
                self.end()

    # the loop's side (streams.Feed)

    def fileno(self) -> int:
        return self._read_fd

    def start(self, limit: int) -> streams.Fed:
        return streams.Fed(b": stream open\n\n")

    def readable(self) -> streams.Fed:
        try:
            data = os.read(self._read_fd, streams.READ_SIZE)
        except BlockingIOError:
            return streams.NOTHING
        if not data:
            self._let_go()
            return streams.Fed(b"", True)
        self.session.last_used = time.monotonic()
        return streams.Fed(data)

    def tick(self, now: float) -> streams.Fed:
        return streams.NOTHING  # keep-alive comments are the relay's (gateway.sse_keepalive_interval)

    def abandon(self, reason: str) -> None:
        self._let_go()

    def _let_go(self) -> None:
        self.session._let_go(self)
        self.close_pipe()

    def close_pipe(self) -> None:
        self.end()
        with self._lock:
            if self._reading:
                self._reading = False
                os.close(self._read_fd)

    # a request thread's side, without a relay claim

    def events(self, keepalive: float) -> Iterator[bytes]:
        """The stream iterated by a thread: its events, and a keep-alive comment after `keepalive` quiet seconds (0: none)."""
        try:
            yield self.start(0).data
            poller = select.poll()
            poller.register(self._read_fd, select.POLLIN | select.POLLHUP)
            quiet_since = time.monotonic()
            while True:
                if poller.poll(streams.TICK * 1000):
                    fed = self.readable()
                    quiet_since = time.monotonic()
                elif keepalive and time.monotonic() - quiet_since >= keepalive:
                    fed = streams.Fed(streams.KEEPALIVE_COMMENT)
                    quiet_since = time.monotonic()
                else:
                    continue
                if fed.data:
                    yield fed.data
                if fed.done:
                    return
        finally:
            self._let_go()


class ListenStream(GetStream):
    """A 2026-07-28 client's subscriptions/listen answer: the process's change notifications, stamped with its id.

    `methods` and `uris`: what it takes of a handshake-era process's
    notifications (the gateway's filter); a 2026-07-28 process stamps its own.
    """

    def __init__(self, session: SessionProcess, request_id: Any, methods: frozenset[str], uris: frozenset[str]):
        super().__init__(session)
        self.request_id = request_id
        self.methods = methods
        self.uris = uris

    def put_nowait(self, message: dict[str, Any]) -> None:
        super().put_nowait(self.stamped(message))

    def stamped(self, message: dict[str, Any]) -> dict[str, Any]:
        """`message` with the listen's id in its `_meta` (every frame of the stream carries it)."""
        key = "result" if "result" in message else "params"
        inner = _object(message.get(key))
        meta = _object(inner.get("_meta"))
        if meta.get(SUBSCRIPTION_ID) == self.request_id:
            return message
        return {**message, key: {**inner, "_meta": {**meta, SUBSCRIPTION_ID: self.request_id}}}


def _listen_filter(params: Any, server_id: str, request_id: Any) -> tuple[list[str], tuple[str, ...]]:
    """A listen request's filter: the flags it sets and the resource URIs it names; InvalidParams when malformed."""
    def invalid(why: str) -> errors.InvalidParams:
        return errors.InvalidParams(f"server '{server_id}': subscriptions/listen: {why}", rpc_id=request_id)

    wanted = params.get("notifications") if isinstance(params, dict) else None
    if not isinstance(wanted, dict):
        raise invalid("params.notifications must be an object (the SubscriptionFilter)")
    flags = []
    for name, value in wanted.items():
        if name in LISTEN_FLAGS:
            if not isinstance(value, bool):
                raise invalid(f"notifications.{name} must be a boolean")
            if value:
                flags.append(name)
    uris = wanted.get("resourceSubscriptions", [])
    if not isinstance(uris, list) or not all(isinstance(uri, str) and 0 < len(uri) <= MAX_URI_LENGTH for uri in uris):
        raise invalid(f"notifications.resourceSubscriptions must be a list of URIs (at most {MAX_URI_LENGTH} "
                      "characters each)")
    if len(uris) > MAX_LISTEN_URIS:
        raise invalid(f"notifications.resourceSubscriptions names {len(uris)} URIs; at most {MAX_LISTEN_URIS}")
    return flags, tuple(dict.fromkeys(uris))


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _promised(capabilities: Mapping[str, Any], name: str, flag: str) -> bool:
    value = capabilities.get(name)
    return isinstance(value, dict) and value.get(flag) is True


class Sessions:
    """This worker's dedicated sessions of one stdio server, by key."""

    def __init__(self, server_id: str, settings: StdioSettings):
        self.server_id = server_id
        self.settings = settings
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionProcess] = {}
        self._starting = 0
        self._names: dict[str, str] = {}  # a 2026-07-28 client's principal -> its session's key
        self._name_locks: dict[str, threading.Lock] = {}

    def keyed(self, name: str) -> SessionProcess:
        """The process of a 2026-07-28 client named `name` (its principal): the live one, else a new one."""
        with self._lock:
            key = self._names.get(name)
            session = self._sessions.get(key) if key else None
            if session is not None and session.alive():
                return session
            lock = self._name_locks.setdefault(name, threading.Lock())
        with lock:  # one start per name at once: its concurrent requests share the process
            with self._lock:
                key = self._names.get(name)
                session = self._sessions.get(key) if key else None
            if session is not None and session.alive():
                return session
            session = self.start(protocol.MODERN)
            with self._lock:
                self._names[name] = session.key
            return session

    def start(self, client_era: str = protocol.LEGACY) -> SessionProcess:
        """A new session's process, after making room: the oldest idle session ends, or 503 when none is idle."""
        evicted: SessionProcess | None = None
        with self._lock:
            if len(self._sessions) + self._starting >= self.settings.max_sessions:
                idle = [s for s in self._sessions.values() if s.idle() or not s.alive()]
                if not idle:
                    raise errors.Overloaded(
                        f"server '{self.server_id}': all {self.settings.max_sessions} dedicated sessions of this "
                        "worker are busy", retry_after=1.0)
                evicted = min(idle, key=lambda s: (s.alive(), s.last_used))
                del self._sessions[evicted.key]
            self._starting += 1
        try:
            if evicted is not None:
                log.info("server %s: ended dedicated session (pid %s) to make room", self.server_id, evicted.pid)
                evicted.close()
            try:
                session = SessionProcess(self.server_id, self.settings, client_era)
            except OSError as exc:
                raise errors.SpawnFailed(f"server '{self.server_id}': could not start a process: {exc}") from None
            except errors.SpawnFailed:
                raise
            except errors.GatewayError as exc:  # the handshake of a 2026-07-28 client's process
                raise errors.SpawnFailed(f"{exc.message} (during start-up)") from None
            with self._lock:
                self._sessions[session.key] = session
            return session
        finally:
            with self._lock:
                self._starting -= 1

    def get(self, key: str | None) -> SessionProcess:
        """The live session `key` names; SessionNotFound (404) when it ended or its process died."""
        with self._lock:
            session = self._sessions.get(key) if key else None
        if session is None or not session.alive():
            if session is not None:
                self.end(session.key)
            raise errors.SessionNotFound(f"session on server '{self.server_id}' has ended (its process is gone): "
                                         "start a new session with initialize")
        return session

    def end(self, key: str) -> bool:
        with self._lock:
            session = self._sessions.pop(key, None)
            for name in [name for name, named in self._names.items() if named == key]:
                del self._names[name]
                self._name_locks.pop(name, None)
        if session is not None:
            session.close()
        return session is not None

    def maintain(self, now: float | None = None) -> None:
        """End sessions idle past session_idle_timeout, and those whose process died."""
        now = time.monotonic() if now is None else now
        with self._lock:
            ended = [s for s in self._sessions.values()
                     if not s.alive() or (s.idle() and now - s.last_used > self.settings.session_idle_timeout)]
        for session in ended:
            log.info("server %s: ended dedicated session (pid %s): %s", self.server_id, session.pid,
                     "idle" if session.alive() else "its process exited")
            self.end(session.key)

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            sessions = list(self._sessions.values())
        idle = [now - s.last_used for s in sessions if s.idle()]
        return {"count": len(sessions), "max": self.settings.max_sessions,
                "oldest_idle": round(max(idle), 1) if idle else None,
                "pids": sorted(s.pid for s in sessions)}
