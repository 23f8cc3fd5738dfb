"""gunicorn's threaded worker, with two changes for kept-alive clients and two for bad ones.

1. It takes only its fair share of new connections. gunicorn's workers share
one listening socket, and whichever wakes first accepts. A client that opens
a burst of keep-alive connections (a load generator, nginx filling its
upstream keepalive pool, an AI client's HTTP pool) can land most of them on
one worker. That worker then does all the work on one core while its
siblings idle: the benchmark saw all 8 of wrk's connections on one of 2
workers in one run of five (615 req/s, against about 1,040 with an even
split), and 5/3 splits in two more.

Each worker publishes how many connections it holds in a small table of
memory shared with the master and every sibling (an anonymous shared mmap
made in the master, inherited through fork). A worker asked to accept while
it holds more connections than its least loaded sibling steps back from the
listening socket for `ACCEPT_PAUSE`, so that sibling takes the connection;
then it takes whatever connection is still waiting. So a sibling that is
busy, hung or full never leaves a client waiting longer than that.

2. The thread that answered a request waits briefly for the next one on the
same connection. Stock gthread hands every request of a kept-alive
connection from its polling thread to a pool thread and back: two thread
wake-ups, a pipe write and read, and four epoll changes per request, about
a third of a stdio call's CPU in the worker (README, Performance). A client
that sends its next request within `KEEPALIVE_LINGER` is served by the same
thread with none of that. Only while the worker holds no more connections
than threads, so a waiting thread never keeps another connection from one;
past that, or when the wait runs out, the connection goes back to the
poller as in stock gthread.

3. A thread gets a connection only once its whole request has arrived, and
never waits on a client for longer than the registry says. Stock gthread
hands a connection to a thread as soon as it is readable and the thread
reads the request blocking, so clients that send their headers or body a
byte at a time (or connect and send nothing) could hold every thread. Here
the polling thread reads requests without blocking (gateway/inbound.py)
and cuts, with one log line, a client whose headers have not all arrived
within `gateway.header_timeout` or whose body has not within
`gateway.body_timeout`. While a thread serves a request the socket has a
timeout of `gateway.send_timeout`: a client that stops reading the answer
is cut when a write to it has not completed by then.

4. Requests its HTTP parser refuses (a NUL in a header, a bad request line
or chunk size, ...) get a JSON-RPC error, as every other error of the
gateway, instead of gunicorn's HTML page; the log line says what was wrong,
with its control characters escaped.

5. A connection closed while request bytes are still unread (the rest of a
body over `max_body_bytes`, a request refused before its body) first reads
and discards them, for at most `DRAIN_SECONDS`: the rest of the body by its
framing, anything else as nginx's lingering close does (FIN after the
answer, then read until the client closes). Closing with unread bytes makes
the kernel send a reset, and a client still sending its body then sees the
reset instead of the answer. gunicorn itself discards only 64 KiB.

6. A pass-through SSE answer holds no thread while it streams. The app's
body for one is a `streams.RelayBody`; the thread sends the headers, takes
the upstream socket and returns at once (`RELAYED`, like gunicorn's own
_DEFER), and this worker's main thread, the one running gunicorn's selector
loop, relays the stream (gateway/streams.py) and, when it ends, closes the
connection or gives it back to the keep-alive handling. A stopping worker
ends its streams just before its graceful timeout runs out.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import select
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from contextlib import suppress
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import ThreadWorker

from . import bulkhead, errors, jsonrpc, owners, streams
from .inbound import CONTINUE, Inbound
from .logtext import clean
from .registry import GatewaySettings
from .websocket import Outcome
from .ws_handshake import RequestHeaders, is_websocket_request

if TYPE_CHECKING:
    # Imported when the worker runs: it brings the app's modules (metrics), which the master must not import.
    from . import ws_serving

log = logging.getLogger(__name__)

# Long enough for a sibling to be scheduled and accept even on a saturated
# machine (20 ms was not, with two CPU hogs on 2 cores); it is only ever
# waited out when no sibling takes the connection. nginx's accept_mutex_delay,
# for the same purpose, is 500 ms.
ACCEPT_PAUSE = 0.05

# Long enough for a client's next request to arrive on a busy machine, short
# enough that a worker beginning to stop does not notice it.
KEEPALIVE_LINGER = 0.01

FREE, BOOTING, STOPPING = 0, -1, -2  # a slot's owner field; a pid when it is accepting

# How long a closing connection may go on reading what the client still sends
# (change 4). It holds the thread that long at most; nginx's lingering_time is 30 s.
DRAIN_SECONDS = 3.0

# The status of what gunicorn's parser refuses, where it is not 400 (the most specific class wins).
REFUSAL_STATUS: dict[type[BaseException], int] = {
    http_errors.LimitRequestLine: 414,
    http_errors.LimitRequestHeaders: 431,
    http_errors.ExpectationFailed: 417,
    http_errors.ForbiddenProxyRequest: 403,
    http_errors.UnsupportedTransferCoding: 501,
    http_errors.ConfigurationProblem: 500,
    # A header the application tried to send is the application's fault.
    http_errors.InvalidResponseHeader: 500,
    http_errors.InvalidResponseHeaderName: 500,
}


# Most bytes read from a client per readiness event: a large body does not keep
# the polling thread from the other connections for long.
READ_SIZE = 65536
# How often the polling thread looks for clients past their deadline; they are cut within this of it.
CUT_INTERVAL = 0.25
DEFAULTS = GatewaySettings()
# What handle() returns for a connection whose stream the relay takes over (change 6).
RELAYED = object()
# A stopping worker ends its streams this long before its graceful timeout runs out, so they end
# cleanly (final chunk) before the loop gives up on its connections.
STREAMS_END_MARGIN = 0.5


class ConnectionTable:
    """Slots of (owner, open connections), shared by the master and the workers it forks.

    The master claims a slot for each worker before forking it and frees it
    when gunicorn reaps the worker (`release`, from the child_exit hook), so a
    slot is never reused while its worker lives. Reads race with writes by
    design: each cell is one aligned 8-byte word, and a stale count only
    makes a worker step back once more or once less.
    """

    SLOTS = 256  # workers of two generations during a HUP, with room to spare

    def __init__(self) -> None:
        self._memory = mmap.mmap(-1, self.SLOTS * 2 * 8)  # MAP_SHARED | MAP_ANONYMOUS
        self._cells = memoryview(self._memory).cast("q")

    def claim(self) -> int | None:
        """A free slot for a worker about to be forked (None: all taken, so no balancing)."""
        for slot in range(self.SLOTS):
            if self._cells[2 * slot] == FREE:
                self._cells[2 * slot] = BOOTING
                self._cells[2 * slot + 1] = 0
                return slot
        return None

    def release(self, slot: int) -> None:
        self._cells[2 * slot] = FREE

    def set_owner(self, slot: int, owner: int) -> None:
        self._cells[2 * slot] = owner

    def set_connections(self, slot: int, count: int) -> None:
        self._cells[2 * slot + 1] = count

    def fewest_elsewhere(self, slot: int) -> int | None:
        """The fewest connections any other accepting worker holds (None: there is none)."""
        cells = self._cells
        fewest: int | None = None
        for other in range(self.SLOTS):
            if other != slot and cells[2 * other] > 0:
                count = cells[2 * other + 1]
                if fewest is None or count < fewest:
                    fewest = count
        return fewest


TABLE = ConnectionTable()


class GatewayThreadWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn ships no type hints
    """`worker_class = "gateway.worker.GatewayThreadWorker"`: gthread plus the two changes above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # runs in the master, before the fork
        self.balance_slot = TABLE.claim()
        self._resume_accept_at = 0.0
        self._inbound: dict[Any, Inbound] = {}  # connections whose request the polling thread is reading
        self._cut_check_at = 0.0
        self._serving = threading.local()  # the connection a pool thread serves (change 6)
        self._streams_end_at: float | None = None
        self.relay: streams.Relay | None = None
        self.hub: ws_serving.Hub | None = None
        self._owner_listener: socket.socket | None = None
        self._owner_address: str | None = None

    def init_process(self) -> None:
        if self.balance_slot is not None:
            TABLE.set_owner(self.balance_slot, os.getpid())
        # Change 7: requests of the sessions this worker holds, relayed by its siblings (owners.py),
        # arrive on a Unix socket of its own, served by this loop as any connection.
        self._owner_listener = owners.listen()
        if self._owner_listener is not None:
            self._owner_address = self._owner_listener.getsockname()
            self.sockets = [*self.sockets, self._owner_listener]  # type: ignore[has-type]  # set by gunicorn, untyped
        bulkhead.set_worker_threads(self.cfg.threads)  # before the app (and its upstreams) is made
        # Requests read whole and waiting for a thread, by the server their path names.
        self._waiting: dict[str | None, int] = {}
        self._waiting_lock = threading.Lock()
        bulkhead.threads_wanted = self._threads_wanted
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = _Relaying(self.wsgi, self._take_stream, self._take_websocket,  # type: ignore[has-type]  # set by gunicorn, untyped
                              self._via_owner_socket)

    def run(self) -> None:
        self.relay = streams.Relay(self.poller, self._settings, self._keep_after_stream, self._drop_after_stream, _peer)
        # In the worker, after gunicorn.conf set the metrics up (see the import above).
        from . import ws_serving

        self.hub = ws_serving.Hub(self.poller, self.method_queue.defer, self.wsgi, self._drop_after_stream, _peer)
        try:
            super().run()
        finally:
            owners.unlisten(self._owner_listener, self._owner_address)
            self.relay.end_all()  # what the loop left (a parent gone, the grace run out): every fd closed
            self.hub.end_all()

    def _via_owner_socket(self) -> bool:
        """Whether the request a pool thread serves came in on this worker's owner socket (change 7)."""
        conn = getattr(self._serving, "conn", None)
        return conn is not None and self._owner_address is not None and conn.server == self._owner_address

    # --- change 6: streams are relayed by this loop ------------------------------------

    def _take_stream(self, body: streams.RelayBody, start_response: Any) -> Any:
        """In the pool thread: send the stream's headers and keep it for the relay; the thread is then free."""
        conn = getattr(self._serving, "conn", None)
        resp = getattr(start_response, "__self__", None)
        if conn is None or conn.is_http2 or self.cfg.is_ssl or not isinstance(resp, gunicorn_wsgi.Response):
            return body  # iterated by this thread, as any body
        try:
            feed = body.take()
            if feed is None:
                return body
            resp.send_headers()
        except BaseException:
            body.close()
            raise
        keep_alive = not resp.should_close()
        chunked, resp.chunked = resp.chunked, False  # the relay frames the body; gunicorn must not end it
        assert self.relay is not None  # made in run(), before any request
        conn.gateway_relayed = (partial(self.relay.start, conn, body, feed, chunked, keep_alive), body.close)
        return ()

    def _take_websocket(self, environ: dict[str, Any], start_response: Any) -> Any:
        """In the pool thread: a WebSocket upgrade checked; accepted, its socket is kept for the loop (None: not ours)."""
        conn = getattr(self._serving, "conn", None)
        resp = getattr(start_response, "__self__", None)
        gateway = getattr(self.wsgi, "extensions", {}).get("mcp_gateway")
        if (conn is None or conn.is_http2 or self.cfg.is_ssl or gateway is None
                or not isinstance(resp, gunicorn_wsgi.Response)):
            return None  # served by the app, which has no WebSocket: its answer says so
        from . import ws_serving

        gateway.start()
        ws, outcome = ws_serving.upgrade(gateway, environ, time.monotonic())
        if outcome.accepted is not None and not streams.CLAIMS.take(gateway.registry.gateway.max_streams):
            outcome = Outcome(ws_serving.too_many(gateway.registry.gateway.max_streams), closed=True)
        status = outcome.to_send[9:12].decode("latin-1") if outcome.to_send.startswith(b"HTTP/1.1 ") else "500"
        start_response(f"{status} WebSocket", [])
        resp.headers_sent = True  # the answer is the sans-IO module's own bytes
        resp.chunked = False
        if outcome.accepted is None:
            resp.force_close()
            with suppress(OSError):
                conn.sock.sendall(outcome.to_send)  # the refusal, before any upgrade
            return ()
        assert self.hub is not None  # made in run(), before any request
        kept = ws_serving.kept_environ(environ)
        conn.gateway_relayed = (partial(self.hub.start, conn, ws, outcome, kept), streams.CLAIMS.give_back)
        return ()

    def _keepalive_after(self, conn: Any, keepalive: Any) -> Any:
        if keepalive is RELAYED:
            return RELAYED  # the body was read whole before the answer began
        return super()._keepalive_after(conn, keepalive)

    def finish_request(self, conn: Any, fs: Any) -> None:
        relayed = getattr(conn, "gateway_relayed", None)
        if relayed is not None:
            start, undo = relayed
            del conn.gateway_relayed
            if not fs.cancelled() and fs.exception() is None and fs.result() is RELAYED:
                start()  # a stream to the relay, or an upgraded connection to the hub
                return
            undo()  # the thread failed after the hand-over began: what it took is given back here
        super().finish_request(conn, fs)

    def _end_streams_in_time(self) -> None:
        """A stopping worker's streams end (final chunk, connection closed) as its graceful timeout runs out."""
        assert self.relay is not None
        now = time.monotonic()
        if self._streams_end_at is None:  # stopping after max_requests: no signal said when it began
            self._streams_end_at = now + max(0.0, self.cfg.graceful_timeout - STREAMS_END_MARGIN)
        self.relay.alive = False
        if now >= self._streams_end_at:
            if self.hub is not None and self.hub.links:
                log.info("worker stopping: closing %d WebSocket connections (1001)", len(self.hub.links))
                self.hub.close_all()
            log.info("worker stopping: ending %d streams so their clients reconnect", len(self.relay.streams))
            self.relay.end_all()

    def _keep_after_stream(self, conn: Any) -> None:
        """A stream ended cleanly on a kept-alive connection: back to gunicorn's keep-alive handling."""
        done: futures.Future[bool] = futures.Future()
        done.set_result(True)
        super().finish_request(conn, done)

    def _drop_after_stream(self, conn: Any) -> None:
        self.nr_conns -= 1
        _close_now(conn.sock)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # A stopping worker accepts nothing more, so siblings must not wait for it.
        if self.balance_slot is not None:
            TABLE.set_owner(self.balance_slot, STOPPING)
        if self._streams_end_at is None:
            self._streams_end_at = time.monotonic() + max(0.0, self.cfg.graceful_timeout - STREAMS_END_MARGIN)
        super().handle_exit(sig, frame)

    def handle(self, conn: Any) -> Any:
        """Serve a connection's request, and its next ones while they come soon (change 2)."""
        self._has_thread(conn)
        keep = super().handle(conn)
        while keep is True and self._may_linger(conn) and self._whole_request_soon(conn):
            keep = super().handle(conn)
        if keep is False and not conn.is_http2 and not self.cfg.is_ssl:
            _drain_before_close(conn)  # change 4; gunicorn's loop closes the socket next
        return keep

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Answer a request gunicorn could not parse (or serve) with a JSON-RPC error (change 3)."""
        status = refusal_status(exc)
        peer = addr[0] if addr else "-"
        if status == 500:
            self.log.exception("error serving a request from %s", peer)
            message, code = "internal gateway error", errors.INTERNAL_ERROR
        else:
            what = clean(str(exc), 200)
            self.log.warning("could not read an HTTP request from %s: %s", peer, what)
            message, code = f"the gateway could not read this HTTP request: {what}", errors.INVALID_REQUEST
        body = jsonrpc.encode(jsonrpc.error(None, code, message))
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        try:
            util.write_nonblock(client, head.encode("latin-1") + body)
        except OSError:
            self.log.debug("could not send the error answer to %s", peer)


    def _whole_request_soon(self, conn: Any) -> bool:
        """Whether the connection's next request arrives whole within KEEPALIVE_LINGER (change 3).

        Whatever part of it did arrive stays buffered, and the polling
        thread reads the rest (finish_request hands a connection with
        buffered bytes back to enqueue_req).
        """
        buffered = conn.parser.unreader.take_buffered()
        if not buffered and not _readable_soon(conn):
            return False
        inbound = self._inbound_for(buffered)
        conn.sock.setblocking(False)
        try:
            ended = _receive(conn.sock, inbound)
        finally:
            conn.sock.setblocking(True)
            conn.parser.unreader.unread(bytes(inbound.buffer))
        # An ended connection goes on too: the parser finds the end without waiting.
        return ended or inbound.complete()

    def handle_request(self, req: Any, conn: Any) -> Any:
        """Serve one request, giving up on a client that does not take the answer (change 3)."""
        if getattr(conn, "gateway_continued", False):
            conn.gateway_continued = False
            req._expected_100_continue = False  # the polling thread has sent "100 Continue" already
        timeout = self._settings().send_timeout
        conn.sock.settimeout(timeout)
        self._serving.conn = conn
        try:
            keep = super().handle_request(req, conn)
        except TimeoutError:
            log.warning("slow client %s cut: did not read the answer within %gs", _peer(conn), timeout)
            _close_now(conn.sock)
            return False
        finally:
            self._serving.conn = None
        if getattr(conn, "gateway_relayed", None) is not None:
            return RELAYED
        return keep

    def _may_linger(self, conn: Any) -> bool:
        # Read from a pool thread: nr_conns and alive are plain values the loop
        # thread writes, and a stale read costs one linger more or less.
        # Relayed streams and WebSockets hold connections but no thread: they do not count here.
        return bool(self.alive and not conn.is_http2 and self.nr_conns - streams.CLAIMS.count <= self.cfg.threads)

    def accept(self, listener: Any) -> None:
        slot = self.balance_slot
        if slot is not None and listener is not self._owner_listener:  # only this worker may take those
            fewest = TABLE.fewest_elsewhere(slot)
            if fewest is not None and self.nr_conns > fewest:
                self._resume_accept_at = time.monotonic() + ACCEPT_PAUSE
                super().set_accept_enabled(False)
                return
        self._accept_one(listener)

    def _accept_one(self, listener: Any) -> None:
        super().accept(listener)  # the listener is non-blocking: nothing waiting is no error
        if self.balance_slot is not None:
            TABLE.set_connections(self.balance_slot, self.nr_conns)

    # --- change 3: requests are read whole by the polling thread ---------------------

    def enqueue_req(self, conn: Any) -> None:
        """Hand `conn` to a thread once its request is all there; until then read it here."""
        if getattr(conn, "gateway_whole", False):
            conn.gateway_whole = False
            server = getattr(conn, "gateway_server", None)
            if server != NO_REQUEST:
                self._waits_for_thread(conn, server)
            super().enqueue_req(conn)
        elif self.cfg.is_ssl or conn.is_http2 or negotiation.prior_knowledge_allowed(self.cfg, conn.client):
            self._waits_for_thread(conn, None)  # its server is not known: any server's
            super().enqueue_req(conn)  # TLS and HTTP/2 are read by their own machinery, as in stock gthread
        else:
            self._read_request(conn)

    def _threads_wanted(self, server_id: str) -> bool:
        """Whether a request for another server than `server_id` is waiting for a thread (gateway/bulkhead.py)."""
        with self._waiting_lock:
            return any(count for target, count in self._waiting.items() if target != server_id)

    def _waits_for_thread(self, conn: Any, target: str | None) -> None:
        with self._waiting_lock:
            self._waiting[target] = self._waiting.get(target, 0) + 1
        conn.gateway_target = target

    def _has_thread(self, conn: Any) -> None:
        if not hasattr(conn, "gateway_target"):
            return
        target: str | None = conn.gateway_target
        del conn.gateway_target
        with self._waiting_lock:
            self._waiting[target] -= 1

    def _settings(self) -> GatewaySettings:
        gateway = getattr(self.wsgi, "extensions", {}).get("mcp_gateway")
        return gateway.registry.gateway if gateway is not None else DEFAULTS

    def _inbound_for(self, buffered: bytes) -> Inbound:
        settings = self._settings()
        return Inbound(buffered, settings.header_timeout, settings.body_timeout, settings.max_body_bytes)

    def _read_request(self, conn: Any) -> None:
        """Start reading a request: a new connection, or a kept-alive one that became readable."""
        buffered = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        inbound = self._inbound_for(buffered)
        conn.sock.setblocking(False)
        ended = _receive(conn.sock, inbound)
        if inbound.complete() or ended:
            self._hand_over(conn, inbound)
            return
        self._inbound[conn] = inbound
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_request_readable, conn))
        self._continue_if_asked(conn, inbound)

    def _on_request_readable(self, conn: Any, client: Any) -> None:
        inbound = self._inbound[conn]
        ended = _receive(conn.sock, inbound)
        if inbound.complete() or ended:
            self.poller.unregister(client)
            del self._inbound[conn]
            self._hand_over(conn, inbound)
        else:
            self._continue_if_asked(conn, inbound)

    @staticmethod
    def _continue_if_asked(conn: Any, inbound: Inbound) -> None:
        # A client that sent "Expect: 100-continue" waits for this before it sends the body.
        if inbound.wants_continue and inbound.reading_body and not inbound.continued:
            inbound.continued = True
            with suppress(OSError):  # a full buffer or a gone client: the body deadline decides
                conn.sock.send(CONTINUE)

    def _hand_over(self, conn: Any, inbound: Inbound) -> None:
        """To a thread, with the request in the parser's buffer: it is read without waiting on the client."""
        conn.init()  # plain HTTP/1 here (see enqueue_req): only makes the parser
        conn.parser.unreader.unread(bytes(inbound.buffer))
        conn.data_ready = True  # no wait for data in the thread
        conn.gateway_continued = inbound.continued
        # A client that closed without sending anything (a kept-alive connection ending) leaves a
        # socket to close, not a request: no queued request should give its thread up for it.
        conn.gateway_server = _server_of(inbound.buffer) if inbound.buffer else NO_REQUEST
        conn.gateway_whole = True
        self.enqueue_req(conn)

    def _cut_slow_clients(self) -> None:
        now = time.monotonic()
        if now < self._cut_check_at:
            return
        self._cut_check_at = now + CUT_INTERVAL
        for conn, inbound in list(self._inbound.items()):
            stopping_idle = not self.alive and not inbound.buffer  # nothing begun: nothing to finish
            if stopping_idle or inbound.expired(now):
                del self._inbound[conn]
                with suppress(KeyError, ValueError):
                    self.poller.unregister(conn.sock)
                self.nr_conns -= 1
                if not stopping_idle:
                    log.warning("slow client %s cut: %s", _peer(conn), inbound.what())
                    _answer_timeout(conn.sock, inbound.what())
                _close_now(conn.sock)

    def set_accept_enabled(self, enabled: bool) -> None:
        # gunicorn's loop re-enables accepting whenever there is room; not while stepped back.
        if enabled and self._resume_accept_at:
            return
        super().set_accept_enabled(enabled)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self._resume_accept_at:
            left = self._resume_accept_at - time.monotonic()
            if left > 0:
                timeout = min(timeout, left)
            else:
                self._resume_accept_at = 0.0
                if self.alive and self.nr_conns < self.worker_connections:
                    super().set_accept_enabled(True)
                    for listener in self.sockets:  # what the siblings left waiting is this worker's
                        self._accept_one(listener)
        relay = self.relay
        if relay is not None and relay.streams:
            timeout = relay.timeout(timeout)
        hub = self.hub
        if hub is not None and hub.links:
            timeout = hub.timeout(timeout)
        if not self.alive and ((relay is not None and relay.streams) or (hub is not None and hub.links)):
            self._end_streams_in_time()
        try:
            for key, mask in self.poller.select(timeout):
                # Relayed sockets need to know which way they are ready; gunicorn's callbacks do not.
                if type(key.data) is streams.Watch:
                    key.data.ready(mask)
                else:
                    key.data(key.fileobj)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
        if relay is not None and relay.streams:
            relay.tick()
        if hub is not None and hub.links:
            hub.tick()
        if self._inbound:
            self._cut_slow_clients()
        if self.balance_slot is not None:
            # Connections also end in this loop (closed, timed out); keep the count current.
            TABLE.set_connections(self.balance_slot, self.nr_conns)


class _Relaying:
    """The WSGI app, with a relayable body taken for the relay (change 6); the app's attributes are its own."""

    def __init__(self, app: Any, take: Callable[[streams.RelayBody, Any], Any],
                 take_websocket: Callable[[dict[str, Any], Any], Any], via_owner_socket: Callable[[], bool]):
        self._app = app
        self._take = take
        self._take_websocket = take_websocket
        self._via_owner_socket = via_owner_socket

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if self._via_owner_socket() and not self._forwarded(environ):
            body = jsonrpc.encode(jsonrpc.error(None, errors.INVALID_REQUEST,
                                                "this socket takes only requests relayed by the gateway's workers"))
            start_response("403 Forbidden", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if environ["REQUEST_METHOD"] == "GET" and _may_be_websocket(environ):
            taken = self._take_websocket(environ, start_response)
            if taken is not None:
                return taken
        result = self._app(environ, start_response)
        if type(result) is streams.RelayBody:  # one check per request: the rest is the stream's own
            return self._take(result, start_response)
        return result

    def _forwarded(self, environ: dict[str, Any]) -> bool:
        gateway = getattr(self._app, "extensions", {}).get("mcp_gateway")
        if gateway is None or not owners.admitted(gateway.forward_keys, environ):
            return False
        environ[owners.FORWARDED_ENVIRON] = True
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._app, name)


def _may_be_websocket(environ: dict[str, Any]) -> bool:
    path = environ.get("PATH_INFO", "")
    headers = RequestHeaders.of({"Upgrade": environ["HTTP_UPGRADE"]} if "HTTP_UPGRADE" in environ else {})
    return is_websocket_request("GET", path, headers)


def _readable_soon(conn: Any) -> bool:
    """Whether the connection has bytes (or its end) to read within KEEPALIVE_LINGER."""
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return bool(poller.poll(KEEPALIVE_LINGER * 1000))


def refusal_status(exc: BaseException) -> int:
    """The HTTP status answering `exc`, raised while gunicorn read or served a request."""
    for kind in type(exc).__mro__:
        if kind in REFUSAL_STATUS:
            return REFUSAL_STATUS[kind]
    return 400 if isinstance(exc, http_errors.ParseException) else 500


def _drain_before_close(conn: Any) -> None:
    """Read and discard what the client still sends, for a bounded time, so that closing sends no reset."""
    sock = conn.sock
    if sock.fileno() < 0:
        return  # gunicorn closed it already
    deadline = time.monotonic() + DRAIN_SECONDS
    finished = not _body_unfinished(conn.parser)
    if not finished:
        # The rest of a body the answer did not need: read through its framing, so a
        # client still sending it is done when the last byte is in, whatever its speed.
        with suppress(Exception):  # malformed, reset, or past the deadline: drained raw below
            finished = bool(conn.parser.finish_body(deadline=deadline, max_bytes=sys.maxsize))
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if finished and not poller.poll(0):
        return  # nothing unread: a plain close sends no reset
    buffer = bytearray(1 << 16)
    try:
        sock.shutdown(socket.SHUT_WR)  # the answer is complete; the client may stop sending
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv_into(buffer):
                break
    except OSError:
        pass  # reset, timed out, or gone: nothing more to wait for
    finally:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RD)  # so gunicorn's own graceful close finds nothing to read


def _body_unfinished(parser: Any) -> bool:
    """Whether the request on `parser` has body bytes not read yet (gunicorn's Body and its readers)."""
    body = getattr(getattr(parser, "mesg", None), "body", None)
    if body is None:
        return False
    if getattr(body, "failed", False):
        return True  # reading it raised: where it ends is unknown
    reader = getattr(body, "reader", None)
    return getattr(reader, "length", 0) > 0 or getattr(reader, "parser", None) is not None  # Length / ChunkedReader


NO_REQUEST = ""  # as a connection's server: nothing arrived to serve


def _server_of(request: bytes | bytearray) -> str | None:
    """The server id a request's path names (`POST /<id>/...`), or None for no MCP route."""
    line = bytes(request[:request.find(b"\r\n")]) if b"\r\n" in request else b""
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1].startswith(b"/"):
        return None
    return parts[1][1:].split(b"/", 1)[0].split(b"?", 1)[0].decode("latin-1") or None


def _receive(sock: socket.socket, inbound: Inbound) -> bool:
    """What has arrived on the non-blocking `sock`, added to `inbound`; True when the client is gone."""
    try:
        data = sock.recv(READ_SIZE)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    inbound.buffer += data
    return not data


def _peer(conn: Any) -> str:
    client = conn.client
    return clean(f"{client[0]}:{client[1]}" if isinstance(client, tuple) and len(client) >= 2 else str(client))


def _answer_timeout(sock: socket.socket, what: str) -> None:
    """A best-effort 408 with a JSON-RPC error, without waiting: the client is not reading anyway."""
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": what}}).encode()
    head = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    try:
        sock.setblocking(False)
        sock.send(head + body)
    except OSError:
        pass


def _close_now(sock: socket.socket) -> None:
    """Close without lingering: gunicorn's graceful close would wait on this client from the polling thread."""
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def release(worker: Any) -> None:
    """From the master's child_exit hook: the worker is gone, its slot is free again."""
    slot = getattr(worker, "balance_slot", None)
    if slot is not None:
        TABLE.release(slot)
