"""MCP stdio test server (official SDK) that keeps talking after it answered.

Tools:

- ``noisy``: reports progress for its own request, logs, answers "noisy done",
  and leaves a background task behind. That task waits until some later
  request calls ``listen``, then writes, in the middle of that request, what a
  pooled process must not hand to whoever holds it: a log message, list_changed
  and resources/updated notifications, progress for ``noisy``'s token and for
  another token, and a notification no spec defines.
- ``listen``: lets the leftover task speak, waits (up to ``seconds``) until it
  has, reports one progress step for its own request, and answers "heard the
  leftovers" (or "no leftovers" when no ``noisy`` call came before it).

Usage::

    python noisy_server.py
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPDeprecationWarning

_state: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(server: MCPServer[Any]) -> AsyncIterator[None]:
    # Background work outlives the request that started it, so it runs in a
    # task group of the server's lifetime.
    async with anyio.create_task_group() as group:
        _state["group"] = group
        yield
        group.cancel_scope.cancel()


mcp = MCPServer("noisy-server", version="1.0", lifespan=lifespan)


def _token(ctx: Context) -> Any:
    meta = ctx.request_context.meta
    if meta is None:
        return None
    return meta.get("progress_token", meta.get("progressToken"))  # a TypedDict; the SDK's spelling first


async def _leftovers(session: ServerSession, token: Any, wanted: anyio.Event, done: anyio.Event) -> None:
    with anyio.move_on_after(30):
        await wanted.wait()
    # Written on the connection's own channel, as a server with work of its own
    # does; raw, because the SDK itself holds some of these back on 2026-07-28.
    outbound = session._connection.outbound
    notify = getattr(outbound, "_outbound", outbound).notify  # under the SDK's filter of change notifications
    await notify("notifications/message", {"level": "error", "logger": "noisy", "data": "leftover log of an earlier call"})
    await notify("notifications/tools/list_changed", None)
    await notify("notifications/resources/list_changed", None)
    await notify("notifications/resources/updated", {"uri": "file:///leftover"})
    if token is not None:
        await notify("notifications/progress", {"progressToken": token, "progress": 99, "message": "leftover progress"})
    await notify("notifications/progress", {"progressToken": "another-token", "progress": 1, "message": "no request's"})
    await notify("notifications/custom/leftover", {"data": "unknown"})
    done.set()


@mcp.tool()
async def noisy(ctx: Context) -> str:
    """Report progress and log for this call, and leave work behind that speaks later."""
    await ctx.report_progress(1, 2, "own step 1")
    with warnings.catch_warnings():  # logging is deprecated as of 2026-07-28 (SEP-2577), still served
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        await ctx.info("own log of the noisy call")
    await ctx.report_progress(2, 2, "own step 2")
    wanted, done = anyio.Event(), anyio.Event()
    _state["wanted"], _state["done"] = wanted, done
    group: TaskGroup = _state["group"]
    group.start_soon(_leftovers, ctx.request_context.session, _token(ctx), wanted, done)
    return "noisy done"


@mcp.tool()
async def listen(ctx: Context, seconds: float = 10.0) -> str:
    """Let an earlier call's leftover work speak during this call, then answer."""
    wanted, done = _state.pop("wanted", None), _state.pop("done", None)
    heard = False
    if wanted is not None and done is not None:
        wanted.set()
        with anyio.move_on_after(seconds):
            await done.wait()
            heard = True
    await ctx.report_progress(1, 1, "own step of listen")
    return "heard the leftovers" if heard else "no leftovers"


if __name__ == "__main__":
    mcp.run("stdio")
    sys.exit(0)
