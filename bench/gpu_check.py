"""GPU check: finetune + evaluate + serve on the default base and on a synthetic ~1.5B model.

Run through bench/gpu_check.sh on a machine with a CUDA GPU (it stops at once, with one line, without
one). For each model: download_snapshot, finetune (`--max_steps`), log_reference, evaluate_checkpoint
and `mlflow models serve` + one batch request, each step through its CLI in a child process, in a
fresh SQLite store under the work directory. Prints, and writes to `--out` after every phase (so a
run cut short keeps what it measured):
  * training tokens/s (finetune's own figure: non-pad tokens per second of the training steps);
  * generation tokens/s (evaluate_checkpoint's `tokens_per_s` of the candidate, and the served
    batch's answers counted with the model's tokenizer over the request's wall time);
  * peak GPU memory of each phase (nvidia-smi's `memory.used` sampled every 0.2 s, minus what was
    used before the phase: the CUDA context is included; 0 means the phase ran on the CPU);
  * training MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak. FLOPs per trained token =
    4 x the weights of the decoder layers' Linear modules: 2 for the forward pass, 2 for the input
    gradients of the backward pass (the base is frozen: no weight gradients). The LM head (applied
    at answer positions only), attention scores and LoRA's own matmuls are left out, so the MFU is
    a slight under-estimate. Peaks used (NVIDIA datasheets, dense, no sparsity): PEAK_BF16_TFLOPS,
    e.g. H200 / H100 SXM 989 TFLOP/s; `--peak_tflops` overrides for other GPUs.

    bench/gpu_check.sh [--models default,synthetic] [--max_steps 20] [--workdir DIR] ...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

SELF = Path(__file__).resolve()
ROOT = SELF.parent.parent
for p in (str(ROOT), str(SELF.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

MODELS = ("default", "synthetic")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), NVIDIA datasheets; matched on the device name
# in this order (the first pattern that matches wins).
PEAK_BF16_TFLOPS = (
    (r"H200.*NVL", 835.0), (r"H200", 989.0),
    (r"H100.*NVL", 835.0), (r"H100.*PCIe", 756.0), (r"H100", 989.0),
    (r"A100", 312.0), (r"L40S", 362.0), (r"\bL4\b", 121.0), (r"\bA10\b", 125.0),
)
SENTENCES = ["The Punter is a high-priced coffee shop serving Chinese food near Café Sicilia.",
             "Blue Spice is a cheap pub in the riverside area.",
             "The Eagle is a family-friendly Italian restaurant with a customer rating of 5 out of 5.",
             "Near the city centre there is a French place called Zizzi; it is not family-friendly."]


# --- pure pieces (tested on CPU) -----------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="default,synthetic", help="comma-separated: default, synthetic")
    ap.add_argument("--synthetic_params", type=float, default=1.5e9)
    ap.add_argument("--synthetic_dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--max_steps", type=int, default=20)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--eval_examples", type=int, default=32)
    ap.add_argument("--eval_batch_size", type=int, default=32)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--serve_batch", type=int, default=8, help="sentences in the one served request; 0: no serving")
    ap.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory (removed)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    ap.add_argument("--step_timeout_s", type=float, default=900.0)
    ap.add_argument("--allow_cpu", action="store_true",
                    help="run without a GPU (to try the script's plumbing on a small setting; no MFU)")
    a = ap.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    problems = []
    if bad or not models:
        problems.append(f"--models {a.models!r}: use a comma-separated subset of {', '.join(MODELS)}")
    for name in ("max_steps", "batch_size", "eval_examples", "eval_batch_size", "max_new_tokens"):
        if getattr(a, name) < 1:
            problems.append(f"--{name} must be >= 1")
    if a.serve_batch < 0:
        problems.append("--serve_batch must be >= 0")
    if not 1e6 <= a.synthetic_params <= 1e11:
        problems.append("--synthetic_params must be between 1e6 and 1e11")
    if a.peak_tflops is not None and a.peak_tflops <= 0:
        problems.append("--peak_tflops must be > 0")
    if problems:
        ap.error("; ".join(problems))
    a.models = models
    return a


def peak_bf16_tflops(device_name: str, override: float | None = None) -> float | None:
    if override:
        return override
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def layer_linear_params(config: dict) -> int:
    """Weights of a Llama-like config's decoder-layer Linear modules (q, k, v, o, gate, up, down)."""
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    inter = config["intermediate_size"]
    per_layer = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * inter
    return per_layer * config["num_hidden_layers"]


def train_flops_per_token(config: dict) -> int:
    """LoRA on a frozen base: forward (2 per weight) + input gradients (2 per weight)."""
    return 4 * layer_linear_params(config)


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    if not peak_tflops or not tokens_per_s:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def cuda_facts(allow_cpu: bool = False) -> dict:
    """torch's view of the GPU; one line on stderr and SystemExit(2) when there is none (unless
    `allow_cpu`)."""
    import torch

    if not torch.cuda.is_available() and allow_cpu:
        return {"name": "cpu (no CUDA; --allow_cpu)", "capability": "-", "memory_gb": 0, "count": 0,
                "torch": torch.__version__, "cuda": torch.version.cuda}
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build (torch.version.cuda is None): install a CUDA build of torch "
               "into the environment, or point PYTHON at one" if torch.version.cuda is None
               else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check nvidia-smi "
                    "and CUDA_VISIBLE_DEVICES")
        print(f"gpu_check: no CUDA GPU: {why}", file=sys.stderr)
        raise SystemExit(2)
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 1e9, 1), "count": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda}


def last_json(stdout: str) -> dict:
    lines = stdout.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i] == "{":
            return json.loads("\n".join(lines[i:]))
    raise ValueError(f"no JSON result in the step's output: {stdout[-500:]!r}")


# --- measuring on the GPU machine ---------------------------------------------------------------------
class GpuMemory:
    """Peak `memory.used` (MiB) of GPU 0 while a block runs, sampled with nvidia-smi."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"]
        self.available = shutil.which("nvidia-smi") is not None

    def used_mib(self) -> float | None:
        if not self.available:
            return None
        try:
            return float(subprocess.run(self.cmd, capture_output=True, text=True, timeout=5).stdout.strip())
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None

    def __enter__(self):
        self.before = self.used_mib() or 0.0
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            used = self.used_mib()
            if used is not None:
                self.peak = max(self.peak, used)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mib(self) -> float | None:
        return round(self.peak - self.before, 1) if self.available else None


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the server this script started (its own session: uvicorn and its workers with it)."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # already gone
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.poll()


class Check:
    def __init__(self, a: argparse.Namespace, work: Path, gpu: dict):
        self.a, self.work, self.gpu = a, work, gpu
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.n = 0
        # The interpreter's bin/ first: `mlflow models serve` starts `uvicorn` from PATH.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT),
                    "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "E2E_LORA_LOG_LEVEL": "WARNING"}
        for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            self.env.pop(k, None)
        self.report: dict = {"gpu": gpu, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                             "models": {}}

    def save(self) -> None:
        self.a.out.parent.mkdir(parents=True, exist_ok=True)
        self.a.out.write_text(json.dumps(self.report, indent=2, sort_keys=True) + "\n")

    def step(self, step: str, **params) -> tuple[dict, float, float | None]:
        """(result, wall seconds, peak GPU memory growth MiB) of one step's CLI."""
        self.n += 1
        cmd = [sys.executable, "-m", f"steps.{step}"] + [x for k, v in params.items() for x in (f"--{k}", str(v))]
        log = self.logs / f"{self.n:02d}-{step}.log"
        start = time.perf_counter()
        with GpuMemory() as mem, open(log, "w") as err:
            proc = subprocess.run(cmd, env=self.env, cwd=self.work, stdout=subprocess.PIPE, stderr=err,
                                  text=True, timeout=self.a.step_timeout_s)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{step} exited {proc.returncode} after {wall:.0f}s; log {log}:\n"
                               f"{log.read_text()[-3000:]}")
        return last_json(proc.stdout), wall, mem.growth_mib

    def serve(self, model_uri: str, tokenizer_dir: Path) -> dict:
        """`mlflow models serve` of the model, one batch request; tokens/s of its answers."""
        from transformers import AutoTokenizer

        sock = __import__("socket").socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        log = self.logs / f"serve-{port}.log"
        url = f"http://127.0.0.1:{port}"
        batch = (SENTENCES * (self.a.serve_batch // len(SENTENCES) + 1))[: self.a.serve_batch]
        with GpuMemory() as mem, open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                                     "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                    env=self.env, cwd=self.work, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                start = time.perf_counter()
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"the server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
                    try:
                        with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                            if r.status == 200:
                                break
                    except (urllib.error.URLError, OSError):
                        pass
                    if time.perf_counter() - start > self.a.step_timeout_s:
                        raise RuntimeError(f"the server was not ready in {self.a.step_timeout_s:.0f}s")
                    time.sleep(0.5)
                ready_s = time.perf_counter() - start
                body = json.dumps({"dataframe_split": {"columns": ["prompt"], "data": [[s] for s in batch]},
                                   "params": {"max_new_tokens": self.a.max_new_tokens}}).encode()
                req = urllib.request.Request(url + "/invocations", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                t = time.perf_counter()
                with urllib.request.urlopen(req, timeout=self.a.step_timeout_s) as r:
                    rows = json.loads(r.read())["predictions"]
                request_s = time.perf_counter() - t
            finally:
                _stop_group(proc)
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokens = sum(len(ids) + 1 for ids in tok([r["mr"] for r in rows], add_special_tokens=False)["input_ids"])
        return {"ready_s": round(ready_s, 1), "request_s": round(request_s, 2), "sentences": len(rows),
                "answer_tokens": tokens, "tokens_per_s": round(tokens / request_s, 1),
                "gpu_mem_peak_mib": mem.growth_mib}

    def model(self, name: str, source: str) -> dict:
        a, out = self.a, {}
        self.report["models"][name] = out
        snap, wall, _ = self.step("download_snapshot", model=source)
        out["download_snapshot_s"] = round(wall, 1)
        base_dir = Path(snap["local_path"])
        config = json.loads((base_dir / "config.json").read_text())
        out["layer_linear_params"] = layer_linear_params(config)
        tune, wall, mem = self.step("finetune", manifest_uri=snap["manifest_uri"], max_steps=a.max_steps,
                                    batch_size=a.batch_size, eval_steps=a.max_steps, save_steps=a.max_steps)
        flops = train_flops_per_token(config)
        peak = peak_bf16_tflops(self.gpu["name"], a.peak_tflops)
        util = mfu(tune["tokens_per_second"], flops, peak)
        out["finetune"] = {"wall_s": round(wall, 1), "train_runtime_s": tune["train_runtime_s"],
                           "tokens_per_s": round(tune["tokens_per_second"], 1), "gpu_mem_peak_mib": mem,
                           "flops_per_token": flops, "peak_bf16_tflops": peak,
                           "model_tflops_per_s": round(tune["tokens_per_second"] * flops / 1e12, 2),
                           "mfu": None if util is None else round(util, 4)}
        self.save()
        ref, wall, mem = self.step("log_reference", checkpoint_uri=tune["checkpoint_uri"])
        out["log_reference"] = {"wall_s": round(wall, 1), "gpu_mem_peak_mib": mem}
        ev, wall, mem = self.step("evaluate_checkpoint", model_uri=ref["model_uri"],
                                  max_examples=a.eval_examples, batch_size=a.eval_batch_size,
                                  max_new_tokens=a.max_new_tokens)
        out["evaluate"] = {"wall_s": round(wall, 1), "examples": ev["examples"], "gpu_mem_peak_mib": mem,
                           "tokens_per_s": round(ev["candidate"].get("tokens_per_s", 0.0), 1),
                           "base_tokens_per_s": round(ev["base"].get("base_tokens_per_s",
                                                                     ev["base"].get("tokens_per_s", 0.0)), 1)}
        self.save()
        if a.serve_batch:
            try:
                out["serve"] = self.serve(ref["model_uri"], base_dir)
            except (RuntimeError, OSError) as err:  # the other figures stand without it
                out["serve"] = {"error": " ".join(str(err).split())[:300]}
            self.save()
        return out


def _mib(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def print_summary(report: dict) -> None:
    g = report["gpu"]
    print(f"\n{g['name']} (cc {g['capability']}, {g['memory_gb']} GB), torch {g['torch']}, CUDA {g['cuda']}")
    print(f"{'model':10s} {'train tok/s':>11s} {'MFU':>6s} {'train MiB':>9s} {'eval tok/s':>10s} "
          f"{'eval MiB':>8s} {'serve tok/s':>11s} {'serve MiB':>9s}")
    for name, m in report["models"].items():
        ft, ev, sv = m.get("finetune", {}), m.get("evaluate", {}), m.get("serve", {})
        mfu_s = f"{ft['mfu'] * 100:5.1f}%" if ft.get("mfu") is not None else "n/a"
        print(f"{name:10s} {ft.get('tokens_per_s', float('nan')):11.0f} {mfu_s:>6s} "
              f"{_mib(ft.get('gpu_mem_peak_mib')):>9s} {ev.get('tokens_per_s', float('nan')):10.1f} "
              f"{_mib(ev.get('gpu_mem_peak_mib')):>8s} {sv.get('tokens_per_s', float('nan')):11.1f} "
              f"{_mib(sv.get('gpu_mem_peak_mib')):>9s}")
        for what, err in ((name, m.get("error")), (f"{name} serve", sv.get("error"))):
            if err:
                print(f"  {what} failed: {err}")
    peaks = sorted({m["finetune"]["peak_bf16_tflops"] for m in report["models"].values()
                    if m.get("finetune", {}).get("peak_bf16_tflops")})
    print(f"MFU: 4 x decoder Linear weights FLOPs per trained token / dense bf16 peak "
          f"{', '.join(f'{p:g}' for p in peaks) or 'unknown (pass --peak_tflops)'} TFLOP/s; MiB: peak GPU "
          "memory over the phase's start (0: the phase ran on the CPU; n/a: no nvidia-smi)")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    gpu = cuda_facts(a.allow_cpu)  # first: no CUDA, no work
    work = a.workdir or Path(tempfile.mkdtemp(prefix="gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(a, work, gpu)
    print(f"gpu_check on {gpu['name']}; work dir {work}", flush=True)
    try:
        failed = []
        for name in a.models:
            t = time.perf_counter()
            try:
                if name == "default":
                    check.model("default", "default")
                else:
                    check.model("synthetic", str(synthetic_base(check, work)))
            except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as err:
                # One model failing leaves the other's figures: record it, go on, exit 1 at the end.
                failed.append(name)
                check.report["models"].setdefault(name, {})["error"] = " ".join(str(err).split())[:500]
                print(f"{name}: FAILED: {err}", file=sys.stderr, flush=True)
            print(f"{name}: {time.perf_counter() - t:.0f}s: {json.dumps(check.report['models'].get(name))}",
                  flush=True)
            check.save()
        print_summary(check.report)
        print(f"wrote {a.out}")
    finally:
        if not a.keep and a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def synthetic_base(check: Check, work: Path) -> Path:
    """The ~1.5B checkpoint, with the default base's tokenizer (its GGUF converted once, cached)."""
    from synthetic_checkpoint import DTYPE_NAMES, write_checkpoint

    snap, _, _ = check.step("download_snapshot", model="default")
    ckpt = work / "synthetic"
    t = time.perf_counter()
    built = write_checkpoint(ckpt, tokenizer_dir=Path(snap["local_path"]), params=check.a.synthetic_params,
                             dtype=DTYPE_NAMES[check.a.synthetic_dtype], shard_bytes=2 * 10**9)
    check.report["synthetic_checkpoint"] = {**{k: built[k] for k in ("shape", "parameters", "total_bytes")},
                                            "build_s": round(time.perf_counter() - t, 1)}
    return ckpt


if __name__ == "__main__":
    sys.exit(main())
