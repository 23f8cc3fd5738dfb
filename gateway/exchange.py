"""One request from its first byte to its last: what it was, and what happens when it ends.

An `Exchange` is begun for every request, by the Flask hooks here or by the
MCP POST route (post.py), which serves its requests without Flask. As the
request is served it learns the caller, the MCP method and the upstream.
When the response closes (after the last byte of a stream, not when the view
returns) `finish` hands the upstream back to the gateway, writes the access
line and records the metrics, the same way whichever path served it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.datastructures import EnvironHeaders
from werkzeug.wsgi import get_path_info

from . import accesslog, metrics

REQUEST_ID_HEADER = "X-Request-Id"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(eq=False)
class Exchange:
    """One request: what the access line and the metrics say of it, and the lease it holds."""

    method: str
    path: str
    peer: str | None
    headers: EnvironHeaders
    request_id: str
    server_id: str | None = None  # from the URL: the MCP routes only
    started: float = field(default_factory=time.perf_counter)
    principal: str | None = None  # the token's name, never its value
    mcp_method: str | None = None
    rpc_id: Any = None
    rpc_error: bool = False
    upstream: str | None = None  # the instance or process that answered
    owner: str | None = None  # the gateway process the request was relayed to (owners.py)
    served: bool = False  # the server id named a server of the registry
    release: Callable[[], None] | None = None  # hands the upstream back (Gateway.checkout)

    @classmethod
    def begin(cls, environ: dict[str, Any], server_id: str | None = None, path: str | None = None) -> Exchange:
        headers = EnvironHeaders(environ)
        given = headers.get(REQUEST_ID_HEADER, "")
        return cls(
            method=environ["REQUEST_METHOD"], path=get_path_info(environ) if path is None else path,
            peer=environ.get("REMOTE_ADDR"),
            headers=headers, server_id=server_id,
            # The client's id when it is sane; else one as unique as uuid4, and cheaper.
            request_id=given if _SANE_ID.match(given) else os.urandom(16).hex(),
        )

    def respond(self, app: Flask, response: Response) -> Response:
        """Tag the response with the request id and finish the exchange when it closes."""
        response.headers[REQUEST_ID_HEADER] = self.request_id
        status = response.status_code
        response.call_on_close(lambda: self.finish(app, status))
        return response

    def detach(self) -> None:
        """The request's stream is relayed by the worker's loop: it holds no thread from now on.

        Its bulkhead slot (a share of the worker's threads) is given back at
        once, so a reload does not wait for relayed streams on a replaced
        upstream: they go on on their own socket until they end or the worker
        stops. And of the request only what the access line still needs is
        kept, X-Forwarded-For: not the whole environ (wsgi.input, the parser's
        objects), which the headers would keep for the stream's life.
        """
        release, self.release = self.release, None
        forwarded = self.headers.get("X-Forwarded-For")
        self.headers = EnvironHeaders({} if forwarded is None else {"HTTP_X_FORWARDED_FOR": forwarded})
        if release is not None:
            release()

    def finish(self, app: Flask, status: int) -> None:
        release, self.release = self.release, None
        try:
            if release is not None:
                release()
        finally:  # each step happens even if one before it failed
            try:
                accesslog.write(app, self, status)
            finally:
                if self.server_id is not None:
                    metrics.record(self, status)


def init_app(app: Flask) -> None:
    """Begin and finish an exchange for every request Flask serves."""
    accesslog.configure(app)  # text, no proxies believed, until the registry says otherwise

    def begin() -> None:
        current()

    def finish(response: Response) -> Response:
        return current().respond(app, response)

    app.before_request(begin)
    app.after_request(finish)


def current() -> Exchange:
    """The exchange of the request Flask is serving, begun on first use (the first before_request hook)."""
    exchange: Exchange | None = g.get("exchange")
    if exchange is None:
        exchange = g.exchange = Exchange.begin(request.environ, (request.view_args or {}).get("server_id"))
    return exchange
