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

tests/unit/test_mlflow_private.py fails loudly when the installed MLflow stops honouring it.
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
