"""Who holds a session's state, and relaying a request to it.

A session whose state lives in one gateway process (a dedicated stdio
process) names that process in its sealed id (`Session.owner`). The name is
`<pid>.<nonce>` (a restarted worker gets a new nonce, so it is never taken
for the old one), followed by `@<advertise_url>` when the replica advertises
one. Each gunicorn worker also listens on `owners/<pid>.<nonce>.sock` in the
runtime directory (gateway/worker.py), so a request reaching any worker can
be handed to the owner:

- same host: over the owner's Unix socket;
- another replica: to its advertise_url, where one of its workers hands it on
  over the owner's socket.

Only forwarded requests may use an owner's socket: they carry FORWARD_HEADER,
an HMAC (keys derived from the session secrets, as sealed.py derives its own)
of the hop kind, the time, the owner it is meant for, the method, the path and
the session id. A relayed request may be relayed once more only from a replica
to a same-host socket; anything else is a loop, refused. The owner's answer
comes back as it is (status, headers, body): a plain answer passed on by the
relaying thread, an SSE answer relayed by the worker's loop over the owner
connection (a streams.SocketFeed, as a pass-through stream is), so a long
stream holds no thread of the relaying worker.
An owner gone (no socket, connection refused, replica unreachable) is 404
SessionNotFound: the client starts a new session.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import http.client
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import errors, rundir, streams
from .dedicated import CORRELATION_HEADER
from .protocol import MODERN_VERSIONS

if TYPE_CHECKING:
    from flask import Response
    from werkzeug.datastructures import EnvironHeaders

    from .exchange import Exchange
    from .runtime import Gateway
    from .sessions import Session

FORWARD_HEADER = "X-Mcp-Gateway-Forward"
LABEL = b"mcp-gateway owner forwarding v1"
WORKER, REPLICA = "worker", "replica"  # the hop a forwarded request took: to a Unix socket, to a replica
# A forwarded request older than this is refused: the header is good for one hop, not for later replays.
FORWARD_WINDOW = 30.0
CONNECT_TIMEOUT = 5.0
# Between bytes of the owner's answer: as long as a stdio call may take, and an SSE stream's keep-alives.
READ_TIMEOUT = 300.0
# Not passed on either way: they describe one connection, not the request.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "content-length", FORWARD_HEADER.lower()})
SOCKET_SUFFIX = ".sock"
# Set in the WSGI environ of a request admitted on this worker's owner socket (gateway/worker.py).
FORWARDED_ENVIRON = "mcp_gateway.forwarded"
# A cancel sent on to a sibling: it answers 202 at once, or is busy, or gone.
SIBLING_TIMEOUT = 2.0
# Cancels being sent on to siblings at once, at most; past it one is dropped.
MAX_TO_SIBLINGS = 64
_to_siblings = 0
_to_siblings_lock = threading.Lock()

_local: tuple[int, str] | None = None
# The principals' claims this worker holds (of_principal), by path and owner name.
_claimed: set[tuple[Path, str]] = set()


def local_name() -> str:
    """This process's name among its host's gateway processes: `<pid>.<nonce>`, new in every process."""
    global _local
    pid = os.getpid()
    if _local is None or _local[0] != pid:  # forked since (a preloaded app): a name of its own
        _local = (pid, f"{pid}.{secrets.token_hex(6)}")
    return _local[1]


def owner_name(advertise_url: str | None) -> str:
    """The owner this process writes in the sessions it holds."""
    return local_name() + (f"@{advertise_url}" if advertise_url else "")


def split(owner: str) -> tuple[str, str | None]:
    """`<pid>.<nonce>[@url]` -> (`<pid>.<nonce>`, url or None)."""
    local, _, url = owner.partition("@")
    return local, url or None


def folder() -> Path | None:
    path = rundir.directory()
    return path / "owners" if path is not None else None


def socket_path(local: str) -> Path | None:
    """Where the worker named `local` listens (None without a runtime directory, or a name not ours)."""
    where = folder()
    if where is None or not local or "/" in local or local.startswith("."):
        return None
    return where / f"{local}{SOCKET_SUFFIX}"


def listen() -> socket.socket | None:
    """In a worker: its owner socket (0600), stale sockets of dead workers removed first."""
    path = socket_path(local_name())
    if path is None:
        return None
    path.parent.mkdir(mode=0o700, exist_ok=True)
    remove_stale(path.parent)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is made 0600, with no window in which it is not
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(128)
    listener.setblocking(False)
    return listener


def unlisten(listener: socket.socket | None, path: str | None) -> None:
    """When the worker exits: its socket closed (gunicorn may have closed it already) and removed."""
    if listener is not None:
        listener.close()
    if path:
        with suppress(OSError):
            os.unlink(path)


def remove_stale(where: Path, pid: int | None = None) -> None:
    """Remove the sockets of workers that are gone (or of `pid`, which the master saw exit)."""
    with suppress(OSError):
        for entry in where.iterdir():
            head = entry.name.partition(".")[0]
            if not entry.name.endswith(SOCKET_SUFFIX) or not head.isdigit():
                continue
            if (pid is not None and int(head) == pid) or (pid is None and not rundir.alive(int(head))):
                entry.unlink(missing_ok=True)



# --- the forwarding header ----------------------------------------------------------


def keys(secrets_: Sequence[bytes]) -> list[bytes]:
    """HMAC keys of forwarded requests, one per session secret (the first signs, every one verifies)."""
    return [HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=LABEL).derive(secret) for secret in secrets_]


def _mac(key: bytes, kind: str, stamp: str, owner: str, method: str, path: str, session_id: str) -> str:
    message = "\n".join((kind, stamp, owner, method, path, session_id)).encode("utf-8", "surrogateescape")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(key: bytes, kind: str, owner: str, method: str, path: str, session_id: str) -> str:
    stamp = str(int(time.time()))
    return f"{kind}.{stamp}.{_mac(key, kind, stamp, owner, method, path, session_id)}"


def verify(keys_: Sequence[bytes], value: str | None, owner: str, method: str, path: str,
           session_id: str) -> str | None:
    """The hop kind of a genuine forwarding header meant for `owner`, else None."""
    if not value:
        return None
    kind, _, rest = value.partition(".")
    stamp, _, mac = rest.partition(".")
    if kind not in (WORKER, REPLICA) or not stamp.isdigit() or abs(time.time() - int(stamp)) > FORWARD_WINDOW:
        return None
    for key in keys_:
        if hmac.compare_digest(mac, _mac(key, kind, stamp, owner, method, path, session_id)):
            return kind
    return None


# --- relaying -----------------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=CONNECT_TIMEOUT)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def gone(server_id: str, why: str) -> errors.SessionNotFound:
    return errors.SessionNotFound(
        f"session on server '{server_id}' is held by a gateway process that is gone ({why}): "
        "start a new session with initialize")


def route(owner: str, own_advertise_url: str | None, arrived_by: str | None, server_id: str) -> tuple[str, str]:
    """(hop kind, where) for a request to `owner`: a Unix socket path, or a replica's URL; a loop is refused."""
    local, url = split(owner)
    if url is not None and url != own_advertise_url:
        if arrived_by is not None:  # a relayed request goes no further than this host's sockets
            raise errors.OwnerLoop(f"server '{server_id}': a relayed request names another replica's session; refused")
        return REPLICA, url
    if arrived_by == WORKER:
        raise errors.OwnerLoop(f"server '{server_id}': a request relayed to its owner's socket names another owner; refused")
    path = socket_path(local)
    if path is None or not path.exists():
        raise gone(server_id, "its worker is no longer running")
    return WORKER, str(path)


class Relayed:
    """The owner's answer: status, headers and a body read from the owner as the client reads it."""

    def __init__(self, connection: http.client.HTTPConnection, answer: http.client.HTTPResponse):
        self._connection = connection
        self._answer = answer
        self.status = answer.status
        self.headers = [(name, value) for name, value in answer.getheaders() if name.lower() not in HOP_BY_HOP
                        and name.lower() != "x-request-id"]
        length = answer.getheader("Content-Length")
        if length is not None and length.isdigit() and answer.getheader("Transfer-Encoding") is None:
            self.headers.append(("Content-Length", length))

    def body(self) -> Iterator[bytes]:
        try:
            while chunk := self._answer.read1(65536):
                yield chunk
        except OSError:
            return  # the owner went mid-answer: the client sees the answer end
        finally:
            self.close()

    def close(self) -> None:
        with suppress(Exception):
            self._answer.close()
        with suppress(Exception):
            self._connection.close()

    @property
    def is_stream(self) -> bool:
        return (self._answer.getheader("Content-Type") or "").startswith("text/event-stream")

    def hand_over(self) -> streams.Handoff | None:
        """The owner connection's socket, with what was buffered of the body and its framing, for the relay."""
        answer, sock = self._answer, self._connection.sock
        reader = answer.fp
        if reader is None or not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
            return None
        sock.setblocking(False)
        try:
            buffered = reader.read1(65536) or b""  # what it read past the head already, else what has arrived
        except OSError:
            buffered = b""
        framing: streams.Framing = (streams.Chunked() if answer.chunked else streams.Length(answer.length)
                                    if answer.length is not None else streams.UntilClose())
        return streams.Handoff(sock, buffered, framing, lambda problem: self.close())


def relay(keys_: Sequence[bytes], owner: str, own_advertise_url: str | None, headers: EnvironHeaders,
          method: str, path: str, query: bytes, body: bytes, server_id: str) -> Relayed:
    """Send the request to `owner` and return its answer, unread; SessionNotFound when the owner is gone."""
    session_id = bound_id(headers.get)
    kind, where = route(owner, own_advertise_url, arrived_by(keys_, headers, method, path, owner), server_id)
    connection: http.client.HTTPConnection
    if kind == WORKER:
        connection = _UnixConnection(where)
        target = split(owner)[0]
    else:
        parts = urlsplit(where)
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(parts.netloc, timeout=CONNECT_TIMEOUT)
        target = owner
    url = path + ("?" + query.decode("latin-1") if query else "")
    try:
        connection.connect()
    except OSError as exc:
        connection.close()
        raise gone(server_id, f"{'its worker' if kind == WORKER else 'its replica'} refused the connection: "
                              f"{type(exc).__name__}") from None
    try:
        assert connection.sock is not None
        connection.sock.settimeout(READ_TIMEOUT)
        connection.putrequest(method, url, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            if name.lower() not in HOP_BY_HOP:
                connection.putheader(name, value)
        connection.putheader(FORWARD_HEADER, sign(keys_[0], kind, target, method, path, session_id))
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body if body else None)
        answer = connection.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        raise errors.UpstreamFailed(f"server '{server_id}': relaying to the session's owner failed: "
                                    f"{type(exc).__name__}") from None
    return Relayed(connection, answer)


def arrived_by(keys_: Sequence[bytes], headers: EnvironHeaders, method: str, path: str, owner: str) -> str | None:
    """The hop a request for `owner` took to get here, if it carries a genuine forwarding header (else None).

    A header for a replica hop was signed for the whole owner name; one for a worker hop, for this worker's.
    """
    value = headers.get(FORWARD_HEADER)
    if not value:
        return None
    target = owner if value.startswith(REPLICA + ".") else local_name()
    return verify(keys_, value, target, method, path, bound_id(headers.get))


def admitted(keys_: Sequence[bytes], environ: dict[str, Any]) -> bool:
    """Whether a request that came in on this worker's owner socket carries a genuine forwarding header for it."""
    value = environ.get("HTTP_" + FORWARD_HEADER.upper().replace("-", "_"))
    return verify(keys_, value, local_name(), environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""),
                  bound_id(lambda name: environ.get("HTTP_" + name.upper().replace("-", "_")))) == WORKER


def bound_id(header: Callable[[str], str | None]) -> str:
    """What names the state a forwarded request is for, bound into its header: the session id, or a 2026-07-28
    client's correlation header (dedicated.py), or nothing (a principal's, whose token the owner checks again)."""
    return header("Mcp-Session-Id") or header(CORRELATION_HEADER) or ""


def of_principal(gateway: Gateway, server_id: str, principal: str) -> str | None:
    """The worker of this host holding `principal`'s dedicated process of `server_id`, when it is another.

    A 2026-07-28 client with a principal sends no id that could name an
    owner, so the host's workers agree on one in `principals/` of the runtime
    directory: the first to serve the principal claims it (a file holding its
    owner name, linked into place whole); a claim of a worker that has exited
    is taken over. None: this worker holds it (or there is no directory to agree
    in). Across replicas each host has its own (README: Dedicated sessions).
    """
    base = rundir.directory()
    if base is None:
        return None
    where = base / "principals"
    path = where / hashlib.sha256(f"{server_id}\0{principal}".encode()).hexdigest()[:40]
    mine = gateway.owner
    if (path, mine) in _claimed:  # ours stays ours while this worker lives: no file to read per request
        return None
    for _ in range(3):
        named = _read_claim(path)
        if named is None:
            if _claim(where, path, mine):
                _claimed.add((path, mine))
                return None
            continue  # another worker claimed it first: whose is it?
        if named == mine:
            _claimed.add((path, mine))
            return None
        if _lives(split(named)[0]):
            return named
        with _claims_lock(where):  # one worker takes the dead one's claim over
            if _read_claim(path) == named:
                path.unlink(missing_ok=True)
    return None  # the claim kept changing under us: serve it here


def _claim(where: Path, path: Path, mine: str) -> bool:
    """Claim `path` for `mine`, whole or not at all: written under a name of this thread's, then linked
    into place (a link fails if the claim exists), so no reader ever sees a claim half written."""
    where.mkdir(mode=0o700, exist_ok=True)
    temporary = where / f".{path.name}.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, mine.encode())
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)


def _read_claim(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as claim:
            return claim.read(1024) or None
    except FileNotFoundError:
        return None


def _lives(local: str) -> bool:
    """Whether the worker `<pid>.<nonce>` still serves: its owner socket is there and its pid lives."""
    where = socket_path(local)
    pid = local.partition(".")[0]
    return where is not None and where.exists() and pid.isdigit() and rundir.alive(int(pid))


@contextlib.contextmanager
def _claims_lock(where: Path) -> Iterator[None]:
    fd = os.open(where / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def elsewhere(gateway: Gateway, session: Session | None) -> str | None:
    """The owner of `session` when another gateway process holds it (its requests are relayed there), else None."""
    if session is None or session.owner is None or session.owner == gateway.owner:
        return None
    return session.owner


def holder(gateway: Gateway, exchange: Exchange, session: Session | None) -> str | None:
    """Where a POST is served when another gateway process holds its state, else None: its session's owner,
    or, for a 2026-07-28 client with a principal on a server with dedicated sessions, its principal's."""
    if session is not None:
        return elsewhere(gateway, session)
    server_id = exchange.server_id or ""
    if (exchange.principal is None or exchange.headers.get("MCP-Protocol-Version") not in MODERN_VERSIONS
            or getattr(gateway.upstreams.get(server_id), "sessions", None) is None):
        return None
    return of_principal(gateway, server_id, exchange.principal)


def relay_to_owner(gateway: Gateway, exchange: Exchange, owner: str, body: bytes, query: bytes) -> Response:
    """The hook before serving.decide: a request of a session another process holds, answered by that process."""
    from flask import Response

    server_id = exchange.server_id or ""
    exchange.owner = owner
    answer = relay(gateway.forward_keys, owner, gateway.registry.gateway.advertise_url, exchange.headers,
                   exchange.method, exchange.path, query, body, server_id)
    if not answer.is_stream or not streams.CLAIMS.take(gateway.registry.gateway.max_streams):
        # A plain answer, or past max_streams: this thread passes the body on.
        response = Response(answer.body(), status=answer.status, headers=answer.headers)
        response.call_on_close(answer.close)
        return response
    # An SSE answer is relayed by the worker's loop over the owner connection, as a pass-through stream.
    def take() -> streams.Feed | None:
        handoff = answer.hand_over()
        return None if handoff is None else streams.SocketFeed(handoff, None)

    relayed = streams.RelayBody(answer.body(), take, answer.close)
    return relayed.respond(exchange, " (to its owner)", status=answer.status, headers=answer.headers)


def came_forwarded(headers: EnvironHeaders) -> bool:
    """Whether the request came in on this worker's owner socket, relayed by a sibling."""
    return bool(headers.environ.get(FORWARDED_ENVIRON))


def siblings() -> list[str]:
    """The owner sockets of this host's other workers."""
    where = folder()
    if where is None:
        return []
    own = local_name() + SOCKET_SUFFIX
    with suppress(OSError):
        return sorted(str(entry) for entry in where.iterdir() if entry.name.endswith(SOCKET_SUFFIX) and entry.name != own)
    return []


def to_siblings(keys_: Sequence[bytes], headers: EnvironHeaders, method: str, path: str, body: bytes) -> None:
    """Send a message (a client's cancel) to every sibling worker, in the background; their answers are dropped."""
    targets = siblings()
    if not targets:
        return
    session_id = headers.get("Mcp-Session-Id", "")
    sent = [(name, value) for name, value in headers.items() if name.lower() not in HOP_BY_HOP]

    def send_all() -> None:
        for target in targets:
            connection = _UnixConnection(target)
            connection.timeout = SIBLING_TIMEOUT
            try:
                connection.connect()
                assert connection.sock is not None
                connection.sock.settimeout(SIBLING_TIMEOUT)
                connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for name, value in sent:
                    connection.putheader(name, value)
                local = Path(target).name.removesuffix(SOCKET_SUFFIX)
                connection.putheader(FORWARD_HEADER, sign(keys_[0], WORKER, local, method, path, session_id))
                connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body)
                connection.getresponse().read()
            except (OSError, http.client.HTTPException):
                continue  # gone or stuck: it holds nothing a client can still be waiting for, or will time it out
            finally:
                connection.close()

    global _to_siblings
    with _to_siblings_lock:
        if _to_siblings >= MAX_TO_SIBLINGS:
            return  # a flood of cancels: the rest are dropped (each is only ever a client's own, and advisory)
        _to_siblings += 1

    def send_counted() -> None:
        global _to_siblings
        try:
            send_all()
        finally:
            with _to_siblings_lock:
                _to_siblings -= 1

    # On the stream wind-down pool, not a thread each, and only so many waiting: a client posting
    # cancels by the thousand makes neither a thread nor a queue per cancel.
    streams.in_background(send_counted)

