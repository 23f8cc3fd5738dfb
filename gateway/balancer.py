"""Choosing an instance of an HTTP server: strategies, stickiness, panic mode.

Strategies: `round_robin` (default), `least_connections` (fewest requests in
flight per unit of weight) and `weighted` (nginx's smooth weighted round
robin). Only routable instances are chosen (up by active checks, not
ejected), unless fewer than half are routable: then, like Envoy's panic
threshold, all are, since sending to a maybe-dead instance beats refusing.
A sticky key picks by rendezvous hashing, so every worker and every replica
maps a key to the same instance without remembering anything.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from . import errors
from .health import InstanceHealth

STRATEGIES = ("round_robin", "least_connections", "weighted")


@dataclass(eq=False)
class Instance:
    endpoint: str
    weight: int
    health: InstanceHealth
    authorization: str | None = None  # the endpoint's own credentials (registry: user:pass@)
    in_flight: int = 0
    _smooth_weight: int = field(default=0, repr=False)


class Balancer:
    def __init__(self, server_id: str, instances: Iterable[Instance], strategy: str = "round_robin"):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown load-balancing strategy {strategy!r}")
        self.server_id = server_id
        self.instances = list(instances)
        self.strategy = strategy
        self._lock = threading.Lock()
        self._eject_lock = threading.Lock()
        self._turn = itertools.count()

    def find(self, endpoint: str) -> Instance | None:
        return next((i for i in self.instances if i.endpoint == endpoint), None)

    def routable_count(self) -> int:
        return sum(1 for i in self.instances if i.health.routable)

    def candidates(self, exclude: Collection[Instance] = ()) -> list[Instance]:
        routable = [i for i in self.instances if i.health.routable]
        pool = routable if len(routable) * 2 >= len(self.instances) and routable else self.instances
        return [i for i in pool if i not in exclude]

    def pick(self, exclude: Collection[Instance] = (), sticky_key: str | None = None) -> Instance:
        """The instance for the next try; `exclude` holds the ones already tried."""
        candidates = self.candidates(exclude)
        if not candidates:
            raise errors.NoInstance(f"server '{self.server_id}': no instance left to try")
        if sticky_key is not None:
            return max(candidates, key=lambda i: _rendezvous(sticky_key, i.endpoint))
        with self._lock:
            if self.strategy == "least_connections":
                turn = next(self._turn)
                count = len(candidates)
                # Ties rotate, so equal load still spreads.
                return min(enumerate(candidates), key=lambda p: (p[1].in_flight / p[1].weight, (p[0] - turn) % count))[1]
            if self.strategy == "weighted":
                total = sum(i.weight for i in candidates)
                for instance in candidates:
                    instance._smooth_weight += instance.weight
                chosen = max(candidates, key=lambda i: i._smooth_weight)
                chosen._smooth_weight -= total
                return chosen
            return candidates[next(self._turn) % len(candidates)]

    def may_eject(self, instance: Instance) -> bool:
        """Never eject the last routable instance."""
        return any(i.health.routable for i in self.instances if i is not instance)

    def report_failure(self, instance: Instance, reason: str) -> bool:
        """Count a failure of real traffic; True if it ejected `instance`.

        Decided under one lock: two instances failing at once must not both see
        the other as routable and both be ejected.
        """
        with self._eject_lock:
            return instance.health.request_failed(reason, self.may_eject(instance))


def _rendezvous(key: str, endpoint: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{endpoint}".encode(), digest_size=8).digest()
