"""The one place this project leans on MLflow behaviour that is not public API.

`log_pyfunc_without_serving_check`: `mlflow.pyfunc.log_model` always validates the input example by
loading the model and predicting once, and only logs a warning when that fails; it has no switch to
skip it. The public `mlflow.models.Model.log(artifact_path, flavor, **kwargs)` (what
`pyfunc.log_model` calls) hands `**kwargs` to `flavor.save_model`, and reads an undocumented
`validate_serving_input` keyword from them: that keyword is the private part. A stand-in flavor
drops it before calling `mlflow.pyfunc.save_model`.

tests/unit/test_mlflow_private.py fails loudly when the installed MLflow stops honouring it.
"""

from __future__ import annotations

from typing import Any

# The keyword `Model.log` reads from its **kwargs to skip the serving-input check.
SKIP_KEYWORD = "validate_serving_input"
# The flavor name `mlflow.pyfunc.log_model` records for a PythonModel instance.
PYFUNC_FLAVOR_NAME = "pyfunc.CustomPythonModel"


class _PyfuncWithoutServingCheck:
    """The pyfunc flavor for `Model.log`, dropping the `validate_serving_input` switch it is given."""

    @staticmethod
    def save_model(path, validate_serving_input: bool = True, **kwargs):
        import mlflow.pyfunc

        return mlflow.pyfunc.save_model(path, **kwargs)


def log_pyfunc_without_serving_check(**kwargs: Any):
    """`mlflow.pyfunc.log_model(**kwargs)` without MLflow's serving check; returns MLflow's ModelInfo."""
    from mlflow.models import Model

    return Model.log(artifact_path=None, flavor=_PyfuncWithoutServingCheck,
                     flavor_name=PYFUNC_FLAVOR_NAME, **{SKIP_KEYWORD: False}, **kwargs)
