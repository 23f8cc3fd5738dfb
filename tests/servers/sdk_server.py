"""MCP test server built with the official SDK (``mcp.server.MCPServer``).

Serves both protocol eras (legacy ``initialize`` and modern 2026-07-28) from one
process.  Tools: ``add``, ``whoami``, ``slow``, ``ask``, ``announce``, ``sleep``, ``blob``, ``crash``.

Usage::

    python sdk_server.py stdio          # stdio transport (TEST_SERVER_START_SECONDS: sleep first)
    python sdk_server.py http PORT      # streamable HTTP on http://127.0.0.1:PORT/mcp
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Annotated

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context, Elicit, Resolve
from mcp.server.request_state import RequestStateSecurity
from mcp.shared.exceptions import MCPDeprecationWarning
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

# Instances of one server must share the key that seals MRTR requestState, or a
# retry that a balancer sends to another instance is refused. Tests set it.
_STATE_KEY = os.environ.get("TEST_SERVER_STATE_KEY")
mcp = MCPServer(
    "test-server",
    version="1.0",
    request_state_security=RequestStateSecurity(keys=[_STATE_KEY]) if _STATE_KEY else None,
)



@mcp.custom_route("/health", methods=["GET"])
async def health(request: Request) -> Response:
    """A plain HTTP health endpoint, as load balancers and the gateway's checks use."""
    return PlainTextResponse("ok")

@mcp.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@mcp.tool()
def record(token: str) -> str:
    """Append ``token`` to the file named by TEST_RECORD_FILE: a test counts how often each call ran."""
    with open(os.environ["TEST_RECORD_FILE"], "a", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token


@mcp.tool()
def whoami() -> int:
    """Return the PID of the server process that served this call."""
    return os.getpid()


@mcp.tool()
async def slow(ctx: Context, steps: int = 3) -> str:
    """Report progress ``steps`` times (0.2 s apart), log once, return "done"."""
    for i in range(1, steps + 1):
        await ctx.report_progress(i, steps, f"step {i}")
        await anyio.sleep(0.2)
    # The whole logging capability is deprecated as of 2026-07-28 (SEP-2577);
    # there is no non-deprecated API for it, so silence the warning locally.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        await ctx.info("slow finished")
    return "done"


class Name(BaseModel):
    """Elicited form: a single name."""

    name: str


def ask_name() -> Elicit[Name]:
    """Resolver: elicit the user's name (input_required or elicitation/create)."""
    return Elicit("What is your name?", Name)


@mcp.tool()
async def ask(who: Annotated[Name, Resolve(ask_name)]) -> str:
    """Elicit a name (works in both eras) and greet it."""
    return f"hello {who.name}"


@mcp.tool()
async def announce(ctx: Context, uri: str = "") -> str:
    """Publish a tools-list change, and an update of ``uri`` when given, to the ``subscriptions/listen`` streams."""
    await ctx.notify_tools_changed()
    if uri:
        await ctx.notify_resource_updated(uri)
    return "announced"


@mcp.tool()
async def sleep(seconds: float) -> str:
    """Sleep ``seconds`` then return "slept"."""
    await anyio.sleep(seconds)
    return "slept"


@mcp.tool()
def blob(size: int) -> str:
    """A string of ``size`` x characters: a large answer."""
    return "x" * size


@mcp.tool()
def crash() -> str:
    """Kill the server process (exit code 3) in the middle of the call."""
    os._exit(3)


def main(argv: list[str]) -> int:
    """Run over stdio or streamable HTTP according to ``argv``."""
    if len(argv) >= 1 and argv[0] == "stdio":
        # A server slow to start (tests of pool growth): it reads nothing meanwhile.
        time.sleep(float(os.environ.get("TEST_SERVER_START_SECONDS", "0")))
        mcp.run("stdio")
        return 0
    if len(argv) >= 2 and argv[0] == "http":
        mcp.run(
            "streamable-http",
            host="127.0.0.1",
            port=int(argv[1]),
            streamable_http_path="/mcp",
        )
        return 0
    print("usage: sdk_server.py stdio | http PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
