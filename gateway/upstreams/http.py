"""HTTP upstreams: forwarding MCP Streamable HTTP to balanced instances.

Owns the requests session (keep-alive pools per instance), header hygiene in
both directions, the try loop (failover under one deadline), passive health
accounting and the active checks run by the gateway's upkeep thread. When
the client and the server speak different MCP eras it also bridges them (see
"era bridging" below): it opens and caches handshake-era sessions with
legacy-only instances for 2026-07-28 clients, or speaks 2026-07-28 to
modern-only ones for legacy clients, translating each message both ways. The
answer is returned as soon as its headers arrive: an SSE body is streamed to
the client chunk by chunk as the instance writes it; a JSON body is read
whole first, so a read-only request can still go to another instance if the
body breaks. requests/urllib3 exceptions are translated here and nowhere else.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import requote_uri
from werkzeug.datastructures import Headers

from .. import errors, jsonrpc, metrics, protocol, sse
from ..backoff import Backoff
from ..balancer import Balancer, Instance
from ..health import HealthPolicy, InstanceHealth
from ..jsonrpc import Reply
from ..protocol import ClientContext, ServerHello
from ..registry import HttpSettings, ServerEntry

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
E = TypeVar("E", bound=errors.UpstreamError)
_bridge_ids = itertools.count(1)  # next() is atomic under the GIL


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
    body: Generator[bytes, None, None] | bytes
    instance: str
    upstream_session: str | None = None

    @property
    def streaming(self) -> bool:
        """An SSE body, handed on chunk by chunk (a JSON body was read whole)."""
        return not isinstance(self.body, bytes)


@dataclass
class LegacySession:
    """A handshake-era session the gateway holds with one instance, for 2026-07-28 clients."""

    session_id: str | None
    version: str


def forwardable(headers: Mapping[str, str] | Headers, drop: frozenset[str]) -> dict[str, str]:
    """Headers minus hop-by-hop ones, those named in Connection, and `drop`."""
    named = {h.strip().lower() for h in (headers.get("Connection") or "").split(",") if h.strip()}
    return {k: v for k, v in headers.items() if k.lower() not in drop and k.lower() not in named}


class HttpUpstream:
    type = "http"

    def __init__(self, entry: ServerEntry, check_interval: float = 30.0):
        assert entry.http is not None
        self.server_id = entry.id
        self.settings: HttpSettings = entry.http
        policy = HealthPolicy(
            rise=self.settings.health_check_rise, fall=self.settings.health_check_fall,
            max_fails=self.settings.max_fails, ejection_time=self.settings.ejection_time,
        )
        self.balancer = Balancer(
            entry.id, (Instance(i.endpoint, i.weight, InstanceHealth(policy), i.authorization)
                       for i in self.settings.instances),
            self.settings.load_balancing,
        )
        self.check_interval = check_interval
        self._last_check = {i.endpoint: (float("-inf"), 1.0) for i in self.balancer.instances}
        self._lock = threading.Lock()
        self._session: requests.Session | None = None
        self.retries = 0
        # Era bridging, learned once per worker: which eras the instances speak.
        self._speaks: dict[str, bool] = {}
        self._hello: ServerHello | None = None
        self._legacy_sessions: dict[str, LegacySession] = {}

    # --- lifecycle ---------------------------------------------------------------

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

    def maintain(self) -> None:
        """Run the active checks that are due (called by the upkeep thread)."""
        for instance in self.balancer.instances:
            # Like HAProxy's fastinter: while an instance is failing, ejected or
            # rising, look again sooner (1 s, doubling up to the interval), so
            # failures show and recoveries come back quickly. The due time follows
            # the instance's state now, so an ejection brings its check forward.
            health = instance.health
            wait = self.check_interval
            if not health.settled:
                wait = min(wait, Backoff(base=1.0).delay(max(1, health.failed_checks)))
            last, jitter = self._last_check[instance.endpoint]
            if time.monotonic() >= last + wait * jitter:
                self._check(instance)
                # Jitter spreads the checks of many workers over the interval.
                self._last_check[instance.endpoint] = (time.monotonic(), random.uniform(0.8, 1.2))

    def check_all(self) -> None:
        """Check every instance now, whatever the schedule."""
        for instance in self.balancer.instances:
            self._check(instance)

    def _check(self, instance: Instance) -> None:
        timeout = (self.settings.connect_timeout, min(self.settings.read_timeout, 10.0))
        try:
            if self.settings.health_check:
                response = self.session.get(instance.endpoint + self.settings.health_check, timeout=timeout,
                                            headers=self._own_headers(instance))
                good = 200 <= response.status_code < 300
            else:
                # Any answer below 500 to an MCP probe means the process is alive.
                probe = protocol.discover_request("mcp-gateway-health")
                response = self.session.post(
                    instance.endpoint + self.settings.mcp_path, data=jsonrpc.encode(probe), timeout=timeout,
                    headers={**JSON_RPC_HEADERS, **protocol.request_headers(probe), **self._own_headers(instance)},
                )
                good = response.status_code < 500
            response.close()
            reason = f"health check answered {response.status_code}"
        except requests.RequestException as exc:
            good, reason = False, f"health check failed: {_describe(exc)}"
        if good:
            if instance.health.check_passed():
                log.warning("server %s: instance %s is healthy again", self.server_id, instance.endpoint)
                self.relearn()  # it may be a new deployment, speaking other eras
        elif instance.health.check_failed(reason):
            log.warning("server %s: instance %s is down: %s", self.server_id, instance.endpoint, reason)

    def _own_headers(self, instance: Instance) -> dict[str, str]:
        """What the gateway adds to its own requests to `instance`: its credentials, then the registry's headers."""
        own = {"Authorization": instance.authorization} if instance.authorization else {}
        return {**own, **self.settings.headers}

    # --- forwarding --------------------------------------------------------------

    def forward(self, request: ProxyRequest) -> ProxyResponse:
        """Send `request` to an instance, failing over where that is safe."""
        deadline = time.monotonic() + self.settings.request_timeout
        tried: list[Instance] = []
        sticky = request.headers.get(self.settings.sticky_header) if self.settings.sticky_header else None
        while True:
            instance = self._pinned(request) if request.instance else self.balancer.pick(tried, sticky)
            tried.append(instance)
            try:
                answer = self._send(instance, request, deadline)
                if request.upstream_session and _session_lost(answer):
                    # Some servers answer 400 for a session they no longer know; the spec says 404.
                    raise errors.SessionNotFound(
                        f"server '{self.server_id}': instance {instance.endpoint} no longer knows this session; "
                        "start a new session"
                    )
                return answer
            except errors.UpstreamError as exc:
                if request.instance is not None or not self._may_retry(request.rpc_method, exc, tried, deadline):
                    if isinstance(exc, errors.BadStatus):
                        answer = exc.response
                        assert isinstance(answer, ProxyResponse)
                        return answer  # the instance's own answer, unchanged
                    raise
                self._retrying(request.rpc_method or request.method, exc)

    def _may_retry(self, rpc_method: str | None, exc: errors.UpstreamError, tried: list[Instance], deadline: float) -> bool:
        """nginx's proxy_next_upstream with its non_idempotent rule, under one deadline (pass-through and bridged alike)."""
        return bool(
            (exc.retry_safe or rpc_method in protocol.READ_ONLY_METHODS)
            and len(tried) < len(self.balancer.instances)
            and time.monotonic() < deadline
            and self.balancer.candidates(tried)
        )

    def _retrying(self, what: str, exc: errors.UpstreamError) -> None:
        self.retries += 1
        metrics.RETRIES.labels(self.server_id).inc()
        log.info("server %s: retrying %s on another instance after: %s", self.server_id, what, exc.message)

    def available(self, endpoint: str) -> bool:
        """Whether requests pinned to `endpoint` can still reach it."""
        instance = self.balancer.find(endpoint)
        return instance is not None and instance.health.routable

    def _pinned(self, request: ProxyRequest) -> Instance:
        instance = self.balancer.find(request.instance or "")
        if instance is None or not instance.health.routable:
            # The session lived there; the spec's answer is 404 and a new session.
            raise errors.SessionNotFound(
                f"server '{self.server_id}': the instance holding this session is no longer available; start a new session"
            )
        return instance

    def _send(self, instance: Instance, request: ProxyRequest, deadline: float) -> ProxyResponse:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.UpstreamReadTimeout(f"server '{self.server_id}': no answer within {self.settings.request_timeout:g}s")
        headers = forwardable(request.headers, NOT_FORWARDED | request.credential_headers
                              if request.credential_headers else NOT_FORWARDED)
        headers.update(self._own_headers(instance))
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
        with self._lock:
            instance.in_flight += 1
        handed_over = False
        try:
            try:
                response = self.session.get_adapter(prepared.url).send(prepared, stream=True, timeout=timeout)
            except requests.RequestException as exc:
                raise self._failure(instance, exc) from None
            result = ProxyResponse(
                status=response.status_code,
                headers=list(forwardable(response.headers, NOT_RETURNED).items()),
                body=b"",
                instance=instance.endpoint,
                upstream_session=response.headers.get("Mcp-Session-Id"),
            )
            sse = response.headers.get("Content-Type", "").startswith("text/event-stream")
            if sse and response.status_code not in RETRYABLE_STATUS:
                result.body = self._stream(instance, response)
                handed_over = True
            else:
                result.body = self._read_whole(instance, response)
            if result.status in RETRYABLE_STATUS:
                failure = errors.BadStatus(
                    f"server '{self.server_id}': instance {instance.endpoint} answered HTTP {result.status}", result)
                raise self._failed(instance, failure)
            instance.health.request_succeeded()
            return result
        finally:
            if not handed_over:
                with self._lock:
                    instance.in_flight -= 1

    def _read_whole(self, instance: Instance, response: requests.Response) -> bytes:
        try:
            body = response.raw.read(MAX_JSON_BODY + 1, decode_content=False)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._failure(instance, exc) from None
        finally:
            response.close()
        where = f"server '{self.server_id}': instance {instance.endpoint}"
        if len(body) > MAX_JSON_BODY:
            raise self._failed(instance, errors.UpstreamFailed(f"{where} sent an answer over {MAX_JSON_BODY} bytes"))
        promised = response.headers.get("Content-Length")
        if promised is not None and promised.isdigit() and int(promised) != len(body):
            # urllib3 returns what arrived before the connection closed; half an answer is a failure.
            raise self._failed(instance, errors.UpstreamFailed(
                f"{where} failed: it closed the connection after {len(body)} of {promised} bytes"
            ))
        return body

    def _stream(self, instance: Instance, response: requests.Response) -> Generator[bytes, None, None]:
        raw = response.raw
        chunks: Iterator[bytes] = (
            raw.read_chunked(STREAM_CHUNK, decode_content=False) if raw.chunked and raw.supports_chunked_reads()
            else iter(lambda: raw.read1(STREAM_CHUNK, decode_content=False), b"")
        )
        ended = False
        try:
            # Not `yield from`: that would close `chunks` with this generator, and
            # _finish_briefly must be able to read on after the client's side closed.
            for chunk in chunks:  # noqa: UP028
                yield chunk
            ended = True
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            ended = True  # nothing left worth reading
            # Bytes already reached the client: no retry, the stream just ends.
            log.warning("server %s: stream from %s broke: %s", self.server_id, instance.endpoint, _describe(exc))
            self._failed(instance, errors.UpstreamFailed(_describe(exc)))
        finally:
            if not ended:
                _finish_briefly(raw, chunks)
            response.close()
            with self._lock:
                instance.in_flight -= 1

    # --- failures ----------------------------------------------------------------

    def _failure(self, instance: Instance, exc: BaseException) -> errors.UpstreamError:
        where = f"server '{self.server_id}': instance {instance.endpoint}"
        if isinstance(exc, requests.ConnectTimeout) or (
            isinstance(exc, requests.ConnectionError) and _never_connected(exc)
        ):
            error: errors.UpstreamError = errors.UpstreamUnreachable(f"{where} is unreachable: {_describe(exc)}")
        elif isinstance(exc, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError)):
            error = errors.UpstreamReadTimeout(f"{where} did not answer within {self.settings.read_timeout:g}s")
        else:
            error = errors.UpstreamFailed(f"{where} failed: {_describe(exc)}")
        return self._failed(instance, error)

    def _failed(self, instance: Instance, error: E) -> E:
        metrics.UPSTREAM_ERRORS.labels(self.server_id, metrics.error_kind(error)).inc()
        if self.balancer.report_failure(instance, error.message):
            metrics.EJECTIONS.labels(self.server_id, instance.endpoint).inc()
            log.warning("server %s: ejected instance %s for %.0fs after %d failures: %s", self.server_id, instance.endpoint,
                        instance.health.ejected_until - time.monotonic(), self.settings.max_fails, error.message)
        return error

    # --- era bridging --------------------------------------------------------------

    def passes_through(self, era: str) -> bool:
        """Whether the instances speak `era` (asked once; see _speaks_era)."""
        return self._speaks_era(era)

    def hello(self) -> ServerHello:
        """What the server says of itself, for the gateway's own initialize/discover answers."""
        if self._hello is None:
            for era in (protocol.MODERN, protocol.LEGACY):
                if self._speaks_era(era):
                    break
        if self._hello is None:
            raise errors.UpstreamFailed(f"server '{self.server_id}' answered neither server/discover nor initialize")
        return self._hello

    def _speaks_era(self, era: str) -> bool:
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
            answer = self._send(instance, self._gateway_request(discover, protocol.request_headers(discover)), deadline)
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
        answer = self._send(instance, self._gateway_request(initialize, {}), deadline)
        _answered(answer, self.server_id, "initialize")
        reply = self._response_in(answer, initialize["id"])
        result = reply.get("result") if reply else None
        if not isinstance(result, dict):
            raise errors.UpstreamRefused(f"server '{self.server_id}': instance {instance.endpoint} refused initialize")
        hello = protocol.hello_from_initialize(result)
        session = LegacySession(answer.upstream_session, hello.protocol_version)
        self._hello = self._hello or hello
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        _close(self._send(instance, self._gateway_request(initialized, session), deadline))
        self._legacy_sessions[instance.endpoint] = session
        return session

    def call(self, message: dict[str, Any], body: bytes, client: ClientContext,
             request_id: str | None = None) -> Generator[Reply, None, None]:
        """A bridged request: translate, send, and translate every message of the answer."""
        deadline = time.monotonic() + self.settings.request_timeout
        server_era = protocol.LEGACY if self._speaks_era(protocol.LEGACY) else protocol.MODERN
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
                answer, via = self._send_bridged(instance, outgoing, server_era, deadline, request_id)
                try:
                    for reply in self._messages(answer):
                        if "method" in reply:
                            if "id" in reply:  # a server->client request: no client can be asked
                                self._refuse(instance, reply, via, deadline)
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
                if forwarded or not self._may_retry(message["method"], exc, tried, deadline):
                    raise
                self._retrying(message["method"], exc)

    def _send_bridged(self, instance: Instance, outgoing: dict[str, Any], server_era: str, deadline: float,
                      request_id: str | None) -> tuple[ProxyResponse, LegacySession | dict[str, str]]:
        """Send a translated request to `instance`, in the gateway's own session with it for a legacy server."""
        for attempt in range(2):
            via: LegacySession | dict[str, str] = (
                self._legacy_session(instance, deadline) if server_era == protocol.LEGACY else protocol.request_headers(outgoing)
            )
            answer = self._send(instance, self._gateway_request(outgoing, via, request_id), deadline)
            if server_era == protocol.LEGACY and attempt == 0 and _session_lost(answer):
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
        _close(self._send(instance, self._gateway_request(refusal, via), deadline))

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

    # --- reporting ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        instances = [{"endpoint": i.endpoint, "weight": i.weight, "in_flight": i.in_flight, **i.health.describe()}
                     for i in self.balancer.instances]
        return {
            "type": self.type,
            "load_balancing": self.balancer.strategy,
            "healthy": self.balancer.routable_count() > 0,
            "routable": self.balancer.routable_count(),
            "retries": self.retries,
            "instances": instances,
        }


def _answered(answer: ProxyResponse, server_id: str, what: str) -> None:
    """UpstreamFailed unless the instance answered for itself: a 5xx is a booting or broken one, not an era."""
    if answer.status >= 500:
        _close(answer)
        raise errors.UpstreamFailed(f"server '{server_id}': instance {answer.instance} answered {what} "
                                    f"with HTTP {answer.status}")


def _session_lost(answer: ProxyResponse) -> bool:
    """The instance no longer knows the session (404, or 400 naming the session as some servers do)."""
    body = answer.body if isinstance(answer.body, bytes) else b""
    return answer.status == 404 or (answer.status == 400 and b"session" in body.lower())


def _close(answer: ProxyResponse) -> None:
    """Release a streamed answer's connection (a no-op for one read whole)."""
    if not isinstance(answer.body, bytes):
        answer.body.close()


def _finish_briefly(raw: urllib3.BaseHTTPResponse, chunks: Iterator[bytes]) -> None:
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
        sock.settimeout(DRAIN_SECONDS)  # the next request on this connection sets its own
        left = DRAIN_BYTES
        for chunk in chunks:
            left -= len(chunk)
            if left <= 0:
                return  # a long stream: dropping the connection is cheaper
    except (urllib3.exceptions.HTTPError, OSError):
        return


def _never_connected(exc: requests.ConnectionError) -> bool:
    """Whether the connection failed before the request could be sent."""
    reason: Any = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError,
                               urllib3.exceptions.NameResolutionError))


def _describe(exc: BaseException) -> str:
    reason: Any = exc.args[0] if exc.args else exc
    reason = getattr(reason, "reason", reason)
    text = str(reason)
    # urllib3 wraps the useful part ("[Errno 111] Connection refused") in its own prose.
    if "[Errno" in text:
        text = text[text.index("[Errno"):].rstrip(")'\"")
    return text or type(exc).__name__
