"""Carrying out a serving plan (serving.py): one function per plan kind, shared by every MCP route.

The POST route (post.py) and the GET and DELETE views (views.py) gather the
facts of a request into one `Served`, ask serving.decide for the plan and
hand both to `carry_out`, which passes the request through to an instance,
bridges it to the upstream's `call`, answers it alone, or raises the
refusal. Upstreams are seen through the Protocols of gateway/upstreams only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from flask import Response

from . import (
    errors,
    in_flight,
    jsonrpc,
    log_levels,
    metrics,
    owners,
    protocol,
    sse,
    streams,
)
from .cancel import Cancellation
from .dedicated import CORRELATION_HEADER, GetStream, SessionProcess, Sessions
from .exchange import Exchange
from .jsonrpc import Reply
from .protocol import ClientContext
from .runtime import Gateway
from .serving import (
    SESSION_HEADER,
    Answer,
    Bridge,
    Dedicated,
    Held,
    Local,
    PassThrough,
    Plan,
    Refuse,
)
from .sessions import Session
from .upstreams import (
    MessageUpstream,
    PassThroughUpstream,
    ProxyRequest,
    ProxyResponse,
    Replies,
)

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(slots=True)
class Served:
    """One request on an MCP route and what serving it needs, gathered once."""

    gateway: Gateway
    exchange: Exchange
    upstream: MessageUpstream
    instances: PassThroughUpstream | None  # upstreams.instances(upstream): None for stdio
    session: Session | None
    client: ClientContext | None  # a POST's (GET and DELETE have no message to judge the era by)
    message: dict[str, Any] | None  # a POST's JSON-RPC message
    body: bytes
    path: str  # what follows /<server-id>/, without its slash
    query: bytes
    cancel: Cancellation | None = None  # a bridged call's, where the client can cancel it (in_flight.py)


def carry_out(served: Served, plan: Plan) -> Response:
    match plan:
        case Bridge():
            return _bridge(served)
        case PassThrough():
            return _pass_through(served, plan)
        case Answer(what=what):
            return _ANSWERS[what](served)
        case Dedicated(what=what):
            return _HELD[what](served)
        case Refuse(error=error):
            raise error


def session_of(gateway: Gateway, exchange: Exchange, server_id: str) -> Session | None:
    """The session the request names, opened for the caller; SessionNotFound if not theirs or not valid.

    A 2026-07-28 request has none, but on a server with dedicated sessions
    its correlation header (dedicated.py) names its process as a session id
    would: its owner, and the process a DELETE ends.
    """
    headers = exchange.headers
    if headers.get("MCP-Protocol-Version") in protocol.MODERN_VERSIONS:
        # 2026-07-28 has no sessions: a stray session id is ignored, as the spec says
        token = headers.get(CORRELATION_HEADER)
        if token is None or exchange.principal is not None:
            return None  # a client with a principal is keyed by it (owners.of_principal)
        if getattr(gateway.upstreams.get(server_id), "sessions", None) is None:
            return None
    else:
        token = headers.get(SESSION_HEADER)
        if token is None:
            return None
    return gateway.signer.verify(token, server_id, exchange.principal)


def json_response(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(jsonrpc.encode(payload), status=status, mimetype="application/json")


# --- pass through --------------------------------------------------------------


def _pass_through(served: Served, plan: PassThrough) -> Response:
    """Pass the request to an instance and its answer back, re-signing any session it starts."""
    upstream, exchange, session = served.instances, served.exchange, served.session
    assert upstream is not None  # serving.decide passes through only to an upstream with instances
    states = served.gateway.states
    message, body = served.message, served.body
    instance = session.instance if session else None
    retry = states.retry(message, upstream.server_id, exchange.principal, upstream.available)
    if retry is not None:  # an MRTR retry goes to the instance that asked, with its own requestState back
        message, instance = retry
        body = jsonrpc.encode(message)
    if exchange.method == "GET" and streams.CLAIMS.full(served.gateway.registry.gateway.max_streams):
        # A GET is a stream: refused before the instance opens one.
        metrics.STREAMS_ENDED.labels("refused").inc()
        raise streams.too_many(served.gateway.registry.gateway.max_streams)
    try:
        answer = upstream.forward(ProxyRequest(
            method=exchange.method, path=f"/{served.path}" if served.path else "", query=served.query,
            headers=exchange.headers, body=body, message=message, instance=instance,
            upstream_session=session.upstream_session if session else None, request_id=exchange.request_id,
            credential_headers=served.gateway.auth.hook_credential_headers,
        ))
    except errors.UpstreamUnreachable as exc:
        if retry is None:
            raise
        raise errors.RequestStateInvalid(f"{exc.message}; it asked for this input, so start the call again "
                                         "without requestState") from None
    response = _passed_back(served, answer, message)
    if plan.ends_session and session is not None and 200 <= response.status_code < 300:
        served.gateway.signer.revoke(session)  # the instance ended it; no worker of ours passes it on again
    return response


def _passed_back(served: Served, answer: ProxyResponse, message: dict[str, Any] | None) -> Response:
    """The instance's answer as the client gets it: requestState wrapped, the session id ours."""
    gateway, exchange, session = served.gateway, served.exchange, served.session
    headers = exchange.headers
    server_id = served.upstream.server_id
    exchange.upstream = answer.instance
    wraps = (message is not None and jsonrpc.is_request(message)
             and headers.get("MCP-Protocol-Version") in protocol.MODERN_VERSIONS)
    session_id: str | None = None
    if answer.upstream_session and (session is None or answer.upstream_session != session.upstream_session):
        params = (message or {}).get("params") or {}
        version = params.get("protocolVersion") or (session.protocol_version if session else protocol.DEFAULT_LEGACY)
        session_id = gateway.signer.mint(
            server_id, str(version), instance=answer.instance, upstream_session=answer.upstream_session,
            principal=exchange.principal,
        )
    elif session is not None:
        session_id = headers[SESSION_HEADER]
    # Last: a relayable body holds a stream claim and the instance's connection until it is closed.
    body = answer.body
    if isinstance(body, bytes):
        if wraps:
            # Its answer may ask for input: the requestState must lead the retry back here.
            body = gateway.states.wrap_message(body, answer.instance, server_id, exchange.principal)
        response = Response(body, status=answer.status, headers=answer.headers)
    else:
        response = _relayable(served, answer, wraps)
    if session_id is not None:
        response.headers[SESSION_HEADER] = session_id
    return response


def _relayable(served: Served, answer: ProxyResponse, wraps: bool) -> Response:
    """A streaming answer as a body the worker's relay can take over (streams.py), counted against max_streams."""
    gateway, exchange = served.gateway, served.exchange
    source = answer.body
    assert not isinstance(source, bytes)  # _passed_back's test
    limit = gateway.registry.gateway.max_streams
    if not streams.CLAIMS.take(limit):
        source.close()  # the instance's answer is dropped: its connection closed, its count down
        metrics.STREAMS_ENDED.labels("refused").inc()
        raise streams.too_many(limit)
    transform: Callable[[bytes], bytes] | None = None
    fallback: Iterator[bytes] = source
    if wraps:
        # Its events may ask for input: each requestState must lead the retry back here.
        states, server_id = gateway.states, served.upstream.server_id
        transform = partial(states.wrap_event, answer.instance, server_id, exchange.principal)
        fallback = states.wrap_stream(source, answer.instance, server_id, exchange.principal)
    body = streams.RelayBody.of_source(source, fallback, transform)
    response = body.respond(exchange, status=answer.status, headers=answer.headers)
    response.headers["X-Accel-Buffering"] = "no"
    return response


# --- bridge: the gateway ends MCP HTTP ---------------------------------------------


def _bridge(served: Served) -> Response:
    """Hand the message to the upstream's `call`: an SSE stream, or just the final response as JSON."""
    exchange, upstream, message, client = served.exchange, served.upstream, served.message, served.client
    assert message is not None and client is not None  # serving.decide bridges POSTs only
    if served.session is not None and client.era == protocol.LEGACY:
        level = served.gateway.log_levels.get(served.session.revocation_id)
        if level is not None:  # the session's logging/setLevel, carried by each of its requests
            client = dataclasses.replace(client, log_level=level)
    cancel, forget = _cancellable(served)
    served.cancel = cancel  # a relayed answer ends when it is cancelled (streams.Relay)
    try:
        response = _answered(served, upstream.call(message, served.body, client, exchange.request_id, cancel))
    except BaseException:
        forget()
        raise
    response.call_on_close(forget)
    return response


def _cancellable(served: Served) -> tuple[Cancellation | None, Callable[[], None]]:
    """A handshake-era client's call, recorded so that its notifications/cancelled finds it (in_flight.py)."""
    client, message = served.client, served.message
    assert client is not None and message is not None
    if client.era != protocol.LEGACY:
        return None, _nothing
    call = in_flight.key(_whose(served), message.get("id"))
    if call is None:
        return None, _nothing
    cancel = Cancellation()
    return cancel, in_flight.register(call, cancel)


def _whose(served: Served) -> str | None:
    return served.session.revocation_id if served.session is not None else served.exchange.principal


def _nothing() -> None:
    pass


def _answered(served: Served, replies: Replies) -> Response:
    """The replies to a POST: an SSE stream when the client takes one and there is more than the response."""
    exchange, upstream = served.exchange, served.upstream
    first = next(replies)  # errors before the first message become plain HTTP errors
    exchange.upstream = first.origin
    if not first.final and "text/event-stream" in exchange.headers.get("Accept", ""):
        # The stream owns `replies` now, and closes it when the client is done.
        return _stream(served, first, replies)
    try:
        # A JSON-only client gets just the final response; notifications are dropped.
        final = first if first.final else next(reply for reply in replies if reply.final)
    except StopIteration:
        raise errors.UpstreamError(f"server '{upstream.server_id}' ended the exchange without a response") from None
    finally:
        replies.close()
    exchange.rpc_error = "error" in final.message
    return Response(final.encoded(), mimetype="application/json")


def _stream(served: Served, first: Reply, replies: Replies) -> Response:
    """A bridged answer as SSE: relayed by the worker's loop once its first event is out, where the upstream can."""
    exchange, message = served.exchange, served.message
    assert message is not None  # a bridged POST's
    fallback = _sse(first, replies, message["id"], exchange)
    hand_over: Callable[[], streams.Feed | None] | None = getattr(replies, "hand_over", None)
    limit = served.gateway.registry.gateway.max_streams
    # The relay takes it only with a claim: past gateway.max_streams (or an upstream that cannot hand
    # its answer over) the request thread iterates it as before, holding its thread until the answer ends.
    if hand_over is None or not streams.CLAIMS.take(limit):
        return Response(fallback, mimetype="text/event-stream", headers=SSE_HEADERS)
    given = hand_over

    def take() -> streams.Feed | None:
        feed = given()
        return None if feed is None else _Bridged(feed, sse.event(first.encoded()), exchange)

    body = streams.RelayBody(fallback, take, replies.close)
    body.cancel = served.cancel
    return body.respond(exchange, mimetype="text/event-stream", headers=SSE_HEADERS)


class _Bridged:
    """A bridged answer's feed as the relay reads it: the first event (a thread took it) before the rest,
    and the exchange told whether the final reply was an error (its access line and metrics say so)."""

    __slots__ = ("exchange", "feed", "first", "last")

    def __init__(self, feed: streams.Feed, first: bytes, exchange: Exchange):
        self.feed = feed
        self.first = first
        self.exchange = exchange
        self.last = b""  # the last bytes given: the final event is in them when the feed ends

    def fileno(self) -> int:
        return self.feed.fileno()

    def start(self, limit: int) -> streams.Fed:
        fed = self.feed.start(limit)
        return self._noted(streams.Fed(self.first + fed.data, fed.done, fed.problem))

    def readable(self) -> streams.Fed:
        return self._noted(self.feed.readable())

    def tick(self, now: float) -> streams.Fed:
        return self._noted(self.feed.tick(now))

    def abandon(self, reason: str) -> None:
        self.feed.abandon(reason)

    def _noted(self, fed: streams.Fed) -> streams.Fed:
        if fed.data:
            self.last = fed.data
        if fed.done:
            self.exchange.rpc_error = _is_error(self.last)
        return fed


def _is_error(events: bytes) -> bool:
    """Whether the last SSE event in `events` is a JSON-RPC error."""
    data = [b"", *sse.events([events])][-1]
    try:
        final = json.loads(data) if data else None
    except ValueError:
        return False
    return isinstance(final, dict) and "error" in final


def _sse(first: Reply, replies: Replies, request_id: Any, exchange: Exchange) -> Iterator[bytes]:
    try:
        yield sse.event(first.encoded())
        for reply in replies:
            if reply.final:
                exchange.rpc_error = "error" in reply.message
            yield sse.event(reply.encoded())
    except errors.Cancelled:
        return  # the client cancelled it: the stream ends with no answer (basic/utilities/cancellation)
    except errors.GatewayError as exc:
        # Headers are gone already; the failure travels as the final event.
        exchange.rpc_error = True
        yield sse.event(jsonrpc.encode(jsonrpc.error(request_id, exc.code, exc.message, exc.data)))
    except Exception as exc:  # a bug must still end the stream with an answer
        log.exception("unhandled error while streaming an answer")
        exchange.rpc_error = True
        yield sse.event(jsonrpc.encode(jsonrpc.error(request_id, errors.INTERNAL_ERROR,
                                                     f"internal gateway error: {type(exc).__name__}")))
    finally:
        replies.close()


# --- answered by the gateway ---------------------------------------------------------


def _initialize(served: Served) -> Response:
    message = _message(served)
    params = message.get("params") or {}
    upstream = served.upstream
    result = protocol.initialize_result(upstream.hello(), params.get("protocolVersion"))
    token = served.gateway.signer.mint(upstream.server_id, result["protocolVersion"], principal=served.exchange.principal)
    response = json_response(jsonrpc.result(message["id"], result))
    response.headers[SESSION_HEADER] = token
    return response


def _ping(served: Served) -> Response:
    return json_response(jsonrpc.result(_message(served)["id"], {}))


def _discover(served: Served) -> Response:
    return json_response(jsonrpc.result(_message(served)["id"], protocol.discover_result(served.upstream.hello())))


def _set_level(served: Served) -> Response:
    """A handshake-era session's logging/setLevel: kept for its later requests (log_levels.py), answered `{}`."""
    message = _message(served)
    level = log_levels.requested(message)
    session = served.session
    if session is not None:  # without a session (a single request) there is nothing later to carry it
        served.gateway.log_levels.set(session.revocation_id, level, session.expires_at)
    return json_response(jsonrpc.result(message["id"], {}))


def _accepted(served: Served) -> Response:
    message, client = served.message, served.client
    if (message is not None and client is not None and client.era == protocol.LEGACY
            and message.get("method") == "notifications/cancelled" and isinstance(message.get("params"), dict)):
        _cancel(served, message["params"])
    return Response(status=202)


def _cancel(served: Served, params: dict[str, Any]) -> None:
    """The client's cancel of one of its calls: here if this worker holds it, else at the siblings'."""
    call = in_flight.key(_whose(served), params.get("requestId"))
    if call is None:
        return
    reason = params.get("reason")
    if in_flight.cancel(call, f"cancelled by the client: {reason}" if isinstance(reason, str) else "cancelled by the client"):
        return
    exchange = served.exchange
    if not owners.came_forwarded(exchange.headers):  # from a sibling already: it asked every worker
        owners.to_siblings(served.gateway.forward_keys, exchange.headers, exchange.method, exchange.path, served.body)


def _end_session(served: Served) -> Response:
    assert served.session is not None  # serving.decide ends only a session the request names
    # The id is self-contained, so every worker would take it again: it is revoked
    # for the whole host (sessions.Revocations) until it would have expired anyway.
    served.gateway.signer.revoke(served.session)
    return Response(status=204)


def _message(served: Served) -> dict[str, Any]:
    assert served.message is not None  # the gateway answers messages of POSTs only (and DELETE, above)
    return served.message


_ANSWERS: dict[Local, Callable[[Served], Response]] = {
    Local.INITIALIZE: _initialize,
    Local.PING: _ping,
    Local.DISCOVER: _discover,
    Local.SET_LEVEL: _set_level,
    Local.ACCEPTED: _accepted,
    Local.END_SESSION: _end_session,
}


# --- dedicated sessions: a process per client session (gateway/dedicated.py) -----------------


def _sessions(served: Served) -> Sessions:
    sessions: Sessions | None = getattr(served.upstream, "sessions", None)
    assert sessions is not None  # serving.decide holds sessions only of an upstream with dedicated sessions
    return sessions


def _held_process(served: Served) -> SessionProcess:
    assert served.session is not None  # serving.decide: only a session the request names
    return _sessions(served).get(served.session.upstream_session)


def _start_session(served: Served) -> Response:
    """initialize: a process of the session's own, given the client's initialize; its answer is the client's."""
    message, exchange, gateway = _message(served), served.exchange, served.gateway
    sessions = _sessions(served)
    process = sessions.start()
    exchange.upstream = f"pid {process.pid}"
    try:
        answer = process.greet(message, served.body)
    except BaseException:
        sessions.end(process.key)
        raise
    result = answer.get("result")
    if not isinstance(result, dict):
        sessions.end(process.key)  # refused: no session to keep
        exchange.rpc_error = True
        return json_response(answer)
    version = str(result.get("protocolVersion") or protocol.DEFAULT_LEGACY)
    token = gateway.signer.mint(served.upstream.server_id, version, upstream_session=process.key,
                                principal=exchange.principal, owner=gateway.owner)
    response = json_response(answer)
    response.headers[SESSION_HEADER] = token
    return response


def _held_request(served: Served) -> Response:
    process = _held_process(served)
    served.exchange.upstream = f"pid {process.pid}"
    sse_answer = "text/event-stream" in served.exchange.headers.get("Accept", "")
    return _answered(served, process.call(_message(served), served.body, sse_answer))


def _deliver(served: Served) -> Response:
    """A notification (initialized, cancelled) or a response to the process's own request: to the process."""
    _held_process(served).deliver(_message(served), served.body)
    return Response(status=202)


def _held_stream(served: Served) -> Response:
    """GET: what the process sends unasked (notifications, requests when no POST answer is open)."""
    process = _held_process(served)
    served.exchange.upstream = f"pid {process.pid}"
    return _piped(served, process.stream())


def _piped(served: Served, stream: GetStream) -> Response:
    """A session's stream (GET, subscriptions/listen) as the response: relayed by the worker's loop where it can."""
    exchange, gateway = served.exchange, served.gateway.registry.gateway
    claimed = streams.CLAIMS.take(gateway.max_streams)
    # Past gateway.max_streams a request thread iterates it (the relay is not offered it), but gives back the
    # server's share of the threads (its bulkhead slot): the session's POSTs (a response to a sampling request
    # among them) never queue behind it. Whoever ends it, or if no one began it, the stream's pipe goes.
    body = streams.RelayBody(stream.events(gateway.sse_keepalive_interval), lambda: stream if claimed else None,
                             partial(stream.abandon, "closed"), claimed=claimed)
    if not claimed:
        exchange.detach()
    return body.respond(exchange, mimetype="text/event-stream", headers=SSE_HEADERS)


def _end_held(served: Served) -> Response:
    """DELETE: the process closed and the id revoked (for every worker of this host)."""
    assert served.session is not None
    if served.session.upstream_session is not None:
        _sessions(served).end(served.session.upstream_session)
    served.gateway.signer.revoke(served.session)
    return Response(status=204)


def _correlated_process(served: Served) -> tuple[SessionProcess, str | None]:
    """A 2026-07-28 request's process: its principal's, else its correlation header's (a new one without),
    and the header to send back (None: keyed by principal)."""
    gateway, exchange, client = served.gateway, served.exchange, served.client
    assert client is not None  # a POST's
    sessions, server_id = _sessions(served), served.upstream.server_id
    token: str | None = None
    if exchange.principal is not None:
        process = sessions.keyed(exchange.principal)
    elif served.session is not None:  # its correlation header (session_of)
        token = exchange.headers[CORRELATION_HEADER]
        process = sessions.get(served.session.upstream_session)
    else:
        process = sessions.start(protocol.MODERN)
        token = gateway.signer.mint(server_id, client.version, upstream_session=process.key, owner=gateway.owner)
    exchange.upstream = f"pid {process.pid}"
    return process, token


def _correlated(served: Served) -> Response:
    """A 2026-07-28 request: answered by its process."""
    process, token = _correlated_process(served)
    sse_answer = "text/event-stream" in served.exchange.headers.get("Accept", "")
    response = _answered(served, process.call(_message(served), served.body, sse_answer))
    if token is not None:
        response.headers[CORRELATION_HEADER] = token
    return response


def _listen(served: Served) -> Response:
    """A 2026-07-28 subscriptions/listen: its process's change notifications, for as long as the client holds it."""
    if "text/event-stream" not in served.exchange.headers.get("Accept", ""):
        raise errors.InvalidRequest("subscriptions/listen is answered with a stream: the Accept header must "
                                    "include text/event-stream", rpc_id=_message(served)["id"])
    process, token = _correlated_process(served)
    response = _piped(served, process.listen(_message(served), served.body))
    if token is not None:
        response.headers[CORRELATION_HEADER] = token
    return response


_HELD: dict[Held, Callable[[Served], Response]] = {
    Held.CORRELATED: _correlated,
    Held.LISTEN: _listen,
    Held.START: _start_session,
    Held.REQUEST: _held_request,
    Held.DELIVER: _deliver,
    Held.STREAM: _held_stream,
    Held.END: _end_held,
}
