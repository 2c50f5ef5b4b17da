"""The private MLflow behaviour lora_pipeline/model/mlflow_private.py relies on, checked against the
installed MLflow: when an upgrade drops it, this fails here (naming what changed), not as a model that
is silently validated (and loaded) at logging time, or not logged at all."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from lora_pipeline.model import mlflow_private

MARK_ENV = "E2E_LORA_TEST_PREDICT_MARK"


class _Marking(mlflow.pyfunc.PythonModel):
    """Leaves a file behind when asked to predict: shows whether MLflow's serving check ran."""

    def predict(self, context, model_input, params=None):
        Path(os.environ[MARK_ENV]).write_text("predicted")
        return model_input


def _log(*, check: bool):
    from mlflow.models import infer_signature

    example = pd.DataFrame({"prompt": ["a sentence"]})
    # A given signature: MLflow does not call predict to infer one (only its serving check does).
    kwargs = dict(name="marking", python_model=_Marking(), pip_requirements=["mlflow"],
                  input_example=example, signature=infer_signature(example, example))
    with mlflow.start_run():
        if check:
            return mlflow.pyfunc.log_model(**kwargs)
        return mlflow_private.log_pyfunc_without_serving_check(**kwargs)


def test_model_log_still_takes_a_flavor_and_passes_keywords_on():
    params = inspect.signature(mlflow.models.Model.log).parameters
    assert "flavor" in params and "artifact_path" in params, \
        f"mlflow.models.Model.log changed its signature: {list(params)}"
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()), \
        "mlflow.models.Model.log no longer takes **kwargs for the flavor"


def test_model_log_still_reads_the_private_switch():
    source = inspect.getsource(mlflow.models.Model.log)
    assert f'kwargs.get("{mlflow_private.SKIP_KEYWORD}"' in source, (
        f"mlflow {mlflow.__version__}: Model.log no longer reads {mlflow_private.SKIP_KEYWORD!r}; "
        "log_pyfunc_without_serving_check must find another way to skip the serving check")


def test_the_switch_skips_the_serving_check_and_logs_a_normal_pyfunc_model(tracking, tmp_path, monkeypatch):
    mark = tmp_path / "predicted"
    monkeypatch.setenv(MARK_ENV, str(mark))
    _log(check=True)
    assert mark.exists(), "control: mlflow.pyfunc.log_model no longer predicts the input example"
    mark.unlink()

    info = _log(check=False)
    assert not mark.exists(), "the serving check ran although it was switched off"
    assert info.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.model"
    assert info.saved_input_example_info is not None  # the example is kept, only the check is skipped
    out = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"prompt": ["x"]}))
    assert list(out["prompt"]) == ["x"] and mark.exists()


def test_widen_scoring_threads_lets_more_blocking_calls_than_the_default_pool_run_at_once():
    """On an event loop's default pool (where MLflow's scoring server runs `predict`), the loop gets a
    pool wide enough for `concurrent` calls that all block until every one has started; outside
    such a pool nothing changes."""
    import asyncio
    import os
    import threading

    from lora_pipeline.model.mlflow_private import widen_scoring_threads

    default = min(32, (os.cpu_count() or 1) + 4)
    assert not widen_scoring_threads(default + 6)  # not on a loop's pool thread

    async def blocked_together(n: int) -> None:
        barrier = threading.Barrier(n, timeout=3)  # breaks unless n calls run at the same time
        await asyncio.gather(*(asyncio.to_thread(barrier.wait) for _ in range(n)))

    async def scenario(widen: bool) -> None:
        if widen:
            assert await asyncio.to_thread(widen_scoring_threads, default + 6)
            await asyncio.sleep(0)  # the loop takes the new pool
        else:
            assert not await asyncio.to_thread(widen_scoring_threads, default)  # no wider than default
        await blocked_together(default + 6)

    asyncio.run(scenario(widen=True))
    with pytest.raises(threading.BrokenBarrierError):
        asyncio.run(scenario(widen=False))
