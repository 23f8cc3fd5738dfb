"""MCP over WebSocket in a running worker: the upgraded sockets its event loop holds, and serving their messages.

The worker (gateway/worker.py) answers an upgrade request in a request
thread: `upgrade` runs the handshake checks (ws_handshake.py) and, when they
pass, the connection's socket is handed to the worker's main thread, the
one running gunicorn's selector loop, as relayed streams are. From then on
an idle connection costs a socket, not a thread: the loop reads frames
(websocket.WebSocketConnection, sans-IO), pings quiet clients and closes
dead ones (`tick`), and submits each JSON-RPC message to a small bounded
executor. A message is served as a bridged POST would be (the upstream's
bulkhead held through gateway.checkout, `upstream.call`, one access line per
message); every Reply, notifications first and then the final response, is
handed back to the loop (`defer`), which alone writes the socket. Several
messages of one connection are served at once and answered in any order.

Close codes: 1001 when the worker stops, 1011 on a fault of the gateway's,
the sans-IO module's own for what the client sent. Each connection counts in
streams.CLAIMS (gateway.max_streams) and in streams.WEBSOCKETS
(/status: workers[].websockets).
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from collections.abc import Callable
from concurrent import futures
from contextlib import suppress
from typing import Any

from flask import Flask

from . import errors, jsonrpc, protocol, streams
from .cancel import Cancellation
from .exchange import Exchange
from .runtime import Gateway
from .websocket import (
    GATEWAY_ERROR,
    GOING_AWAY,
    Outcome,
    WebSocketConnection,
    WebSocketSession,
)
from .ws_handshake import Refused, UpgradeChecks

log = logging.getLogger(__name__)

# Threads serving WebSocket messages in one worker: bounded, so a flood of messages queues instead
# of making threads; the upstreams' bulkheads bound each server's share as over HTTP.
SERVING_THREADS = 8
# The most bytes waiting for a client that does not read; past it the connection is closed (1011).
MAX_PENDING = 4 * 1024 * 1024
# The most requests of one connection queued or being served at once: past it a request is refused
# at once (-32002), so one client cannot queue unbounded work for every other connection's threads.
MAX_SERVING = 32


def too_many(limit: int) -> bytes:
    """The HTTP answer to an upgrade past gateway.max_streams: 503 with Retry-After, as a stream gets."""
    return Refused.of(streams.too_many(limit)).encode()


def upgrade(gateway: Gateway, environ: dict[str, Any], now: float) -> tuple[WebSocketConnection, Outcome]:
    """The upgrade request of `environ` checked: the connection and its first Outcome (a 101, or the refusal)."""
    checks = UpgradeChecks(gateway.rebinding, gateway.auth, gateway.upstreams)
    ws = WebSocketConnection.from_settings(checks, gateway.registry.gateway, now)
    path = environ.get("RAW_URI") or environ.get("PATH_INFO", "/")
    return ws, ws.upgrade("GET", path, request_headers(environ), now)


def request_headers(environ: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """The request's headers as (name, value) bytes, from a WSGI environ."""
    pairs = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").lower()
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = key.replace("_", "-").lower()
        else:
            continue
        pairs.append((name.encode("latin-1"), str(value).encode("latin-1")))
    return pairs


# What serving a message reads of the upgrade request's environ (Exchange.begin, the access line).
KEPT_KEYS = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "REMOTE_ADDR", "CONTENT_TYPE", "CONTENT_LENGTH")


def kept_environ(environ: dict[str, Any]) -> dict[str, Any]:
    """The strings of `environ` a connection keeps for its life: its method, path, peer and headers.

    Not the whole environ: wsgi.input, gunicorn's socket and the rest would keep the request's
    parser objects alive for as long as the connection is open (memory per idle WebSocket, issue 15).
    """
    return {key: value for key, value in environ.items() if key.startswith("HTTP_") or key in KEPT_KEYS}


class Link:
    """One upgraded connection held by the loop: its socket, its sans-IO state, its unsent bytes."""

    def __init__(self, hub: Hub, conn: Any, ws: WebSocketConnection, environ: dict[str, Any]):
        self.hub = hub
        self.conn = conn
        self.sock: socket.socket = conn.sock
        self.ws = ws
        self.environ = environ
        self.pending = bytearray()
        self.over = False
        self.writing = False
        self.serving = 0  # its requests queued or being served (MAX_SERVING); only the loop changes it
        # Each request in flight by its JSON-RPC id (hashable), to cancel it; only the loop touches it.
        self.in_flight: dict[Any, Cancellation] = {}

    # --- in the loop ---------------------------------------------------------------

    def ready(self, _fileobj: Any) -> None:
        """The socket is readable (or writable while bytes wait): flush, then read what arrived."""
        if self.over:
            return
        self.flush()
        if self.over:
            return
        data = streams.receive(self.sock)
        if data is not None:
            self.apply(self.ws.receive(data, time.monotonic()))

    def apply(self, outcome: Outcome) -> None:
        self.pending += outcome.to_send
        self.flush()
        for message in outcome.messages:
            self.hub.submit(self, message)
        if outcome.closed:
            self.end()

    def send_message(self, message: dict[str, Any]) -> None:
        """From a serving thread, through the loop's queue: one message to the client."""
        if self.over:
            return
        self.pending += self.ws.send_message(message)
        self.flush()

    def fail(self) -> None:
        """From a serving thread, through the loop's queue: a fault of ours closes the connection (1011)."""
        if not self.over:
            self.pending += self.ws.close(GATEWAY_ERROR, "gateway error")
            self.flush()

    def close(self, code: int, reason: str) -> None:
        if not self.over:
            self.pending += self.ws.close(code, reason)
            self.flush()
            if self.ws.closed:
                self.end()

    def answered(self, message: dict[str, Any] | None, key: Any, cancel: Cancellation) -> None:
        """Through the loop's queue: a request's final message (None: it was cancelled), then its end."""
        if message is not None:
            self.send_message(message)
        self.served(key, cancel)

    def served(self, key: Any, cancel: Cancellation) -> None:
        """Through the loop's queue: one of its requests is done (answered, failed or cancelled)."""
        self.serving -= 1
        if self.in_flight.get(key) is cancel:
            del self.in_flight[key]
        cancel.close()

    def cancelled(self, message: dict[str, Any]) -> None:
        """The client's notifications/cancelled: the request it names is cut short, and not answered."""
        params = message.get("params")
        key = _key(params.get("requestId")) if isinstance(params, dict) else None
        cancel = self.in_flight.get(key) if key is not None else None
        if cancel is not None:
            cancel.cancel("the client cancelled it")

    def flush(self) -> None:
        if not streams.send_pending(self.sock, self.pending):
            self.end()
            return
        if len(self.pending) > MAX_PENDING:
            log.warning("WebSocket client %s does not read: %d bytes waiting, closed", self.hub.peer(self.conn),
                        len(self.pending))
            self.end()
            return
        want = bool(self.pending)
        if want != self.writing and not self.over:
            self.writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            with suppress(KeyError, ValueError, OSError):
                self.hub.poller.modify(self.sock, events, self.ready)

    def end(self) -> None:
        if self.over:
            return
        self.over = True
        with suppress(KeyError, ValueError, OSError):
            self.hub.poller.unregister(self.sock)
        for cancel in self.in_flight.values():  # no one is left to answer: every request winds down now
            cancel.cancel("the connection ended")
        self.hub.ended(self)


class Hub:
    """The WebSocket connections of one worker's loop (its main thread) and the executor serving their messages."""

    def __init__(self, poller: selectors.BaseSelector, defer: Callable[..., None], app: Any,
                 drop: Callable[[Any], None], peer: Callable[[Any], str]):
        self.poller = poller
        self.defer = defer  # runs a callable on the loop thread (gunicorn's method_queue.defer)
        self.app = app
        self.drop = drop  # closes a connection the loop is done with (and counts it gone)
        self.peer = peer
        self.links: set[Link] = set()
        self._tick_at = 0.0
        self.executor = futures.ThreadPoolExecutor(SERVING_THREADS, thread_name_prefix="ws")

    def gateway(self) -> Gateway:
        gateway: Gateway = self.app.extensions["mcp_gateway"]
        return gateway

    def start(self, conn: Any, ws: WebSocketConnection, outcome: Outcome, environ: dict[str, Any]) -> None:
        """In the loop: the upgraded connection's socket is watched from now on; `outcome` holds the 101."""
        link = Link(self, conn, ws, environ)
        # The connection is never parsed as HTTP again: its parser and last request need not be kept.
        conn.parser = None
        self.links.add(link)
        streams.WEBSOCKETS.take(1 << 62)
        conn.sock.setblocking(False)
        try:
            self.poller.register(conn.sock, selectors.EVENT_READ, link.ready)
        except (OSError, ValueError, KeyError):  # its socket is gone already: counted and closed as any end
            link.end()
            return
        link.apply(outcome)

    def ended(self, link: Link) -> None:
        self.links.discard(link)
        streams.WEBSOCKETS.give_back()
        streams.CLAIMS.give_back()
        self.drop(link.conn)

    def timeout(self, timeout: float) -> float:
        """The loop's select timeout while connections are held: at most streams.TICK.

        Not the soonest deadline of every connection: that is a pass over all
        of them on every turn of the loop, which under load turns thousands of
        times a second. Pings and dead-peer timeouts are seconds; a quarter of
        one late is nothing.
        """
        return min(timeout, streams.TICK)

    def tick(self) -> None:
        """Pings, dead peers and unanswered closes: every connection looked at, at most once per streams.TICK."""
        now = time.monotonic()
        if now < self._tick_at:
            return
        self._tick_at = now + streams.TICK
        for link in list(self.links):
            if link.ws.next_deadline() <= now:
                link.apply(link.ws.tick(now))

    def close_all(self, code: int = GOING_AWAY, reason: str = "the gateway worker is stopping: reconnect") -> None:
        """A stopping worker: every connection closed (1001); the clients' close frames, or CLOSE_TIMEOUT, end them."""
        for link in list(self.links):
            link.close(code, reason)

    def end_all(self) -> None:
        """What the loop still holds as it exits: closed frames sent where they fit, every socket closed."""
        for link in list(self.links):
            link.close(GOING_AWAY, "the gateway worker is stopping: reconnect")
            link.end()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, link: Link, message: dict[str, Any]) -> None:
        if not jsonrpc.is_request(message):
            # Its cancellations cut a request short; the client's responses and other notifications
            # are ignored: a pooled process has nothing to ask the client, as over HTTP.
            if message.get("method") == "notifications/cancelled":
                link.cancelled(message)
            return
        if link.serving >= MAX_SERVING:
            link.send_message(jsonrpc.error(message["id"], errors.OVERLOADED, (
                f"{MAX_SERVING} requests are in progress on this WebSocket connection, the most the gateway "
                "serves for one; wait for their answers")))
            return
        link.serving += 1
        cancel = Cancellation()
        key = _key(message["id"])
        if key is not None:
            # A second request reusing an id in flight takes it over: a cancellation names the latest.
            link.in_flight[key] = cancel
        try:
            self.executor.submit(self._serve, link, message, key, cancel)
        except RuntimeError:  # shut down: the worker is going
            link.fail()

    # --- in a serving thread --------------------------------------------------------

    def _serve(self, link: Link, message: dict[str, Any], key: Any, cancel: Cancellation) -> None:
        answered = False

        def send(reply: dict[str, Any], final: bool) -> None:
            nonlocal answered
            kept = None if cancel.cancelled else reply  # a cancelled request gets no answer (basic/utilities/cancellation)
            if final:
                # The answer and the request's share given back in one step of the loop: a client
                # that sends again as soon as it reads the answer finds its share free.
                answered = True
                self.defer(link.answered, kept, key, cancel)
            elif kept is not None:
                self.defer(link.send_message, kept)

        try:
            serve_message(self.gateway(), self.app, link.ws, link.environ, message, send, cancel)
        except Exception:  # a fault of ours: this connection ends, the worker goes on
            log.exception("serving a WebSocket message failed")
            self.defer(link.fail)
        finally:
            if not answered:
                self.defer(link.served, key, cancel)


def _key(request_id: Any) -> Any:
    """A JSON-RPC id as a key of Link.in_flight (a string or a number), or None."""
    return request_id if isinstance(request_id, (str, int, float)) and not isinstance(request_id, bool) else None


def serve_message(gateway: Gateway, app: Flask, ws: WebSocketConnection, environ: dict[str, Any],
                  message: dict[str, Any], send: Callable[[dict[str, Any], bool], None],
                  cancel: Cancellation | None = None) -> None:
    """One JSON-RPC request of a connection, served as a bridged POST; what answers it goes to `send`
    (the message, and whether it is the final one).

    Cancelled (the client's notifications/cancelled, or the connection gone),
    the request ends with no message and 499 in its access line.
    """
    session = ws.session
    assert session is not None
    server_id = session.server_id
    exchange = Exchange.begin(environ, server_id=server_id, path=environ.get("PATH_INFO", "/"))
    exchange.method = "WS"
    exchange.principal = session.principal
    exchange.rpc_id = message.get("id")
    exchange.mcp_method = str(message.get("method"))
    status = 200
    try:
        upstream = gateway.checkout(server_id, exchange)
        if WebSocketSession.is_initialize(message):
            send(session.initialize(message, upstream.hello()), True)
            return
        client = session.context(message)
        if client.era == protocol.LEGACY and message.get("method") == "logging/setLevel":
            send(session.set_level(message), True)  # never to a shared process (serving.Local.SET_LEVEL)
            return
        body = jsonrpc.encode(message)
        replies = upstream.call(message, body, client, exchange.request_id, cancel)
        try:
            for reply in replies:
                exchange.upstream = reply.origin or exchange.upstream
                if reply.final and "error" in reply.message:
                    exchange.rpc_error = True
                send(reply.message, reply.final)
        finally:
            close = getattr(replies, "close", None)
            if close is not None:
                close()  # a stdio call not finished (the client went) is cancelled
    except errors.GatewayError as exc:
        status = exc.http_status
        exchange.rpc_error = True
        send(jsonrpc.error(message.get("id"), exc.code, exc.message, exc.data), True)  # dropped if it was cancelled
    finally:
        if cancel is not None and cancel.cancelled:
            status = errors.Cancelled.http_status  # however it ended: no answer was owed
            exchange.rpc_error = False
        exchange.finish(app, status)
