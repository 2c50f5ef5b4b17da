"""Training throughput of the `finetune` step vs a plain `transformers.Trainer`, side by side.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_finetune_throughput.py            # default model
    .venv/bin/python bench/bench_finetune_throughput.py --model path/to/checkpoint_dir    # any local base

Same base, same data (data/sample.csv, same split), same steps, same batches (same seed), same
evaluation and save schedule, in one process. Three trainings, alternated `--repeats` times so
machine load drifts hit all of them alike; the median of each is compared:
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


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="download_snapshot `model`: 'default' or a local dir")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--save-steps", type=int, default=5, help="also the eval interval")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-seq-length", type=int, default=1024)
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

    runs: dict[str, list[tuple[float, int]]] = {"plain-full": [], "plain-answer": [], "step": []}
    results = []
    print(f"model={ns.model} steps={ns.steps} batch={ns.batch_size} save/eval every {ns.save_steps} "
          f"torch threads={torch.get_num_threads()} repeats={ns.repeats}", flush=True)
    for rep in range(ns.repeats):
        for name in ("plain-full", "plain-answer", "step"):
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
    for base, why in (("plain-answer", "reporting + checkpoint-logging overhead; goal >= 0.97"),
                      ("plain-full", "the step vs a vanilla Trainer set-up")):
        paired = [b_s / s_s for (b_s, _), (s_s, _) in zip(runs[base], runs["step"], strict=True)]
        print(f"ratio step / {base:12s} = {statistics.median(paired):.3f}  per repeat "
              f"{', '.join(f'{r:.3f}' for r in paired)}  ({why})")
    for r in results:
        print(f"step run {r.run_id}: {r.checkpoints_logged} checkpoints; training loop spent "
              f"{r.checkpoint_on_save_s:.3f} s handing them over and {r.checkpoint_final_wait_s:.2f} s "
              f"waiting for the last upload, of {r.train_runtime_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
