"""Long-lived HTTP pass-through streams, relayed by the worker's event loop instead of a thread each.

A pass-through SSE answer (the answer to a POST, or a handshake-era GET
stream) is made by carry_out.py as a `RelayBody`. Under gunicorn's thread
pool alone it is iterated like any body. Under gateway/worker.py the request
thread sends its headers, takes the upstream socket out of urllib3
(`Handoff`) and returns to the pool; the worker's main thread, the one
that runs gunicorn's selector loop, then relays the stream (`Relay`):
it reads the upstream without blocking, decodes its framing, cuts it into
SSE events, applies the per-event transform (MRTR requestState wrapping),
frames it as chunked for the client and writes without blocking. It also
watches the client (gone: the upstream is closed at once), bounds what a
client leaves unread (`stream_buffer_bytes`), sends SSE keep-alive comments
on idle streams and ends every stream when the worker stops.

The relay knows a stream only as a `Feed`: a file descriptor to watch and
what to send when it is readable. `SocketFeed` is an HTTP upstream's
socket (pass-through); a stdio process's stdout is another
(gateway/upstreams/stdio.py). A feed ends itself (its source done or
broken) or is abandoned by the stream (the client gone or too slow, the
worker stopping), and then lets its source go: an upstream connection
closed, a process's request cancelled.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from . import errors

if TYPE_CHECKING:
    from flask import Response

    from .cancel import Cancellation
    from .exchange import Exchange

log = logging.getLogger(__name__)

READ_SIZE = 65536
KEEPALIVE_COMMENT = b": keep-alive\n\n"
FINAL_CHUNK = b"0\r\n\r\n"
# How often the loop looks at idle streams and flush deadlines at most.
TICK = 0.25


# --- how many streams a worker holds ------------------------------------------------


class Claims:
    """Streams of this worker (a process), counted from the answer that starts one to its end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def full(self, limit: int) -> bool:
        return self.count >= limit

    def take(self, limit: int) -> bool:
        with self._lock:
            if self.count >= limit:
                return False
            self.count += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.count -= 1


CLAIMS = Claims()
# WebSocket connections this worker holds (ws_serving.py); each is also one of CLAIMS.
WEBSOCKETS = Claims()


# --- framings of the upstream's body ---------------------------------------------------


class Framing(Protocol):
    """An incremental decoder of an HTTP body's framing."""

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """The payload in `data`, and whether the body ended; ValueError when the framing is broken."""

    def closed(self) -> bool:
        """Whether the connection's end is a clean end of the body."""

    def complete(self) -> bool:
        """Whether the whole body has arrived, so the connection could carry another request."""


class UntilClose:
    def feed(self, data: bytes) -> tuple[bytes, bool]:
        return data, False

    def closed(self) -> bool:
        return True

    def complete(self) -> bool:
        return False  # only the connection's end ends the body


class Length:
    def __init__(self, length: int):
        self.left = length

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        if len(data) > self.left:
            raise ValueError(f"sent {len(data) - self.left} bytes past its Content-Length")
        self.left -= len(data)
        return data, self.left == 0

    def closed(self) -> bool:
        return self.left == 0

    complete = closed


class Chunked:
    """Transfer-Encoding: chunked, decoded as it arrives (RFC 9112 7.1)."""

    MAX_LINE = 4096

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._left = -1  # bytes of the current chunk still to come; -1: a size line is next
        self._trailers = False
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        self._buffer += data
        out = bytearray()
        buffer = self._buffer
        while buffer and not self.done:
            if self._left > 0:
                take = min(self._left, len(buffer))
                out += buffer[:take]
                del buffer[:take]
                self._left -= take
                continue
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > self.MAX_LINE:
                    raise ValueError("a chunk line too long")
                break
            line = bytes(buffer[:end])
            del buffer[:end + 2]
            if self._trailers:
                self.done = not line  # trailers end with an empty line
            elif self._left == 0:  # the CRLF after a chunk's data
                if line:
                    raise ValueError("a chunk not followed by CRLF")
                self._left = -1
            else:
                size = line.split(b";", 1)[0].strip()
                try:
                    self._left = int(size, 16)
                except ValueError:
                    raise ValueError(f"a bad chunk size {size[:20]!r}") from None
                if self._left < 0:
                    raise ValueError("a negative chunk size")
                if self._left == 0:
                    self._trailers = True
        return bytes(out), self.done

    def closed(self) -> bool:
        return self.done

    complete = closed


# --- SSE events ---------------------------------------------------------------------------


class Events:
    """Cuts an SSE body into whole events (each ending with its blank line), line ends as LF."""

    def __init__(self) -> None:
        self.pending = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        pending = self.pending
        pending += data
        if b"\r" in pending:
            # A CR at the end may be half of a CRLF: leave it for the next read.
            tail = pending.endswith(b"\r")
            text = bytes(pending[:-1] if tail else pending).replace(b"\r\n", b"\n")
            pending[:] = text + (b"\r" if tail else b"")
        end = pending.rfind(b"\n\n")
        if end < 0:
            return []
        complete = bytes(pending[:end + 2])
        del pending[:end + 2]
        return [event + b"\n\n" for event in complete.split(b"\n\n") if event]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- the loop's sockets: non-blocking reads and writes, and their limit ------------------------


def receive(sock: socket.socket) -> bytes | None:
    """What has arrived on a non-blocking client socket: None for nothing yet, b"" for its end (or a failure)."""
    try:
        return sock.recv(READ_SIZE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def send_pending(sock: socket.socket, pending: bytearray) -> bool:
    """Send as much of `pending` as a non-blocking socket takes now (sent bytes removed); False: the peer is gone."""
    while pending:
        try:
            sent = sock.send(pending)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        del pending[:sent]
    return True


_BACKGROUND: futures.ThreadPoolExecutor | None = None
_BACKGROUND_LOCK = threading.Lock()
# Threads that wind down what a relayed stream let go when that blocks (a process's cancelled
# request read out for its grace, a refusal POSTed to an instance): never the loop's thread.
BACKGROUND_THREADS = 4


def in_background(job: Callable[[], None]) -> None:
    """Run a blocking wind-down off the loop (a bounded pool, made on first use); its errors are logged."""
    global _BACKGROUND
    with _BACKGROUND_LOCK:
        if _BACKGROUND is None:
            _BACKGROUND = futures.ThreadPoolExecutor(BACKGROUND_THREADS, thread_name_prefix="stream-release")
        executor = _BACKGROUND

    def run() -> None:
        try:
            job()
        except Exception:
            log.exception("error winding down a relayed stream")

    try:
        executor.submit(run)
    except RuntimeError:  # the interpreter is exiting: run it here rather than leak what it holds
        run()


def too_many(limit: int) -> errors.Overloaded:
    """A new stream or WebSocket past gateway.max_streams: 503 with Retry-After."""
    return errors.Overloaded(f"this gateway worker holds its most long-lived streams ({limit}, gateway.max_streams); "
                             "try again shortly", retry_after=1)


# --- what a stream reads from -----------------------------------------------------


@dataclass(slots=True)
class Fed:
    """What a feed gives the stream at one moment: bytes for the client, and whether (and how) the feed ended."""

    data: bytes = b""
    done: bool = False
    problem: str | None = None  # what broke, when done; None for a clean end


NOTHING = Fed()


class Feed(Protocol):
    """A relayed stream's source, driven by the loop's thread only.

    Once it returns a Fed that is done it has let its source go; otherwise
    `abandon` does, once, when the stream ends first.
    """

    def fileno(self) -> int:
        """What the loop watches for readability."""

    def start(self, limit: int) -> Fed:
        """What to send at once (read before the hand-over); `limit` bounds what may wait for a whole event."""

    def readable(self) -> Fed:
        """The descriptor is readable: what that gives."""

    def tick(self, now: float) -> Fed:
        """A look at the clock (about every TICK): a feed with a deadline ends itself here."""

    def abandon(self, reason: str) -> None:
        """The stream ended before the feed did (the client gone or slow, the worker stopping)."""


@runtime_checkable
class Source(Protocol):
    """An upstream's streaming body that can give its socket up (gateway/upstreams/transport.py)."""

    def __iter__(self) -> Iterator[bytes]: ...

    def __next__(self) -> bytes: ...

    def close(self) -> None: ...

    def hand_over(self) -> Handoff | None: ...


@dataclass
class Handoff:
    """An upstream socket with what was read from it already, and how to let it go."""

    sock: socket.socket
    buffered: bytes
    framing: Framing
    # Called once, from the loop's thread: None when the stream ended as it should, else what broke.
    release: Callable[[str | None], None]


class SocketFeed:
    """An HTTP upstream's SSE body (pass-through): its framing decoded, cut into events, each maybe transformed."""

    __slots__ = ("_released", "events", "handoff", "limit", "transform")

    def __init__(self, handoff: Handoff, transform: Callable[[bytes], bytes] | None):
        self.handoff = handoff
        self.transform = transform
        self.events = Events()
        self.limit = 1 << 20
        self._released = False

    def fileno(self) -> int:
        return self.handoff.sock.fileno()

    def start(self, limit: int) -> Fed:
        self.limit = limit
        self.handoff.sock.setblocking(False)
        return self._received(self.handoff.buffered) if self.handoff.buffered else NOTHING

    def readable(self) -> Fed:
        try:
            data = self.handoff.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return NOTHING
        except OSError as exc:
            return self._end(f"its stream broke: {exc}")
        if not data:
            return self._end(None if self.handoff.framing.closed() else "it closed its stream mid-answer")
        return self._received(data)

    def tick(self, now: float) -> Fed:
        return NOTHING

    def abandon(self, reason: str) -> None:
        self._release(None)  # the upstream connection is closed: nothing waits for the rest

    def _received(self, data: bytes) -> Fed:
        try:
            payload, done = self.handoff.framing.feed(data)
        except ValueError as exc:
            return self._end(f"its stream broke: {exc}")
        events = self.events.feed(payload)
        transform = self.transform
        out = b"".join(transform(event) for event in events) if transform is not None else b"".join(events)
        if len(self.events.pending) > self.limit:
            return self._end(f"it sent an event over {self.limit} bytes", out)
        return self._end(None, out) if done else Fed(out)

    def _end(self, problem: str | None, data: bytes = b"") -> Fed:
        self._release(problem)
        return Fed(data, True, problem)

    def _release(self, problem: str | None) -> None:
        if not self._released:
            self._released = True
            self.handoff.release(problem)


class RelayBody:
    """A WSGI body the worker may relay instead of iterating (else it iterates like any body).

    `fallback` is what a thread iterates; `hand_over` gives the feed the
    relay reads instead (None: it cannot, the thread iterates); `release`
    lets the source go either way (a no-op once a feed owns it). `close`
    ends the body, then closes the response (the exchange).
    """

    def __init__(self, fallback: Iterator[bytes], hand_over: Callable[[], Feed | None],
                 release: Callable[[], None], claimed: bool = True):
        self.fallback = fallback
        self._hand_over = hand_over
        self._release = release
        self.claimed = claimed  # it holds one of CLAIMS, given back at close
        self.on_close: Callable[[], None] | None = None  # the Flask response's close (`respond` sets it)
        self.what = ""  # for log lines: the request that opened the stream
        # Called when the relay takes the stream: the request's share of the threads is free (`respond` sets it).
        self.on_relay: Callable[[], None] | None = None
        # The request's cancellation (the client's notifications/cancelled, in_flight.py): the relay
        # ends a cancelled stream, its source let go, without an answer.
        self.cancel: Cancellation | None = None
        self._closed = False

    @classmethod
    def of_source(cls, source: Source, fallback: Iterator[bytes],
                  transform: Callable[[bytes], bytes] | None) -> RelayBody:
        """An HTTP upstream's streaming answer, relayed as a SocketFeed."""

        def hand_over() -> Feed | None:
            handoff = source.hand_over()
            return None if handoff is None else SocketFeed(handoff, transform)

        return cls(fallback, hand_over, source.close)

    def respond(self, exchange: Exchange, what: str = "", **options: Any) -> Response:
        """The Flask response that carries this body for `exchange` (`options`: status, headers, mimetype).

        Passed through as it is, so the body closes the response (and so the
        exchange); relayed, the exchange holds no thread (Exchange.detach).
        """
        from flask import Response

        self.what = f"{exchange.method} {exchange.path}{what}"
        self.on_relay = exchange.detach
        response = Response(self, direct_passthrough=True, **options)
        self.on_close = response.close
        return response

    def __iter__(self) -> Iterator[bytes]:
        return self.fallback

    def take(self) -> Feed | None:
        feed = self._hand_over()
        if feed is not None and self.on_relay is not None:
            self.on_relay()
        return feed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self.fallback, "close", None)
            if close is not None:
                close()
            self._release()
        finally:
            if self.claimed:
                CLAIMS.give_back()
            if self.on_close is not None:
                self.on_close()  # calls close() again (a no-op), then the exchange's finish


# --- the relay --------------------------------------------------------------------------


class Watch:
    """What the worker's selector holds for a relayed socket: the stream and which side."""

    __slots__ = ("stream", "upstream")

    def __init__(self, stream: Stream, upstream: bool):
        self.stream = stream
        self.upstream = upstream

    def ready(self, mask: int) -> None:
        stream = self.stream
        if stream.over:
            return
        try:
            if self.upstream:
                stream.upstream_readable()
            else:
                stream.client_ready(mask)
        except Exception:  # a bug must end one stream, not the worker's loop
            log.exception("error relaying a stream")
            stream.abort("error")


@dataclass(eq=False)
class Stream:
    relay: Relay
    conn: Any  # gunicorn's TConn
    body: RelayBody
    feed: Feed
    chunked: bool  # the client's framing: chunked, else until close
    keep_alive: bool
    started: float
    last_event: float
    out: bytearray = field(default_factory=bytearray)
    writing: bool = False  # the client socket is watched for writability too
    finishing: float = 0.0  # the feed is done; the rest is being flushed until this time
    over: bool = False
    feeding: bool = True  # the feed has not ended, nor been abandoned
    # The descriptor watched for the feed, kept: once the feed let its source go, fileno() may say -1,
    # and a key left under the old number would refuse the next stream whose socket reuses it.
    feed_fd: int = -1

    @property
    def client(self) -> socket.socket:
        sock: socket.socket = self.conn.sock
        return sock

    # --- events -------------------------------------------------------------------------

    def upstream_readable(self) -> None:
        self.fed(self.feed.readable())

    def fed(self, fed: Fed) -> None:
        """What the feed gave: sent on, and the stream ended after it when the feed is done."""
        if fed.done:
            self.stop_watching_feed()  # it let its source go already: nothing to abandon
        if fed.data:
            self.last_event = time.monotonic()
            self.send(fed.data)
            if self.over:
                return
        if fed.done:
            self.feed_ended(fed.problem)

    def client_ready(self, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            data = receive(self.client)
            if data is None:
                return
            if not data:
                self.abort("client_gone")
                return
            # A client sending while its stream is open: nothing here serves it; it is read
            # (so the socket does not stay readable) and the connection closes after the stream.
            self.keep_alive = False
        if mask & selectors.EVENT_WRITE:
            self.flush()

    # --- writing to the client ------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.out += chunk(data) if self.chunked else data
        self.flush()

    def flush(self) -> None:
        out = self.out
        if not send_pending(self.client, out):
            self.abort("client_gone")
            return
        if len(out) > self.relay.buffer_bytes:
            log.warning("slow client %s cut: its stream %s left over %d bytes unread", self.relay.peer(self.conn),
                        self.body.what, self.relay.buffer_bytes)
            self.abort("slow_client")
            return
        want = bool(out)
        if want != self.writing:
            self.writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.relay.poller.modify(self.client, events, Watch(self, False))
        if self.finishing and not out:
            self.relay.done(self, self.ended_reason, keep=self.keep_alive)

    # --- ends ----------------------------------------------------------------------------

    ended_reason = "ended"

    def feed_ended(self, problem: str | None) -> None:
        """The feed is done (or broke) and let its source go: what is unsent is flushed, then the final chunk."""
        if problem is not None:
            self.keep_alive = False
            self.ended_reason = "upstream_broken"
        if not self.relay.alive:
            self.keep_alive = False
        if self.chunked:
            self.out += FINAL_CHUNK
        else:
            self.keep_alive = False  # until close: the close ends the body
        self.finishing = time.monotonic() + self.relay.send_timeout
        self.flush()

    def stop_watching_feed(self) -> None:
        if not self.feeding:
            return
        self.feeding = False
        if self.feed_fd >= 0:
            with suppress(KeyError, ValueError, OSError):
                self.relay.poller.unregister(self.feed_fd)
            self.feed_fd = -1

    def cancelled(self) -> None:
        """The client cancelled the request: its source let go, the stream ended cleanly with no answer."""
        self.stop_watching_feed()
        self.feed.abandon("cancelled")
        self.ended_reason = "cancelled"
        self.feed_ended(None)

    def abort(self, reason: str) -> None:
        """End now: the client is gone or too slow, or the worker stops; nothing more is sent but what goes at once."""
        if self.feeding:
            self.stop_watching_feed()
            self.feed.abandon(reason)
        if reason == "shutdown":
            if self.chunked and not self.finishing:
                self.out += FINAL_CHUNK  # a clean end, so the client reconnects rather than reports an error
            send_pending(self.client, self.out)
        self.relay.done(self, reason, keep=False)


class Relay:
    """The streams of one worker, driven by the worker's selector loop (its main thread)."""

    def __init__(self, poller: selectors.BaseSelector, settings: Callable[[], Any],
                 keep: Callable[[Any], None], drop: Callable[[Any], None], peer: Callable[[Any], str]):
        self.poller = poller
        self._settings = settings
        self._keep = keep
        self._drop = drop
        self.peer = peer
        self.streams: set[Stream] = set()
        self.alive = True
        self._tick_at = 0.0
        self.buffer_bytes = 1 << 20
        self.send_timeout = 30.0
        self.keepalive_interval = 15.0
        # Imported here, in the worker: gunicorn imports this module (through worker.py) in the master,
        # before the runtime directory tells prometheus_client where its multiprocess files go.
        from . import metrics
        self._metrics = metrics

    def start(self, conn: Any, body: RelayBody, feed: Feed, chunked: bool, keep_alive: bool) -> None:
        settings = self._settings()
        self.buffer_bytes = settings.stream_buffer_bytes
        self.send_timeout = settings.send_timeout
        self.keepalive_interval = settings.sse_keepalive_interval
        now = time.monotonic()
        stream = Stream(self, conn, body, feed, chunked, keep_alive and self.alive, now, now)
        self.streams.add(stream)
        self._metrics.STREAMS_STARTED.inc()
        conn.sock.setblocking(False)
        try:
            first = feed.start(self.buffer_bytes)
            self.poller.register(conn.sock, selectors.EVENT_READ, Watch(stream, False))
            if not first.done:
                self.poller.register(feed.fileno(), selectors.EVENT_READ, Watch(stream, True))
                stream.feed_fd = feed.fileno()
        except (OSError, ValueError, KeyError):
            stream.abort("client_gone")
            return
        stream.fed(first)

    def done(self, stream: Stream, reason: str, keep: bool) -> None:
        if stream.over:
            return
        stream.over = True
        self.streams.discard(stream)
        with suppress(KeyError, ValueError, OSError):
            self.poller.unregister(stream.client)
        self._metrics.STREAMS_ENDED.labels(reason).inc()
        try:
            stream.body.close()  # the exchange: lease, access line, metrics
        except Exception:
            log.exception("error closing a relayed stream")
        if keep:
            self._keep(stream.conn)
        else:
            self._drop(stream.conn)

    def timeout(self, timeout: float) -> float:
        """The loop's select timeout, shortened to the next keep-alive or flush deadline (roughly)."""
        return min(timeout, TICK) if self.streams else timeout

    def tick(self) -> None:
        """Keep-alive comments on idle streams, and ends of flushes that ran out of time."""
        now = time.monotonic()
        if not self.streams or now < self._tick_at:
            return
        self._tick_at = now + TICK
        interval = self.keepalive_interval
        for stream in list(self.streams):
            if stream.over:
                continue
            if stream.feeding:
                cancel = stream.body.cancel
                if cancel is not None and cancel.cancelled:
                    stream.cancelled()
                else:
                    stream.fed(stream.feed.tick(now))
                if stream.over:
                    continue
            if stream.finishing:
                if now > stream.finishing:
                    stream.abort("slow_client")
            elif interval and now - stream.last_event >= interval:
                # Events are passed on whole, so between two reads is always between events.
                stream.last_event = now
                try:
                    stream.send(KEEPALIVE_COMMENT)
                except Exception:
                    log.exception("error relaying a stream")
                    stream.abort("error")

    def end_all(self) -> None:
        """The worker stops: every stream ends now, cleanly where the client takes it."""
        self.alive = False
        for stream in list(self.streams):
            stream.abort("shutdown")
