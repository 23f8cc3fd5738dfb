"""HTTP upstreams: MCP Streamable HTTP to the balanced instances of one server.

`HttpUpstream` puts together what serving one `http` entry takes: the
balancer (balancer.py) picks an instance, the transport (transport.py) sends
one request to it and accounts the outcome to the instance's health, the
failover policy (failover.py) says whether a failed try may go to another
instance, the active checks (checks.py) probe the instances on a schedule,
and the bridge (bridge.py) serves clients of the era the instances do not
speak. A request passed through (`forward`) keeps its bytes: its answer is
returned once its headers arrive, an SSE body streamed as the instance writes
it, a JSON body read whole first so a read-only request can still fail over.
"""

from __future__ import annotations

from typing import Any

from .. import errors
from ..balancer import Balancer, Instance
from ..cancel import Cancellation
from ..health import HealthPolicy, InstanceHealth
from ..protocol import ClientContext, ServerHello
from ..registry import HttpSettings, ServerEntry
from ..settings import GATEWAY
from .bridge import Bridge, BridgedReplies, session_lost
from .checks import HealthChecks
from .failover import Failover, retrying
from .transport import ProxyRequest, ProxyResponse, Transport

__all__ = ["HttpUpstream", "ProxyRequest", "ProxyResponse"]


class HttpUpstream:
    type = "http"

    def __init__(self, entry: ServerEntry, check_interval: float = GATEWAY.default("health_check_interval")):
        assert entry.http is not None
        self.server_id = entry.id
        self.settings: HttpSettings = entry.http
        policy = HealthPolicy(
            rise=self.settings.health_check_rise, fall=self.settings.health_check_fall,
            max_fails=self.settings.max_fails, ejection_time=self.settings.ejection_time,
        )
        self.balancer = Balancer(
            entry.id, (Instance(i.endpoint, i.weight, InstanceHealth(policy), i.authorization)
                       for i in self.settings.instances),
            self.settings.load_balancing,
        )
        self.retries = 0
        # nginx's proxy_next_upstream with its non_idempotent rule: each instance once, under one deadline.
        self.failover = Failover(tries=len(self.balancer.instances), timeout=self.settings.request_timeout)
        self.transport = Transport(entry.id, self.settings, self.balancer)
        self.bridge = Bridge(entry.id, self.settings, self.balancer, self.transport, self.failover, self._retrying)
        self.checks = HealthChecks(entry.id, self.settings, self.balancer, self.transport, check_interval, self.relearn)

    # --- lifecycle ---------------------------------------------------------------

    @property
    def check_interval(self) -> float:
        return self.checks.interval

    @check_interval.setter
    def check_interval(self, seconds: float) -> None:
        self.checks.interval = seconds

    def close(self) -> None:
        self.transport.close()

    def maintain(self) -> None:
        """Run the active checks that are due (called by the upkeep thread)."""
        self.checks.maintain()

    def check_all(self) -> None:
        """Check every instance now, whatever the schedule."""
        self.checks.check_all()

    # --- passing through ---------------------------------------------------------

    def forward(self, request: ProxyRequest) -> ProxyResponse:
        """Send `request` to an instance, failing over where that is safe."""
        policy = self.failover.begin()
        tried: list[Instance] = []
        sticky = request.headers.get(self.settings.sticky_header) if self.settings.sticky_header else None
        while True:
            instance = self._pinned(request) if request.instance else self.balancer.pick(tried, sticky)
            tried.append(instance)
            try:
                answer = self.transport.send(instance, request, policy.deadline)
                if request.upstream_session and session_lost(answer):
                    # Some servers answer 400 for a session they no longer know; the spec says 404.
                    raise errors.SessionNotFound(
                        f"server '{self.server_id}': instance {instance.endpoint} no longer knows this session; "
                        "start a new session"
                    )
                return answer
            except errors.UpstreamError as exc:
                retry = None if request.instance is not None else policy.retry(exc, request.rpc_method)
                if retry is None or not self.balancer.candidates(tried):
                    if isinstance(exc, errors.BadStatus):
                        answer = exc.response
                        assert isinstance(answer, ProxyResponse)
                        return answer  # the instance's own answer, unchanged
                    raise
                policy = retry
                self._retrying(request.rpc_method or request.method, exc)

    def _retrying(self, what: str, exc: errors.UpstreamError) -> None:
        """A request passed through or bridged goes to another instance."""
        self.retries += 1
        retrying(self.server_id, what, "another instance", exc)

    def available(self, endpoint: str) -> bool:
        """Whether requests pinned to `endpoint` can still reach it."""
        instance = self.balancer.find(endpoint)
        return instance is not None and instance.health.routable

    def _pinned(self, request: ProxyRequest) -> Instance:
        instance = self.balancer.find(request.instance or "")
        if instance is None or not instance.health.routable:
            # The session lived there; the spec's answer is 404 and a new session.
            raise errors.SessionNotFound(
                f"server '{self.server_id}': the instance holding this session is no longer available; start a new session"
            )
        return instance

    # --- era bridging (bridge.py) ------------------------------------------------

    def passes_through(self, era: str) -> bool:
        """Whether the instances speak `era` (asked once; see Bridge.speaks_era)."""
        return self.bridge.speaks_era(era)

    def hello(self) -> ServerHello:
        """What the server says of itself, for the gateway's own initialize/discover answers."""
        return self.bridge.hello()

    def relearn(self) -> None:
        """Forget which eras the instances speak (on reload, and when an instance comes back)."""
        self.bridge.relearn()

    def call(self, message: dict[str, Any], body: bytes, client: ClientContext,
             request_id: str | None = None, cancel: Cancellation | None = None) -> BridgedReplies:
        """A bridged request: translated, sent, and every message of the answer translated back."""
        return self.bridge.call(message, body, client, request_id, cancel)

    # --- reporting ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        instances = [{"endpoint": i.endpoint, "weight": i.weight, "in_flight": i.in_flight, **i.health.describe()}
                     for i in self.balancer.instances]
        return {
            "type": self.type,
            "load_balancing": self.balancer.strategy,
            "healthy": self.balancer.routable_count() > 0,
            "routable": self.balancer.routable_count(),
            "retries": self.retries,
            "instances": instances,
        }
