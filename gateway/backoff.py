"""Exponential back-off: how long to wait after the n-th consecutive failure.

Used for restarting processes that fail to start or exit, and for looking
again sooner at an instance whose health check failed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delay before the next try after `failures` consecutive failures (immutable policy)."""

    base: float = 0.5
    cap: float = 60.0

    def delay(self, failures: int) -> float:
        return 0.0 if failures <= 0 else min(self.cap, self.base * 2 ** (failures - 1))
