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

from collections.abc import Generator
from typing import Any, Protocol

from ..jsonrpc import Reply
from ..protocol import ClientContext, ServerHello
from ..registry import ServerEntry
from .http import HttpUpstream, ProxyRequest, ProxyResponse
from .stdio import StdioUpstream

__all__ = ["HttpUpstream", "MessageUpstream", "PassThroughUpstream", "ProxyRequest", "ProxyResponse", "StdioUpstream",
           "Upstream", "build", "instances"]


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


class MessageUpstream(Upstream, Protocol):
    """An upstream the gateway speaks JSON-RPC messages to (the gateway ends MCP HTTP)."""

    def hello(self) -> ServerHello: ...
    def call(self, message: dict[str, Any], body: bytes, client: ClientContext,
             request_id: str | None = None) -> Generator[Reply, None, None]: ...


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
