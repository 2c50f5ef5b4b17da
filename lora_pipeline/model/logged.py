"""Finding and reading models this pipeline logged (shared by log_reference and evaluate_checkpoint).

Unknown or foreign models are InputErrors naming the parameter that pointed at them; artifacts that
are gone or unreadable are StepErrors. Every model is addressed by URI: `models:/<model_id>`,
`runs:/<run_id>/<name>` or `models:/<name>@<alias>`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lora_pipeline import artifacts
from lora_pipeline.errors import InputError, Problem, StepError, one_line

log = logging.getLogger(__name__)

_MODEL_URI_PREFIXES = ("models:/", "runs:/")


@dataclass
class Weights:
    """What log_reference logs: the weights folder, what kind it is, the base it refers to."""
    manifest: object  # lora_pipeline.base.manifest.Manifest
    kind: str  # artifacts.KIND_ADAPTER | artifacts.KIND_FULL
    weights_dir: Path
    source_model_id: str = ""  # the checkpoint's logged model, if it came from one
    task_spec: dict | None = None  # the checkpoint's task.json (None: an e2e model)


def looks_like_model_uri(uri: str) -> bool:
    return uri.startswith(_MODEL_URI_PREFIXES) and len(uri.split(":/", 1)[1].strip("/")) > 0


def latest_output(entry_point: str, key: str, field: str) -> str:
    """The output `key` of the latest FINISHED run of `entry_point` in the active experiment."""
    import mlflow

    from lora_pipeline.tracking.lookup import active_experiment_id, newest_step_runs

    client = mlflow.MlflowClient()
    exp = active_experiment_id(client)
    for r in newest_step_runs(client, exp, entry_point, status="FINISHED", max_results=20):
        value = artifacts.get_outputs(r).get(key)
        if value:
            log.info("%s defaults to %s (output %r of %s run %s)", field, value, key, entry_point,
                     r.info.run_id)
            return value
    raise InputError(Problem(field, "", f"is empty and no finished {entry_point} run in experiment "
                             f"{exp} has an output {key!r}",
                             f"run {entry_point} first, or pass {field} explicitly"))


def model_info(uri: str, field: str):
    """MLflow's ModelInfo of any model URI; an unknown model is an InputError naming the field."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.models.get_model_info(uri)
    except (MlflowException, OSError) as err:
        raise InputError(Problem(field, uri, f"no such model ({one_line(err, 160)})",
                                 "pass a model URI that MLflow lists: models:/<model_id>, "
                                 "runs:/<run_id>/<name> or models:/<name>@<alias>")) from None


def e2e_artifacts(info, field: str, uri: str) -> dict[str, str]:
    """The E2EExtractor artifacts of a logged model (name -> path inside the model), or InputError."""
    arts = (info.flavors.get("python_function") or {}).get("artifacts") or {}
    if artifacts.BASE_REF_ARTIFACT not in arts:
        raise InputError(Problem(field, uri, "is not a model of this pipeline (no "
                                 f"{artifacts.BASE_REF_ARTIFACT}: not logged by finetune or log_reference)",
                                 "pass a checkpoint that finetune logged"))
    return {k: v["path"] if isinstance(v, dict) else v for k, v in arts.items()}


def download_model_file(info, inner: str, dst: Path) -> Path:
    """One file or folder of a logged model (`inner`: its path inside the model)."""
    import mlflow

    model_uri = info.model_uri
    try:
        if info.model_id:
            # `models:/<id>/<path>` is read as a registered name; the model's own location is not.
            root = mlflow.MlflowClient().get_logged_model(info.model_id).artifact_location
            return Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root.rstrip('/')}/{inner}", dst_path=str(dst)))
        return Path(mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/{inner}",
                                                        dst_path=str(dst)))
    except Exception as err:  # MLflow raises several types for a missing artifact
        raise StepError(f"cannot download {inner} of model {model_uri} ({type(err).__name__}: "
                        f"{one_line(err, 160)}); its artifacts are gone or "
                        "unreadable: log the checkpoint again") from err


def check_checkpoint_task(spec: dict | None, task: str, system_prompt: str, checkpoint_uri: str) -> None:
    """A checkpoint carries its own task (task.json): a `task` other than the default, or a
    `system_prompt`, that disagrees with it would be silently dropped, so it is an InputError."""
    from lora_pipeline.task.tasks import DEFAULT_TASK, task_from_spec

    own, own_prompt = task_from_spec(spec)
    problems = []
    if task.strip().lower() not in (DEFAULT_TASK, own.name):
        problems.append(Problem("task", task, f"the checkpoint {checkpoint_uri} was trained for task={own.name}",
                                f"pass task={own.name}, or leave the default"))
    if system_prompt and system_prompt != (own_prompt or own.system_prompt):
        problems.append(Problem("system_prompt", system_prompt, f"the checkpoint {checkpoint_uri} was "
                                "trained with another system prompt (its task.json)",
                                "leave system_prompt empty to keep the checkpoint's own"))
    if problems:
        raise InputError(problems)


def read_checkpoint(checkpoint_uri: str, manifest_uri: str, tmp: Path) -> Weights:
    """The weights of a checkpoint finetune logged, downloaded into `tmp`, and the base they were
    trained on (`manifest_uri` if given: it must pin the same base as the checkpoint's own)."""
    from lora_pipeline.base.manifest import Manifest, load_manifest

    info = model_info(checkpoint_uri, "checkpoint_uri")
    arts = e2e_artifacts(info, "checkpoint_uri", checkpoint_uri)
    ref_path = download_model_file(info, arts[artifacts.BASE_REF_ARTIFACT], tmp)
    own = Manifest.from_json(ref_path.read_text())
    manifest = load_manifest(manifest_uri) if manifest_uri else own
    if manifest.digest() != own.digest():
        raise InputError(Problem(
            "manifest_uri", manifest_uri,
            f"pins base {manifest.reference()}, but the checkpoint was trained on "
            f"{own.reference()}", "pass the manifest the finetune run used, or "
            "leave manifest_uri empty to use the checkpoint's own"))
    spec = None
    if artifacts.TASK_ARTIFACT in arts:
        spec = json.loads(download_model_file(info, arts[artifacts.TASK_ARTIFACT], tmp / "task").read_text())
    for name, kind in ((artifacts.ADAPTER_ARTIFACT, artifacts.KIND_ADAPTER),
                       (artifacts.FULL_MODEL_ARTIFACT, artifacts.KIND_FULL)):
        if name in arts:
            return Weights(manifest, kind, download_model_file(info, arts[name], tmp / "ckpt"),
                           info.model_id or "", spec)
    raise InputError(Problem("checkpoint_uri", checkpoint_uri,
                             "holds neither an adapter nor a full model",
                             "pass a checkpoint that finetune logged"))


def logged_model_bytes(model_id: str) -> int:
    """Size of everything stored for a logged model (recursive listing of its artifacts)."""
    import mlflow

    client = mlflow.MlflowClient()

    def walk(path: str | None) -> int:
        total = 0
        for f in client.list_logged_model_artifacts(model_id, path):
            total += walk(f.path) if f.is_dir else (f.file_size or 0)
        return total

    return walk(None)


def check_serves(model_uri: str) -> None:
    """Load the logged model (base resolved and verified, adapter applied) and predict its example."""
    import mlflow
    import pandas as pd

    from lora_pipeline.model.serving import INPUT_EXAMPLE_SENTENCE

    try:
        model = mlflow.pyfunc.load_model(model_uri)
        out = model.predict(pd.DataFrame({"prompt": [INPUT_EXAMPLE_SENTENCE]}),
                            params={"max_new_tokens": 16})
    except StepError:
        raise
    except Exception as err:  # anything that stops the model from serving
        raise StepError(f"the logged model {model_uri} does not serve: {type(err).__name__}: "
                        f"{one_line(err)}") from err
    log.info("serving check: %r -> %r", INPUT_EXAMPLE_SENTENCE, out.iloc[0].to_dict())
