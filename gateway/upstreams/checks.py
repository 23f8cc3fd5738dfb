"""Active health checks of an HTTP server's instances, and when each is due.

Run by the gateway's upkeep thread (`maintain`): each instance is probed
through the transport every `interval` seconds, with jitter so the workers'
checks spread out, and sooner while it is failing, ejected or rising. A probe's
result moves the instance's health (health.py); one that comes back may be a
new deployment, so `came_back` is called.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from .. import errors
from ..backoff import Backoff
from ..balancer import Balancer, Instance
from ..registry import HttpSettings
from .transport import Transport

log = logging.getLogger(__name__)


class HealthChecks:
    def __init__(self, server_id: str, settings: HttpSettings, balancer: Balancer, transport: Transport,
                 interval: float, came_back: Callable[[], None]):
        self.server_id = server_id
        self.settings = settings
        self.balancer = balancer
        self.transport = transport
        self.interval = interval  # gateway.health_check_interval; runtime.py changes it on reload
        self._came_back = came_back
        # endpoint -> (when it was last checked, the jitter of its next wait)
        self._last_check = {i.endpoint: (float("-inf"), 1.0) for i in balancer.instances}

    def maintain(self) -> None:
        """Run the checks that are due."""
        for instance in self.balancer.instances:
            # Like HAProxy's fastinter: while an instance is failing, ejected or
            # rising, look again sooner (1 s, doubling up to the interval), so
            # failures show and recoveries come back quickly. The due time follows
            # the instance's state now, so an ejection brings its check forward.
            health = instance.health
            wait = self.interval
            if not health.settled:
                wait = min(wait, Backoff(base=1.0).delay(max(1, health.failed_checks)))
            last, jitter = self._last_check[instance.endpoint]
            if time.monotonic() >= last + wait * jitter:
                self.check(instance)
                # Jitter spreads the checks of many workers over the interval.
                self._last_check[instance.endpoint] = (time.monotonic(), random.uniform(0.8, 1.2))

    def check_all(self) -> None:
        """Check every instance now, whatever the schedule."""
        for instance in self.balancer.instances:
            self.check(instance)

    def check(self, instance: Instance) -> None:
        try:
            status = self.transport.probe(instance)
            # Any answer below 500 to an MCP probe means the process is alive.
            good = 200 <= status < 300 if self.settings.health_check else status < 500
            reason = f"health check answered {status}"
        except errors.UpstreamError as exc:
            good, reason = False, f"health check failed: {exc.message}"
        if good:
            if instance.health.check_passed():
                log.warning("server %s: instance %s is healthy again", self.server_id, instance.endpoint)
                self._came_back()  # it may be a new deployment, speaking other eras
        elif instance.health.check_failed(reason):
            log.warning("server %s: instance %s is down: %s", self.server_id, instance.endpoint, reason)
