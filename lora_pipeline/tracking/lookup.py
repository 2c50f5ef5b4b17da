"""Finding runs: the active experiment, and the newest runs of an entry point (one lookup for all steps).

Public MLflow APIs only. The active experiment is resolved the way `mlflow run` and `mlflow.set_experiment`
leave it in the environment (`MLFLOW_RUN_ID`, `MLFLOW_EXPERIMENT_ID`, `MLFLOW_EXPERIMENT_NAME`), so a step
started by `main`, by `mlflow run` or by hand looks in the same experiment it logs to.
"""

from __future__ import annotations

import os
from typing import Any

from lora_pipeline import artifacts

DEFAULT_EXPERIMENT_ID = "0"  # MLflow's "Default" experiment


def active_experiment_id(client: Any = None) -> str:
    import mlflow

    client = client or mlflow.MlflowClient()
    if os.environ.get("MLFLOW_RUN_ID"):
        return client.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
    return DEFAULT_EXPERIMENT_ID


def newest_step_runs(client: Any, experiment_id: str, entry_point: str, *, status: str | None = None,
                     max_results: int = 50) -> list:
    """Runs of `entry_point` (by the step tag), newest first; `status` e.g. 'FINISHED' filters them."""
    query = f"tags.`{artifacts.STEP_TAG}` = '{entry_point}'"
    if status:
        query += f" and attributes.status = '{status}'"
    return list(client.search_runs([experiment_id], filter_string=query,
                                   order_by=["attributes.start_time DESC"], max_results=max_results))
