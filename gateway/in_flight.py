"""Bridged calls in flight in this worker, so that a handshake-era client's `notifications/cancelled` reaches them.

Over HTTP the cancel of a request comes as a separate POST, which may land on
any worker. Each bridged or pooled call of a handshake-era client is recorded
here by (whose: the session's revocation id, else the principal; the
JSON-RPC id) with the `Cancellation` its upstream honours (gateway/cancel.py).
A cancel that finds its call here cancels it; one that does not is sent on to
the sibling workers' owner sockets (owners.py, `to_siblings`), where it is
looked up the same way and goes no further. A caller can only ever name its
own calls: the key comes from its sealed session or its token, never from the
message alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .cancel import Cancellation

Key = tuple[str, str | int]

_calls: dict[Key, Cancellation] = {}
_lock = threading.Lock()


def key(whose: str | None, rpc_id: Any) -> Key | None:
    """The key of a call, or None when it has no owner to scope it by or an id that cannot be looked up."""
    if whose is None or isinstance(rpc_id, bool) or not isinstance(rpc_id, str | int):
        return None
    return (whose, rpc_id)


def register(call: Key, cancel: Cancellation) -> Callable[[], None]:
    """Record `cancel` under `call` (a later call reusing the id takes it over); returns what forgets it."""
    with _lock:
        _calls[call] = cancel

    def forget() -> None:
        with _lock:
            if _calls.get(call) is cancel:
                del _calls[call]
        cancel.close()

    return forget


def cancel(call: Key, reason: str) -> bool:
    """Cancel the call if this worker holds it; whether it did."""
    with _lock:
        found = _calls.get(call)
    if found is None:
        return False
    found.cancel(reason)
    return True


def count() -> int:
    with _lock:
        return len(_calls)
