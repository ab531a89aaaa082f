"""Group commit: the claims of concurrent deliveries decided in one transaction.

Dramatiq hands each message to a worker thread. A thread handling a claim
message (one claim, or a producer's batch) submits its claims here and waits;
one flusher thread per process takes whatever has gathered (up to
``max_batch`` claims), decides it as one batch, publishes its credit message,
and wakes the submitters, which then return and let Dramatiq acknowledge their
deliveries. Nothing is acknowledged before its claims have committed, so a
crash anywhere re-delivers. Many small messages cost few transactions.

With more than one flusher, batches are decided in parallel transactions
(the claim handler never waits for another transaction over a claim both
hold: issuance.workers.handlers.claims_in_turn).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
# A submission (up to max_batch items) and the Future of its items' results.
Entry = tuple[Sequence[T], Future[list[R | BaseException]]]


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        run: Callable[[Sequence[T]], Sequence[R | BaseException]],
        *,
        max_batch: int = 500,
        linger: float = 0.002,
        flushers: int | Callable[[], int] = 1,
    ) -> None:
        self.run = run
        self.max_batch = max_batch
        self.linger = linger
        self.flushers = flushers
        # One entry per submission (up to max_batch items), not per item: a
        # Future per claim was a fifth of a busy worker's GIL.
        self.queue: queue.SimpleQueue[Entry[T, R]] = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    def submit(self, item: T) -> R:
        """Decide ``item`` with whatever else is waiting; block until committed."""
        return self.submit_many([item])[0]

    def submit_many(self, items: Sequence[T]) -> list[R]:
        """Decide ``items`` with whatever else is waiting (possibly over more
        than one transaction); block until all are committed."""
        results = self.submit_each(items)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    def submit_each(self, items: Sequence[T]) -> list[R | BaseException]:
        """:meth:`submit_many`, with the error of each item that ``run``
        turned down alone in its place instead of raised."""
        self._start()
        pieces = []
        for start in range(0, len(items), self.max_batch):
            piece = items[start : start + self.max_batch]
            future: Future[list[R | BaseException]] = Future()
            self.queue.put((piece, future))
            pieces.append((piece, future))
        results: list[R | BaseException] = []
        for piece, future in pieces:  # wait for all, whatever the first one's fate
            error = future.exception()
            results.extend([error] * len(piece) if error is not None else future.result())
        return results

    def _start(self) -> None:
        with self._lock:
            if not self._started:
                count = self.flushers() if callable(self.flushers) else self.flushers
                for n in range(max(1, count)):
                    name = f"group-commit-{n}"
                    threading.Thread(target=self._flush_forever, name=name, daemon=True).start()
                self._started = True

    def _flush_forever(self) -> None:
        while True:
            entries = [self.queue.get()]
            count = len(entries[0][0])
            try:
                while count < self.max_batch:  # a submission is never split: a flush may pass max_batch
                    entries.append(self.queue.get(timeout=self.linger))
                    count += len(entries[-1][0])
            except queue.Empty:
                pass
            items = [item for piece, _ in entries for item in piece]
            try:
                results = self.run(items)
                if len(results) != len(items):
                    raise RuntimeError(f"{len(results)} results for {len(items)} items")
            except BaseException as exc:  # every submitter re-raises it: Dramatiq retries each message
                for _, future in entries:
                    future.set_exception(exc)
                continue
            at = 0
            for piece, future in entries:
                # An error in an item's place is that item's alone (run decided the others).
                future.set_result(list(results[at : at + len(piece)]))
                at += len(piece)
