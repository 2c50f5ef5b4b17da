"""Cross-request batching in the logged model: concurrent `predict` calls share generate batches and
get exactly the answers they get one at a time (the batcher itself: tests/unit/test_batching.py)."""

from __future__ import annotations

import threading

import mlflow
import pandas as pd
import pytest
from test_serving import SENTENCES, log_checkpoint, make_adapter, snapshot  # noqa: F401

from lora_pipeline.model import serving

PARAMS = {"max_new_tokens": 10, "precision": "fp32"}
# Four clients, two sentences each.
REQUESTS = [SENTENCES[i:i + 2] for i in range(0, 8, 2)]


@pytest.fixture
def model_uri(tracking, sharp_model_dir, tmp_path) -> str:
    return log_checkpoint(snapshot(str(sharp_model_dir)), make_adapter(sharp_model_dir, tmp_path / "adapter"))


def _generate_calls(monkeypatch) -> list[int]:
    """Rows of each generate call (the real generate still runs)."""
    rows: list[int] = []
    real = serving.generate

    def spy(model, tokenizer, sentences, **kwargs):
        rows.append(len(sentences))
        return real(model, tokenizer, sentences, **kwargs)

    monkeypatch.setattr(serving, "generate", spy)
    return rows


def _concurrent_predicts(model, params=PARAMS) -> list[pd.DataFrame]:
    barrier = threading.Barrier(len(REQUESTS))
    out: list = [None] * len(REQUESTS)

    def client(n: int) -> None:
        barrier.wait()
        out[n] = model.predict(pd.DataFrame({"prompt": REQUESTS[n]}), params=params)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def test_concurrent_requests_share_one_batch_and_get_the_sequential_answers(model_uri, monkeypatch):
    # A generous window, so the four threads surely meet in it on a busy machine; the batch closes
    # as soon as it is full (8 rows), not at the end of the window.
    model = mlflow.pyfunc.load_model(model_uri, model_config={"batch_max_wait_ms": 10_000,
                                                              "batch_max_rows": 8})
    # One request after another (on the same model unbatched: batched, each would wait out the window).
    alone = mlflow.pyfunc.load_model(model_uri, model_config={"batching": False})
    sequential = [alone.predict(pd.DataFrame({"prompt": r}), params=PARAMS) for r in REQUESTS]
    calls = _generate_calls(monkeypatch)
    concurrent = _concurrent_predicts(model)
    assert calls == [8]  # one generate call for the four requests
    for got, want in zip(concurrent, sequential, strict=True):
        pd.testing.assert_frame_equal(got, want)
    # Distinct answers per sentence: a row handed to the wrong request would show.
    assert pd.concat(sequential)["mr"].nunique() == len(SENTENCES)


def test_requests_with_other_settings_are_not_mixed(model_uri, monkeypatch):
    model = mlflow.pyfunc.load_model(model_uri, model_config={"batch_max_wait_ms": 500})
    calls = _generate_calls(monkeypatch)
    barrier = threading.Barrier(2)
    out: dict[int, pd.DataFrame] = {}

    def client(n: int) -> None:
        barrier.wait()
        out[n] = model.predict(pd.DataFrame({"prompt": REQUESTS[0]}), params={**PARAMS, "max_new_tokens": 4 + n})

    threads = [threading.Thread(target=client, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert calls == [2, 2]
    for n in range(2):
        alone = model.predict(pd.DataFrame({"prompt": REQUESTS[0]}), params={**PARAMS, "max_new_tokens": 4 + n})
        pd.testing.assert_frame_equal(out[n], alone)


def test_batching_off_generates_each_request_alone(model_uri, monkeypatch):
    model = mlflow.pyfunc.load_model(model_uri, model_config={"batching": False})
    assert model.unwrap_python_model()._batcher is None
    calls = _generate_calls(monkeypatch)
    _concurrent_predicts(model)
    assert calls == [2, 2, 2, 2]
