"""Health of one HTTP upstream instance: active checks and passive ejection.

Active checks follow HAProxy: an instance goes down after `fall` failed
checks in a row and comes back after `rise` good ones; it is routable before
its first check, and one good check is enough at boot. A good check also
ends a passive ejection (Envoy's default). Passive ejection follows
Envoy's outlier detection: `max_fails` consecutive failures of real traffic
eject it for `ejection_time` x the number of times it has been ejected
(capped). The balancer, not this class, makes sure the last instance is never
ejected. Time comes from an injected clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .settings import HTTP

MAX_EJECTION_MULTIPLIER = 10


@dataclass(frozen=True)
class HealthPolicy:
    """An HTTP server's health settings (defaults: the registry's, gateway/settings.py)."""

    rise: int = HTTP.default("health_check_rise")
    fall: int = HTTP.default("health_check_fall")
    max_fails: int = HTTP.default("max_fails")
    ejection_time: float = HTTP.default("ejection_time")


class InstanceHealth:
    def __init__(self, policy: HealthPolicy, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self._clock = clock
        self.checked = False
        self.up = True  # routable until a check says otherwise
        self._streak = 0  # consecutive check results against the current state
        self.failed_checks = 0  # consecutive, whatever the state
        self.consecutive_failures = 0  # of real traffic
        self.times_ejected = 0
        self.ejected_until = 0.0
        self.last_error: tuple[str, float] | None = None

    # --- active checks ---------------------------------------------------------

    def check_passed(self) -> bool:
        """Record a good check; True when this brought the instance back up."""
        self.failed_checks = 0
        # Envoy's default: a good active check ends an ejection.
        self.ejected_until = 0.0
        if not self.checked:
            self.checked, self.up = True, True
            return False
        if self.up:
            self._streak = 0
            return False
        self._streak += 1
        if self._streak >= self.policy.rise:
            self.up, self._streak = True, 0
            self.consecutive_failures = 0
            return True
        return False

    def check_failed(self, reason: str) -> bool:
        """Record a failed check; True when this took the instance down."""
        self._note(reason)
        self.checked = True
        self.failed_checks += 1
        if not self.up:
            self._streak = 0
            return False
        self._streak += 1
        if self._streak >= self.policy.fall:
            self.up, self._streak = False, 0
            return True
        return False

    # --- passive ejection --------------------------------------------------------

    @property
    def ejected(self) -> bool:
        return self._clock() < self.ejected_until

    def request_succeeded(self) -> None:
        self.consecutive_failures = 0

    def request_failed(self, reason: str, may_eject: bool) -> bool:
        """Record a failure of real traffic; True when it ejected the instance."""
        self._note(reason)
        self.consecutive_failures += 1
        if not may_eject or self.ejected or self.consecutive_failures < self.policy.max_fails:
            return False
        self.times_ejected += 1
        multiplier = min(self.times_ejected, MAX_EJECTION_MULTIPLIER)
        self.ejected_until = self._clock() + self.policy.ejection_time * multiplier
        self.consecutive_failures = 0
        return True

    @property
    def settled(self) -> bool:
        """Up, not ejected, last check good: checks may go at the normal interval."""
        return self.up and self.failed_checks == 0 and not self.ejected and self._streak == 0

    @property
    def routable(self) -> bool:
        return self.up and not self.ejected

    def _note(self, reason: str) -> None:
        self.last_error = (reason, time.time())

    def describe(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "healthy": self.up,
            "checked": self.checked,
            "ejected": self.ejected,
            "times_ejected": self.times_ejected,
            "consecutive_failures": self.consecutive_failures,
            "failed_checks": self.failed_checks,
            "last_error": None,
        }
        if self.ejected:
            state["ejected_for"] = round(self.ejected_until - self._clock(), 3)
        if self.last_error:
            message, at = self.last_error
            state["last_error"] = {"message": message, "at": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")}
        return state
