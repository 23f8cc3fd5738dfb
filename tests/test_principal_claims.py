"""The host's workers agree which one holds a 2026-07-28 principal's dedicated process (owners.of_principal)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway import owners


def worker(name: str, alive: bool = True) -> Any:
    """A gateway as of_principal sees it: its owner name, and (if alive) its owner socket with a live pid."""
    local = f"{os.getpid() if alive else 999_999_999}.{name}"
    if alive:
        path = owners.socket_path(local)
        assert path is not None
        path.parent.mkdir(exist_ok=True)
        path.touch()
    return SimpleNamespace(owner=local)


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MCP_GATEWAY_RUNTIME_DIR", str(tmp_path))
    return tmp_path


def test_the_first_worker_claims_and_the_others_are_sent_to_it() -> None:
    first, second = worker("a"), worker("b")
    assert owners.of_principal(first, "srv", "alice") is None  # claimed: served here
    assert owners.of_principal(second, "srv", "alice") == first.owner  # relayed to the first
    assert owners.of_principal(first, "srv", "alice") is None
    assert owners.of_principal(second, "srv", "bob") is None  # another principal, another claim
    assert owners.of_principal(first, "other", "alice") is None  # and another server


def test_a_claim_of_a_worker_that_exited_is_taken_over() -> None:
    gone, live = worker("gone", alive=False), worker("live")
    assert owners.of_principal(gone, "srv", "alice") is None
    assert owners.of_principal(live, "srv", "alice") is None
    assert owners.of_principal(worker("later"), "srv", "alice") == live.owner


def test_racing_workers_agree_on_one_holder() -> None:
    racers = [worker(f"w{number}") for number in range(8)]
    answers: dict[str, str | None] = {}
    start = threading.Barrier(len(racers))

    def race(gateway: Any) -> None:
        start.wait()
        answers[gateway.owner] = owners.of_principal(gateway, "srv", "carol")

    threads = [threading.Thread(target=race, args=(gateway,)) for gateway in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    holders = [name for name, answer in answers.items() if answer is None]
    assert len(answers) == len(racers) and len(holders) == 1, answers
    assert {answer for answer in answers.values() if answer is not None} == set(holders), answers
