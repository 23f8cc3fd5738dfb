"""Upstreams: what a registry entry becomes, and the interface the views use.

A message upstream turns one client JSON-RPC request into the stream of
messages that answers it (notifications first, the response last), whatever
transport and protocol era sits behind it. `stdio.StdioUpstream` serves
`stdio` entries (stdio templates included) from a process pool;
`http.HttpUpstream` serves `http` entries (http templates included), passing
requests through and answering like a message upstream only for traffic it
bridges between eras. The views see them through the Protocols here only;
`instances` gives the face of an upstream that requests can be passed
through to (an http server's instances), or None.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from ..cancel import Cancellation
from ..jsonrpc import Reply
from ..protocol import ClientContext, ServerHello
from ..registry import ServerEntry
from .http import HttpUpstream, ProxyRequest, ProxyResponse
from .stdio import StdioUpstream

__all__ = ["HttpUpstream", "MessageUpstream", "PassThroughUpstream", "ProxyRequest", "ProxyResponse", "Replies",
           "StdioUpstream", "Upstream", "build", "instances"]


class Upstream(Protocol):
    """What every registry entry becomes: run by upkeep, reported by /status."""

    server_id: str
    type: str

    def maintain(self) -> None: ...
    def close(self) -> None: ...
    def status(self) -> dict[str, Any]: ...
    def passes_through(self, era: str) -> bool:
        """Whether a client of `era` can be passed through as it is (MCP HTTP end to end), not bridged."""
        ...


class Replies(Protocol):
    """The messages answering one request, notifications first, the response last (final).

    `close` ends it early (the client left): the upstream winds the request
    down. `hand_over`, once the first reply was taken, gives the rest as a
    streams.Feed of SSE events the worker's loop relays instead of a thread
    iterating (every later reply, the response included, or an error event
    when the request fails or runs out of time), or None when it cannot;
    after a hand-over the feed owns the request and `close` is a no-op.
    """

    def __iter__(self) -> Iterator[Reply]: ...
    def __next__(self) -> Reply: ...
    def close(self) -> None: ...


class MessageUpstream(Upstream, Protocol):
    """An upstream the gateway speaks JSON-RPC messages to (the gateway ends MCP HTTP)."""

    def hello(self) -> ServerHello: ...
    def call(self, message: dict[str, Any], body: bytes, client: ClientContext,
             request_id: str | None = None, cancel: Cancellation | None = None) -> Replies:
        """Serve one request; `cancel`, when given, cut it short from another thread (errors.Cancelled)."""
        ...


class PassThroughUpstream(MessageUpstream, Protocol):
    """An upstream of instances speaking MCP HTTP: a request can also be passed to one as it is."""

    def forward(self, request: ProxyRequest) -> ProxyResponse: ...
    def available(self, endpoint: str) -> bool:
        """Whether requests pinned to `endpoint` can still reach it."""
        ...


def instances(upstream: Upstream) -> PassThroughUpstream | None:
    """`upstream` as one with instances to pass requests to (an http server), or None (stdio)."""
    return upstream if isinstance(upstream, HttpUpstream) else None


def build(entry: ServerEntry, check_interval: float) -> MessageUpstream | HttpUpstream:
    if entry.type == "stdio":
        return StdioUpstream(entry)
    if entry.http is not None:
        return HttpUpstream(entry, check_interval)
    raise ValueError(f"server '{entry.id}' has neither stdio nor http settings")
