"""The built-in `demo` MCP server, written with the official MCP SDK.

Run by the `demo` and `demo-http` templates:
    python -m gateway.demo_server [--transport stdio|http] [--host H] [--port P]
Configuration comes from the environment, as the template maps it:
MCP_DEMO_HELLO_FROM (who greets) and MCP_DEMO_LOG_LEVEL. It answers both
protocol eras (the SDK does), over stdio or streamable HTTP at /mcp.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mcp.server import MCPServer

HELLO_FROM_ENV = "MCP_DEMO_HELLO_FROM"
LOG_LEVEL_ENV = "MCP_DEMO_LOG_LEVEL"


def build_server() -> MCPServer:
    # Imported here: the SDK is only needed where the demo server runs.
    from mcp.server import MCPServer
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response

    hello_from = os.environ.get(HELLO_FROM_ENV, "the MCP gateway demo")
    server = MCPServer("demo", version="1.0", instructions=f"A demo MCP server; greetings come from {hello_from}.")

    @server.tool()
    def say_hello(name: str) -> str:
        """Greet `name` on behalf of the configured `hello_from`."""
        return f"Hello, {name}! Greetings from {hello_from}."

    @server.tool()
    def echo_message(message: str) -> str:
        """Return `message` unchanged."""
        return message

    @server.tool()
    def get_server_info() -> dict[str, object]:
        """What this server is and how it runs."""
        return {"name": "demo", "version": "1.0", "hello_from": hello_from, "pid": os.getpid(),
                "python": platform.python_version(), "log_level": os.environ.get(LOG_LEVEL_ENV, "info")}

    @server.custom_route("/health", methods=["GET"])  # type: ignore[untyped-decorator]  # the SDK leaves it untyped
    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.demo_server", description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("stdio", "http"), default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    level = os.environ.get(LOG_LEVEL_ENV, "info").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr)
    server = build_server()
    if args.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host=args.host, port=args.port, streamable_http_path="/mcp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
