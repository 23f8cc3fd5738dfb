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
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .. import errors, jsonrpc, protocol, sse
from ..balancer import Balancer, Instance
from ..cancel import Cancellation
from ..jsonrpc import Reply
from ..protocol import ClientContext, ServerHello
from ..registry import HttpSettings
from .failover import Failover
from .transport import JSON_RPC_HEADERS, ProxyRequest, ProxyResponse, Transport

log = logging.getLogger(__name__)

_bridge_ids = itertools.count(1)  # next() is atomic under the GIL


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
             request_id: str | None = None, cancel: Cancellation | None = None) -> Generator[Reply, None, None]:
        """A bridged request: translate, send, and translate every message of the answer."""
        failover = self.failover.begin()
        server_era = protocol.LEGACY if self.speaks_era(protocol.LEGACY) else protocol.MODERN
        # Every bridged request of this worker shares one session per instance, and clients
        # choose ids alike (curl's are all 1): a server keying its answer streams by id
        # would cross or lose them, so the instance sees an id of the gateway's.
        outgoing = {**protocol.request_for_server(message, client.era, server_era), "id": f"mcp-gateway-{next(_bridge_ids)}"}
        tried: list[Instance] = []
        while True:
            instance = self.balancer.pick(tried)
            tried.append(instance)
            forwarded = False  # a message of the answer went on to the client: no retry from then on
            try:
                answer, via = self._send_bridged(instance, outgoing, server_era, failover.deadline, request_id)
                try:
                    for reply in self._messages(answer):
                        if "method" in reply:
                            if "id" in reply:  # a server->client request: no client can be asked
                                self._refuse(instance, reply, via, failover.deadline)
                            else:
                                forwarded = True
                                yield Reply(reply, None, final=False, origin=instance.endpoint)
                        elif reply.get("id") in (outgoing.get("id"), None):
                            # An error without an id answers the one request of this exchange.
                            mapped = {**reply, "id": message["id"]}
                            translated = protocol.reply_for_client(mapped, message["method"], client.era, server_era,
                                                                   self.server_id)
                            yield Reply(translated, None, final=True, origin=instance.endpoint)
                            return
                finally:
                    _close(answer)
                raise errors.UpstreamFailed(f"server '{self.server_id}': instance {instance.endpoint} answered HTTP "
                                            f"{answer.status} without a response to the request")
            except errors.UpstreamError as exc:
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
