"""The baseline of bench/bench_eval_step.py: `evaluate_checkpoint`'s job as a competent user writes it by
hand with transformers, PEFT and MLflow.

Loads the base once in the given precision's weights (fp32), puts the LoRA adapter on it with PEFT and
merges it in place (`merge_adapter`: plain Linear speed, no LoRA branch per call), generates greedy
answers in left-padded batches in input order, then unmerges and generates again with the adapter
disabled (the base's answers, without loading the base twice); bf16 = the same autocast as
`plain_generate` in bench_eval_throughput.py. Scores both with the pipeline's slot scorer (a pure
function, milliseconds) so the two sides report the same numbers, and logs the metrics and the
per-example table to an MLflow run, as the step does. Prints one JSON line: the scores.

    python bench/plain_evaluate.py --base <checkpoint dir> --adapter <adapter dir> --eval_data <csv: mr, ref>
        [--batch_size 32] [--max_new_tokens 64] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--eval_data", required=True)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    opts = parser.parse_args()

    import mlflow
    import pandas as pd
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from bench_eval_throughput import plain_generate

    from lora_pipeline.task.e2e import format_prompt
    from lora_pipeline.task.tasks import get_task

    rows = pd.read_csv(opts.eval_data)
    tok = AutoTokenizer.from_pretrained(opts.base, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(opts.base, dtype=torch.float32),
                                      opts.adapter).eval()
    prompts = [format_prompt(tok, s) for s in rows["ref"]]
    model.merge_adapter()
    candidate = plain_generate(model, tok, prompts, opts.batch_size, opts.max_new_tokens, opts.precision)
    model.unmerge_adapter()
    with model.disable_adapter():
        base = plain_generate(model, tok, prompts, opts.batch_size, opts.max_new_tokens, opts.precision)

    task = get_task("e2e")
    expected = list(rows["mr"])
    cand = task.score(list(zip(expected, candidate, strict=True)), "")
    base_scored = task.score(list(zip(expected, base, strict=True)), "")
    with mlflow.start_run(run_name="plain_evaluate"):
        mlflow.log_metrics({**{f"candidate.{k}": v for k, v in cand.metrics.items()},
                            **{f"base.{k}": v for k, v in base_scored.metrics.items()}})
        mlflow.log_table(pd.DataFrame({"sentence": rows["ref"], "expected": expected, "predicted": candidate,
                                       "base_predicted": base}), "eval_table.json")
    print(json.dumps({"candidate": cand.metrics, "base": base_scored.metrics}))


if __name__ == "__main__":
    main()
