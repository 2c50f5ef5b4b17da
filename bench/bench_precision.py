"""Whether `precision=auto` picks the faster compute precision on this CPU: fp32 against bf16 autocast.

`auto` (lora_pipeline/model/device.py: `auto_precision`, `CPU_BF16_FLAGS`) trains and generates under
bf16 autocast on CPUs with AMX and in fp32 elsewhere. This measures both precisions side by side, in
one process, on the two jobs `auto` decides for:
  * a training step as `finetune` takes it: the default base with finetune's LoRA config, a batch of
    `--train_batch` rows of data/sample.csv (prompt and answer in the chat template, right-padded),
    forward, backward and an AdamW step;
  * generation as `evaluate_checkpoint` runs it: `serving.generate` (greedy, `--sentences` prompts,
    batch 32, <= 64 new tokens) on the base with that adapter merged, each precision on the copy the
    served model generates with: bf16 on the bf16-Linear copy (`serving.bf16_linear_copy`), fp32 on
    the model, each with its Linear weights packed (MKL for fp32, oneDNN for bf16) where the CPU
    supports it (`packed_linear.packed_linear_copy`).
Each job's two precisions alternate `--repeats` times (the first untimed run of each is warm-up), and
the speed ratio bf16 / fp32 of each repeat is quoted as median and range. The row says what `auto`
picks on this machine and whether that is the faster precision (or a ratio inside the noise).

    flock /tmp/heavy.lock .venv/bin/python bench/bench_precision.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)
SAMPLE = ROOT / "data" / "sample.csv"


def _training_batch(tok, rows):
    """Token ids, attention mask and labels of `rows` (mr, ref), prompt and answer as finetune
    formats them, right-padded (padding not in the loss)."""

    from lora_pipeline.task.e2e import answer_text, format_prompt

    texts = [format_prompt(tok, ref) + answer_text(tok, mr) for mr, ref in rows]
    enc = tok(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc["input_ids"], enc["attention_mask"], labels, int(enc["attention_mask"].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per precision and job, alternated")
    ap.add_argument("--train_batch", type=int, default=8, help="rows per training step (finetune's default)")
    ap.add_argument("--sentences", type=int, default=32, help="prompts generated, batch 32")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--model", default="default", help="base for download_snapshot")
    ap.add_argument("--out", type=Path, default=None, help="results file (default: bench/results/precision.json)")
    opts = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_precision."))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    import pandas as pd
    import record
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_pipeline.model import device, packed_linear, serving
    from lora_pipeline.model.precision import autocast, resolve_precision
    from steps import download_snapshot, finetune

    snap = download_snapshot.run(download_snapshot.Args(model=opts.model))
    base_dir = Path(snap.local_path)
    tok = serving.load_tokenizer(base_dir)
    df = pd.read_csv(SAMPLE)
    a = finetune.Args()
    torch.manual_seed(0)
    model = get_peft_model(serving.load_causal_lm(base_dir),
                           LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                                      target_modules=a.target_modules.split(","), task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.learning_rate)
    step = max(1, len(df) // opts.train_batch)
    ids, mask, labels, train_tokens = _training_batch(
        tok, list(zip(df["mr"].iloc[::step].head(opts.train_batch), df["ref"].iloc[::step].head(opts.train_batch),
                      strict=True)))

    def train_step(precision: str) -> None:
        model.train()
        with autocast(model, precision):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sentences = df.drop_duplicates("mr")["ref"].head(opts.sentences).tolist()
    # B is zero in a fresh adapter: merged, these are the base's weights (the answers run long, to
    # max_new_tokens for most rows: generation speed, not answer quality, is measured).
    merged = get_peft_model(serving.load_causal_lm(base_dir),
                            LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha,
                                       target_modules=a.target_modules.split(","),
                                       task_type="CAUSAL_LM")).merge_and_unload().eval()
    gen_models = {"fp32": packed_linear.packed_linear_copy(merged), "bf16": packed_linear.packed_linear_copy(serving.bf16_linear_copy(merged))}

    def gen(precision: str) -> None:
        serving.generate(gen_models[precision], tok, sentences, max_new_tokens=opts.max_new_tokens,
                         batch_size=32, precision=precision)

    hw = device.detect()
    auto = resolve_precision("auto", "cpu", hw=hw)
    print(f"CPU bf16 flags: {sorted(hw.cpu_flags & {'avx512_bf16', 'amx_bf16'}) or 'none'}; auto picks {auto}; "
          f"torch threads {torch.get_num_threads()}")
    jobs = {"training step": (train_step, f"batch {opts.train_batch}, {train_tokens} tokens, LoRA r={a.lora_r}"),
            "generation": (gen, f"{len(sentences)} prompts, batch 32, <= {opts.max_new_tokens} new tokens, greedy")}
    figures, table = {"auto_picks": auto, "cpu_bf16_flags": sorted(hw.cpu_flags & {"avx512_bf16", "amx_bf16"}),
                      "jobs": {}}, []
    for job, (fn, what) in jobs.items():
        secs: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for r in range(opts.repeats + 1):
            for precision in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
                t0 = time.perf_counter()
                fn(precision)
                if r:  # run 0 of each is warm-up
                    secs[precision].append(time.perf_counter() - t0)
        ratio = record.spread([f / b for f, b in zip(secs["fp32"], secs["bf16"], strict=True)])
        faster = "bf16" if ratio["median"] > 1 else "fp32"
        noise = record.within_noise(ratio, 1.0)
        verdict = (f"inside the noise (the median favours {faster})" if noise
                   else f"auto picks the faster ({faster})" if auto == faster
                   else f"auto picks the SLOWER ({auto}; {faster} is faster)")
        figures["jobs"][job] = {"what": what, "fp32_seconds": record.spread(secs["fp32"]),
                                "bf16_seconds": record.spread(secs["bf16"]),
                                "bf16_speed_vs_fp32": ratio, "faster": faster, "within_noise": noise}
        print(f"{job:<14} fp32 {record.spread(secs['fp32'])['median']:.2f} s  bf16 "
              f"{record.spread(secs['bf16'])['median']:.2f} s  bf16 speed / fp32 {record.fmt_spread(ratio, 2, 'x')}"
              f"  -> {verdict}")
        flags = ", ".join(figures["cpu_bf16_flags"]) or "no bf16 flags"
        table.append({
            "figure": f"`precision=auto` on the measuring CPU ({flags}): bf16 autocast speed / fp32, {job} "
                      f"({what}; default base)",
            "goal": "auto picks the faster",
            "measured": f"{record.fmt_spread(ratio, 2, 'x')} (fp32 {record.spread(secs['fp32'])['median']:.2f} s, "
                        f"bf16 {record.spread(secs['bf16'])['median']:.2f} s); auto picks {auto}: {verdict}"})
    record.write("precision", figures=figures, rows=table, out=opts.out)


if __name__ == "__main__":
    main()
