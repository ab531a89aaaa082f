"""Group commit: concurrent submissions share a flush; with more than one
flusher, flushes run side by side."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from issuance.workers.batching import GroupCommit


def test_items_submitted_together_are_decided_in_few_flushes() -> None:
    flushes: list[list[int]] = []
    gate = threading.Event()

    def run(items: list[int]) -> list[int]:
        gate.wait(5)
        flushes.append(list(items))
        return [i * 2 for i in items]

    commit: GroupCommit[int, int] = GroupCommit(run, linger=0.05)
    with ThreadPoolExecutor(20) as executor:
        futures = [executor.submit(commit.submit, i) for i in range(20)]
        gate.set()
        assert [f.result() for f in futures] == [i * 2 for i in range(20)]
    assert sorted(i for flush in flushes for i in flush) == list(range(20))
    assert len(flushes) < 20


def test_two_flushers_decide_two_batches_at_once() -> None:
    inside = threading.Barrier(2, timeout=5)  # broken (an error) unless two flushes meet

    def run(items: list[int]) -> list[int]:
        inside.wait()
        return items

    commit: GroupCommit[int, int] = GroupCommit(run, max_batch=1, flushers=lambda: 2)
    with ThreadPoolExecutor(2) as executor:
        assert sorted(executor.map(commit.submit, [1, 2])) == [1, 2]


def test_an_error_reaches_every_submitter_of_its_flush() -> None:
    def run(items: list[int]) -> list[int]:
        raise RuntimeError("database gone")

    commit: GroupCommit[int, int] = GroupCommit(run)
    try:
        commit.submit(1)
    except RuntimeError as exc:
        assert str(exc) == "database gone"
    else:
        raise AssertionError("the flush's error was not raised")


def test_a_submission_travels_whole_and_an_items_error_stays_its_own() -> None:
    flushes: list[list[int]] = []

    def run(items: list[int]) -> list[int | BaseException]:
        flushes.append(list(items))
        return [ValueError(f"bad {i}") if i == 7 else i * 2 for i in items]

    commit: GroupCommit[int, int] = GroupCommit(run, max_batch=4)
    results = commit.submit_each(list(range(10)))
    assert [r for r in results if not isinstance(r, BaseException)] == [i * 2 for i in range(10) if i != 7]
    assert str(results[7]) == "bad 7"
    # Pieces of at most max_batch, never an item split from its piece, in order.
    assert [i for flush in flushes for i in flush] == list(range(10))
    assert all(len(flush) % 4 == 0 or flush[-1] == 9 for flush in flushes)
