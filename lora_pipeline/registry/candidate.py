"""The candidate for the registry: a logged E2E extractor model, its MLmodel, its pinned base and the
evaluation metrics logged on it (what persist_and_register reads before it changes anything)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_pipeline import artifacts
from lora_pipeline.errors import InputError, Problem, StepError, one_line


@dataclass
class Candidate:
    model: Any  # mlflow.entities.LoggedModel
    mlmodel: dict
    manifest: Any  # lora_pipeline.base.manifest.Manifest
    metrics: dict[str, float]
    metric_runs: dict[str, str]
    # The model's task.json (task and system prompt); None for a model logged before tasks existed (e2e).
    task_spec: dict | None = None

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def primary_metric(self) -> str:
        """The primary metric of the task the model was trained for (its MLmodel metadata `task`,
        written with task.json; none: e2e): the default gate metric."""
        from lora_pipeline.task.tasks import DEFAULT_TASK, get_task

        return get_task(str((self.mlmodel.get("metadata") or {}).get("task") or DEFAULT_TASK)).primary_metric

    @property
    def uri(self) -> str:
        return artifacts.model_uri(self.model.model_id)

    @property
    def artifact_names(self) -> dict:
        return pyfunc_artifacts(self.mlmodel)

    @property
    def self_contained(self) -> bool:
        names = self.artifact_names
        return artifacts.FULL_MODEL_ARTIFACT in names or artifacts.PERSISTED_BASE_ARTIFACT in names


@contextlib.contextmanager
def quiet_downloads():
    """MLflow draws a progress bar per download call; a dozen bars for a few kB of small files is noise."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def artifact_repo(location: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(location)


def latest_metrics(model) -> tuple[dict[str, float], dict[str, str]]:
    """The newest value of each metric logged on a LoggedModel, and the run that logged it."""
    best: dict[str, Any] = {}
    for m in model.metrics or []:
        if m.key not in best or (m.timestamp, m.step) >= (best[m.key].timestamp, best[m.key].step):
            best[m.key] = m
    return ({k: float(m.value) for k, m in best.items()},
            {k: m.run_id or "" for k, m in best.items()})


def pyfunc_artifacts(mlmodel: dict | None) -> dict:
    """The pyfunc flavor's artifacts of an MLmodel: name -> {"path": ...}."""
    return (mlmodel or {}).get("flavors", {}).get("python_function", {}).get("artifacts") or {}


def read_candidate(client, model_uri: str) -> Candidate:
    """The READY logged model `models:/<model_id>`, with its MLmodel, manifest and metrics; an
    InputError naming `model_uri` when it is no E2E extractor this pipeline logged."""
    import yaml
    from mlflow.exceptions import MlflowException

    from lora_pipeline.base.manifest import Manifest

    model_id = artifacts.parse_model_id_uri(model_uri)
    try:
        lm = client.get_logged_model(model_id)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise InputError(Problem("model_uri", model_uri, "no such logged model in the "
                                     "tracking store", "pass the models:/<model_id> URI that "
                                     "log_reference printed (same MLFLOW_TRACKING_URI)")) from err
        raise StepError(f"cannot read model {model_uri} ({type(err).__name__}: "
                        f"{one_line(err)})") from err
    if str(lm.status) != "READY":
        raise InputError(Problem("model_uri", model_uri, f"is {lm.status}, not READY (its "
                                 "logging failed or never finished)", "log the model again with "
                                 "log_reference and evaluate it"))
    repo = artifact_repo(lm.artifact_location)
    with tempfile.TemporaryDirectory() as tmp, quiet_downloads():
        try:
            mlmodel = yaml.safe_load(Path(repo.download_artifacts(artifacts.MLMODEL_FILE, tmp)).read_text())
            ref = f"{artifacts.MODEL_ARTIFACTS_DIR}/{artifacts.BASE_REF_ARTIFACT}"
            manifest = Manifest.from_json(Path(repo.download_artifacts(ref, tmp)).read_text())
            spec = None
            task_file = pyfunc_artifacts(mlmodel).get(artifacts.TASK_ARTIFACT)
            if task_file:
                spec = json.loads(Path(repo.download_artifacts(task_file.get("path", ""), tmp)).read_text())
        except (OSError, ValueError, MlflowException) as err:
            raise InputError(Problem("model_uri", model_uri, "is not an E2E extractor model "
                                     f"(no {artifacts.BASE_REF_ARTIFACT} / MLmodel: "
                                     f"{type(err).__name__}: {one_line(err)})",
                                     "pass the model log_reference logged")) from err
    metrics, runs = latest_metrics(lm)
    return Candidate(lm, mlmodel or {}, manifest, metrics, runs, spec)


def require_gate_metrics(candidate: Candidate, metric: str, model_uri: str) -> None:
    """The gate compares `metric` and `base_<metric>`: an InputError if evaluation did not log them."""
    missing = [k for k in (metric, f"base_{metric}") if k not in candidate.metrics]
    if missing:
        have = ", ".join(sorted(candidate.metrics)) or "none"
        raise InputError(Problem(
            "model_uri", model_uri,
            f"has no evaluation metric {' / '.join(missing)} (metrics on the model: {have}); the "
            "promotion gate needs it",
            f"run evaluate_checkpoint --model_uri {model_uri} first"
            + ("" if not candidate.metrics else ", or pick a gate_metric it has")))
