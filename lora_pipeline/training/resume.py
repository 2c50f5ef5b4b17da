"""`resume_from`: find the checkpoint model to continue from, and rebuild a Trainer checkpoint from it.

A finetune run logs every save as a model `checkpoint-<step>` (adapter + optimizer/scheduler/RNG
state); only READY ones count, so a checkpoint whose upload was cut off by a crash is never used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lora_pipeline import artifacts
from lora_pipeline.errors import Problems
from lora_pipeline.training import ENTRY_POINT

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class Checkpoint(NamedTuple):
    """A logged checkpoint model of a finetune run."""

    run_id: str
    step: int
    model: Any  # mlflow LoggedModel


@dataclass
class ResumePoint:
    run_id: str
    model_id: str
    step: int
    checkpoint_dir: str  # a rebuilt Trainer checkpoint dir (adapter + trainer state)


def checkpoints_of(client, run) -> list[tuple[int, Any]]:
    """(step, logged model) of the run's READY checkpoints, oldest first."""
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    prefix = artifacts.CHECKPOINT_MODEL_PREFIX + "-"
    out = []
    for m in models:
        if m.name.startswith(prefix) and m.name[len(prefix):].isdigit() and str(m.status).endswith("READY"):
            out.append((int(m.name[len(prefix):]), m))
    return sorted(out, key=lambda x: x[0])


def resolve_resume(resume_from: str, problems: Problems) -> Checkpoint | None:
    """The newest checkpoint of run `resume_from` (or, for 'last', of the newest finetune run that has
    one), or None: nothing asked, or a problem added to `problems`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from lora_pipeline.cli import configure_tracking
    from lora_pipeline.tracking import lookup

    rf = resume_from.strip()
    if not rf or (rf != "last" and not RUN_ID.match(rf)):
        return None  # empty, or malformed (the step's validate_static reports that once)
    configure_tracking()
    client = mlflow.MlflowClient()
    if rf == "last":
        exp = lookup.active_experiment_id(client)
        for run in lookup.newest_step_runs(client, exp, ENTRY_POINT):
            if run.info.run_id == os.environ.get("MLFLOW_RUN_ID"):
                continue  # this very run (started by `mlflow run`) has nothing yet
            ckpts = checkpoints_of(client, run)
            if ckpts:
                step, model = ckpts[-1]
                return Checkpoint(run.info.run_id, step, model)
        problems.add("resume_from", rf, f"no finetune run in experiment {exp} has a logged checkpoint",
                     "pass a run id explicitly, or train without resume_from")
        return None
    try:
        run = client.get_run(rf)
    except MlflowException:
        problems.add("resume_from", rf, f"no run with this id in {mlflow.get_tracking_uri()}",
                     "pass the run id of a finetune run (see the MLflow UI), or 'last'")
        return None
    ckpts = checkpoints_of(client, run)
    if not ckpts:
        step_tag = run.data.tags.get(artifacts.STEP_TAG, "?")
        problems.add("resume_from", rf, f"run ({step_tag}, {run.info.status}) has no logged checkpoint "
                     "to resume from", "pass a finetune run that saved at least one checkpoint "
                     "(save_steps <= its max_steps), or train without resume_from")
        return None
    step, model = ckpts[-1]
    return Checkpoint(rf, step, model)


def download_resume(target: Checkpoint, dest: Path, *, resume_from: str, lora_r: int, lora_alpha: float,
                    target_modules: Sequence[str], problems: Problems) -> ResumePoint | None:
    """Rebuild a Trainer checkpoint dir (adapter files + trainer state) from a logged model; None
    (with a problem added) when it has no trainer state or other LoRA parameters than asked."""
    import mlflow
    from mlflow.models import Model

    model, step = target.model, target.step
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifacts.model_uri(model.model_id),
                                                     dst_path=str(dest / "download")))
    arts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    paths = {k: local / v["path"] for k, v in arts.items()}
    if artifacts.TRAINER_STATE_ARTIFACT not in paths or artifacts.ADAPTER_ARTIFACT not in paths:
        problems.add("resume_from", resume_from, f"checkpoint models:/{model.model_id} has no "
                     "trainer state (optimizer/scheduler/RNG)", "resume from a finetune checkpoint model")
        return None
    ckpt = dest / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for src_dir in (paths[artifacts.ADAPTER_ARTIFACT], paths[artifacts.TRAINER_STATE_ARTIFACT]):
        for f in src_dir.iterdir():
            shutil.move(str(f), ckpt / f.name)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    theirs = (cfg.get("r"), float(cfg.get("lora_alpha")), sorted(cfg.get("target_modules") or []))
    ours = (lora_r, float(lora_alpha), sorted(target_modules))
    if theirs != ours:
        problems.add("resume_from", resume_from,
                     f"checkpoint-{step} was trained with lora_r={theirs[0]}, lora_alpha={theirs[1]}, "
                     f"target_modules={','.join(theirs[2])}",
                     "pass the same LoRA parameters as the run you resume")
        return None
    return ResumePoint(run_id=target.run_id, model_id=model.model_id, step=step, checkpoint_dir=str(ckpt))
