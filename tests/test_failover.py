"""The failover policy (gateway/upstreams/failover.py): one immutable value per try.

Which failures may be tried again for which methods, how many tries, one
deadline for them all. No clock is mocked: a deadline of 0 s has passed as soon
as it is fixed, one of an hour has not.
"""

from __future__ import annotations

import logging

import pytest

from gateway import errors, metrics
from gateway.upstreams.failover import Failover, retrying

HOUR = 3600.0


def test_a_failure_before_the_request_left_is_retried_for_any_method() -> None:
    policy = Failover(tries=2, timeout=HOUR).begin()
    for error in (errors.UpstreamUnreachable("refused"), errors.NoInstance("none"), errors.RequestNotSent("pipe")):
        assert policy.retry(error, "tools/call") is not None
        assert policy.retry(error, None) is not None


def test_a_failure_after_the_request_left_is_retried_only_for_read_only_methods() -> None:
    policy = Failover(tries=2, timeout=HOUR).begin()
    broke = errors.UpstreamFailed("reset")
    assert policy.retry(broke, "tools/call") is None
    assert policy.retry(broke, None) is None  # a GET or DELETE passed through: no JSON-RPC method
    assert policy.retry(broke, "tools/list") is not None
    assert policy.retry(errors.UpstreamReadTimeout("slow"), "resources/read") is not None


def test_a_clients_error_is_never_retried() -> None:
    policy = Failover(tries=5, timeout=HOUR).begin()
    assert policy.retry(errors.SessionNotFound("gone"), "tools/list") is None
    assert policy.retry(errors.InvalidParams("bad"), "tools/list") is None


def test_retry_on_limits_which_failures_count() -> None:
    # stdio retries only what a process did; a pool that could not start one is not tried again.
    policy = Failover(tries=2, timeout=HOUR, retry_on=(errors.ProcessFailed,)).begin()
    assert policy.retry(errors.SpawnFailed("cannot start"), "tools/list") is None
    assert policy.retry(errors.Overloaded("busy"), "tools/list") is None
    assert policy.retry(errors.RequestNotSent("pipe"), "tools/call") is not None
    assert policy.retry(errors.ProcessFailed("died"), "tools/list") is not None
    assert policy.retry(errors.ProcessFailed("died"), "tools/call") is None


def test_tries_are_counted_and_run_out() -> None:
    error = errors.UpstreamUnreachable("refused")
    assert Failover(tries=1, timeout=HOUR).begin().retry(error, "tools/list") is None
    first = Failover(tries=3, timeout=HOUR).begin()
    second = first.retry(error, "tools/list")
    assert second is not None and second.tried == 2
    third = second.retry(error, "tools/list")
    assert third is not None and third.tried == 3
    assert third.retry(error, "tools/list") is None


def test_one_deadline_for_every_try() -> None:
    error = errors.UpstreamUnreachable("refused")
    passed = Failover(tries=3, timeout=0.0).begin()
    assert passed.passed() and passed.remaining() <= 0
    assert passed.retry(error, "tools/list") is None
    started = Failover(tries=3, timeout=HOUR).begin()
    retried = started.retry(error, "tools/list")
    assert retried is not None and retried.deadline == started.deadline  # not a new deadline per try
    assert retried.begin() is retried  # begun once: a later begin() keeps the deadline


def test_the_deadline_starts_at_begin_not_when_the_policy_is_made() -> None:
    # stdio: the deadline starts when the request is first written to a process, not while one starts.
    policy = Failover(tries=2, timeout=0.0)
    assert not policy.begun and not policy.passed() and policy.remaining() == 0.0
    assert policy.retry(errors.RequestNotSent("pipe"), "tools/call") is not None  # nothing to have passed yet
    assert policy.begin().begun and policy.begin().passed()


def test_a_policy_is_an_immutable_value() -> None:
    policy = Failover(tries=2, timeout=HOUR)
    with pytest.raises(AttributeError):
        policy.tries = 5  # type: ignore[misc]
    begun = policy.begin()
    assert begun is not policy and not policy.begun and policy.tried == 1
    retried = begun.retry(errors.UpstreamUnreachable("refused"), "tools/call")
    assert retried is not None and retried is not begun and begun.tried == 1 and retried.tried == 2
    assert hash(policy) == hash(Failover(tries=2, timeout=HOUR))


def test_the_retry_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    def count() -> float:
        return metrics.RETRIES.labels("fo-test")._value.get()  # type: ignore[attr-defined,no-any-return]

    before = count()
    with caplog.at_level(logging.INFO, logger="gateway.upstreams.failover"):
        retrying("fo-test", "tools/list", "another instance", errors.UpstreamUnreachable("it is down"))
    assert count() == before + 1
    lines = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert lines == ["server fo-test: retrying tools/list on another instance after: it is down"]
