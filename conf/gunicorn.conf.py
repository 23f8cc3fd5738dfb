"""gunicorn settings for the MCP gateway: `gunicorn -c conf/gunicorn.conf.py wsgi:app`.

Threaded workers (gthread): each worker process has its own stdio pools, and
its threads share them. Worker processes are what beat the GIL, so there are
as many as cores by default. Override with the environment variables below
or on the command line (a `--bind` given there wins over the registry).
"""

import multiprocessing
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# First thing, before prometheus_client is imported anywhere: the runtime directory
# (metrics of every worker, their status, the last good registry). Exits on an
# invalid registry at start; on HUP an invalid one is refused and the old one kept.
from gateway import master as _master

_settings = _master.load_settings()

bind = [os.environ.get("MCP_GATEWAY_BIND", f"{_settings.host}:{_settings.port}")]
# gthread, taking only its fair share of new connections and serving a kept-alive
# connection's next request on the same thread (gateway/worker.py).
worker_class = "gateway.worker.GatewayThreadWorker"
workers = int(os.environ.get("MCP_GATEWAY_WORKERS") or min(4, max(2, multiprocessing.cpu_count())))
threads = int(os.environ.get("MCP_GATEWAY_THREADS") or 8)
# gthread workers heartbeat from their main loop, so a long tool call does not trip this.
timeout = 60
# On TERM a worker stops accepting and finishes in-flight calls for this long.
graceful_timeout = 30
keepalive = 75  # above nginx's default upstream keepalive_timeout of 60 s
# A relayed stream's connection counts among a worker's connections (gateway/streams.py): room for
# gateway.max_streams of them, plus gunicorn's default 1000 for everything else.
worker_connections = _settings.max_streams + 1000
preload_app = False  # pools, threads and children are per worker, made after fork
# The gateway writes its own access line (request id, server, MCP method, upstream);
# gunicorn's is off unless asked for.
accesslog = os.environ.get("MCP_GATEWAY_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("MCP_GATEWAY_LOG_LEVEL", "info")


# The master's part: http templates' processes (once per gateway), HUP, exited workers.
on_starting = _master.on_starting
on_reload = _master.on_reload
child_exit = _master.child_exit
on_exit = _master.on_exit


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    """Start this worker's pools now rather than on its first request.

    A reload lets requests on a replaced upstream run as long as a HUP lets them: graceful_timeout.
    """
    gateway = worker.wsgi.extensions.get("mcp_gateway")
    if gateway is not None:
        gateway.drain_timeout = float(worker.cfg.graceful_timeout)
        gateway.start()


def worker_exit(server, worker):  # type: ignore[no-untyped-def]
    """Stop every child of the exiting worker: close stdin, TERM, KILL the group."""
    gateway = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get("mcp_gateway")
    if gateway is not None:
        gateway.close()

# gunicorn 27's control socket defaults to one path per user; two gateways on
# one host (or a test suite) would fight over it. Nothing here uses it.
control_socket_disable = True
