"""Cross-request batching for the served model (MLflow feature request #8007).

`mlflow models serve` runs each request's `predict` in a thread of its own (the scoring server's
`asyncio.to_thread`), so concurrent requests call `predict` at the same time. Generating each alone
runs several small batches back to back (or side by side, fighting over the same cores); a decoder
step costs nearly the same for 1 row as for 16 on a CPU, so gathering the rows of concurrent requests
into one generate batch answers them all in about the time of one.

`Batcher.submit(key, items)` blocks its caller until its items are answered. One worker thread
takes submitted jobs in arrival order and runs `run_batch(key, items)` over the items of several
jobs with the same key (the same generation settings) at once:
  * a batch closes when it holds `max_rows` items, or the rows queued while the previous batch ran
    plus as many as that batch had (the clients it answered have come back), or when its oldest job
    has waited its window (counted from the previous batch's end for a job that waited through
    it); jobs already queued always go in (up to `max_rows`), so batches grow as load grows;
  * the window is `WAIT_FRACTION` (10%) of the previous batch's generation time, at most
    `max_wait_s` (and `max_wait_s` before the first batch). Why not a fixed few ms: the clients of a
    batch are answered together, and each sends its next request after its response is written,
    parsed and the new request parsed, schema-checked and tokenised in the server, one after another
    under the GIL: tens of ms apart. With a 5 ms window the 8 clients of a 6 s batch came back as
    batches of 1-4 and throughput halved (bench/load_test.py: 0.44x in-process). A window of 10% of
    the batch time gathers them, and costs at most 10% where it does not fill (600 ms on a 6 s batch);
  * a job is never split: one larger than `max_rows` runs alone;
  * jobs with another key wait for the next batch, in arrival order;
  * an exception in `run_batch` is raised in every caller of that batch; the worker goes on.
The worker exits after `idle_exit_s` without work and is started again by the next submit, so an
idle or discarded model holds no thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# The share of a batch's generation time that the next batch may wait for its rows (see above).
WAIT_FRACTION = 0.1


@dataclass(eq=False)
class _Job:
    key: Hashable
    items: Sequence[Any]
    submitted: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Any] | None = None
    error: BaseException | None = None


class Batcher:
    def __init__(self, run_batch: Callable[[Hashable, list[Any]], list[Any]], *, max_rows: int,
                 max_wait_s: float, idle_exit_s: float = 30.0):
        if max_rows < 1 or max_wait_s < 0:
            raise ValueError(f"max_rows={max_rows} must be >= 1 and max_wait_s={max_wait_s} >= 0")
        self._run_batch = run_batch
        self.max_rows, self.max_wait_s, self.idle_exit_s = max_rows, max_wait_s, idle_exit_s
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.batches = 0  # generate batches run (for tests and logs)
        self.sizes: list[int] = []  # rows of each batch run, the last 1,000 (for tests and logs)
        self._last_rows = 0  # rows of the previous batch
        self._last_s: float | None = None  # its generation time; None before the first batch
        self._waiting: dict[Hashable, int] = {}  # rows per key that came in while it ran
        self._last_end = 0.0  # when it ended (time.monotonic)

    def submit(self, key: Hashable, items: Sequence[Any]) -> list[Any]:
        """`run_batch(key, ...)`'s answers for `items`, in order; blocks until they are ready."""
        if not items:
            return []
        job = _Job(key, items)
        with self._lock:  # a worker deciding to exit holds the lock too: no job is left behind
            self._queue.put(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="e2e-batcher", daemon=True)
                self._worker.start()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    # --- the worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        pending: list[_Job] = []  # taken from the queue, not run yet (arrival order)
        while True:
            if not pending:
                try:
                    pending.append(self._queue.get(timeout=self.idle_exit_s))
                except queue.Empty:
                    with self._lock:
                        if self._queue.empty():
                            self._worker = None
                            return
                    continue
            self._gather(pending)
            batch = self._take(pending)
            self._run(batch, pending)

    def _gather(self, pending: list[_Job]) -> None:
        """Add arriving jobs to `pending` until the oldest one's batch is full, holds the rows queued
        while the previous batch ran plus as many as that batch had (its clients are back), or its
        window is over; jobs already queued are always taken.

        Why queued + previous, not the previous batch's rows alone: clients split into two groups
        (some came in while a batch ran) would stay split, each batch closing as soon as the other
        group's requests, already queued, matched the last batch's size; the group just answered
        came back tens of ms later, into the batch after (tests/unit/test_batching.py makes that
        case; its share of the served throughput was not measured apart)."""
        key = pending[0].key
        # The window opens when the job arrived or, for one that waited through the previous batch,
        # when that batch ended: its clients come back only then.
        deadline = max(pending[0].submitted, self._last_end) + self.window_s()
        rows = sum(len(j.items) for j in pending if j.key == key)
        expected = self._waiting.get(key, 0) + self._last_rows
        while rows < self.max_rows:
            came_back = self._last_s is not None and rows >= expected
            left = 0.0 if came_back else deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                return
            pending.append(job)
            if job.key == key:
                rows += len(job.items)

    def window_s(self) -> float:
        """How long a batch may wait for more rows after its oldest job arrived."""
        if self._last_s is None:
            return self.max_wait_s
        return min(self.max_wait_s, WAIT_FRACTION * self._last_s)

    def _take(self, pending: list[_Job]) -> list[_Job]:
        """The oldest job plus the next ones of its key that fit in `max_rows`; removed from `pending`."""
        key, batch, rows, rest = pending[0].key, [], 0, []
        for job in pending:
            if job.key == key and (not batch or rows + len(job.items) <= self.max_rows):
                batch.append(job)
                rows += len(job.items)
            else:
                rest.append(job)
        pending[:] = rest
        return batch

    def _run(self, batch: list[_Job], pending: list[_Job]) -> None:
        items = [item for job in batch for item in job.items]
        t0 = time.monotonic()
        error: Exception | None = None
        try:
            answers = self._run_batch(batch[0].key, items)
            if len(answers) != len(items):
                raise RuntimeError(f"run_batch answered {len(answers)} items for {len(items)}")
        except Exception as err:  # the callers get it; the worker keeps serving the others
            error = err
        self.batches += 1
        self._last_end = time.monotonic()
        self._last_rows, self._last_s = len(items), self._last_end - t0
        self.sizes = [*self.sizes[-999:], len(items)]
        self._note_waiting(pending)
        if error is not None:
            for job in batch:
                job.error = error
                job.done.set()
            return
        log.info("batch of %d rows from %d requests in %.2f s", len(items), len(batch), self._last_s)
        start = 0
        for job in batch:
            job.result = list(answers[start:start + len(job.items)])
            start += len(job.items)
            job.done.set()

    def _note_waiting(self, pending: list[_Job]) -> None:
        """Take into `pending` the jobs that came in while a batch ran and count their rows per key:
        done before that batch's callers are answered, so none of them can be among these."""
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        waiting: dict[Hashable, int] = {}
        for job in pending:
            waiting[job.key] = waiting.get(job.key, 0) + len(job.items)
        self._waiting = waiting
