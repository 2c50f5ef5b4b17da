"""`Plan`: everything validated and staged before training, JSON so that torchrun ranks read the same.

`load_data` reads the training data: E2E mr/ref files for task=e2e as the pipeline always has
(lora_pipeline/task/data.py, the pinned figures), anything else through lora_pipeline/task/formats.py.
`stage` turns checked inputs into a plan: it splits the examples (by MR, by `group_column`, or by
row), resolves the pinned base,
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

from lora_pipeline.errors import InputError, Problem, Problems
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
    # JSONL: (mr, ref) rows for task=e2e; (messages, targets, group) rows as JSON text otherwise
    # (formats.to_record), which evaluate_checkpoint reads back as messages data.
    all_path: str  # every example used (logged as the run's dataset input)
    train_path: str  # the training split
    validation_path: str  # the held-out split
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


# The finetune parameters that say what the data is (formats.DataArgs) and how the e2e path reads it.
DATA_FIELDS = frozenset({"task", "data_format", "prompt_column", "completion_column", "messages_column",
                         "group_column", "system_prompt", "skip_malformed", "dataset", "dataset_revision"})


@dataclass
class TrainingData:
    """The training data as read: `ds` + `report` (E2E mr/ref through data.py) or `loaded`."""

    ds: Any = None  # datasets.Dataset (mr, ref)
    report: Any = None  # data.LoadReport
    loaded: Any = None  # formats.Loaded

    @property
    def source_location(self) -> str:
        return self.report.source.location if self.report is not None else self.loaded.source.location


def load_data(args: Any) -> TrainingData:
    """Read and check the training data; InputError with every bad row otherwise.

    task=e2e on mr/ref data without a group_column keeps the path every E2E run has taken (data.py:
    skip_malformed, the split by MR), so its figures do not move; other layouts of E2E data (e.g.
    prompt/completion Parquet) and the other tasks go through formats.py.
    """
    from lora_pipeline.task import data, formats
    from lora_pipeline.task.tasks import get_task

    task = get_task(args.task)
    da = formats.data_args(args)
    if task.name == "e2e" and da.data_format in ("auto", "e2e") and not da.group_column.strip():
        try:
            ds, report = data.load_examples_report(args.dataset, args.dataset_revision,
                                                   skip_malformed=args.skip_malformed)
            return TrainingData(ds=ds, report=report)
        except InputError as err:
            if da.data_format == "e2e":
                raise
            e2e_error = err
        try:
            return TrainingData(loaded=formats.load(args.dataset, args.dataset_revision, task=task, args=da))
        except InputError:
            raise e2e_error from None  # the mr/ref reader's message is the more specific one
    return TrainingData(loaded=formats.load(args.dataset, args.dataset_revision, task=task, args=da))


def _e2e_rows(examples: list, field: str = "dataset") -> list[dict[str, str]]:
    """E2E examples read by formats.py as the (mr, ref) rows the e2e training path takes."""
    bad = [ex.row for ex in examples if len(ex.messages) != 2 or ex.messages[0]["role"] != "user"]
    if bad:
        raise InputError(Problem(field, f"{len(bad)} rows", "task=e2e takes one sentence and one MR per "
                                 f"row; rows {', '.join(map(str, bad[:5]))} are conversations",
                                 "use task=json or text for conversations, or one user turn and its MR"))
    return [{"mr": ex.completion, "ref": ex.messages[0]["content"]} for ex in examples]


def split_data(args: Any, td: TrainingData):
    """(all, train, validation) as datasets.Dataset, and the distinct groups on each side."""
    import datasets

    from lora_pipeline.task import data, formats
    from lora_pipeline.task.tasks import get_task

    if td.ds is not None:
        train, val = data.split_by_mr(td.ds, args.validation_fraction, args.seed)
        return td.ds, train, val, distinct_mrs(train), distinct_mrs(val)
    examples = td.loaded.examples
    train_ex, val_ex = formats.split(examples, args.validation_fraction, args.seed, unit=td.loaded.unit)

    def groups(part: list) -> int:
        return len({ex.group if ex.group is not None else ("row", ex.row) for ex in part})

    if get_task(args.task).name == "e2e":
        to_rows = _e2e_rows
    else:
        def to_rows(part: list) -> list[dict[str, str]]:
            return [formats.to_record(ex) for ex in part]
    return (datasets.Dataset.from_list(to_rows(examples)), datasets.Dataset.from_list(to_rows(train_ex)),
            datasets.Dataset.from_list(to_rows(val_ex)), groups(train_ex), groups(val_ex))


def stage(args: Any, td: TrainingData, manifest, resume_target: Checkpoint | None, problems: Problems,
          hardware: dict[str, Any] | None = None) -> Plan:
    """Split, check against the base and write out checked inputs; raises `InputError` with every
    problem found here (and any already in `problems`). `hardware`: `check_hardware`'s decisions,
    completed here with the weight dtype (which needs the base's config) into `Plan.extra`."""
    from lora_pipeline.model import device as dev
    from lora_pipeline.model.serving import load_tokenizer, resolve_base
    from lora_pipeline.task.tasks import get_task
    from lora_pipeline.training.trainer_utils import example_length

    ds, train, val, n_train_groups, n_val_groups = split_data(args, td)
    task = get_task(args.task)
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
        lengths = [example_length(tok, row, task, args.system_prompt or None)
                   for part in (train, val) for row in part]
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
            validation_path=str(paths["validation"]), dataset_source=td.source_location,
            n_train_mrs=n_train_groups, n_validation_mrs=n_val_groups,
            rows_skipped=td.report.rows_skipped if td.report is not None else 0, longest_tokens=max(lengths),
            resume=resume, extra=extra,
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
