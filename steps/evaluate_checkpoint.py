"""`evaluate_checkpoint`: score a logged model against its base on held-out sentences.

Input: a model URI (`models:/<id>`, `runs:/<run>/<name>`, `models:/<name>@<alias>`) of a model this
pipeline logged, and an evaluation set (default: the held-out split the `finetune` run behind the
model logged, found by following the model's lineage (lora_pipeline/tracking/lineage.py); else a
.csv/.jsonl file, an artifact URI of one, or a Hub dataset id). The base is evaluated on the same
sentences through the same code path (the served model without its adapter, base resolved and
verified from the pinned manifest), so every report shows base vs candidate
(lora_pipeline/model/evaluation.py).

Metrics: the task's (the one the model was trained for, `task.json`; lora_pipeline/task/tasks.py).
e2e: slot precision / recall / F1 (micro, and per slot), exact match of the whole MR, rate of
unparsable outputs; json: field precision / recall / F1, valid-JSON rate, exact match; text: exact
match, token F1, ROUGE-L; always generation tokens per second. They go to this run (`candidate.*`,
`base.*`) and to the logged model (`slot_f1`, ..., `base_slot_f1`, ...), with a per-example table
(`eval_table.json`: sentence or prompt, expected, predicted, per-row score) the MLflow UI shows.
"""

from __future__ import annotations

import gc
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_pipeline import artifacts
from lora_pipeline.cli import param, run_cli
from lora_pipeline.errors import InputError, Problem, Problems
from lora_pipeline.model import device
from lora_pipeline.model.logged import latest_output, looks_like_model_uri, model_info
from lora_pipeline.model.precision import PRECISIONS
from lora_pipeline.task import formats

log = logging.getLogger(__name__)

ENTRY_POINT = "evaluate_checkpoint"
LOG_REFERENCE_ENTRY_POINT = "log_reference"


@dataclass
class Args:
    model_uri: str = param("", "model to evaluate: models:/<id>, runs:/<run>/<name> or "
                           "models:/<name>@<alias>; default: the model of the latest finished "
                           "log_reference run")
    eval_data: str = param("", "evaluation set: a .csv/.jsonl/.json/.parquet file (mr, ref; prompt, "
                           "completion; or messages: see data_format), an artifact URI of one, or a "
                           "Hub dataset id; default: the held-out split of the finetune run behind "
                           "the model")
    eval_data_revision: str = param("", "Hub dataset ids only: branch, tag or commit")
    # The data parameters (lora_pipeline/task/formats.py:DataArgs, shared with finetune). `task` is
    # the model's own (task.json) unless given; the layout ones apply to an eval_data you pass (the
    # default held-out split is in the pipeline's own layout).
    task: str = formats.data_param("task")
    data_format: str = formats.data_param("data_format")
    prompt_column: str = formats.data_param("prompt_column")
    completion_column: str = formats.data_param("completion_column")
    messages_column: str = formats.data_param("messages_column")
    system_prompt: str = formats.data_param("system_prompt")
    skip_malformed: bool = param(False, "skip evaluation rows whose MR does not parse (default: "
                                 "refuse the set)")
    max_examples: int = param(200, "evaluate at most this many examples (a fixed random sample); "
                              "0 = all")
    batch_size: int = param(32, "sentences generated together (left-padded batches)")
    max_new_tokens: int = param(64, "longest answer generated, in tokens")
    precision: str = param("auto", "compute precision of generation: bf16 (autocast; weights stay "
                           "fp32), fp32, or auto = bf16 where the hardware has fast bf16 matmuls "
                           "(CUDA bf16, or a CPU with AMX: amx_bf16), as finetune trains")
    device: str = param("auto", "where to generate: cuda, cpu, or auto = cuda when torch sees a GPU; "
                        "cuda without one is an error")
    dtype: str = param("auto", "dtype of the weights: fp32, bf16, or auto = the checkpoint's stored "
                       "dtype, fp32 where that format is slow on the device")
    device_map: str = param("", "spread a model too big for one device: auto, balanced, "
                            "balanced_low_0, sequential (accelerate), or cpu, cuda, cuda:<index>; "
                            "'' = the whole model on `device`")
    max_memory: str = param("", "with a device_map strategy, the most each device may hold, e.g. "
                            "0:20GiB,1:20GiB,cpu:64GiB; '' = what accelerate finds free")


@dataclass
class Result:
    run_id: str
    model_uri: str
    model_id: str
    eval_data: str
    examples: int
    candidate: dict[str, float] = field(default_factory=dict)
    base: dict[str, float] = field(default_factory=dict)


def validate_static(args: Args) -> Problems:
    problems = Problems()
    if args.model_uri:
        problems.require(looks_like_model_uri(args.model_uri), "model_uri", args.model_uri,
                         "is not a model URI",
                         "pass models:/<model_id>, runs:/<run_id>/<name> or models:/<name>@<alias>")
    problems.positive("max_examples", args.max_examples, allow_zero=True)
    problems.positive("batch_size", args.batch_size)
    problems.positive("max_new_tokens", args.max_new_tokens)
    problems.require(args.precision in PRECISIONS, "precision", args.precision, "is not supported",
                     f"use one of: {', '.join(PRECISIONS)}")
    problems.require(args.device in device.DEVICES, "device", args.device, "is not a device this "
                     "pipeline runs on", f"use one of: {', '.join(device.DEVICES)}")
    problems.require(args.dtype in device.DTYPES, "dtype", args.dtype, "is not supported",
                     f"use one of: {', '.join(device.DTYPES)}")
    formats.check_args(formats.DataArgs(**{f: getattr(args, f) for f in _DATA_FIELDS}), problems)
    return problems


_DATA_FIELDS = ("task", "data_format", "prompt_column", "completion_column", "messages_column",
                "system_prompt")


def load_options(args: Args):
    """The device, dtype and memory plan the models load with, checked against this machine; an
    InputError with every problem (CUDA asked for where there is none, a device map naming a GPU
    that is not there, a max_memory that limits nothing, ...)."""
    from lora_pipeline.model.serving import LoadOptions

    hw = device.detect()
    problems = Problems()
    dev = device.resolve_device(args.device, hw=hw, problems=problems)
    memory = device.resolve_memory(dev, device_map=args.device_map, max_memory=args.max_memory, hw=hw,
                                   problems=problems)
    problems.raise_if_any()
    return LoadOptions(device=dev, dtype=args.dtype, memory=memory)


def default_eval_data(model_uri: str, model_id: str) -> str:
    """The held-out split of the finetune run in the model's lineage; InputError if there is none."""
    import mlflow

    from lora_pipeline.tracking.lineage import validation_data

    client = mlflow.MlflowClient()
    source = validation_data(client, client.get_logged_model(model_id)) if model_id else None
    if not source:
        raise InputError(Problem("eval_data", "", f"is empty and no finetune run in the lineage "
                                 f"of {model_uri} logged a held-out split",
                                 "pass eval_data (a .csv/.jsonl file with columns mr, ref)"))
    log.info("eval_data defaults to the held-out split %s", source)
    return source


def run(args: Args) -> Result:
    from lora_pipeline.cli import configure_tracking

    validate_static(args).raise_if_any()
    options = load_options(args)  # before any download or model load
    configure_tracking()
    model_uri = args.model_uri or latest_output(LOG_REFERENCE_ENTRY_POINT, artifacts.MODEL_OUTPUT,
                                                "model_uri")
    info = model_info(model_uri, "model_uri")
    model_id = info.model_id or ""

    import mlflow

    from lora_pipeline.model import evaluation, serving
    from lora_pipeline.task.eval_set import eval_dataset, load_task_examples
    from lora_pipeline.tracking.runs import step_run

    eval_source = args.eval_data or default_eval_data(model_uri, model_id)
    gen = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, precision=args.precision)
    with tempfile.TemporaryDirectory(prefix="evaluate.") as tmp_str:
        tmp = Path(tmp_str)
        # Loaded before the run starts: an unresolvable base or a digest mismatch leaves no run.
        with serving.loading(options):
            extractor, base_arts = evaluation.load_candidate(info.model_uri, tmp)
        task = evaluation.model_task(args.task, extractor.task_name, model_uri)
        if args.system_prompt:  # evaluate the model (and its base) under another system prompt
            extractor.system_prompt = args.system_prompt
        # finetune's held-out split (the default; main passes it explicitly) is in the pipeline's own
        # layout, whatever layout the training data had.
        own_split = not args.eval_data or args.eval_data.endswith(artifacts.VALIDATION_DATA_PATH)
        layout = None if own_split else formats.DataArgs(
            **{f: getattr(args, f) for f in _DATA_FIELDS if f != "task"}, task=task.name)
        sentences, expected, table = load_task_examples(
            eval_source, args.eval_data_revision, task, layout, tmp, skip_malformed=args.skip_malformed,
            max_examples=args.max_examples)
        log.info("evaluating %s (task %s) and its base on %d examples of %s", model_uri, task.name,
                 len(sentences), eval_source)

        with step_run(ENTRY_POINT, args) as active:
            run_id = active.info.run_id
            dataset = eval_dataset(table, eval_source)
            mlflow.log_input(dataset, context="evaluation")

            cand, cand_rows = evaluation.score(
                expected, evaluation.generate_timed(extractor, sentences, desc="candidate", **gen), "", task)
            # One model in memory at a time: the candidate goes before the base loads.
            del extractor
            gc.collect()
            with serving.loading(options):
                base_ext = evaluation.load_base(base_arts)
            if args.system_prompt:
                base_ext.system_prompt = args.system_prompt
            base, base_rows = evaluation.score(
                expected, evaluation.generate_timed(base_ext, sentences, desc="base", **gen), "", task)
            del base_ext
            gc.collect()

            run_metrics = {f"candidate.{k}": v for k, v in cand.items()}
            run_metrics.update({f"base.{k}": v for k, v in base.items()})
            run_metrics["eval_examples"] = len(sentences)
            mlflow.log_metrics(run_metrics, dataset=dataset)
            model_metrics = dict(cand)
            model_metrics.update({f"base_{k}": v for k, v in base.items()})
            if model_id:
                mlflow.log_metrics(model_metrics, model_id=model_id, dataset=dataset)
                mlflow.MlflowClient().set_logged_model_tags(model_id, {artifacts.EVAL_RUN_TAG: run_id})
            mlflow.log_table(evaluation.eval_table(sentences, expected, cand_rows, base_rows, task.name),
                             artifacts.EVAL_TABLE_FILE)
            mlflow.set_tags({"eval.data": eval_source, "eval.model": model_uri, "eval.task": task.name,
                             "eval.primary_metric": task.primary_metric})
            artifacts.set_outputs(mlflow.MlflowClient(), run_id,
                                  {artifacts.MODEL_OUTPUT: artifacts.model_uri(model_id) if model_id
                                   else model_uri})
    key = task.primary_metric
    log.info("%s: candidate %.3f, base %.3f (%d examples)", key, cand[key], base[key], len(sentences))
    return Result(run_id=run_id, model_uri=model_uri, model_id=model_id, eval_data=eval_source,
                  examples=len(sentences), candidate=cand, base=base)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(Args, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
