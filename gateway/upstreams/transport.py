"""Transport: one HTTP request to one instance of an HTTP server, and what it did to the instance's health.

Owns the requests session (a keep-alive pool per instance, made after
gunicorn forks), header hygiene in both directions, the send itself (a
prepared request handed straight to the adapter), reading a JSON answer whole
or streaming an SSE one as it arrives, and the passive health accounting of
real traffic (a failure counted, an instance ejected). Every exception of
requests, urllib3 and the sockets under them becomes a gateway error in one
function, `translate`, applied by the `Translating` guard: nothing outside
this module sees a foreign exception.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import requote_uri
from werkzeug.datastructures import Headers

from .. import errors, jsonrpc, metrics, protocol
from ..balancer import Balancer, Instance
from ..registry import HttpSettings
from ..streams import Chunked, Framing, Handoff, Length, UntilClose

log = logging.getLogger(__name__)

# RFC 9110 7.6.1 hop-by-hop fields, plus what a proxy must not pass on:
# Host (ours), Cookie/Authorization (no credential passthrough), framing.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# X-API-Key and Authorization carry the caller's credential; auth.py may name more (ProxyRequest.credential_headers).
NOT_FORWARDED = HOP_BY_HOP | {"host", "cookie", "authorization", "x-api-key", "content-length", "accept-encoding",
                              "mcp-session-id"}
NOT_RETURNED = HOP_BY_HOP | {"content-length", "set-cookie", "mcp-session-id", "server", "date"}
RETRYABLE_STATUS = frozenset({502, 503, 504})
# What every request of the gateway's own sends (the spec's Accept for Streamable HTTP).
JSON_RPC_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
MAX_JSON_BODY = 64 * 1024 * 1024
STREAM_CHUNK = 64 * 1024
# What is left of a stream after the response the bridge wanted: read if it comes this soon.
DRAIN_SECONDS = 0.05
DRAIN_BYTES = 64 * 1024
# What requests, urllib3 and the sockets under them raise (requests' own errors are OSErrors too).
FOREIGN = (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError)
E = TypeVar("E", bound=errors.UpstreamError)


@dataclass
class ProxyRequest:
    """What the view hands over: the client's request, already validated."""

    method: str
    path: str  # what follows /<server-id>, with its leading slash (or "")
    query: bytes
    headers: Mapping[str, str] | Headers
    body: bytes
    message: dict[str, Any] | None  # the JSON-RPC message of a POST
    instance: str | None = None  # pinned by a session
    upstream_session: str | None = None
    request_id: str | None = None  # X-Request-Id, passed on
    credential_headers: frozenset[str] = frozenset()  # lower-cased; never forwarded (no token passthrough)

    @property
    def rpc_method(self) -> str | None:
        return self.message.get("method") if self.message else None


@dataclass
class ProxyResponse:
    status: int
    headers: list[tuple[str, str]]
    body: UpstreamStream | bytes  # an SSE body streams (iterated, or handed to the relay)
    instance: str
    upstream_session: str | None = None

    @property
    def streaming(self) -> bool:
        """An SSE body, handed on chunk by chunk (a JSON body was read whole)."""
        return not isinstance(self.body, bytes)


def forwardable(headers: Mapping[str, str] | Headers, drop: frozenset[str]) -> dict[str, str]:
    """Headers minus hop-by-hop ones, those named in Connection, and `drop`."""
    named = {h.strip().lower() for h in (headers.get("Connection") or "").split(",") if h.strip()}
    return {k: v for k, v in headers.items() if k.lower() not in drop and k.lower() not in named}


# --- foreign exceptions ---------------------------------------------------------


def translate(exc: BaseException, where: str, read_timeout: float) -> errors.UpstreamError:
    """The gateway error for a foreign exception raised talking to the instance `where` names.

    Unreachable (retry-safe: the request never left) when the connection was
    not made; a read timeout when the instance took the request and said
    nothing for `read_timeout`; a failure (the request may have been acted on)
    for the rest: a reset, a broken stream, garbage, a URL urllib3 cannot use.
    """
    if isinstance(exc, requests.ConnectTimeout) or (isinstance(exc, requests.ConnectionError) and _never_connected(exc)):
        return errors.UpstreamUnreachable(f"{where} is unreachable: {_describe(exc)}")
    if isinstance(exc, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError)):
        return errors.UpstreamReadTimeout(f"{where} did not answer within {read_timeout:g}s")
    return errors.UpstreamFailed(f"{where} failed: {_describe(exc)}")


class Translating:
    """A guard (`with`) that raises `translate`'s gateway error in place of a foreign exception.

    Made once per instance and reused by every request (it holds no state of
    one), so guarding the hot path costs no allocation.
    """

    __slots__ = ("read_timeout", "where")

    def __init__(self, where: str, read_timeout: float):
        self.where = where
        self.read_timeout = read_timeout

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is not None and isinstance(exc, FOREIGN):
            raise translate(exc, self.where, self.read_timeout) from None


def _never_connected(exc: requests.ConnectionError) -> bool:
    """Whether the connection failed before the request could be sent."""
    reason: Any = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError,
                               urllib3.exceptions.NameResolutionError))


def _describe(exc: BaseException) -> str:
    # A socket's own OSError says it best ("[Errno 104] ..."); requests' (OSErrors too) wrap urllib3's reason.
    reason: Any = exc if isinstance(exc, OSError) and not isinstance(exc, requests.RequestException) else (
        exc.args[0] if exc.args else exc)
    reason = getattr(reason, "reason", reason)
    text = str(reason)
    # urllib3 wraps the useful part ("[Errno 111] Connection refused") in its own prose.
    if "[Errno" in text:
        text = text[text.index("[Errno"):].rstrip(")'\"")
    return text or type(exc).__name__


# --- the transport --------------------------------------------------------------


class Transport:
    """Requests to the instances of one HTTP server: sent, read, and accounted to each instance's health."""

    def __init__(self, server_id: str, settings: HttpSettings, balancer: Balancer):
        self.server_id = server_id
        self.settings = settings
        self.balancer = balancer
        self._lock = threading.Lock()  # the session's making, and in-flight counts
        self._session: requests.Session | None = None
        self._guards = {i.endpoint: Translating(f"server '{server_id}': instance {i.endpoint}", settings.read_timeout)
                        for i in balancer.instances}

    @property
    def session(self) -> requests.Session:
        """Made lazily, so it is made after gunicorn forks."""
        if self._session is None:
            with self._lock:
                if self._session is None:
                    session = requests.Session()
                    session.trust_env = False  # no proxies or .netrc from the environment
                    adapter = HTTPAdapter(pool_connections=len(self.balancer.instances),
                                          pool_maxsize=self.settings.max_connections, max_retries=0)
                    session.mount("http://", adapter)
                    session.mount("https://", adapter)
                    session.headers.clear()
                    self._session = session
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()

    def own_headers(self, instance: Instance) -> dict[str, str]:
        """What the gateway adds to its own requests to `instance`: its credentials, then the registry's headers."""
        own = {"Authorization": instance.authorization} if instance.authorization else {}
        return {**own, **self.settings.headers}

    def probe(self, instance: Instance) -> int:
        """The HTTP status an active health check gets from `instance` (its health_check path, or an MCP probe)."""
        read_timeout = min(self.settings.read_timeout, 10.0)
        timeout = (self.settings.connect_timeout, read_timeout)
        # Said in the check's reason, after "health check failed:" (the log line names server and instance).
        with Translating("the instance", read_timeout):
            if self.settings.health_check:
                response = self.session.get(instance.endpoint + self.settings.health_check, timeout=timeout,
                                            headers=self.own_headers(instance))
            else:
                probe = protocol.discover_request("mcp-gateway-health")
                response = self.session.post(
                    instance.endpoint + self.settings.mcp_path, data=jsonrpc.encode(probe), timeout=timeout,
                    headers={**JSON_RPC_HEADERS, **protocol.request_headers(probe), **self.own_headers(instance)},
                )
            response.close()
        return response.status_code

    def send(self, instance: Instance, request: ProxyRequest, deadline: float) -> ProxyResponse:
        """Send `request` to `instance` and take its answer's headers (an SSE body then streams)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.UpstreamReadTimeout(f"server '{self.server_id}': no answer within {self.settings.request_timeout:g}s")
        headers = forwardable(request.headers, NOT_FORWARDED | request.credential_headers
                              if request.credential_headers else NOT_FORWARDED)
        headers.update(self.own_headers(instance))
        headers["Accept-Encoding"] = "identity"  # bytes pass through as they are
        if request.upstream_session:
            headers["Mcp-Session-Id"] = request.upstream_session
        if request.request_id:
            headers["X-Request-Id"] = request.request_id
        url = instance.endpoint + request.path + (f"?{request.query.decode('latin-1')}" if request.query else "")
        timeout = (min(self.settings.connect_timeout, remaining), min(self.settings.read_timeout, remaining))
        # Built by hand and handed to the adapter: Session.request's merging of cookies,
        # hooks, auth and environment settings (none of which a proxy wants) cost about
        # 140 us of CPU per call, a third of the forwarding path (README, Performance).
        prepared = requests.PreparedRequest()
        prepared.method = request.method
        prepared.url = requote_uri(url)  # the path arrives decoded; quote it again
        prepared.headers = CaseInsensitiveDict(headers)
        prepared.body = request.body or None
        if request.body or request.method not in ("GET", "HEAD"):
            prepared.headers["Content-Length"] = str(len(request.body))
        guard = self._guards[instance.endpoint]
        with self._lock:
            instance.in_flight += 1
        handed_over = False
        try:
            try:
                with guard:
                    response = self.session.get_adapter(prepared.url).send(prepared, stream=True, timeout=timeout)
            except errors.UpstreamError as error:
                raise self.failed(instance, error) from None
            result = ProxyResponse(
                status=response.status_code,
                headers=list(forwardable(response.headers, NOT_RETURNED).items()),
                body=b"",
                instance=instance.endpoint,
                upstream_session=response.headers.get("Mcp-Session-Id"),
            )
            sse = response.headers.get("Content-Type", "").startswith("text/event-stream")
            if sse and response.status_code not in RETRYABLE_STATUS:
                result.body = UpstreamStream(self, instance, response, guard)
                handed_over = True
            else:
                result.body = self._read_whole(instance, response, guard)
            if result.status in RETRYABLE_STATUS:
                failure = errors.BadStatus(
                    f"server '{self.server_id}': instance {instance.endpoint} answered HTTP {result.status}", result)
                raise self.failed(instance, failure)
            instance.health.request_succeeded()
            return result
        finally:
            if not handed_over:
                with self._lock:
                    instance.in_flight -= 1

    def _read_whole(self, instance: Instance, response: requests.Response, guard: Translating) -> bytes:
        try:
            with guard:
                body = response.raw.read(MAX_JSON_BODY + 1, decode_content=False)
        except errors.UpstreamError as error:
            raise self.failed(instance, error) from None
        finally:
            response.close()
        if len(body) > MAX_JSON_BODY:
            raise self.failed(instance, errors.UpstreamFailed(f"{guard.where} sent an answer over {MAX_JSON_BODY} bytes"))
        promised = response.headers.get("Content-Length")
        if promised is not None and promised.isdigit() and int(promised) != len(body):
            # urllib3 returns what arrived before the connection closed; half an answer is a failure.
            raise self.failed(instance, errors.UpstreamFailed(
                f"{guard.where} failed: it closed the connection after {len(body)} of {promised} bytes"
            ))
        return body

    def _stream(self, instance: Instance, response: requests.Response, guard: Translating) -> Generator[bytes, None, None]:
        raw = response.raw
        chunks: Iterator[bytes] = (
            raw.read_chunked(STREAM_CHUNK, decode_content=False) if raw.chunked and raw.supports_chunked_reads()
            else iter(lambda: raw.read1(STREAM_CHUNK, decode_content=False), b"")
        )
        ended = False
        try:
            with guard:
                # Not `yield from`: that would close `chunks` with this generator, and
                # _finish_briefly must be able to read on after the client's side closed.
                for chunk in chunks:  # noqa: UP028
                    yield chunk
            ended = True
        except errors.UpstreamError as error:
            ended = True  # nothing left worth reading
            # Bytes already reached the client: no retry, the stream just ends.
            log.warning("server %s: stream from %s broke: %s", self.server_id, instance.endpoint, error.message)
            self.failed(instance, error)
        finally:
            if not ended:
                _finish_briefly(raw, chunks, guard)
            response.close()
            with self._lock:
                instance.in_flight -= 1

    def released(self, instance: Instance, raw: urllib3.BaseHTTPResponse, problem: str | None,
                 framing: Framing | None = None) -> None:
        """A stream the worker's relay read (streams.py) is over: its connection reused or closed, its count down.

        Given back to the keep-alive pool only when the body ended whole by its
        `framing`, the answer allowed keep-alive and the pool has room: a
        thousand streams ending must not each overflow it ("Connection pool is
        full" every time); every other connection is closed, with whatever
        the stream left unread.
        """
        if not (problem is None and framing is not None and framing.complete() and _give_back(raw)):
            raw.close()
            raw._connection = None  # type: ignore[attr-defined]
        with self._lock:
            instance.in_flight -= 1
        if problem is not None:
            error = errors.UpstreamFailed(f"{self._guards[instance.endpoint].where} failed: {problem}")
            log.warning("server %s: stream from %s broke: %s", self.server_id, instance.endpoint, problem)
            self.failed(instance, error)

    def failed(self, instance: Instance, error: E) -> E:
        """Count a failure of real traffic against `instance`, ejecting it when that was one too many."""
        metrics.UPSTREAM_ERRORS.labels(self.server_id, metrics.error_kind(error)).inc()
        if self.balancer.report_failure(instance, error.message):
            metrics.EJECTIONS.labels(self.server_id, instance.endpoint).inc()
            log.warning("server %s: ejected instance %s for %.0fs after %d failures: %s", self.server_id, instance.endpoint,
                        instance.health.ejected_until - time.monotonic(), self.settings.max_fails, error.message)
        return error


class UpstreamStream:
    """An SSE answer's body: iterated by a thread (`_stream`), or its socket handed to the worker's relay whole.

    Whichever way, it releases its instance once: closed before it was
    read, its connection is closed and the count goes down at once.
    """

    def __init__(self, transport: Transport, instance: Instance, response: requests.Response, guard: Translating):
        self._transport = transport
        self._instance = instance
        self._response: requests.Response | None = response  # until handed over; then only its raw answer
        self._raw = response.raw
        self._guard = guard
        self._chunks: Generator[bytes, None, None] | None = None
        self._taken = False  # iterated or handed over
        self._released = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._chunks is None:
            if self._taken:
                raise StopIteration
            self._taken = True
            assert self._response is not None  # dropped only when handed over, which sets _taken
            self._chunks = self._transport._stream(self._instance, self._response, self._guard)
        return next(self._chunks)

    def close(self) -> None:
        if self._chunks is not None:
            self._chunks.close()  # its own finally lets the instance go
        else:
            self._taken = True
            self._release(None)  # never read, or handed over and not let go by the relay

    def _release(self, problem: str | None, framing: Framing | None = None) -> None:
        if not self._released:
            self._released = True
            self._transport.released(self._instance, self._raw, problem, framing)

    def interrupt(self) -> None:
        """Cut a read blocked on this answer, from another thread: its socket shut down."""
        sock = getattr(getattr(self._raw, "connection", None), "sock", None)
        if isinstance(sock, socket.socket):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def hand_over(self) -> Handoff | None:
        """The socket, what urllib3 has buffered of the body and its framing; None when that cannot be (TLS, read already)."""
        if self._taken:
            return None
        raw = self._raw
        message = getattr(raw, "_fp", None)  # http.client's response: it parsed the head, nothing of the body
        sock = getattr(getattr(raw, "connection", None), "sock", None)
        reader = getattr(message, "fp", None)
        if message is None or reader is None or not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
            return None
        self._taken = True
        sock.setblocking(False)
        try:
            buffered = reader.read1(STREAM_CHUNK)  # what it buffered after the head; else what has arrived
        except OSError:
            buffered = b""
        # The relay reads the socket itself from now on, so what a held stream keeps is cut to what
        # release() needs (issue 15: worker memory per idle stream). The buffered reader, emptied
        # above, goes with its 8 KB buffer: http.client keeps the raw socket file in its place, so
        # the socket's file reference (what keeps it open after http.client closed its connection,
        # as it does for an answer that ends with the connection) is let go on release, as before.
        # And the requests.Response with its headers, cookies and prepared request is let go.
        message.fp = reader.detach()
        self._response = None
        framing: Framing = (Chunked() if message.chunked else Length(message.length) if message.length is not None
                            else UntilClose())
        return Handoff(sock, buffered or b"", framing, lambda problem: self._release(problem, framing))


def _give_back(raw: Any) -> bool:
    """Put a relayed answer's connection back in its pool, the body read whole; False when it cannot go back."""
    message = getattr(raw, "_fp", None)
    connection = getattr(raw, "_connection", None)
    pool = getattr(raw, "_pool", None)
    queue = getattr(pool, "pool", None)
    if message is None or connection is None or queue is None or message.will_close or queue.full():
        return False
    sock = getattr(connection, "sock", None)
    if sock is not None:
        sock.setblocking(True)  # the relay made it non-blocking; urllib3 sets its timeouts per request
    message.close()  # http.client's response (the socket stays open): the connection may send a request again
    raw.release_conn()
    return True


def _finish_briefly(raw: urllib3.BaseHTTPResponse, chunks: Iterator[bytes], guard: Translating) -> None:
    """Read the rest of a stream left early, if it ends at once, so its connection is reused.

    The bridge stops reading an SSE answer at the response it wants, and the
    server ends the stream right after it, as the spec asks. Left unread, the
    end of the stream would stay in the socket and the pool would have to
    drop the connection: a new TCP connection for every bridged request.
    """
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is None:
        return
    try:
        with guard:
            sock.settimeout(DRAIN_SECONDS)  # the next request on this connection sets its own
            left = DRAIN_BYTES
            for chunk in chunks:
                left -= len(chunk)
                if left <= 0:
                    return  # a long stream: dropping the connection is cheaper
    except errors.UpstreamError:
        return
