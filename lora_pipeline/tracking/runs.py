"""Starting and tagging step runs consistently."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator

from lora_pipeline import artifacts
from lora_pipeline.cli import configure_tracking
from lora_pipeline.tracking.version import pipeline_git_commit

log = logging.getLogger(__name__)



def args_as_params(args: object) -> dict[str, str]:
    """Parameters as MLflow stores them: strings, booleans lower-case like the CLI accepts them."""
    from lora_pipeline import config

    out = {}
    for k, v in dataclasses.asdict(args).items():
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    if config.active_path:
        out.setdefault(config.CONFIG_FIELD, config.active_path)
    return out


def overridden_params(existing: dict[str, str], params: dict[str, str]) -> dict[str, str]:
    """`config.<name>` for each value that differs from the one already logged.

    `mlflow run` logs the command line (defaults included) before the step starts, and MLflow params
    cannot change; the values a config file set are what the step used, so they go beside them.
    """
    return {f"config.{k}": v for k, v in params.items() if k in existing and existing[k] != v}


@contextlib.contextmanager
def step_run(entry_point: str, args: object, *, nested: bool = False) -> Iterator[object]:
    """Start (or, under `mlflow run`, resume) the step's run; an exception ends it FAILED."""
    import mlflow

    from lora_pipeline.tracking import stale

    configure_tracking()
    # A step killed earlier (kill -9, OOM) left its run RUNNING: close such runs as KILLED first, so the
    # UI tells the truth and `main` can resume them. Never raises (housekeeping).
    stale.close_stale_runs(exclude=[os.environ.get("MLFLOW_RUN_ID", "")])
    with mlflow.start_run(nested=nested) as run:
        client = mlflow.MlflowClient()
        mlflow.set_tags(stale.process_tags())
        existing = client.get_run(run.info.run_id).data.params
        # `mlflow run` already logged the CLI parameters; log only what is not there yet.
        params = args_as_params(args)
        mlflow.log_params({k: v for k, v in params.items() if k not in existing})
        if params.get("config"):
            mlflow.log_params(overridden_params(existing, params))
        mlflow.set_tags({artifacts.STEP_TAG: entry_point,
                         artifacts.GIT_COMMIT_TAG: pipeline_git_commit()})
        log.info("%s: run %s (tracking %s)", entry_point, run.info.run_id, mlflow.get_tracking_uri())
        yield run
