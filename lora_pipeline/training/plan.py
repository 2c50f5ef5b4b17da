"""`Plan`: everything validated and staged before training, JSON so that torchrun ranks read the same.

`stage` turns checked inputs into a plan: it splits the examples by MR, resolves the pinned base,
checks that the target modules exist and that no example is longer than `max_seq_length`, rebuilds
the checkpoint to resume from, and writes the splits into a work dir the caller removes afterwards.

`args` below is the finetune step's `Args` dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_pipeline.errors import Problems
from lora_pipeline.training.resume import Checkpoint, ResumePoint, download_resume

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"  # in the work dir: rank 0's run id, then its result (read by the launcher)


@dataclass
class Plan:
    """Everything validated before training: what the workers need, JSON-serialisable."""

    args: Any  # the step's Args (a dataclass; a dict in the JSON)
    manifest_json: str
    base_dir: str
    work_dir: str
    all_path: str  # JSONL (mr, ref): every example used (logged as the run's dataset input)
    train_path: str  # JSONL (mr, ref): the training split
    validation_path: str  # JSONL (mr, ref): the held-out split
    dataset_source: str  # resolved location (file path or Hub id)
    n_train_mrs: int
    n_validation_mrs: int
    rows_skipped: int
    longest_tokens: int
    resume: ResumePoint | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str, args_type: type) -> Plan:
        data = json.loads(text)
        resume = data.pop("resume")
        args = args_type(**data.pop("args"))
        return cls(**data, args=args, resume=ResumePoint(**resume) if resume else None)

    def write_result(self, payload: dict[str, Any]) -> None:
        """Merge `payload` into the work dir's result file (rank 0 -> the launching process)."""
        path = Path(self.work_dir) / RESULT_FILE
        path.write_text(json.dumps({**self.read_result(), **payload}))

    def read_result(self) -> dict[str, Any]:
        path = Path(self.work_dir) / RESULT_FILE
        return json.loads(path.read_text()) if path.is_file() else {}


def target_module_names(text: str) -> list[str]:
    """The `target_modules` parameter (comma-separated) as a list."""
    return [m.strip() for m in text.split(",") if m.strip()]


def check_target_modules(base_dir: Path, wanted: list[str], problems: Problems) -> None:
    """Every target module name must name linear layers of the architecture (checked on an empty
    model: no weights loaded)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear)})
    missing = [m for m in wanted if m not in linear]
    if missing:
        problems.add("target_modules", ",".join(wanted),
                     f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a linear module "
                     f"of {type(model).__name__}",
                     f"choose from: {', '.join(linear)}")


def check_hardware(args: Any, problems: Problems) -> dict[str, Any] | None:
    """Check `device`, `precision` and the memory knobs against this machine (no download: the
    device is known before the base is); every problem into `problems`. Returns the decisions so far
    ({device, precision} and the hardware facts under `hw`), or None when a value is not even one of
    the allowed names (`validate_static` reported it)."""
    from lora_pipeline.model import device as dev
    from lora_pipeline.model.precision import PRECISIONS, resolve_precision

    if args.device not in dev.DEVICES or args.dtype not in dev.DTYPES or args.precision not in PRECISIONS:
        return None
    hw = dev.detect()
    device = dev.resolve_device(args.device, hw=hw, problems=problems)
    dev.resolve_memory(device, gradient_checkpointing=args.gradient_checkpointing,
                       load_in_4bit=args.load_in_4bit, num_processes=args.num_processes, hw=hw,
                       problems=problems)
    return {"device": device, "precision": resolve_precision(args.precision, device, hw=hw), "hw": hw}


def stage(args: Any, ds, report, manifest, resume_target: Checkpoint | None, problems: Problems,
          hardware: dict[str, Any] | None = None) -> Plan:
    """Split, check against the base and write out checked inputs; raises `InputError` with every
    problem found here (and any already in `problems`). `hardware`: `check_hardware`'s decisions,
    completed here with the weight dtype (which needs the base's config) into `Plan.extra`."""
    from lora_pipeline.model import device as dev
    from lora_pipeline.model.serving import load_tokenizer, resolve_base
    from lora_pipeline.task import data
    from lora_pipeline.training.trainer_utils import encode_example

    train, val = data.split_by_mr(ds, args.validation_fraction, args.seed)
    work = Path(tempfile.mkdtemp(prefix="finetune-"))
    try:
        base_dir = resolve_base(manifest)
        modules = target_module_names(args.target_modules)
        check_target_modules(base_dir, modules, problems)
        extra: dict[str, Any] = {}
        if hardware is not None:
            dtype = dev.resolve_dtype(args.dtype, base_dir, device=hardware["device"], hw=hardware["hw"],
                                      problems=problems)
            extra = {"device": hardware["device"], "precision": hardware["precision"], "dtype": dtype}
        tok = load_tokenizer(base_dir)
        lengths = [encode_example(tok, r, m)["length"] for r, m in
                   zip(list(train["ref"]) + list(val["ref"]), list(train["mr"]) + list(val["mr"]), strict=True)]
        too_long = sum(n > args.max_seq_length for n in lengths)
        if too_long:
            problems.add("max_seq_length", args.max_seq_length,
                         f"{too_long} of {len(lengths)} examples are longer (prompt+answer up to "
                         f"{max(lengths)} tokens) and would be cut",
                         f"pass max_seq_length={max(lengths)} or more, or drop those examples")
        resume = None
        if resume_target is not None:
            resume = download_resume(resume_target, work / "resume", resume_from=args.resume_from,
                                     lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                                     target_modules=modules, problems=problems)
        problems.raise_if_any()
        paths = {k: work / f"{k}.jsonl" for k in ("all", "train", "validation")}
        for k, part in (("all", ds), ("train", train), ("validation", val)):
            part.to_json(str(paths[k]), force_ascii=False)
        return Plan(
            args=args, manifest_json=manifest.to_json(), base_dir=str(base_dir),
            work_dir=str(work), all_path=str(paths["all"]), train_path=str(paths["train"]),
            validation_path=str(paths["validation"]), dataset_source=report.source.location,
            n_train_mrs=distinct_mrs(train), n_validation_mrs=distinct_mrs(val),
            rows_skipped=report.rows_skipped, longest_tokens=max(lengths), resume=resume, extra=extra,
        )
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def distinct_mrs(ds) -> int:
    from lora_pipeline.task.e2e import normalise_mr

    return len({normalise_mr(m) or m for m in ds["mr"]})


def load_split(path: str):
    """A staged JSONL split as a `datasets.Dataset`."""
    import datasets

    # The Arrow cache goes beside the file (the plan's work dir, removed after the run), not into the
    # shared HF datasets cache, which would keep a copy per run.
    return datasets.load_dataset("json", data_files=path, split="train",
                                 cache_dir=str(Path(path).parent / "hf-datasets-cache"))
