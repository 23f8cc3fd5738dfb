"""Era bridging for HTTP servers: the gateway speaks to the instances in the era they know.

When the client and the server speak different MCP eras, the gateway ends the
client's MCP HTTP and sends the request itself: to legacy-only instances in a
handshake-era session it opens and caches per instance (for 2026-07-28
clients), to modern-only ones in 2026-07-28 (for legacy clients), translating
each message both ways. Which eras the instances speak is asked once per
worker (server/discover, then initialize) and learned only from a real
answer; it is forgotten on reload and when an instance comes back.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from .. import errors, jsonrpc, protocol, sse, streams
from ..balancer import Balancer, Instance
from ..cancel import Cancellation
from ..jsonrpc import Reply
from ..protocol import ClientContext, ServerHello
from ..registry import HttpSettings
from .failover import Failover
from .transport import (
    DRAIN_BYTES,
    DRAIN_SECONDS,
    JSON_RPC_HEADERS,
    MAX_JSON_BODY,
    ProxyRequest,
    ProxyResponse,
    Transport,
    UpstreamStream,
)

log = logging.getLogger(__name__)

_bridge_ids = itertools.count(1)  # next() is atomic under the GIL
E = TypeVar("E", bound=errors.UpstreamError)


@dataclass
class LegacySession:
    """A handshake-era session the gateway holds with one instance, for 2026-07-28 clients."""

    session_id: str | None
    version: str


class Bridge:
    def __init__(self, server_id: str, settings: HttpSettings, balancer: Balancer, transport: Transport,
                 failover: Failover, retrying: Callable[[str, errors.UpstreamError], None]):
        self.server_id = server_id
        self.settings = settings
        self.balancer = balancer
        self.transport = transport
        self.failover = failover
        self._retrying = retrying
        # Learned once per worker: which eras the instances speak.
        self._speaks: dict[str, bool] = {}
        self._hello: ServerHello | None = None
        self._legacy_sessions: dict[str, LegacySession] = {}

    # --- what the instances speak ----------------------------------------------------

    def hello(self) -> ServerHello:
        """What the server says of itself, for the gateway's own initialize/discover answers."""
        if self._hello is None:
            for era in (protocol.MODERN, protocol.LEGACY):
                if self.speaks_era(era):
                    break
        if self._hello is None:
            raise errors.UpstreamFailed(f"server '{self.server_id}' answered neither server/discover nor initialize")
        return self._hello

    def speaks_era(self, era: str) -> bool:
        """Whether the instances speak `era`, asked of one that answers (learned once)."""
        if era in self._speaks:
            return self._speaks[era]
        tried: list[Instance] = []
        while True:
            instance = self.balancer.pick(tried)
            tried.append(instance)
            try:
                return self._probe_era(instance, era)
            except errors.UpstreamError as exc:
                if not self.balancer.candidates(tried):
                    raise
                log.info("server %s: asking another instance which eras it speaks after: %s", self.server_id, exc.message)

    def relearn(self) -> None:
        """Forget which eras the instances speak (on reload, and when an instance comes back)."""
        self._speaks.clear()
        self._hello = None

    def _probe_era(self, instance: Instance, era: str) -> bool:
        """Ask `instance`; only a real answer is learned (a 5xx, an error page or no answer raise instead)."""
        deadline = time.monotonic() + self.settings.request_timeout
        if era == protocol.MODERN:
            discover = protocol.discover_request("mcp-gateway-discover")
            answer = self.transport.send(instance, self._gateway_request(discover, protocol.request_headers(discover)),
                                         deadline)
            _answered(answer, self.server_id, "server/discover")
            reply = self._response_in(answer, discover["id"])
            if reply is None and answer.status < 300:
                raise errors.UpstreamFailed(f"server '{self.server_id}': instance {answer.instance} answered "
                                            "server/discover with no JSON-RPC response")
            hello = protocol.hello_from_discover(reply.get("result") if reply else None)
            speaks = hello is not None
            self._hello = self._hello or hello
        else:
            try:
                self._legacy_session(instance, deadline)
                speaks = True
            except errors.UpstreamRefused:
                speaks = False
        self._speaks[era] = speaks
        log.info("server %s %s %s", self.server_id, "speaks" if speaks else "does not speak",
                 protocol.LATEST_MODERN if era == protocol.MODERN else "the handshake era")
        return speaks

    def _legacy_session(self, instance: Instance, deadline: float) -> LegacySession:
        """The cached handshake-era session with `instance`, opened on first use."""
        cached = self._legacy_sessions.get(instance.endpoint)
        if cached is not None:
            return cached
        initialize = protocol.initialize_request("mcp-gateway-initialize")
        answer = self.transport.send(instance, self._gateway_request(initialize, {}), deadline)
        _answered(answer, self.server_id, "initialize")
        reply = self._response_in(answer, initialize["id"])
        result = reply.get("result") if reply else None
        if not isinstance(result, dict):
            raise errors.UpstreamRefused(f"server '{self.server_id}': instance {instance.endpoint} refused initialize")
        hello = protocol.hello_from_initialize(result)
        session = LegacySession(answer.upstream_session, hello.protocol_version)
        self._hello = self._hello or hello
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        _close(self.transport.send(instance, self._gateway_request(initialized, session), deadline))
        self._legacy_sessions[instance.endpoint] = session
        return session

    # --- a bridged request ----------------------------------------------------------

    def call(self, message: dict[str, Any], body: bytes, client: ClientContext,
             request_id: str | None = None, cancel: Cancellation | None = None) -> BridgedReplies:
        """A bridged request: translate, send, and translate every message of the answer."""
        return BridgedReplies(self, message, client, request_id, cancel)

    def _replies(self, holder: BridgedReplies, message: dict[str, Any], client: ClientContext, request_id: str | None,
                 cancel: Cancellation | None) -> Generator[Reply, None, None]:
        """What BridgedReplies iterates: each try's answer read by this thread (until the relay takes it)."""
        failover = self.failover.begin()
        server_era = protocol.LEGACY if self.speaks_era(protocol.LEGACY) else protocol.MODERN
        # Every bridged request of this worker shares one session per instance, and clients
        # choose ids alike (curl's are all 1): a server keying its answer streams by id
        # would cross or lose them, so the instance sees an id of the gateway's.
        outgoing = {**protocol.request_for_server(message, client.era, server_era, client.log_level), "id": f"mcp-gateway-{next(_bridge_ids)}"}
        tried: list[Instance] = []
        while True:
            if cancel is not None:
                cancel.check(self.server_id)
            instance = self.balancer.pick(tried)
            tried.append(instance)
            forwarded = False  # a message of the answer went on to the client: no retry from then on
            try:
                response, via = self._send_bridged(instance, outgoing, server_era, failover.deadline, request_id)
                answer = holder.answer = Answer(self, instance, response, via, outgoing, message, client, server_era,
                                                failover.deadline)
                forget = cancel.on_cancel(answer.interrupt) if cancel is not None else None
                try:
                    for reply in answer.messages(cancel):
                        handled = answer.handle(reply, answer.refuse)
                        if handled is not None:
                            forwarded = True
                            yield handled
                            if handled.final:
                                return
                except errors.Cancelled:
                    answer.tell_cancelled(f"the client cancelled the request ({cancel.reason if cancel else ''})")
                    raise
                finally:
                    if forget is not None:
                        forget()
                    if not answer.relayed:
                        answer.close()
                raise errors.UpstreamFailed(f"server '{self.server_id}': instance {instance.endpoint} answered HTTP "
                                            f"{response.status} without a response to the request")
            except errors.UpstreamError as exc:
                if cancel is not None and cancel.cancelled:
                    cancel.check(self.server_id)  # the read was cut by the cancellation, not the instance
                # The same rules as a request passed through: what never reached an instance,
                # or changes nothing, goes to another one (a stream that broke before it said
                # anything included), unless the client has been sent part of the answer.
                retry = None if forwarded else failover.retry(exc, message["method"])
                if retry is None or not self.balancer.candidates(tried):
                    raise
                failover = retry
                self._retrying(message["method"], exc)

    def _send_bridged(self, instance: Instance, outgoing: dict[str, Any], server_era: str, deadline: float,
                      request_id: str | None) -> tuple[ProxyResponse, LegacySession | dict[str, str]]:
        """Send a translated request to `instance`, in the gateway's own session with it for a legacy server."""
        for attempt in range(2):
            via: LegacySession | dict[str, str] = (
                self._legacy_session(instance, deadline) if server_era == protocol.LEGACY else protocol.request_headers(outgoing)
            )
            answer = self.transport.send(instance, self._gateway_request(outgoing, via, request_id), deadline)
            if server_era == protocol.LEGACY and attempt == 0 and session_lost(answer):
                _close(answer)
                self._legacy_sessions.pop(instance.endpoint, None)  # it expired: open a new one, once
                continue
            break
        return answer, via

    def _gateway_request(self, message: dict[str, Any], via: LegacySession | Mapping[str, str],
                         request_id: str | None = None) -> ProxyRequest:
        """A request of the gateway's own: in a legacy session, or with the given headers."""
        headers = dict(JSON_RPC_HEADERS)
        if isinstance(via, LegacySession):
            headers["MCP-Protocol-Version"] = via.version
            upstream_session = via.session_id
        else:
            headers.update(via)
            upstream_session = None
        return ProxyRequest(method="POST", path=self.settings.mcp_path, query=b"", headers=headers,
                            body=jsonrpc.encode(message), message=message, upstream_session=upstream_session,
                            request_id=request_id)

    def _refuse(self, instance: Instance, request: dict[str, Any], via: LegacySession | Mapping[str, str],
                deadline: float) -> None:
        refusal = jsonrpc.error(request["id"], errors.METHOD_NOT_FOUND,
                                f"{request['method']} is not available: the MCP gateway bridges this session and "
                                "cannot ask the client")
        _close(self.transport.send(instance, self._gateway_request(refusal, via), deadline))

    def _cancelled(self, instance: Instance, request_id: Any, via: LegacySession | Mapping[str, str], reason: str) -> None:
        """Tell a handshake-era instance the gateway's request is cancelled, so it stops working on it."""
        notification = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                        "params": {"requestId": request_id, "reason": reason}}
        deadline = time.monotonic() + min(self.settings.request_timeout, 10.0)
        _close(self.transport.send(instance, self._gateway_request(notification, via), deadline))

    def _messages(self, answer: ProxyResponse) -> Iterator[dict[str, Any]]:
        """Every JSON-RPC message of an answer, JSON or SSE, as it arrives."""
        datas = sse.events(answer.body) if not isinstance(answer.body, bytes) else iter([answer.body])
        for data in datas:
            try:
                message = json.loads(data)
            except ValueError:
                raise errors.UpstreamFailed(
                    f"server '{self.server_id}': instance {answer.instance} answered HTTP {answer.status} "
                    f"with a body that is not JSON-RPC: {data[:200]!r}") from None
            if isinstance(message, dict):
                yield message

    def _response_in(self, answer: ProxyResponse, request_id: Any) -> dict[str, Any] | None:
        """The response to `request_id` in an answer, or None if it holds none."""
        try:
            for message in self._messages(answer):
                if "method" not in message and message.get("id") in (request_id, None):
                    return message
        except errors.UpstreamFailed:
            return None
        finally:
            _close(answer)
        return None


def _answered(answer: ProxyResponse, server_id: str, what: str) -> None:
    """UpstreamFailed unless the instance answered for itself: a 5xx is a booting or broken one, not an era."""
    if answer.status >= 500:
        _close(answer)
        raise errors.UpstreamFailed(f"server '{server_id}': instance {answer.instance} answered {what} "
                                    f"with HTTP {answer.status}")


def session_lost(answer: ProxyResponse) -> bool:
    """The instance no longer knows the session (404, or 400 naming the session as some servers do)."""
    body = answer.body if isinstance(answer.body, bytes) else b""
    return answer.status == 404 or (answer.status == 400 and b"session" in body.lower())


def _close(answer: ProxyResponse) -> None:
    """Release a streamed answer's connection (a no-op for one read whole)."""
    if not isinstance(answer.body, bytes):
        answer.body.close()


# --- one bridged answer, read by a thread and then maybe by the relay --------------------


class Answer:
    """One instance's answer to a bridged request, message by message, and the connection it came on.

    An SSE answer's socket is taken out of urllib3 at once (transport's
    Handoff) and read here, its framing decoded and cut into events by the
    relay's own Framing and Events: by the serving thread (blocking) until
    the first reply, then maybe by the worker's relay (`BridgedFeed`) from
    where the thread stopped. `handle` is what both do with each message. An
    answer that cannot be handed over (JSON, TLS) is read as the transport
    gives it.
    """

    def __init__(self, bridge: Bridge, instance: Instance, response: ProxyResponse,
                 via: LegacySession | dict[str, str], outgoing: dict[str, Any], message: dict[str, Any],
                 client: ClientContext, server_era: str, deadline: float):
        self.bridge = bridge
        self.instance = instance
        self.response = response
        self.via = via
        self.outgoing = outgoing
        self.message = message
        self.client = client
        self.server_era = server_era
        self.deadline = deadline
        body = response.body
        self.handoff = body.hand_over() if isinstance(body, UpstreamStream) else None
        self.buffered = self.handoff.buffered if self.handoff is not None else b""
        self.events = streams.Events()
        self.queue: deque[bytes] = deque()  # whole events read and not handled yet
        self.ended = False  # the body ended (whole, or its connection closed)
        self.answered = False  # the response went to the client
        self.relayed = False  # a BridgedFeed owns it now
        self.released = False  # its connection was let go (reused or closed)
        self._told = False  # a handshake-era instance was sent notifications/cancelled

    # --- each message, whoever reads -----------------------------------------------

    def handle(self, reply: dict[str, Any], refuse: Callable[[dict[str, Any]], None]) -> Reply | None:
        """A message of the answer as the client gets it (None: not for the client); `refuse` answers a request."""
        origin = self.instance.endpoint
        if "method" in reply:
            if "id" in reply:  # a server->client request: no client can be asked
                refuse(reply)
                return None
            return Reply(reply, None, final=False, origin=origin)
        if reply.get("id") in (self.outgoing.get("id"), None):
            # An error without an id answers the one request of this exchange.
            mapped = {**reply, "id": self.message["id"]}
            translated = protocol.reply_for_client(mapped, self.message["method"], self.client.era, self.server_era,
                                                   self.bridge.server_id)
            self.answered = True
            return Reply(translated, None, final=True, origin=origin)
        return None

    def refuse(self, request: dict[str, Any]) -> None:
        self.bridge._refuse(self.instance, request, self.via, self.deadline)

    def refuse_in_background(self, request: dict[str, Any]) -> None:
        """The refusal is a POST to the instance: never sent from the loop's thread."""
        streams.in_background(partial(self.refuse, request))

    def parse(self, data: bytes) -> dict[str, Any] | None:
        try:
            message = json.loads(data)
        except ValueError:
            raise errors.UpstreamFailed(
                f"server '{self.bridge.server_id}': instance {self.instance.endpoint} answered HTTP "
                f"{self.response.status} with a body that is not JSON-RPC: {data[:200]!r}") from None
        return message if isinstance(message, dict) else None

    def tell_cancelled(self, reason: str) -> None:
        """A handshake-era instance is told the request is cancelled (in the background), so it stops working on it."""
        if self.server_era != protocol.LEGACY or self.answered or self._told:
            return
        self._told = True
        streams.in_background(partial(self.bridge._cancelled, self.instance, self.outgoing["id"], self.via, reason))

    # --- read by the serving thread ---------------------------------------------------

    def messages(self, cancel: Cancellation | None) -> Iterator[dict[str, Any]]:
        """Every JSON-RPC message of the answer as it arrives; errors.Cancelled once `cancel` cut the read."""
        try:
            if self.handoff is None:
                yield from self.bridge._messages(self.response)
                return
            while True:
                while self.queue:
                    for data in sse.events([self.queue.popleft()]):
                        message = self.parse(data)
                        if message is not None:
                            yield message
                if self.ended:
                    return
                self._read(cancel)
        except errors.UpstreamError:
            if cancel is not None and cancel.cancelled:
                cancel.check(self.bridge.server_id)
            raise

    def _read(self, cancel: Cancellation | None) -> None:
        assert self.handoff is not None
        sock, framing = self.handoff.sock, self.handoff.framing
        where = f"server '{self.bridge.server_id}': instance {self.instance.endpoint}"
        data, self.buffered = self.buffered, b""
        if not data:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise self._broke(errors.UpstreamReadTimeout(
                    f"server '{self.bridge.server_id}': no answer within {self.bridge.settings.request_timeout:g}s"))
            try:
                sock.settimeout(min(self.bridge.settings.read_timeout, remaining))
                data = sock.recv(streams.READ_SIZE)
            except TimeoutError:
                if cancel is not None:
                    cancel.check(self.bridge.server_id)
                raise self._broke(errors.UpstreamReadTimeout(f"{where} did not answer within "
                                                             f"{self.bridge.settings.read_timeout:g}s")) from None
            except OSError as exc:
                if cancel is not None:
                    cancel.check(self.bridge.server_id)
                raise self._broke(errors.UpstreamFailed(f"{where} failed: its stream broke: {exc}")) from None
        if cancel is not None:
            cancel.check(self.bridge.server_id)
        if not data:
            self.ended = True
            if not framing.closed():
                raise self._broke(errors.UpstreamFailed(f"{where} failed: it closed its stream mid-answer"))
            return
        try:
            payload, self.ended = framing.feed(data)
        except ValueError as exc:
            raise self._broke(errors.UpstreamFailed(f"{where} failed: its stream broke: {exc}")) from None
        self.queue.extend(self.events.feed(payload))
        if len(self.events.pending) > MAX_JSON_BODY:
            raise self._broke(errors.UpstreamFailed(f"{where} sent an event over {MAX_JSON_BODY} bytes"))

    def _broke(self, error: E) -> E:
        """The stream failed: its connection closed and the failure counted against the instance."""
        self.release(error.message)
        return error

    def interrupt(self) -> None:
        """Cut a read blocked on this answer, from another thread (the request was cancelled)."""
        if self.handoff is not None:
            with suppress(OSError):
                self.handoff.sock.shutdown(socket.SHUT_RDWR)
        elif isinstance(self.response.body, UpstreamStream):
            self.response.body.interrupt()

    def close(self) -> None:
        """The thread is done with the answer: its connection back to the pool if the rest comes at once, else closed."""
        if self.handoff is None:
            _close(self.response)
            return
        if self.answered and not self.ended and not self.released:
            # The server ends the stream right after the response, as the spec asks: read that
            # end if it comes at once, so the connection is reused rather than a new one made.
            with suppress(OSError, ValueError):
                self.handoff.sock.settimeout(DRAIN_SECONDS)
                left = DRAIN_BYTES
                while not self.ended and left > 0:
                    data = self.buffered or self.handoff.sock.recv(streams.READ_SIZE)
                    self.buffered = b""
                    if not data:
                        break
                    left -= len(data)
                    self.ended = self.handoff.framing.feed(data)[1]
        self.release(None)

    def release(self, problem: str | None) -> None:
        """Let the connection go once: reused when its body ended whole and nothing broke, else closed."""
        if self.handoff is not None and not self.released:
            self.released = True
            self.handoff.release(problem)


class BridgedReplies:
    """What Bridge.call returns (upstreams.Replies): iterated by a thread, or handed to the relay after the first reply."""

    def __init__(self, bridge: Bridge, message: dict[str, Any], client: ClientContext, request_id: str | None,
                 cancel: Cancellation | None):
        self.answer: Answer | None = None  # the try being read
        self._handed = False
        self._replies = bridge._replies(self, message, client, request_id, cancel)

    def __iter__(self) -> Iterator[Reply]:
        return self

    def __next__(self) -> Reply:
        return next(self._replies)

    def close(self) -> None:
        if not self._handed:
            self._replies.close()

    def hand_over(self) -> BridgedFeed | None:
        """The rest of the answer as a feed for the worker's relay; None when it is not an SSE socket to hand on."""
        answer = self.answer
        if self._handed or answer is None or answer.handoff is None or answer.answered or answer.released:
            return None
        answer.relayed = True  # the generator's end leaves the connection to the feed
        self._handed = True
        self._replies.close()
        return BridgedFeed(answer)


class BridgedFeed:
    """The rest of a bridged SSE answer read by the worker's relay (streams.Feed), each event handled as a thread would.

    The instance's socket is read by a SocketFeed (its framing and event
    cutting), continuing the Events the thread left; each whole event is
    parsed and handled by `Answer.handle`, and sent on as the gateway's own
    SSE event. It ends on the response (the connection reused when the body
    ended whole), on a broken stream and at the request's deadline (an error
    event for the client's id, the connection closed).
    """

    def __init__(self, answer: Answer):
        assert answer.handoff is not None
        self.answer = answer
        self.request_id = answer.message["id"]
        buffered, answer.buffered = answer.buffered, b""
        self.socket_feed = streams.SocketFeed(
            streams.Handoff(answer.handoff.sock, buffered, answer.handoff.framing, answer.release), None)
        self.socket_feed.events = answer.events  # whatever half event the thread left

    def fileno(self) -> int:
        return self.socket_feed.fileno()

    def start(self, limit: int) -> streams.Fed:
        queued = b"".join(self.answer.queue)
        self.answer.queue.clear()
        if self.answer.ended:  # the thread read the body to its end already: nothing more will come
            self.socket_feed.abandon("ended")
            return self._give(queued, streams.Fed(b"", True, None))
        return self._give(queued, self.socket_feed.start(limit))

    def readable(self) -> streams.Fed:
        return self._give(b"", self.socket_feed.readable())

    def tick(self, now: float) -> streams.Fed:
        if now < self.answer.deadline:
            return streams.NOTHING
        self.answer.tell_cancelled("the MCP gateway's deadline for the request passed")
        self.socket_feed.abandon("deadline")  # the body did not end: the connection is closed
        settings = self.answer.bridge.settings
        return streams.Fed(self._error(errors.UpstreamReadTimeout(
            f"server '{self.answer.bridge.server_id}': no answer within {settings.request_timeout:g}s")), True, None)

    def abandon(self, reason: str) -> None:
        self.socket_feed.abandon(reason)
        self.answer.tell_cancelled(f"the MCP gateway ended the request ({reason})")

    def _give(self, queued: bytes, fed: streams.Fed) -> streams.Fed:
        """What the client gets of whole events read: each handled; the feed's end an error unless it answered."""
        answer = self.answer
        out = bytearray()
        try:
            for data in sse.events([queued + fed.data]):
                message = answer.parse(data)
                handled = None if message is None else answer.handle(message, answer.refuse_in_background)
                if handled is None:
                    continue
                out += sse.event(handled.encoded())
                if handled.final:
                    if not fed.done:
                        self.socket_feed.abandon("answered")  # reused if the body ended in this read
                    return streams.Fed(bytes(out), True, None)
        except errors.UpstreamError as exc:
            answer.release(exc.message)
            self.socket_feed.abandon("broken")
            return streams.Fed(bytes(out) + self._error(exc), True, exc.message)
        if not fed.done:
            return streams.Fed(bytes(out))
        where = f"server '{answer.bridge.server_id}': instance {answer.instance.endpoint}"
        error = errors.UpstreamFailed(f"{where} failed: {fed.problem}" if fed.problem else
                                      f"{where} answered HTTP {answer.response.status} without a response to the request")
        return streams.Fed(bytes(out) + self._error(error), True, fed.problem)

    def _error(self, error: errors.GatewayError) -> bytes:
        """The failure as the request's final event (the headers are gone already)."""
        return sse.event(jsonrpc.encode(jsonrpc.error(self.request_id, error.code, error.message, error.data)))
