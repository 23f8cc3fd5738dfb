"""Sealed tokens: AES-256-GCM with keys derived from the gateway's secrets.

What the gateway hands a client to bring back later (a session id, an MRTR
requestState envelope) is sealed here: `prefix` and the base64url of a random
12-byte nonce and the ciphertext, with additional authenticated data the
caller chooses (the server id and the principal), so a token can be neither
read nor changed, nor used on another server or by another principal. Each
use has its own label, from which its keys are derived (HKDF-SHA256), so a
token of one kind never opens as another. Key rotation: the first secret
seals, every secret opens.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE = 12
TAG = 16
# The plaintext is padded to a multiple of this, so a token's length says little
# about how long what it holds is.
PAD = 64


class Sealer:
    """Seals and opens tokens of one kind (`label`), starting with `prefix`."""

    def __init__(self, secrets_: Sequence[bytes], label: bytes, prefix: str, max_length: int):
        if not secrets_:
            raise ValueError("at least one secret is needed")
        self._keys = [AESGCM(_derive(secret, label)) for secret in secrets_]
        self._aad_label = label + b"\0"
        self.prefix = prefix
        self.max_length = max_length

    def seal(self, plain: bytes, *context: str | None) -> str:
        plain += b" " * (-len(plain) % PAD)  # JSON ignores trailing whitespace
        nonce = os.urandom(NONCE)
        sealed = self._keys[0].encrypt(nonce, plain, self._aad(context))
        return self.prefix + base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()

    def open(self, token: str, *context: str | None) -> bytes | None:
        """The plaintext, or None for anything not sealed by these keys for this `context`."""
        if not token.startswith(self.prefix) or len(token) > self.max_length:
            return None
        body = token[len(self.prefix):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < NONCE + TAG or _b64(raw) != body:  # one encoding per token: no equivalent spellings
            return None
        aad = self._aad(context)
        for key in self._keys:
            try:
                return key.decrypt(raw[:NONCE], raw[NONCE:], aad)
            except InvalidTag:
                continue
        return None

    def _aad(self, context: Sequence[str | None]) -> bytes:
        # JSON, so that no pair of values can spell another pair.
        return self._aad_label + json.dumps(list(context)).encode()


def _derive(secret: bytes, label: bytes) -> bytes:
    """A 256-bit AES key from a secret of any length."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(secret)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
