"""Legacy-era MCP sessions that need no shared store.

The `Mcp-Session-Id` a legacy client receives is a signed, self-describing
token: it names the server, the negotiated protocol version and, for HTTP
servers, the instance holding the session and that instance's own session
id; it carries its issue time, with an HMAC over all of it. Any gunicorn worker, and any
gateway replica given the same secret, can check it without asking anyone;
an id the gateway did not mint (or one past its time to live) is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import errors

SECRET_ENV = "MCP_GATEWAY_SESSION_SECRET"


@dataclass(frozen=True)
class Session:
    server_id: str
    protocol_version: str
    issued_at: float
    instance: str | None = None
    upstream_session: str | None = None


class SessionSigner:
    def __init__(self, secret: bytes, ttl: float, clock: Callable[[], float] = time.time):
        self._key = hashlib.sha256(b"mcp-gateway session v1\0" + secret).digest()
        self._ttl = ttl
        self._clock = clock

    def mint(self, server_id: str, protocol_version: str, instance: str | None = None,
             upstream_session: str | None = None) -> str:
        claims: dict[str, object] = {"s": server_id, "v": protocol_version, "t": int(self._clock()), "n": secrets.token_hex(8)}
        if instance is not None:
            claims["i"] = instance
        if upstream_session is not None:
            claims["u"] = upstream_session
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{body}.{_b64(self._sign(body))}"

    def verify(self, token: str, server_id: str) -> Session:
        """The session `token` stands for, or SessionNotFound (HTTP 404)."""
        body, _, signature = token.partition(".")
        try:
            valid = hmac.compare_digest(_unb64(signature), self._sign(body))
            claims = json.loads(_unb64(body)) if valid else None
        except ValueError:
            claims = None
        if not isinstance(claims, dict) or claims.get("s") != server_id:
            raise errors.SessionNotFound(f"session not found on server '{server_id}': start a new session with initialize")
        issued = float(claims.get("t", 0))
        if self._clock() - issued > self._ttl:
            raise errors.SessionNotFound(f"session on server '{server_id}' has expired: start a new session with initialize")
        return Session(server_id=server_id, protocol_version=str(claims.get("v")), issued_at=issued,
                       instance=claims.get("i"), upstream_session=claims.get("u"))

    def _sign(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_secret(configured: str | None) -> bytes:
    """The session secret: configured, from the environment, or a per-host file.

    Every worker of one gunicorn must share it, and workers are separate
    processes, so an unconfigured secret is created once in a file (mode 0600)
    that all of them read. Replicas behind one load balancer must be given the
    same secret explicitly.
    """
    if configured:
        return configured.encode()
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV].encode()
    folder = Path(tempfile.gettempdir()) / f"mcp-gateway-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / "session-secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    # A worker racing the creator may read an empty file for an instant.
    for _ in range(100):
        value = path.read_text().strip()
        if value:
            return value.encode()
        time.sleep(0.01)
    raise RuntimeError(f"session secret file {path} stays empty")
