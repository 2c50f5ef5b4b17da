"""`lora_pipeline.model.batching.Batcher`: concurrent submits share batches, each gets its own answers."""

from __future__ import annotations

import threading
import time

import pytest

from lora_pipeline.model.batching import Batcher


class Recorder:
    """A run_batch that answers item -> (key, item) and records every batch it was given."""

    def __init__(self, delay: float = 0.0, fail_on: object = None):
        self.batches: list[tuple[object, list]] = []
        self.delay, self.fail_on = delay, fail_on

    def __call__(self, key, items):
        self.batches.append((key, list(items)))
        time.sleep(self.delay)
        if self.fail_on in items:
            raise ValueError(f"cannot answer {self.fail_on}")
        return [(key, i) for i in items]


def _concurrently(batcher: Batcher, jobs: list[tuple[object, list]]) -> list:
    """Submit every (key, items) from its own thread, all released at once; answers in job order."""
    barrier = threading.Barrier(len(jobs))
    out: list = [None] * len(jobs)

    def client(n: int) -> None:
        barrier.wait()
        try:
            out[n] = batcher.submit(*jobs[n])
        except Exception as err:  # noqa: BLE001 (the test looks at what each caller got)
            out[n] = err

    threads = [threading.Thread(target=client, args=(n,)) for n in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_concurrent_submits_form_one_batch_and_get_their_own_answers():
    run = Recorder()
    batcher = Batcher(run, max_rows=8, max_wait_s=5.0)
    jobs = [("k", [f"{n}-a", f"{n}-b"]) for n in range(4)]
    t0 = time.monotonic()
    out = _concurrently(batcher, jobs)
    assert out == [[("k", f"{n}-a"), ("k", f"{n}-b")] for n in range(4)]
    assert len(run.batches) == 1 and len(run.batches[0][1]) == 8 and batcher.batches == 1
    assert time.monotonic() - t0 < 5.0  # a full batch does not wait out the window


def test_a_lone_request_waits_at_most_max_wait():
    batcher = Batcher(Recorder(), max_rows=8, max_wait_s=0.2)
    t0 = time.monotonic()
    assert batcher.submit("k", ["x"]) == [("k", "x")]
    assert 0.15 <= time.monotonic() - t0 < 2.0


def test_batches_hold_at_most_max_rows_and_never_split_a_request():
    run = Recorder()
    batcher = Batcher(run, max_rows=5, max_wait_s=1.0)
    out = _concurrently(batcher, [("k", [n] * 3) for n in range(3)] + [("k", list(range(7)))])
    assert [len(o) for o in out] == [3, 3, 3, 7]
    sizes = sorted(len(items) for _, items in run.batches)
    assert sizes == [3, 3, 3, 7]  # 3 + 3 > 5: one request per batch; the 7-row one alone


def test_different_settings_never_share_a_batch():
    run = Recorder()
    batcher = Batcher(run, max_rows=8, max_wait_s=1.0)
    out = _concurrently(batcher, [("greedy", [1]), ("sampled", [2]), ("greedy", [3]), ("sampled", [4])])
    assert out == [[("greedy", 1)], [("sampled", 2)], [("greedy", 3)], [("sampled", 4)]]
    assert sorted((k, sorted(items)) for k, items in run.batches) == [("greedy", [1, 3]), ("sampled", [2, 4])]


def test_an_error_reaches_every_caller_of_its_batch_and_the_worker_goes_on():
    run = Recorder(fail_on="bad")
    batcher = Batcher(run, max_rows=4, max_wait_s=1.0)
    out = _concurrently(batcher, [("k", ["bad"]), ("k", ["good"])])
    assert all(isinstance(o, ValueError) and str(o) == "cannot answer bad" for o in out)
    assert batcher.submit("k", ["later"]) == [("k", "later")]


def test_requests_arriving_during_a_batch_go_together_next():
    run = Recorder(delay=0.5)
    batcher = Batcher(run, max_rows=8, max_wait_s=0.0)
    first = threading.Thread(target=batcher.submit, args=("k", ["first"]))
    first.start()
    time.sleep(0.1)  # the first batch is generating
    out = _concurrently(batcher, [("k", [n]) for n in range(3)])
    first.join()
    assert out == [[("k", n)] for n in range(3)]
    assert [sorted(items, key=str) for _, items in run.batches] == [["first"], [0, 1, 2]]


def test_the_worker_exits_when_idle_and_comes_back():
    batcher = Batcher(Recorder(), max_rows=2, max_wait_s=0.0, idle_exit_s=0.05)
    assert batcher.submit("k", [1]) == [("k", 1)]
    deadline = time.monotonic() + 5
    while batcher._worker is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher._worker is None
    assert batcher.submit("k", [2]) == [("k", 2)]
    assert batcher.submit("k", []) == []


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match=r"max_rows=0 must be >= 1 and max_wait_s=-1 >= 0"):
        Batcher(Recorder(), max_rows=0, max_wait_s=-1)


def _closed_loop(batcher: Batcher, clients: int, rounds: int, stagger_s: float) -> None:
    """`clients` threads, each sending one row, waiting for its answer, then (after `stagger_s` x its
    number: a server parses and checks requests one after another) sending the next, `rounds` times."""
    barrier = threading.Barrier(clients)

    def client(n: int) -> None:
        barrier.wait()
        for r in range(rounds):
            assert batcher.submit("k", [(n, r)]) == [("k", (n, r))]
            time.sleep(stagger_s * n)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


def test_clients_coming_back_staggered_after_a_batch_are_gathered_again():
    # A 0.5 s batch gives a 50 ms window (WAIT_FRACTION 0.1); the 6 clients come back 0-25 ms apart.
    # A fixed 5 ms window (this model's earlier default) split them into batches of 1-3 rows: that
    # halved the served throughput in bench/load_test.py.
    run = Recorder(delay=0.5)
    batcher = Batcher(run, max_rows=8, max_wait_s=0.5)
    _closed_loop(batcher, clients=6, rounds=4, stagger_s=0.005)
    assert batcher.sizes == [6, 6, 6, 6]


def test_the_batch_closes_when_the_previous_batch_s_clients_are_back():
    # The clients of a 4-row batch all come back at once: the next batch closes at 4 rows at once
    # instead of waiting out its window (0.1 x 1 s = 100 ms).
    starts, ends = [], []

    def run(key, items):
        starts.append(time.monotonic())
        time.sleep(1.0)
        ends.append(time.monotonic())
        return [(key, i) for i in items]

    batcher = Batcher(run, max_rows=8, max_wait_s=0.3)
    _closed_loop(batcher, clients=4, rounds=3, stagger_s=0.0)
    assert batcher.sizes == [4, 4, 4]
    gaps = [s - e for s, e in zip(starts[1:], ends[:-1], strict=True)]
    assert max(gaps) < 0.05, gaps  # waited out, each gap would be >= 0.1 s


def test_the_window_is_a_tenth_of_the_previous_batch_at_most_max_wait():
    batcher = Batcher(Recorder(delay=0.3), max_rows=8, max_wait_s=2.0)
    assert batcher.window_s() == 2.0  # before any batch: the cap
    batcher.submit("k", [1])  # waits the 2 s window alone, then runs 0.3 s
    assert batcher.window_s() == pytest.approx(0.03, abs=0.02)
    t0 = time.monotonic()
    batcher.submit("k", [2])  # a lone request now waits ~30 ms, not 2 s
    assert time.monotonic() - t0 < 0.3 + 0.5


def test_clients_split_into_two_groups_are_gathered_into_one_batch_again():
    # Clients 4-7 start while the first batch (clients 0-3) runs, so their requests wait, queued,
    # for the next. That batch must also wait for clients 0-3 to come back (queued 4 + answered 4),
    # not close at 4 rows because the previous batch had 4: that kept the groups apart for good.
    run = Recorder(delay=0.5)
    batcher = Batcher(run, max_rows=16, max_wait_s=0.5)
    barrier = threading.Barrier(8)

    def client(n: int) -> None:
        barrier.wait()
        if n >= 4:
            time.sleep(0.7)  # the first batch closed its 0.5 s window at 4 rows and runs
        for r in range(4):
            assert batcher.submit("k", [(n, r)]) == [("k", (n, r))]

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert batcher.sizes == [4, 8, 8, 8, 4]
