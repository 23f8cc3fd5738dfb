"""Legacy-era MCP sessions that need no shared store.

The `Mcp-Session-Id` a legacy client receives is a sealed, self-describing
token: `v1.` and the base64url of a random 12-byte nonce and an AES-256-GCM
ciphertext. Sealed inside are the negotiated protocol version, the issue and
expiry times, a random revocation id and, for HTTP servers, the instance
holding the session and that instance's own session id, and for a session
whose state lives in one gateway process (a dedicated stdio process) that
process, its owner; the server id and
the caller's principal are the additional authenticated data. So a client
can read nothing out of an id, and an id changed in any byte, presented on
another server or by another principal, or past its time is refused (404).
Any gunicorn worker, and any gateway replica given the same secret, can open
it without asking anyone.

Key rotation: the first secret seals, every secret opens. DELETE revokes an
id: a record named by its revocation id, in the runtime directory's
`revoked/` folder that every worker of this host shares (in-process without
one), kept until the id would have expired anyway.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import errors, private
from .sealed import Sealer

SECRET_ENV = "MCP_GATEWAY_SESSION_SECRET"
PREFIX = "v1."  # a later format gets v2., and v1 ids can still be told apart
LABEL = b"mcp-gateway session id v1"  # the keys and AAD of session ids (sealed.py)
# Ids are a few hundred characters; anything much longer is not one of ours.
MAX_TOKEN = 2048
_REVOCATION_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Session:
    server_id: str
    protocol_version: str
    issued_at: float
    instance: str | None = None
    upstream_session: str | None = None
    principal: str | None = None  # who opened it (the token's name), when auth is on
    expires_at: float = 0.0
    revocation_id: str = ""  # names its revocation record; never shown outside the sealed id
    # The gateway process that holds the session's state (a dedicated process), where one does:
    # requests reaching another worker or replica are relayed to it.
    owner: str | None = None


class Revocations:
    """Ended sessions, by revocation id, until each would have expired anyway.

    With a folder (the runtime directory's `revoked/`), one empty file per
    ended session, its mtime the expiry: every worker of the host sees it
    with one stat. Without one (the app outside gunicorn), a set in this
    process.
    """

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._local: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, revocation_id: str, expires_at: float) -> None:
        if self.folder is None:
            with self._lock:
                self._local[revocation_id] = expires_at
            return
        self.folder.mkdir(mode=0o700, exist_ok=True)
        path = self.folder / revocation_id
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        os.utime(path, (expires_at, expires_at))

    def __contains__(self, revocation_id: object) -> bool:
        if not isinstance(revocation_id, str):
            return False
        if self.folder is None:
            return revocation_id in self._local
        return os.path.lexists(self.folder / revocation_id)

    def prune(self, now: float) -> int:
        """Forget the records of ids that have expired anyway; how many went."""
        if self.folder is None:
            with self._lock:
                gone = [rid for rid, until in self._local.items() if until < now]
                for rid in gone:
                    del self._local[rid]
            return len(gone)
        return private.prune_expired(self.folder, now)


class SessionSigner:
    """Seals and opens session ids with the secrets given (the first seals, all open)."""

    def __init__(self, secrets_: Sequence[bytes], ttl: float, clock: Callable[[], float] = time.time,
                 revocations: Revocations | None = None):
        self._sealer = Sealer(secrets_, LABEL, PREFIX, MAX_TOKEN)
        self._ttl = ttl
        self._clock = clock
        self.revocations = revocations if revocations is not None else Revocations(None)

    def mint(self, server_id: str, protocol_version: str, instance: str | None = None,
             upstream_session: str | None = None, principal: str | None = None, owner: str | None = None) -> str:
        now = self._clock()
        claims: dict[str, object] = {"v": protocol_version, "t": now, "e": now + self._ttl, "r": secrets.token_hex(16)}
        if instance is not None:
            claims["i"] = instance
        if upstream_session is not None:
            claims["u"] = upstream_session
        if owner is not None:
            claims["o"] = owner
        return self._sealer.seal(json.dumps(claims, separators=(",", ":")).encode(), server_id, principal)

    def verify(self, token: str, server_id: str, principal: str | None = None) -> Session:
        """The session `token` stands for, or SessionNotFound (HTTP 404)."""
        plain = self._sealer.open(token, server_id, principal)
        session = _session(plain, server_id, principal) if plain is not None else None
        if session is None:
            raise errors.SessionNotFound(f"session not found on server '{server_id}': start a new session with initialize")
        now = self._clock()
        if now > session.expires_at or now - session.issued_at > self._ttl:
            raise errors.SessionNotFound(f"session on server '{server_id}' has expired: start a new session with initialize")
        if session.revocation_id in self.revocations:
            raise errors.SessionNotFound(f"session on server '{server_id}' has ended (DELETE): start a new session with initialize")
        return session

    def revoke(self, session: Session) -> None:
        """End `session` for every worker of this host (until it would have expired anyway)."""
        self.revocations.add(session.revocation_id, session.expires_at)


def _session(plain: bytes, server_id: str, principal: str | None) -> Session | None:
    """The sealed claims, checked for shape (sealed by us, but a bad one must not become a 500)."""
    try:
        claims = json.loads(plain)
    except ValueError:
        return None
    if not (isinstance(claims, dict) and isinstance(claims.get("v"), str)
            and all(isinstance(claims.get(k), int | float) for k in ("t", "e"))
            and isinstance(claims.get("r"), str) and _REVOCATION_ID.fullmatch(claims["r"])
            and all(isinstance(claims.get(k), str | None) for k in ("i", "u", "o"))):
        return None
    return Session(server_id=server_id, protocol_version=claims["v"], issued_at=float(claims["t"]),
                   instance=claims.get("i"), upstream_session=claims.get("u"), principal=principal,
                   expires_at=float(claims["e"]), revocation_id=claims["r"], owner=claims.get("o"))


# --- the secrets -----------------------------------------------------------------------


def split_secrets(value: str | Iterable[str]) -> list[str]:
    """`"new,old"` or `["new", "old"]` -> `["new", "old"]` (blank items dropped)."""
    items = value.split(",") if isinstance(value, str) else [part for item in value for part in item.split(",")]
    return [item.strip() for item in items if item.strip()]


def load_secrets(configured: str | Iterable[str] | None) -> list[bytes]:
    """The session secrets, first the one that seals: configured, from the environment, or a per-host file.

    Every worker of one gunicorn must share them, and workers are separate
    processes, so when none is configured one is created once, in a file only
    this user may have written (see private.py), that all of them read.
    Replicas behind one load balancer must be given the same secrets explicitly.
    """
    for source in (configured, os.environ.get(SECRET_ENV)):
        found = split_secrets(source) if source else []
        if found:
            return [secret.encode() for secret in found]
    folder = Path(tempfile.gettempdir()) / f"mcp-gateway-{os.getuid()}"
    advice = f"remove it or set gateway.session_secret (or {SECRET_ENV})"
    return [private.read_or_create_secret(folder, "session-secret", advice).encode()]
