"""P3: evaluation throughput, this pipeline's served model vs `mlflow.transformers` pyfunc defaults.

Same model, same prompts, same process. The fine-tuned model is the default base plus a LoRA adapter
(`--adapter_dir`, e.g. one finetune logged; default: a fresh adapter with finetune's default config,
which leaves the base's outputs unchanged).
  * ours: `log_reference`'s model loaded with `mlflow.pyfunc.load_model`, `predict` with
    evaluate_checkpoint's defaults (`batch_size`, `precision=auto`: bf16 autocast where the CPU has
    bf16 matmuls), `max_new_tokens=64`, greedy; and once more with `precision=fp32`, the baseline's
    own precision, so both figures come from the same run;
  * baseline: the merged model as a `text-generation` pipeline, logged with
    `mlflow.transformers.log_model` and default settings (only `pip_requirements` given: requirement
    inference crashes on this stack), loaded with `mlflow.pyfunc.load_model`, `predict` on the same
    chat-formatted prompts; `max_new_tokens` and greedy decoding are set in the model's generation
    config (the default signature has no params, so predict-time params are ignored).
Prints sentences/s and generated tokens/s of both, and the ratio (goal >= 8x). The figure that
matters is on a fine-tuned adapter (what evaluate_checkpoint evaluates: short answers that end);
the default no-op adapter makes the base answer at length, up to max_new_tokens.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_eval_throughput.py [--sentences 32]
        [--adapter_dir <the adapter/ artifact of a fine-tuned model, e.g. the one bench_quality logs>]
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SHARED_E2E = ROOT.parent / "shared" / "e2e" / "devset-cleaned.csv"
MAX_NEW_TOKENS = 64


def _sentences(n: int) -> list[str]:
    import pandas as pd

    df = pd.read_csv(SHARED_E2E)
    # One sentence per MR, spread over the file: varied lengths and slot counts.
    df = df.drop_duplicates("mr")
    step = max(1, len(df) // n)
    return df["ref"].iloc[::step].head(n).tolist()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=32)
    from steps.evaluate_checkpoint import Args as EvalArgs

    parser.add_argument("--batch_size", type=int, default=EvalArgs().batch_size,
                        help="ours: sentences per generate call (default: evaluate_checkpoint's)")
    parser.add_argument("--adapter_dir", default="", help="a PEFT adapter folder for the default base")
    parser.add_argument("--model", default="default", help="base for download_snapshot")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench_eval."))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.chdir(work)
    import mlflow
    import pandas as pd
    import torch
    import transformers

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("bench")
    from lora_pipeline import artifacts
    from lora_pipeline.base.manifest import load_manifest
    from lora_pipeline.model import serving
    from lora_pipeline.task.e2e import format_prompt, parse_mr
    from steps import download_snapshot, log_reference

    snap = download_snapshot.run(download_snapshot.Args(model=opts.model))
    manifest = load_manifest(snap.manifest_uri)
    base_dir = Path(snap.local_path)
    adapter = Path(opts.adapter_dir) if opts.adapter_dir else _fresh_adapter(base_dir, work / "adapter")
    sentences = _sentences(opts.sentences)
    print(f"base {manifest.reference()}; adapter {'given: ' + str(adapter) if opts.adapter_dir else 'fresh (no-op)'}; "
          f"{len(sentences)} sentences; max_new_tokens {MAX_NEW_TOKENS}; greedy; "
          f"torch threads {torch.get_num_threads()}")

    # Ours -------------------------------------------------------------------------------------
    with mlflow.start_run():
        ckpt = serving.log_e2e_model(artifacts.checkpoint_model_name(1), manifest, adapter_dir=adapter,
                                     with_input_example=False)
    ours_uri = log_reference.run(log_reference.Args(
        checkpoint_uri=artifacts.model_uri(ckpt.model_id))).model_uri
    ours_model = mlflow.pyfunc.load_model(ours_uri)
    tok = ours_model.unwrap_python_model().tokenizer
    from lora_pipeline.model.precision import resolve_precision

    ours = {}  # precision -> (seconds, answers)
    for precision in ("auto", "fp32"):
        params = {"batch_size": opts.batch_size, "max_new_tokens": MAX_NEW_TOKENS, "precision": precision}
        ours_model.predict(pd.DataFrame({"prompt": sentences[:2]}),
                           params={**params, "max_new_tokens": 4})  # warm-up
        t0 = time.perf_counter()
        out = ours_model.predict(pd.DataFrame({"prompt": sentences}), params=params)
        ours[precision] = (time.perf_counter() - t0, out["mr"].tolist())
    auto = resolve_precision("auto")
    del ours_model

    # Baseline ---------------------------------------------------------------------------------
    merged = serving.apply_adapter(serving.load_causal_lm(base_dir), adapter)  # same weights as ours
    # The same decoding as ours, set on the model itself: the default pyfunc signature has no params
    # schema, so predict-time params are dropped (MLflow warns) and generation would otherwise run
    # to the model's maximum length. MLflow's own settings stay at their defaults.
    merged.generation_config.max_new_tokens = MAX_NEW_TOKENS
    merged.generation_config.do_sample = False
    merged.generation_config.max_length = None
    pipe = transformers.pipeline("text-generation", model=merged, tokenizer=serving.load_tokenizer(base_dir))
    with mlflow.start_run():
        default_uri = mlflow.transformers.log_model(pipe, name="default",
                                                    pip_requirements=serving.pip_requirements()).model_uri
    del pipe, merged
    base_model = mlflow.pyfunc.load_model(default_uri)
    prompts = [format_prompt(tok, s) for s in sentences]
    base_model.predict(prompts[:2])  # warm-up
    t0 = time.perf_counter()
    base_out = base_model.predict(prompts)
    base_s = time.perf_counter() - t0
    base_texts = [str(x) for x in (base_out if isinstance(base_out, list) else list(base_out.iloc[:, 0]))]
    # The baseline echoes the prompt (whitespace-stripped) before the answer: count only the answer.
    base_answers = [t[len(p.rstrip()):] if t.startswith(p.rstrip()) else t
                    for t, p in zip(base_texts, prompts, strict=True)]
    base_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in base_answers)

    n = len(sentences)
    print(f"\nP3  evaluation throughput on {n} sentences (goal >= 8x)")
    print(f"    mlflow.transformers pyfunc (defaults, fp32): {base_s:7.1f} s  {n / base_s:6.2f} sent/s  "
          f"{base_tokens / base_s:7.1f} tok/s  ({base_tokens} tokens)")
    for precision, label in (("auto", f"auto = {auto}"), ("fp32", "fp32")):
        secs, answers = ours[precision]
        # Tokens generated, counted from the answers (+1 for the end-of-sequence token): the `mr`
        # column holds the normalised MR, or the raw text when it did not parse.
        tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in answers)
        agree = sum(parse_mr(a.strip()) == parse_mr(m) for a, m in zip(base_answers, answers, strict=True))
        print(f"    ours, batch {opts.batch_size}, precision {label:11s}: {secs:7.1f} s  {n / secs:6.2f} sent/s  "
              f"{tokens / secs:7.1f} tok/s  ({tokens} tokens)  speed-up {base_s / secs:.1f}x "
              f"(tokens/s {(tokens / secs) / (base_tokens / base_s):.1f}x); same MR as baseline {agree}/{n}")
    print(f"\n(work dir {work})")


if __name__ == "__main__":
    main()
