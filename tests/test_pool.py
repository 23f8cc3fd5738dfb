"""Pool policies with an injected clock: growth, waiting, idle retirement, spawn back-off."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from gateway import errors, metrics
from gateway.backoff import Backoff
from gateway.pool import StdioPool
from gateway.protocol import MODERN, ServerHello
from gateway.registry import StdioSettings

from .harness import Clock

HELLO = ServerHello(era=MODERN, protocol_version="2026-07-28", capabilities={}, server_info={"name": "fake"})
_pids = itertools.count(1000)


@dataclass(eq=False)
class FakeProcess:
    pid: int = field(default_factory=lambda: next(_pids))
    hello: ServerHello | None = HELLO
    running: bool = True
    closed_with: float | None = None
    closed_by: threading.Thread | None = None
    killed: bool = False

    def alive(self) -> bool:
        return self.running

    def close(self, grace: float = 2.0) -> None:
        self.running = False
        self.closed_with = grace
        self.closed_by = threading.current_thread()

    def kill(self) -> None:
        self.killed = True  # a signal: the pipes stay open for the thread using them


class Spawner:
    def __init__(self) -> None:
        self.made: list[FakeProcess] = []
        self.fail_with: str | None = None
        self.raise_: Exception | None = None
        self.gate: threading.Event | None = None  # when set, spawns wait for it

    def __call__(self) -> FakeProcess:
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.raise_ is not None:
            raise self.raise_
        if self.fail_with:
            raise errors.SpawnFailed(self.fail_with)
        process = FakeProcess()
        self.made.append(process)
        return process


def in_this_thread(job: Callable[[], None]) -> None:
    job()


def make_pool(background: bool = False, **settings: object) -> tuple[StdioPool, Spawner, Clock]:
    """A pool of fakes; spawns run in the calling thread unless `background` (the pool's own threads)."""
    spawner, clock = Spawner(), Clock()
    options = {"command": ("x",), "pool_size": 3, "pool_min": 1, "idle_timeout": 60.0, "wait_timeout": 0.2, **settings}
    extra = {} if background else {"start": in_this_thread}
    pool = StdioPool("srv", StdioSettings(**options), spawner, clock=clock, **extra)  # type: ignore[arg-type]
    return pool, spawner, clock


def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError("condition not reached in 5 s")


def test_backoff_doubles_from_base_up_to_cap() -> None:
    backoff = Backoff(base=0.5, cap=4.0)
    assert [backoff.delay(n) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]


def test_pool_starts_at_minimum_and_grows_to_pool_size_under_load() -> None:
    pool, spawner, _ = make_pool(pool_min=1, pool_size=3)
    pool.maintain()
    assert pool.stats()["processes"] == 1 and pool.stats()["idle"] == 1
    held = [pool.acquire() for _ in range(3)]
    assert len(spawner.made) == 3 and len(set(map(id, held))) == 3
    assert pool.stats()["busy"] == 3


def test_checkout_reuses_the_most_recently_returned_process() -> None:
    pool, _, _ = make_pool()
    a, b = pool.acquire(), pool.acquire()
    pool.release(a)
    pool.release(b)
    assert pool.acquire() is b


def test_full_pool_makes_requests_wait_then_503_with_retry_after() -> None:
    pool, _, _ = make_pool(pool_size=1, wait_timeout=0.2)
    pool.acquire()
    with pytest.raises(errors.Overloaded) as caught:
        pool.acquire()
    assert caught.value.http_status == 503 and caught.value.retry_after
    assert "no process became free within 0.2s" in caught.value.message and "'srv'" in caught.value.message


def test_a_waiting_request_gets_the_process_released_meanwhile() -> None:
    pool, _, _ = make_pool(pool_size=1, wait_timeout=5.0)
    first = pool.acquire()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    while pool.stats()["waiting"] == 0:
        threading.Event().wait(0.01)
    pool.release(first)
    waiter.join(5)
    assert got == [first]


def test_waiting_queue_is_bounded() -> None:
    pool, _, _ = make_pool(pool_size=1, max_waiting=0)
    pool.acquire()
    with pytest.raises(errors.Overloaded, match="already waiting"):
        pool.acquire()


def test_idle_processes_beyond_the_minimum_retire_after_idle_timeout() -> None:
    pool, _, clock = make_pool(pool_min=1, pool_size=3, idle_timeout=60.0)
    held = [pool.acquire() for _ in range(3)]
    for process in held:
        pool.release(process)
        clock.now += 1
    clock.now += 57  # idle for 60, 59 and 58 s: only the oldest is due
    pool.maintain()
    assert held[0].closed_with == 2.0 and held[1].running and pool.stats()["processes"] == 2
    clock.now += 1
    pool.maintain()
    assert not held[1].running and pool.stats()["processes"] == 1
    clock.now += 1000
    pool.maintain()
    assert held[2].running and pool.stats()["processes"] == 1  # never below pool_min


def test_failed_process_is_killed_at_once_and_counted_as_restart() -> None:
    pool, _, _ = make_pool()
    process = pool.acquire()
    pool.release(process, failure="process 1 wrote non-JSON to stdout")
    stats = pool.stats()
    assert process.closed_with == 0 and stats["restarts"] == 1 and stats["processes"] == 0
    assert stats["last_error"]["message"] == "process 1 wrote non-JSON to stdout"
    assert pool.acquire() is not process


def test_process_that_died_while_idle_is_discarded_at_checkout() -> None:
    pool, spawner, _ = make_pool()
    dead = pool.acquire()
    pool.release(dead)
    dead.running = False
    assert pool.acquire() is spawner.made[-1] is not dead
    assert pool.stats()["restarts"] == 1


def test_spawn_failures_back_off_exponentially_and_show_in_stats() -> None:
    pool, spawner, clock = make_pool(pool_min=1)
    spawner.fail_with = "server 'srv': cannot start 'x': No such file or directory"
    with pytest.raises(errors.SpawnFailed):
        pool.acquire()
    # Inside the back-off window nothing is spawned: an immediate 503.
    with pytest.raises(errors.SpawnFailed, match="next start attempt in 0.5s") as caught:
        pool.acquire()
    assert caught.value.http_status == 503 and caught.value.retry_after == 1.0
    stats = pool.stats()
    assert stats["spawn_failures"] == 1 and stats["next_spawn_in"] == 0.5 and stats["healthy"] is False
    assert "No such file" in stats["last_error"]["message"]
    clock.now += 0.5
    pool.maintain()  # upkeep retries when the window is over, and fails again
    assert pool.stats()["spawn_failures"] == 2 and pool.stats()["next_spawn_in"] == 1.0
    clock.now += 1.0
    spawner.fail_with = None
    pool.maintain()
    stats = pool.stats()
    assert stats["spawn_failures"] == 0 and stats["processes"] == 1 and stats["healthy"] is True


def test_closing_the_pool_stops_idle_processes_at_once_and_busy_ones_when_returned() -> None:
    pool, _, _ = make_pool()
    busy = pool.acquire()
    idle = pool.acquire()
    pool.release(idle)
    closer = threading.Thread(target=pool.close)
    closer.start()
    until(lambda: idle.closed_by is not None)
    assert idle.closed_with == 2.0 and idle.closed_by is closer
    with pytest.raises(errors.Overloaded, match="shutting down"):
        pool.acquire()
    # The request thread still reads the busy one's pipes: close() leaves them alone.
    assert busy.closed_by is None and not busy.killed and closer.is_alive()
    pool.release(busy)  # its request thread returns it, and closes it, itself
    closer.join(5)
    assert busy.closed_by is threading.current_thread() and not busy.killed
    assert pool.stats()["processes"] == 0


def test_a_busy_process_not_returned_in_time_is_killed_by_signal_never_closed_by_close() -> None:
    pool, _, _ = make_pool()
    busy = pool.acquire()
    pool.close(wait=0.05)
    assert busy.killed and busy.closed_by is None  # its fds stay with the request thread
    pool.release(busy, failure="process exited before it answered")
    assert busy.closed_by is threading.current_thread() and busy.closed_with == 0


def test_a_waiting_request_takes_the_first_process_that_frees_not_its_own_spawn() -> None:
    pool, spawner, _ = make_pool(background=True, pool_size=2, pool_min=0, wait_timeout=5.0)
    warm = pool.acquire()
    spawner.gate = threading.Event()  # the next process takes its time to start
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    try:
        until(lambda: pool.stats()["waiting"] == 1 and pool.stats()["starting"] == 1)
        pool.release(warm)
        waiter.join(2)
        assert got == [warm] and pool.stats()["starting"] == 1  # served before its spawn is up
    finally:
        spawner.gate.set()
        waiter.join(5)
    until(lambda: pool.stats()["idle"] == 1 and pool.stats()["starting"] == 0)
    assert pool.stats()["pids"] == sorted([warm.pid, spawner.made[-1].pid])  # type: ignore[attr-defined]


def test_waiters_share_the_processes_that_come_up() -> None:
    pool, spawner, _ = make_pool(background=True, pool_size=3, pool_min=0, wait_timeout=5.0)
    spawner.gate = threading.Event()
    got: list[object] = []
    waiters = [threading.Thread(target=lambda: got.append(pool.acquire())) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    until(lambda: pool.stats()["waiting"] == 3)
    assert pool.stats()["starting"] == 3  # one spawn per waiting request, never more than pool_size
    spawner.gate.set()
    for waiter in waiters:
        waiter.join(5)
    assert len({id(p) for p in got}) == 3 and pool.stats()["busy"] == 3


@pytest.mark.parametrize("exc", [TypeError("'NoneType' object is not subscriptable"), ValueError("embedded null byte"),
                                 KeyError("result"), AttributeError("'str' object has no attribute 'get'")])
def test_a_spawn_failure_of_any_kind_is_counted_backed_off_and_frees_the_slot(exc: Exception) -> None:
    pool, spawner, clock = make_pool(pool_size=1, pool_min=0)
    before = metrics.PROCESS_START_FAILURES.labels("srv")._value.get()
    spawner.raise_ = exc
    with pytest.raises(errors.SpawnFailed, match=type(exc).__name__) as caught:
        pool.acquire()
    assert caught.value.http_status == 503
    stats = pool.stats()
    assert stats["spawn_failures"] == 1 and stats["starting"] == 0 and stats["processes"] == 0
    assert stats["next_spawn_in"] == 0.5 and type(exc).__name__ in stats["last_error"]["message"]
    assert metrics.PROCESS_START_FAILURES.labels("srv")._value.get() == before + 1
    spawner.raise_ = None
    clock.now += 0.5
    assert pool.acquire() is spawner.made[-1]  # the slot came back
