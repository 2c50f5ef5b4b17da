"""`log_reference`: log the fine-tuned result as a model that refers to its base instead of copying it.

Two ways in (exactly one):
  * `checkpoint_uri` (default: the best checkpoint of the latest finished `finetune` run): a model
    that `finetune` logged (`models:/<id>`, `runs:/<run>/<name>`, `models:/<name>@<alias>`). Its
    PEFT adapter is re-logged with the pinned base reference, a signature and an input example; the
    trainer state (optimizer, scheduler) stays with the checkpoint. The logged model is then loaded
    back and asked to predict its input example, so a model that cannot serve is an error here and
    not a warning in MLflow's log.
  * `full_model_dir`: a plain local directory holding a complete checkpoint (config.json,
    safetensors weights, tokenizer). Logged file by file without loading the weights (the
    memory-efficient path): only the safetensors headers are read, to reject a truncated file
    (lora_pipeline/model/full_checkpoint.py); with a local store each file is then copied straight
    into the model's artifacts and hashed on the way for `artifact_digests.json`
    (serving.log_e2e_model). `task` and `system_prompt` say what it was trained for; they travel
    with it as `task.json`, as with a checkpoint (whose own task.json they must agree with).

The base is never copied: the model stores the snapshot manifest (Hub repo id + commit, or the
snapshot run's artifact URI, plus every file's sha256); loading resolves the base from it and checks
every digest (lora_pipeline/model/serving.py). Output: tag `model` = `models:/<model_id>`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_pipeline import artifacts
from lora_pipeline.cli import param, run_cli
from lora_pipeline.errors import InputError, Problems
from lora_pipeline.model import logged
from lora_pipeline.model.full_checkpoint import check_full_model_dir, read_full_model
from lora_pipeline.task import formats
from lora_pipeline.task.tasks import get_task
from lora_pipeline.training import ENTRY_POINT as FINETUNE_ENTRY_POINT

log = logging.getLogger(__name__)

ENTRY_POINT = "log_reference"


@dataclass
class Args:
    manifest_uri: str = param("", "snapshot manifest URI printed by download_snapshot "
                              "(runs:/<run>/snapshot/manifest.json); default: the one the checkpoint "
                              "refers to; required with full_model_dir")
    checkpoint_uri: str = param("", "checkpoint model logged by finetune: models:/<id>, "
                                "runs:/<run>/<name> or models:/<name>@<alias>; default: the best "
                                "checkpoint of the latest finished finetune run")
    full_model_dir: str = param("", "instead of a checkpoint: a local directory with a complete "
                                "model (config.json, *.safetensors, tokenizer), logged without "
                                "loading its weights")
    # What the model was trained for: a full model has no task.json of its own (a checkpoint does;
    # these must then agree with it). Declared in lora_pipeline/task/formats.py:DataArgs.
    task: str = formats.data_param("task")
    system_prompt: str = formats.data_param("system_prompt")


@dataclass
class Result:
    run_id: str
    model_uri: str
    model_id: str
    kind: str  # adapter | full
    base_reference: str
    logged_bytes: int  # everything the logged model stores
    base_bytes: int  # the base's weights and files, which it refers to instead of storing


def validate_static(args: Args) -> Problems:
    problems = Problems()
    if args.checkpoint_uri and args.full_model_dir:
        problems.add("full_model_dir", args.full_model_dir, "given together with checkpoint_uri",
                     "pass either checkpoint_uri (an adapter checkpoint) or full_model_dir "
                     "(a complete model), not both")
    if args.checkpoint_uri:
        problems.require(logged.looks_like_model_uri(args.checkpoint_uri), "checkpoint_uri",
                         args.checkpoint_uri, "is not a model URI",
                         "pass models:/<model_id>, runs:/<run_id>/<name> or models:/<name>@<alias>")
    if args.full_model_dir:
        problems.require(bool(args.manifest_uri), "manifest_uri", args.manifest_uri,
                         "is required with full_model_dir (it names the base the model was "
                         "fine-tuned from)", "pass the manifest URI that download_snapshot printed")
        check_full_model_dir(Path(args.full_model_dir).expanduser(), args.full_model_dir, problems)
    try:
        get_task(args.task)
    except InputError as err:
        problems.items.extend(err.problems)
    return problems


def run(args: Args) -> Result:
    from lora_pipeline.cli import configure_tracking

    validate_static(args).raise_if_any()
    configure_tracking()
    if not args.checkpoint_uri and not args.full_model_dir:
        args.checkpoint_uri = logged.latest_output(FINETUNE_ENTRY_POINT, artifacts.CHECKPOINT_OUTPUT,
                                                   "checkpoint_uri")

    import mlflow

    from lora_pipeline.model import serving
    from lora_pipeline.tracking.runs import step_run

    with tempfile.TemporaryDirectory(prefix="log_reference.") as tmp_str:
        tmp = Path(tmp_str)
        if args.checkpoint_uri:
            weights = logged.read_checkpoint(args.checkpoint_uri, args.manifest_uri, tmp)
            logged.check_checkpoint_task(weights.task_spec, args.task, args.system_prompt, args.checkpoint_uri)
        else:
            weights = read_full_model(args.full_model_dir, args.manifest_uri, tmp, args.task, args.system_prompt)
        manifest, kind = weights.manifest, weights.kind
        source = args.checkpoint_uri or str(Path(args.full_model_dir).expanduser().resolve())
        tags = {artifacts.SOURCE_MODEL_TAG: (artifacts.model_uri(weights.source_model_id)
                                             if weights.source_model_id else source),
                artifacts.MODEL_KIND_TAG: kind, "base.reference": manifest.reference(),
                artifacts.MANIFEST_DIGEST_TAG: manifest.digest()}
        with step_run(ENTRY_POINT, args) as active:
            run_id = active.info.run_id
            log.info("logging %s model referring to %s", kind, manifest.reference())
            info = serving.log_e2e_model(
                artifacts.REFERENCE_MODEL_NAME, manifest,
                adapter_dir=weights.weights_dir if kind == artifacts.KIND_ADAPTER else None,
                full_model_dir=weights.weights_dir if kind == artifacts.KIND_FULL else None,
                tags=tags, with_input_example=True, task_spec=weights.task_spec,
                # MLflow's own check loads the model and only warns when it fails; adapters get the
                # strict check below, full models are never loaded here (memory-efficient path).
                validate_serving_input=False,
            )
            uri = artifacts.model_uri(info.model_id)
            if kind == artifacts.KIND_ADAPTER:
                logged.check_serves(uri)
            size = logged.logged_model_bytes(info.model_id)
            mlflow.log_metrics({"logged_model_bytes": size, "base_bytes": manifest.total_bytes,
                                "logged_to_base_ratio": size / max(manifest.total_bytes, 1)})
            mlflow.set_tags(tags)
            artifacts.set_outputs(mlflow.MlflowClient(), run_id, {artifacts.MODEL_OUTPUT: uri})
    log.info("logged %s (%.2f MB, refers to %s of %.1f MB)", uri, size / 1e6,
             manifest.reference(), manifest.total_bytes / 1e6)
    return Result(run_id=run_id, model_uri=uri, model_id=info.model_id, kind=kind,
                  base_reference=manifest.reference(), logged_bytes=size,
                  base_bytes=manifest.total_bytes)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(Args, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
