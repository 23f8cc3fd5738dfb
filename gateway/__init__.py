"""MCP gateway: one HTTP endpoint in front of many MCP servers.

`create_app()` is the application factory (gunicorn loads `wsgi:app`). It
reads and validates the registry and wires the blueprint; it starts no
process, thread or socket, so it is safe before gunicorn forks. The package
imports nothing heavy at its top, so gunicorn's master can read its config
(conf/gunicorn.conf.py imports gateway.master) before prometheus_client is
loaded and told where the workers' metrics go.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from flask import Flask

    from .registry import Registry


def configure_logging() -> None:
    """Log to stderr (gunicorn's error log) unless the host application set logging up."""
    if not logging.getLogger().handlers:
        from .logtext import OneLineFormatter

        # Every record's message is escaped and bounded (logtext.py): no client or
        # upstream value can start a log line of its own.
        handler = logging.StreamHandler()
        handler.setFormatter(OneLineFormatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        # The logging HOWTO's "Optimization": this format needs neither the caller's
        # file and line (a stack walk per record) nor thread names. The access line
        # is written for every request, so this is on the hot path.
        logging._srcfile = None
        logging.logThreads = False
        logging.logMultiprocessing = False


def _app_class() -> type[Flask]:
    from flask import Flask

    class GatewayFlask(Flask):
        """Flask, less a per-request cost on the hot path.

        Flask asks `inspect` whether each hook and the view is a coroutine on
        every request (8 times per MCP request here, ~10 us in all); nothing in
        the gateway is async, so the answer is kept per function.
        """

        _sync: ClassVar[dict[Any, Any]] = {}

        def ensure_sync(self, func: Any) -> Any:
            found = self._sync.get(func)
            if found is None:
                found = self._sync[func] = super().ensure_sync(func)
            return found

    return GatewayFlask


def create_app(test_config: Mapping[str, Any] | None = None, registry: Registry | None = None) -> Flask:
    """Build the app from `registry` (default: the one this gateway serves, see rundir.serving_registry)."""
    from . import exchange, rundir
    from .post import McpPostRoute
    from .runtime import Gateway

    configure_logging()
    app = _app_class()(__name__)
    if test_config:
        app.config.update(test_config)
    if registry is None:
        registry = rundir.serving_registry(app.config.get("REGISTRY_PATH"))
    exchange.init_app(app)
    Gateway(registry).init_app(app)
    from .views import bp

    app.register_blueprint(bp)
    app.wsgi_app = McpPostRoute(app, app.wsgi_app)  # type: ignore[method-assign]
    return app
