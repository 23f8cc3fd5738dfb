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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    from .registry import Registry


def configure_logging() -> None:
    """Log to stderr (gunicorn's error log) unless the host application set logging up."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")


def create_app(test_config: Mapping[str, Any] | None = None, registry: Registry | None = None) -> Flask:
    """Build the app from `registry` (default: the registry this gateway runs, see extension.boot_registry)."""
    from flask import Flask

    from . import accesslog, metrics
    from .extension import Gateway, boot_registry

    configure_logging()
    app = Flask(__name__)
    if test_config:
        app.config.update(test_config)
    if registry is None:
        registry = boot_registry(app.config.get("REGISTRY_PATH"))
    app.config["MAX_CONTENT_LENGTH"] = registry.gateway.max_body_bytes
    accesslog.init_app(app, registry.gateway.log_format, registry.gateway.trusted_proxies)
    metrics.init_app(app)
    Gateway(registry).init_app(app)
    from .views import bp

    app.register_blueprint(bp)
    return app
