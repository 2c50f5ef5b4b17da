"""Training throughput of the `finetune` step vs a plain `transformers.Trainer`, side by side.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_finetune_throughput.py            # default model
    .venv/bin/python bench/bench_finetune_throughput.py --model path/to/checkpoint_dir    # any local base

Same base, same data (data/sample.csv, same split), same steps, same batches (same seed), same
evaluation and save schedule, in one process. Three trainings, alternated `--repeats` times (the
order rotates each repeat) so machine load drifts hit all of them alike; the median of each is compared:
  * `plain-full`:   `Trainer` with the model's own loss (LM head at every position), no reporting;
                    checkpoints saved locally only;
  * `plain-answer`: `Trainer` with the step's answer-only loss, no reporting, local checkpoints;
  * `step`:         `finetune.run`: answer-only loss + per-step MLflow metrics + a checkpoint model
                    logged to MLflow at every save (background thread) + dataset/params logging.
Throughput = non-padding tokens trained / seconds in `trainer.train()` (evaluation and saving
included, as they are part of the schedule); for the step the wait for the last checkpoint upload
after training is added. The tokens are identical across the three (asserted), so each ratio is a
ratio of times. `step / plain-answer` isolates what reporting and checkpoint logging cost (goal
>= 0.97); `step / plain-full` is what the step gains over a vanilla Trainer set-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import record  # noqa: E402


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="download_snapshot `model`: 'default' or a local dir")
    # Defaults = the pipeline's default schedule (finetune.Args: 40 steps, save + eval every 20), 5 repeats.
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--save-steps", type=int, default=20, help="also the eval interval")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seq-length", type=int, default=1024)
    ap.add_argument("--sides", default="plain-full,plain-answer,step",
                    help="trainings to run (step and plain-answer give the goal's ratio; plain-full is context)")
    return ap.parse_args()


def main() -> int:
    ns = parse()
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "bench-finetune"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import mlflow
    import torch
    from transformers import Trainer, TrainerCallback

    from lora_pipeline.training import session
    from lora_pipeline.training.trainer_utils import AnswerCollator, AnswerOnlyTrainer
    from steps import download_snapshot, finetune

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("bench-finetune")
    os.chdir(work)
    snap = download_snapshot.run(download_snapshot.Args(model=ns.model))
    args = finetune.Args(manifest_uri=snap.manifest_uri, dataset=str(ROOT / "data" / "sample.csv"),
                         max_steps=ns.steps, batch_size=ns.batch_size, save_steps=ns.save_steps,
                         eval_steps=ns.save_steps, logging_steps=1, max_seq_length=ns.max_seq_length)

    class Clock(TrainerCallback):
        """Seconds from the first to the last training callback, and the tokens trained."""

        def on_train_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_train_end(self, a, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0
            self.tokens = state.num_input_tokens_seen

    def plain(trainer_cls) -> tuple[float, int]:
        clock = Clock()
        plan = finetune.prepare(args)
        try:
            parts = session.build(plan)
            targs = session.training_arguments(args, Path(plan.work_dir) / "trainer", world_size=1)
            trainer = trainer_cls(model=parts.model, args=targs, train_dataset=parts.train,
                                  eval_dataset=parts.validation, processing_class=parts.tokenizer,
                                  data_collator=AnswerCollator(parts.tokenizer.pad_token_id),
                                  callbacks=[clock])
            trainer.train()
            return clock.seconds, clock.tokens
        finally:
            import shutil

            shutil.rmtree(plan.work_dir, ignore_errors=True)

    def step() -> tuple[float, int, object]:
        clock = Clock()
        result = finetune.run(args, callbacks=[clock])
        return clock.seconds + result.checkpoint_final_wait_s, clock.tokens, result

    names = [n.strip() for n in ns.sides.split(",") if n.strip()]
    if not {"step", "plain-answer"} <= set(names) or set(names) - {"plain-full", "plain-answer", "step"}:
        raise SystemExit(f"--sides={ns.sides!r}: name step and plain-answer, optionally plain-full")
    runs: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
    results = []
    print(f"model={ns.model} steps={ns.steps} batch={ns.batch_size} save/eval every {ns.save_steps} "
          f"torch threads={torch.get_num_threads()} repeats={ns.repeats}", flush=True)
    for rep in range(ns.repeats):
        # Rotate the order each repeat, so no side always runs first (warm caches) or last.
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            if name == "step":
                secs, toks, res = step()
                results.append(res)
            else:
                secs, toks = plain(Trainer if name == "plain-full" else AnswerOnlyTrainer)
            runs[name].append((secs, toks))
            print(f"  repeat {rep + 1} {name:13s} {secs:8.1f} s  {toks} tokens  {toks / secs:8.1f} tok/s",
                  flush=True)
    tokens = {t for v in runs.values() for _, t in v}
    assert len(tokens) == 1, f"the trainings saw different tokens: {tokens}"
    rate = {k: statistics.median(t / s for s, t in v) for k, v in runs.items()}
    print()
    for k, v in rate.items():
        print(f"{k:13s} median {v:8.1f} tok/s")
    # Ratios within each repeat (the three ran back to back, under the same machine load), then
    # the median over repeats: a load spike in one repeat does not mix with another's figures.
    ratios = {}
    for base, why in (("plain-answer", "reporting + checkpoint-logging overhead; goal >= 0.97"),
                      ("plain-full", "the step vs a vanilla Trainer set-up")):
        if base not in runs:
            continue
        paired = [b_s / s_s for (b_s, _), (s_s, _) in zip(runs[base], runs["step"], strict=True)]
        ratios[base] = record.spread(paired)
        print(f"ratio step / {base:12s} = {statistics.median(paired):.3f}  per repeat "
              f"{', '.join(f'{r:.3f}' for r in paired)}  ({why})")
    ra = ratios["plain-answer"]
    # The step does strictly more work than plain-answer (the same training plus logging), so a ratio
    # whose range reaches 1 says only "no overhead measurable above the noise".
    verdict = " (range reaches 1.0: overhead inside the noise)" if record.within_noise(ra) else ""
    record.write("finetune_throughput", figures={
        "steps": ns.steps, "save_steps": ns.save_steps, "batch_size": ns.batch_size, "repeats": ns.repeats,
        "tokens": tokens.pop(), "tok_per_s": rate, "step_over_plain_answer": ra,
        "step_over_plain_full": ratios.get("plain-full")},
        rows=[{"figure": f"finetune throughput, step / plain `Trainer` with the same answer-only loss "
                         f"({ns.steps} steps, save + eval every {ns.save_steps}, {ns.repeats} alternating repeats)",
               "goal": ">= 0.97", "measured": record.fmt_spread(ra) + verdict}]
        + ([{"figure": "finetune throughput, step / vanilla `Trainer` (full-vocabulary logits)", "goal": "",
             "measured": record.fmt_spread(ratios["plain-full"])}] if "plain-full" in ratios else []))
    for r in results:
        print(f"step run {r.run_id}: {r.checkpoints_logged} checkpoints; training loop spent "
              f"{r.checkpoint_on_save_s:.3f} s handing them over and {r.checkpoint_final_wait_s:.2f} s "
              f"waiting for the last upload, of {r.train_runtime_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
