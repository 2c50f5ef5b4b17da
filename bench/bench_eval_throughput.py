"""P3: evaluation throughput of the served model against two baselines, on equal terms.

Same model weights, same chat-formatted prompts, same batch size, same greedy decoding and the same
`max_new_tokens` on every side, in one process, for each precision asked (fp32, bf16):
  * ours: `log_reference`'s model loaded with `mlflow.pyfunc.load_model`, `predict` with
    `batch_size`, `max_new_tokens`, `precision` (bf16 = autocast on a bf16-Linear copy of the fp32
    model; fp32 on a CPU = a copy whose Linear weights are packed once for MKL's sgemm; generation:
    lora_pipeline/model/serving.py, decoding.py, packed_linear.py);
  * plain transformers: the merged model, batched `model.generate` written by hand (left-padded
    batches of `batch_size` in input order, greedy); bf16 = the same autocast as ours;
  * `mlflow.transformers` pyfunc: the merged model as a `text-generation` pipeline logged with
    `model_config={"batch_size", "max_new_tokens", "do_sample": False}` (its pipeline batches), and
    `torch_dtype=bfloat16` for bf16 (MLflow's way to ask for bf16), loaded with
    `mlflow.pyfunc.load_model`, `predict` on the prompts (only `pip_requirements` given besides:
    requirement inference crashes on this stack).
  * in fp32 where the served model packs its Linear weights for MKL (a CPU), also ours on its
    weights as loaded (`F.linear`), to show what the packing brings.
Prints and writes (bench/results/eval_throughput.json, with command, commit and machine) seconds,
sentences/s and generated tokens/s of each, the ratios ours / plain and ours / mlflow.transformers
(and ours / ours as loaded), and how many answers parse to the same MR as plain transformers'.
The figure that matters is on a fine-tuned adapter (what evaluate_checkpoint evaluates: short
answers that end); the default, a fresh adapter with finetune's config, leaves the base's answers
(mostly as long as max_new_tokens allows).

    flock /tmp/heavy.lock .venv/bin/python bench/bench_eval_throughput.py [--sentences 32]
        [--batch_size 32] [--precisions fp32,bf16] [--adapter_dir <the adapter/ of a fine-tuned model>]
Smoke run on a tiny model (seconds): --model <a small local checkpoint> --sentences 4 --batch_size 2
    --max_new_tokens 4 --precisions fp32 --out <a scratch file>
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)
SHARED_E2E = ROOT.parent / "shared" / "e2e" / "devset-cleaned.csv"
SAMPLE = ROOT / "data" / "sample.csv"


def eval_rows(path: Path, n: int):
    """`n` rows (mr, ref) of a CSV: one sentence per MR, spread over the file (varied lengths and slot
    counts)."""
    import pandas as pd

    df = pd.read_csv(path).drop_duplicates("mr")
    step = max(1, len(df) // n)
    return df.iloc[::step].head(n).reset_index(drop=True)


def _sentences(path: Path, n: int) -> list[str]:
    return eval_rows(path, n)["ref"].tolist()


def _fresh_adapter(base_dir: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from steps import finetune

    a = finetune.Args()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha,
                                    target_modules=a.target_modules.split(","),
                                    task_type="CAUSAL_LM")).save_pretrained(out)
    return out


# The side that times the served model without its packed Linear weights (fp32 on a CPU).
UNPACKED = "ours, weights as loaded"


def _alternated(sides: dict, repeats: int) -> dict:
    """Seconds of every repeat of each side, the sides run in a rotating order (so a slow spell of the
    machine falls on all of them), and each side's answers from its last run."""
    names = list(sides)
    secs: dict[str, list[float]] = {n: [] for n in names}
    answers: dict[str, list[str]] = {}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            answers[name] = sides[name]()
            secs[name].append(time.perf_counter() - t0)
    return {n: (secs[n], answers[n]) for n in names}


def plain_generate(model, tok, prompts: list[str], batch_size: int, max_new_tokens: int, precision: str):
    """Plain transformers, by hand: left-padded batches in input order, greedy `generate`."""
    import torch
    from transformers import GenerationConfig

    from lora_pipeline.model.precision import autocast

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                           top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tok(prompts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode(), autocast(model, precision):
            gen = model.generate(**enc, generation_config=cfg)
        out += [t.strip() for t in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def main() -> None:
    from steps.evaluate_checkpoint import Args as EvalArgs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=EvalArgs().batch_size,
                        help="sentences per generate call, every side (default: evaluate_checkpoint's)")
    parser.add_argument("--max_new_tokens", type=int, default=EvalArgs().max_new_tokens)
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per side, alternated; medians and ranges are quoted")
    parser.add_argument("--adapter_dir", default="", help="a PEFT adapter folder for the base")
    parser.add_argument("--model", default="default", help="base for download_snapshot")
    parser.add_argument("--data", type=Path, default=SHARED_E2E if SHARED_E2E.is_file() else SAMPLE,
                        help="CSV with mr, ref columns (default: ../shared/e2e/devset-cleaned.csv, else "
                             "data/sample.csv)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: "
                        "bench/results/eval_throughput.json)")
    opts = parser.parse_args()
    if opts.adapter_dir:  # before the chdir below; MLflow reads it as an artifact URI
        opts.adapter_dir = str(Path(opts.adapter_dir).resolve())
    if opts.out is not None:  # likewise: a relative --out names a file under where it was asked
        opts.out = opts.out.resolve()
    precisions = [p.strip() for p in opts.precisions.split(",") if p.strip()]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        parser.error(f"--precisions={opts.precisions!r}: use fp32 and/or bf16")
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench_eval."))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.chdir(work)
    import mlflow
    import pandas as pd
    import record
    import torch
    import transformers

    from lora_pipeline import artifacts
    from lora_pipeline.base.manifest import load_manifest
    from lora_pipeline.model import serving
    from lora_pipeline.task.e2e import format_prompt, parse_mr
    from steps import download_snapshot, log_reference

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("bench")
    snap = download_snapshot.run(download_snapshot.Args(model=opts.model))
    manifest = load_manifest(snap.manifest_uri)
    base_dir = Path(snap.local_path)
    adapter = Path(opts.adapter_dir) if opts.adapter_dir else _fresh_adapter(base_dir, work / "adapter")
    adapter_kind = "a fine-tuned" if opts.adapter_dir else "a fresh (no-op)"
    sentences = _sentences(opts.data, opts.sentences)
    n, bs, mnt = len(sentences), opts.batch_size, opts.max_new_tokens
    print(f"base {manifest.reference()}; adapter {'given' if opts.adapter_dir else 'fresh (no-op)'}; "
          f"{n} sentences; batch {bs}; max_new_tokens {mnt}; greedy; torch threads {torch.get_num_threads()}")

    with mlflow.start_run():
        ckpt = serving.log_e2e_model(artifacts.checkpoint_model_name(1), manifest, adapter_dir=adapter,
                                     with_input_example=False)
    ours_model = mlflow.pyfunc.load_model(log_reference.run(log_reference.Args(
        checkpoint_uri=artifacts.model_uri(ckpt.model_id))).model_uri, model_config={"batching": False})
    extractor = ours_model.unwrap_python_model()
    tok = extractor.tokenizer
    prompts = [format_prompt(tok, s) for s in sentences]
    merged = serving.apply_adapter(serving.load_causal_lm(base_dir), adapter)  # the same weights as ours
    pipe_tok = serving.load_tokenizer(base_dir)  # left padding, pad token set

    def tokens(answers: list[str]) -> int:
        # Generated tokens, counted from the answers (+1 for the end-of-sequence token).
        return sum(len(ids) + 1 for ids in tok(answers, add_special_tokens=False)["input_ids"])

    rows, table = [], []
    df = pd.DataFrame({"prompt": sentences})
    for precision in precisions:
        params = {"batch_size": bs, "max_new_tokens": mnt, "precision": precision}
        pipe = transformers.pipeline("text-generation", model=merged, tokenizer=pipe_tok)
        with mlflow.start_run():
            uri = mlflow.transformers.log_model(
                pipe, name=f"mlflow-transformers-{precision}",
                model_config={"batch_size": bs, "max_new_tokens": mnt, "do_sample": False},
                torch_dtype=torch.bfloat16 if precision == "bf16" else None,
                pip_requirements=serving.pip_requirements()).model_uri
        del pipe
        mt_model = mlflow.pyfunc.load_model(uri)

        def mt_answers(m=mt_model) -> list[str]:
            raw = m.predict(prompts)
            texts = [str(x) for x in (raw if isinstance(raw, list) else list(raw.iloc[:, 0]))]
            # Only the answer counts, should the pipeline echo the prompt.
            return [t[len(p.rstrip()):].strip() if t.startswith(p.rstrip()) else t.strip()
                    for t, p in zip(texts, prompts, strict=True)]

        sides = {
            "ours": lambda p=params: [str(x) for x in ours_model.predict(df, params=p)["mr"]],
            "plain transformers": lambda p=precision: plain_generate(merged, pipe_tok, prompts, bs, mnt, p),
            "mlflow.transformers": mt_answers,
        }
        packed = extractor.generation_model(precision)
        if precision == "fp32" and packed is not extractor.model:
            # What the packed Linear weights (lora_pipeline/model/packed_linear.py) bring: the same
            # served model generating on its weights as loaded (F.linear), timed alongside.
            def unpacked(p=params, packed=packed) -> list[str]:
                extractor._fp32_model = extractor.model
                try:
                    return [str(x) for x in ours_model.predict(df, params=p)["mr"]]
                finally:
                    extractor._fp32_model = packed

            sides[UNPACKED] = unpacked
        # Warm-up of each side on every prompt, 2 new tokens (first-call set-up is not generation
        # speed). On all the prompts, not a few: the first pass at a batch's full size also pays the
        # process's first large allocations (glibc returns big freed blocks to the system until its
        # mmap threshold has grown), and the side that ran first paid them for all: ours' first run,
        # right after a 2-prompt warm-up, took 9.7 s against 7.0 s for its second.
        ours_model.predict(df, params={**params, "max_new_tokens": 2})
        plain_generate(merged, pipe_tok, prompts, bs, 2, precision)
        mt_model.predict(prompts)
        timed = _alternated(sides, opts.repeats)
        del mt_model

        plain_mr = [parse_mr(a) for a in timed["plain transformers"][1]]
        row = {"precision": precision, "sentences": n, "batch_size": bs, "max_new_tokens": mnt}
        for name, (secs, answers) in timed.items():
            med = record.spread(secs)["median"]
            row[name] = {"seconds": record.spread(secs), "sentences_per_s": round(n / med, 3),
                         "tokens_per_s": round(tokens(answers) / med, 1), "tokens": tokens(answers),
                         "same_mr_as_plain": sum(parse_mr(a) == m for a, m in zip(answers, plain_mr, strict=True))}
        # Ratios per repeat (the sides of one repeat ran back to back), then median and range.
        ours_s = timed["ours"][0]
        row["ours_vs_plain"] = record.spread([b / o for b, o in zip(timed["plain transformers"][0], ours_s, strict=True)])
        row["ours_vs_mlflow_transformers"] = record.spread(
            [b / o for b, o in zip(timed["mlflow.transformers"][0], ours_s, strict=True)])
        if UNPACKED in timed:
            row["packed_vs_unpacked"] = record.spread(
                [u / o for u, o in zip(timed[UNPACKED][0], ours_s, strict=True)])
        rows.append(row)
        same = f"{row['ours']['same_mr_as_plain']}/{n} answers parse to plain's MR"
        for key, label in (("ours_vs_plain", "hand-written batched transformers `generate`"),
                           ("ours_vs_mlflow_transformers", "`mlflow.transformers` pyfunc logged with `batch_size`")):
            r = row[key]
            noise = "; inside the noise" if record.within_noise(r, 1.5) else ""
            table.append({
                "figure": f"P3 evaluation throughput, {precision}: ours / {label} (same {n} prompts, batch {bs}, "
                          f"<= {mnt} new tokens, greedy, default base + {adapter_kind} adapter)",
                "goal": ">= 1.5x",
                "measured": f"{record.fmt_spread(r, 2, 'x')}{noise} (ours {row['ours']['seconds']['median']:.1f} s; "
                            f"{same})"})
        if UNPACKED in timed:
            r = row["packed_vs_unpacked"]
            noise = "; inside the noise" if record.within_noise(r, 1.0) else ""
            table.append({
                "figure": f"P3 evaluation throughput, {precision}: ours / ours on its weights as loaded "
                          f"(`F.linear`; the packed Linear weights' share, same run)",
                "goal": "> 1x (kept only if faster)",
                "measured": f"{record.fmt_spread(r, 2, 'x')}{noise} (ours {row['ours']['seconds']['median']:.1f} s, "
                            f"as loaded {row[UNPACKED]['seconds']['median']:.1f} s; as loaded: "
                            f"{row[UNPACKED]['same_mr_as_plain']}/{n} answers parse to plain's MR)"})

    print(f"\n{'precision':<10}{'side':<22}{'median s':>9}{'sent/s':>8}{'tok/s':>8}{'same MR':>9}")
    for row in rows:
        for name in ("ours", UNPACKED, "plain transformers", "mlflow.transformers"):
            if name not in row:
                continue
            r = row[name]
            print(f"{row['precision']:<10}{name:<22}{r['seconds']['median']:>9.2f}{r['sentences_per_s']:>8.2f}"
                  f"{r['tokens_per_s']:>8.1f}{r['same_mr_as_plain']:>6}/{n}")
        print(f"{row['precision']:<10}speed-up: {record.fmt_spread(row['ours_vs_plain'], 2, 'x')} plain "
              f"transformers, {record.fmt_spread(row['ours_vs_mlflow_transformers'], 2, 'x')} mlflow.transformers")
        if "packed_vs_unpacked" in row:
            print(f"{row['precision']:<10}packed Linear weights: {record.fmt_spread(row['packed_vs_unpacked'], 2, 'x')} "
                  "the same served model on its weights as loaded")
    record.write("eval_throughput", figures={
        # The base by its content (the temporary store's run URI would mean nothing later).
        "base": {"source": manifest.source, "architecture": manifest.architecture,
                 "bytes": manifest.total_bytes, "manifest_sha256": manifest.digest()},
        "adapter": adapter_kind, "repeats": opts.repeats, "rows": rows}, rows=table, out=opts.out)


if __name__ == "__main__":
    main()
