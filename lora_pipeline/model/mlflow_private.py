"""The one place this project leans on MLflow behaviour that is not public API.

`log_pyfunc_without_serving_check`: `mlflow.pyfunc.log_model` always validates the input example by
loading the model and predicting once, and only logs a warning when that fails; it has no switch to
skip it. The public `mlflow.models.Model.log(artifact_path, flavor, **kwargs)` (what
`pyfunc.log_model` calls) hands `**kwargs` to `flavor.save_model`, and reads an undocumented
`validate_serving_input` keyword from them: that keyword is the private part. A stand-in flavor
drops it before calling `mlflow.pyfunc.save_model`.

`placed_artifacts`: files the caller already wrote into the logged model's (local) artifact location
are added to the pyfunc `artifacts` of the MLmodel, in the layout `pyfunc.save_model` writes for
artifacts it copies itself (`{"path": "artifacts/<name>", "uri": ...}`), so MLflow does not copy
them twice (into a temp model dir, then into the store). The stand-in flavor is public API
(`Model.log`'s `flavor`, whose `save_model` gets the remaining keywords); the MLmodel layout is
MLflow's file format, which registry/copy.py:write_mlmodel edits the same way.

`widen_scoring_threads`: MLflow's scoring server (`mlflow models serve`, uvicorn) runs each request's
`predict` with `asyncio.to_thread`, on the event loop's default thread pool, which Python sizes
min(32, CPUs + 4): 6 threads on a 2-core machine. With cross-request batching every request waits in
`predict` for its batch, so at most 6 requests could be in a batch at once, whatever
`batch_max_rows` said: with bench/load_test.py's 8 single-sentence clients the server logged batches
of 6 every ~3.8 s, the two other clients' requests queued behind them. The model loads before
uvicorn starts its loop, so the pool is widened from the first `predict`, which runs on it: the
running loop (found among live objects: asyncio gives no handle to another thread's loop) is asked,
from its own thread, to take a larger default pool. The old pool's threads finish their requests;
new requests go to the new pool. Only from a thread of a loop's default pool (named `asyncio_N`),
and only when exactly one loop is running.

tests/unit/test_mlflow_private.py fails loudly when the installed MLflow stops honouring them (the
scoring-server pool: tests/per_step/test_serve_http.py, more concurrent requests than the default
pool in one batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The keyword `Model.log` reads from its **kwargs to skip the serving-input check.
SKIP_KEYWORD = "validate_serving_input"
# The flavor name `mlflow.pyfunc.log_model` records for a PythonModel instance.
PYFUNC_FLAVOR_NAME = "pyfunc.CustomPythonModel"


class _PyfuncWithoutServingCheck:
    """The pyfunc flavor for `Model.log`, dropping the `validate_serving_input` switch it is given."""

    @staticmethod
    def save_model(path, validate_serving_input: bool = True,
                   placed_artifacts: dict[str, tuple[str, int]] | None = None, **kwargs):
        import mlflow.pyfunc

        saved = mlflow.pyfunc.save_model(path, **kwargs)
        if placed_artifacts:
            _add_placed_artifacts(Path(path), kwargs["mlflow_model"], placed_artifacts)
        return saved


def _add_placed_artifacts(path: Path, mlflow_model, placed: dict[str, tuple[str, int]]) -> None:
    """List `placed` ({name: (uri it came from, bytes)}) among the pyfunc artifacts of the MLmodel,
    at `artifacts/<name>` (where the caller wrote them in the store) and count their bytes."""
    conf = mlflow_model.flavors["python_function"]
    arts = dict(conf.get("artifacts") or {})
    for name, (uri, size) in placed.items():
        if name in arts:
            raise ValueError(f"artifact {name!r} is both placed and copied by MLflow")
        arts[name] = {"path": f"artifacts/{name}", "uri": uri}
        if isinstance(mlflow_model.model_size_bytes, int):
            mlflow_model.model_size_bytes += size
    conf["artifacts"] = arts
    mlflow_model.save(str(path / "MLmodel"))


def log_pyfunc_without_serving_check(*, placed_artifacts: dict[str, tuple[str, int]] | None = None,
                                     **kwargs: Any):
    """`mlflow.pyfunc.log_model(**kwargs)` without MLflow's serving check; returns MLflow's ModelInfo.

    `placed_artifacts` ({name: (source uri, bytes)}): artifacts already written to
    `<model artifact location>/artifacts/<name>` (`kwargs["model_id"]` names the model), listed in
    the MLmodel without being copied again."""
    from mlflow.models import Model

    if placed_artifacts:
        if not kwargs.get("model_id"):
            raise ValueError("placed artifacts need the model_id of the model they were written into")
        kwargs["placed_artifacts"] = placed_artifacts
    return Model.log(artifact_path=None, flavor=_PyfuncWithoutServingCheck,
                     flavor_name=PYFUNC_FLAVOR_NAME, **{SKIP_KEYWORD: False}, **kwargs)


# Names of the threads of the pool `widen_scoring_threads` gives the server's event loop.
SCORING_THREAD_PREFIX = "predict-request"
# Thread names of asyncio's own default pool (`BaseEventLoop.run_in_executor`).
ASYNCIO_THREAD_PREFIX = "asyncio_"


def widen_scoring_threads(concurrent: int) -> bool:
    """From a `predict` running on an event loop's default thread pool (MLflow's scoring server),
    make that pool `concurrent` threads wide (see the module docstring). Returns whether it asked:
    False when not on such a thread, when not exactly one loop is running, or when `concurrent` is
    no more than Python's default pool. The pool starts its threads only as requests need them."""
    import asyncio
    import gc
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    if not threading.current_thread().name.startswith(ASYNCIO_THREAD_PREFIX):
        return False
    if concurrent <= min(32, (os.cpu_count() or 1) + 4):
        return False
    loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()]
    if len(loops) != 1:
        return False
    pool = ThreadPoolExecutor(max_workers=concurrent, thread_name_prefix=SCORING_THREAD_PREFIX)
    loops[0].call_soon_threadsafe(loops[0].set_default_executor, pool)
    return True
