"""P3, the whole step: `evaluate_checkpoint` as a user waits for it, against the same job written by hand.

bench_eval_throughput.py times generation alone (`predict` on a loaded model). A user waits for the
whole step: a fresh process that imports, loads the model, generates the candidate's answers and the
base's, scores both and logs them. Both sides here are that, each a fresh process timed from start to
exit, the sides alternated:
  * ours: `python -m steps.evaluate_checkpoint --model_uri <log_reference's model> --eval_data <csv>
    --max_examples 0` with the given batch size, max_new_tokens and precision (it loads the candidate
    through the served model, with the base's digests checked, then the base alone; one model in
    memory at a time);
  * plain: bench/plain_evaluate.py, the same job written by hand with transformers, PEFT and MLflow
    (the base loaded once, the adapter merged in place for the candidate, disabled for the base,
    left-padded batches in input order, greedy, the same metrics and table logged).
Same base, same adapter, same rows, same prompts, same batch size and max_new_tokens, one tracking
store (sqlite) in a work folder. Prints and writes (bench/results/eval_step.json) the seconds of each,
the ratio plain / ours per repeat (median and range) and both sides' candidate and base slot F1.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_eval_step.py --adapter_dir <adapter/ of a
        fine-tuned model> [--sentences 200] [--repeats 3] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_eval_throughput import SAMPLE, SHARED_E2E, eval_rows  # noqa: E402


def _timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Seconds from start to exit of `cmd`; its output goes to `log`."""
    with open(log, "a", encoding="utf-8") as err:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=err, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit {proc.returncode}; see {log}")
    return seconds


def main() -> None:
    from steps.evaluate_checkpoint import Args as EvalArgs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=EvalArgs().max_examples,
                        help="evaluation rows, distinct MRs (default: the step's max_examples)")
    parser.add_argument("--batch_size", type=int, default=EvalArgs().batch_size)
    parser.add_argument("--max_new_tokens", type=int, default=EvalArgs().max_new_tokens)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side, alternated")
    parser.add_argument("--adapter_dir", required=True, help="a PEFT adapter folder for the base "
                        "(what evaluate_checkpoint evaluates: a fine-tuned one)")
    parser.add_argument("--model", default="default", help="base for download_snapshot")
    parser.add_argument("--data", type=Path, default=SHARED_E2E if SHARED_E2E.is_file() else SAMPLE,
                        help="CSV with mr, ref columns (default: ../shared/e2e/devset-cleaned.csv, else "
                             "data/sample.csv)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default: bench/results/eval_step.json)")
    opts = parser.parse_args()
    adapter = Path(opts.adapter_dir).resolve()
    out = opts.out.resolve() if opts.out is not None else None
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench_eval_step."))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"  # this process and both sides
    env = dict(os.environ)
    import mlflow
    import record

    from lora_pipeline import artifacts
    from lora_pipeline.base.manifest import load_manifest
    from lora_pipeline.model import serving
    from lora_pipeline.task.e2e import parse_mr
    from steps import download_snapshot, log_reference

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    snap = download_snapshot.run(download_snapshot.Args(model=opts.model))
    manifest = load_manifest(snap.manifest_uri)
    with mlflow.start_run():
        ckpt = serving.log_e2e_model(artifacts.checkpoint_model_name(1), manifest, adapter_dir=adapter,
                                     with_input_example=False)
    model_uri = log_reference.run(log_reference.Args(checkpoint_uri=artifacts.model_uri(ckpt.model_id))).model_uri
    # Rows whose MR the step accepts (the devset repeats a slot in some; the step refuses those unless
    # told to skip them, and the plain side would score them): both sides get the same rows.
    rows = eval_rows(opts.data, 2 * opts.sentences)
    rows = rows[rows["mr"].map(parse_mr).notna()].head(opts.sentences)
    data = work / "eval.csv"
    rows[["mr", "ref"]].to_csv(data, index=False)
    n = len(rows)
    gen = ["--batch_size", str(opts.batch_size), "--max_new_tokens", str(opts.max_new_tokens),
           "--precision", opts.precision]
    python = sys.executable
    sides = {
        "ours": [python, "-m", "steps.evaluate_checkpoint", "--model_uri", model_uri, "--eval_data", str(data),
                 "--max_examples", "0", *gen],
        "plain": [python, str(ROOT / "bench" / "plain_evaluate.py"), "--base", snap.local_path,
                  "--adapter", str(adapter), "--eval_data", str(data), *gen],
    }
    print(f"base {manifest.reference()}; {n} rows; batch {opts.batch_size}; max_new_tokens "
          f"{opts.max_new_tokens}; {opts.precision}; {opts.repeats} alternated repeats; logs in {work}")

    secs: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(opts.repeats):
        names = list(sides)[r % 2:] + list(sides)[:r % 2]
        for name in names:
            s = _timed(sides[name], env, work / f"{name}.log")
            secs[name].append(s)
            print(f"repeat {r + 1}: {name} {s:.1f} s", flush=True)

    # Both sides' scores, from the tracking store (each side's latest run).
    client = mlflow.MlflowClient()
    ours_run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.`{artifacts.STEP_TAG}` = 'evaluate_checkpoint'",
                                  max_results=1)[0]
    plain_runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    filter_string="attributes.run_name = 'plain_evaluate'", max_results=1)
    scores = {
        "ours": {k: ours_run.data.metrics.get(k) for k in ("candidate.slot_f1", "base.slot_f1")},
        "plain": {k: plain_runs[0].data.metrics.get(k) for k in ("candidate.slot_f1", "base.slot_f1")},
    }
    ratio = record.spread([p / o for p, o in zip(secs["plain"], secs["ours"], strict=True)])
    figures = {"rows": n, "batch_size": opts.batch_size, "max_new_tokens": opts.max_new_tokens,
               "precision": opts.precision, "repeats": opts.repeats,
               "base": {"source": manifest.source, "manifest_sha256": manifest.digest()},
               "seconds": {k: record.spread(v) for k, v in secs.items()}, "plain_vs_ours": ratio,
               "scores": scores}
    print(json.dumps(figures, indent=1))
    noise = "; inside the noise" if record.within_noise(ratio, 1.0) else ""
    table = [{
        "figure": f"P3 whole `evaluate_checkpoint` step, {opts.precision}: hand-written transformers + PEFT + "
                  f"MLflow script / ours, fresh process each, start to exit ({n} rows, candidate and base, "
                  f"batch {opts.batch_size}, <= {opts.max_new_tokens} new tokens, greedy, default base + a "
                  f"fine-tuned adapter)",
        "goal": "> 1x (the speed-up survives loading, scoring and logging)",
        "measured": f"{record.fmt_spread(ratio, 2, 'x')}{noise} (ours "
                    f"{figures['seconds']['ours']['median']:.1f} s, plain "
                    f"{figures['seconds']['plain']['median']:.1f} s; candidate slot F1 ours "
                    f"{scores['ours']['candidate.slot_f1']:.3f}, plain {scores['plain']['candidate.slot_f1']:.3f})"}]
    record.write("eval_step", figures=figures, rows=table, out=out)


if __name__ == "__main__":
    main()
