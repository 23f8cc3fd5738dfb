"""Failover: whether a failed request may be tried again, as one immutable value per try.

Shared by both upstreams (another instance of an HTTP server, a fresh process
of a stdio one). A try may be repeated when the error is of a kind the policy
retries (`retry_on`) and either never reached the upstream (the error class's
`retry_safe`) or the method changes nothing by protocol
(protocol.READ_ONLY_METHODS), while tries are left and the one deadline that
covers every try has not passed. The deadline is fixed by `begin()`, which its
user calls when the request is first handed to an upstream. Each further try
gets a new value from `retry()`; none is ever changed. Whether a message of the
answer already reached the client, or another instance is left to try, is for
the user to say: the policy knows nothing of them.
"""

from __future__ import annotations

import logging
import math
import time
from typing import NamedTuple

from .. import errors, metrics, protocol

log = logging.getLogger(__name__)

NOT_BEGUN = math.inf  # a deadline that never passes
_tuple = tuple.__new__  # a value made per request on the hot path: no Python-level __init__


class Failover(NamedTuple):
    """A failover policy, and where a request is in it: a tuple, so never changed and cheap to make."""

    tries: int = 1  # in all, the first included
    timeout: float = 30.0  # seconds from begin() to the deadline every try shares
    retry_on: tuple[type[errors.GatewayError], ...] = (errors.UpstreamError,)
    tried: int = 1  # tries made, the one under way included
    deadline: float = NOT_BEGUN  # time.monotonic(); fixed by begin()

    @property
    def begun(self) -> bool:
        return self.deadline != NOT_BEGUN

    def begin(self) -> Failover:
        """This policy with its deadline fixed from now (kept if it was fixed already)."""
        if self.deadline != NOT_BEGUN:
            return self
        return _tuple(Failover, (self.tries, self.timeout, self.retry_on, self.tried, time.monotonic() + self.timeout))

    def remaining(self) -> float:
        """Seconds left to the deadline (all of `timeout` before begin())."""
        return self.deadline - time.monotonic() if self.begun else self.timeout

    def passed(self) -> bool:
        return time.monotonic() >= self.deadline

    def retry(self, error: errors.GatewayError, method: str | None) -> Failover | None:
        """The policy for the next try after `error` on a request of `method`, or None: give up."""
        if not isinstance(error, self.retry_on):
            return None
        if not (error.retry_safe or method in protocol.READ_ONLY_METHODS):
            return None  # it reached the upstream, and may have changed something there
        if self.tried >= self.tries or self.passed():
            return None
        return _tuple(Failover, (self.tries, self.timeout, self.retry_on, self.tried + 1, self.deadline))


def retrying(server_id: str, what: str, elsewhere: str, error: errors.GatewayError) -> None:
    """Count and log a request tried again (`elsewhere`: another instance, another process)."""
    metrics.RETRIES.labels(server_id).inc()
    log.info("server %s: retrying %s on %s after: %s", server_id, what, elsewhere, error.message)
