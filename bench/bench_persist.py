"""P2 / P6: memory and speed of persisting the default base (538 MB), side by side with `cp` and with
`mlflow.transformers.persist_pretrained_model`.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_persist.py [--repeats 5] [--workdir DIR] [--keep]

Setup (not timed): a fresh SQLite store; `download_snapshot` of the default base (SmolLM2-135M-Instruct,
the pinned copy lands in the snapshot run's artifacts); a random LoRA adapter (r=8, q/v) for it. Then,
per repeat, on the same disk, in alternating order:
  * ours: a fresh reference-only E2E model is logged, and `persist_and_register` runs in a child
    process that measures its peak RSS growth (psutil sampling every 5 ms + ru_maxrss) over the
    RSS it had after importing everything the step uses and opening the MLflow stores (their
    fixed cost, ~55 MB of SQLAlchemy and schema checks whatever the model, is printed apart);
    copy throughput = base bytes / the copy phase (metric `persist.seconds`); the whole step's
    wall time is reported too;
  * `cp -r` of the same snapshot files (and `sync` of the copies: ours fsyncs every file), and the
    sha256 of those files alone (no copy): the floor of any copy verified against the manifest;
  * `mlflow.transformers.persist_pretrained_model` where it works: the same base as a plain
    transformers model logged with `save_pretrained=False` against a local Hub (olah, tests/support/hubserver.py,
    serving the same files); measured in a child the same way (weights written / wall time), and
    its reload with the Hub gone compared with the original logits.
Finally (correctness only, not timed) persist_pretrained_model on a PEFT model over the same Hub base.
Prints every repeat, the medians and the ratios, and writes bench/results/persist.json. The headline
figures are what a user waits for and pays: P2 = peak RSS growth / bytes persisted, counted from BEFORE
the MLflow stores are opened (goal <= 10%); P6 = `cp -r` + `sync` time / the WHOLE step's time, per
alternated repeat (the same durability: ours fsyncs every file; goal >= 0.8). The copy phase alone is
printed too, for diagnosis only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SELF = Path(__file__).resolve()
ROOT = SELF.parent.parent
for p in (str(ROOT), str(ROOT / "tests" / "support"), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import record  # noqa: E402

P2_GOAL, P6_GOAL = 0.10, 0.8
HUB_REPO = "bench/smollm2-135m-instruct"
SENTENCES = ["The Punter is a high-priced coffee shop serving Chinese food near Café Sicilia.",
             "Blue Spice is a cheap pub in the riverside area."]
MB = 1e6


# --- measuring, in a child process --------------------------------------------------------------------
class PeakRSS:
    """Peak resident memory of this process while a block runs, over the RSS it had before."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self._proc, self._interval = psutil.Process(), interval_s
        self._stop = threading.Event()
        self.baseline = self.peak = 0

    def __enter__(self):
        self.baseline = self.peak = self._proc.memory_info().rss
        self._maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if maxrss > self._maxrss_before:  # a new lifetime peak was reached inside the block
            self.peak = max(self.peak, maxrss)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def _open_stores() -> int:
    """Open the tracking and registry stores (SQLAlchemy + schema check: ~55 MB, paid once per process
    whatever the model) before the baseline; returns the RSS before opening them."""
    import mlflow
    import psutil

    before = psutil.Process().memory_info().rss
    client = mlflow.MlflowClient()
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)
    return before


def child_ours(model_uri: str, name: str) -> dict:
    # Everything the step imports, imported before the baseline: the growth measured is the work's.
    import mlflow  # noqa: F401
    import tqdm.auto  # noqa: F401
    import yaml  # noqa: F401
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository  # noqa: F401

    from lora_pipeline.tracking import runs  # noqa: F401
    from steps import persist_and_register as par

    args = par.Args(model_uri=model_uri, registered_name=name)
    before_store = _open_stores()
    with PeakRSS() as rss:
        start = time.perf_counter()
        res = par.run(args)
        wall = time.perf_counter() - start
    metrics = mlflow.MlflowClient().get_run(res.run_id).data.metrics
    return {"baseline": rss.baseline, "peak": rss.peak, "growth": rss.growth, "step_s": wall,
            "store_init": rss.baseline - before_store, "copy_s": metrics["persist.seconds"],
            "bytes": res.persisted_bytes, "version": res.version}


def child_ppm_log(commit: str, out: str, peft: bool) -> dict:
    """Log the Hub base as a transformers model without weights (save_pretrained=False)."""
    import mlflow
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(HUB_REPO, revision=commit)
    model = AutoModelForCausalLM.from_pretrained(HUB_REPO, revision=commit, dtype=torch.float32)
    if peft:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    enc = tok(SENTENCES, return_tensors="pt", padding=True)
    with torch.inference_mode():
        np.save(out, model(**enc).logits.float().numpy())
    with mlflow.start_run():
        info = mlflow.transformers.log_model({"model": model, "tokenizer": tok}, name="hf-reference",
                                             task="text-generation", save_pretrained=False,
                                             pip_requirements=["transformers", "torch"])
    return {"model_uri": info.model_uri}


def _files_under(root: Path, subdirs: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for d in subdirs for p in (root / d).rglob("*") if p.is_file())


def child_ppm(model_uri: str) -> dict:
    import mlflow
    import mlflow.transformers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from lora_pipeline.registry.persist import local_path_of

    before_store = _open_stores()
    with PeakRSS() as rss:
        start = time.perf_counter()
        mlflow.transformers.persist_pretrained_model(model_uri)
        wall = time.perf_counter() - start
    lm = mlflow.MlflowClient().get_logged_model(model_uri.split("/")[-1])
    written = _files_under(local_path_of(lm.artifact_location), ("model", "components"))
    return {"baseline": rss.baseline, "peak": rss.peak, "growth": rss.growth, "step_s": wall,
            "store_init": rss.baseline - before_store, "bytes": written}


def child_reload(model_uri: str, ref: str) -> dict:
    """Reload a transformers model with the Hub gone; compare its logits with the original's."""
    import mlflow
    import numpy as np
    import torch

    parts = mlflow.transformers.load_model(model_uri, return_type="components")
    tok, model = parts["tokenizer"], parts["model"]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(SENTENCES, return_tensors="pt", padding=True)
    with torch.inference_mode():
        got = model(**enc).logits.float().numpy()
    return {"max_abs_delta": float(np.abs(got - np.load(ref)).max()), "class": type(model).__name__}


CHILDREN = {"ours": child_ours, "ppm-log": child_ppm_log, "ppm": child_ppm, "reload": child_reload}


# --- the parent -----------------------------------------------------------------------------------------
def run_child(kind: str, env: dict[str, str], **kwargs) -> dict:
    proc = subprocess.run([sys.executable, str(SELF), "--child", kind, "--kwargs", json.dumps(kwargs)],
                          env=env, capture_output=True, text=True, timeout=1800, cwd=os.getcwd())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {kind} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def timed_sha256(src: Path) -> float:
    """sha256 of the same files, streamed: the floor of any copy verified against the manifest."""
    from lora_pipeline.base.manifest import sha256_file

    start = time.perf_counter()
    for p in sorted(src.rglob("*")):
        if p.is_file():
            sha256_file(p)
    return time.perf_counter() - start


def timed_cp(src: Path, dst: Path) -> tuple[float, float]:
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    t_cp = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(["sync", *[str(p) for p in dst.rglob("*") if p.is_file()]], check=True)
    return t_cp, time.perf_counter() - start


def log_reference(manifest, adapter: Path, i: int) -> str:
    import mlflow

    from lora_pipeline import artifacts
    from lora_pipeline.model import serving

    with mlflow.start_run(run_name=f"reference-{i}"):
        info = serving.log_e2e_model(artifacts.REFERENCE_MODEL_NAME, manifest, adapter_dir=adapter,
                                     with_input_example=False)
        # Placeholders for the gate (the gate does not affect what is copied or how fast).
        mlflow.log_metrics({"slot_f1": 0.5, "base_slot_f1": 0.1}, model_id=info.model_id)
    return artifacts.model_uri(info.model_id)


def make_adapter(base_dir: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)).save_pretrained(out)
    return out


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--skip-ppm", action="store_true", help="skip persist_pretrained_model")
    ap.add_argument("--child", choices=sorted(CHILDREN))
    ap.add_argument("--kwargs", default="{}")
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(CHILDREN[a.child](**json.loads(a.kwargs))), flush=True)
        return 0

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-persist-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", MLFLOW_EXPERIMENT_NAME="bench-persist",
               PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
               MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    env.pop("MLFLOW_RUN_ID", None)
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")})
    import mlflow

    from lora_pipeline.base.manifest import load_manifest
    from lora_pipeline.registry.persist import local_path_of
    from steps import download_snapshot

    from hubserver import LocalHub, hf_env, publish_git_repo

    # Everything (store, artifacts, Hub mirror, copies) lives in the work dir, on the same disk.
    os.chdir(work)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name("bench-persist") is None:
        client.create_experiment("bench-persist", artifact_location=(work / "mlartifacts").as_uri())
    mlflow.set_experiment("bench-persist")
    print(f"work dir {work}", flush=True)
    snap = download_snapshot.run(download_snapshot.Args())
    manifest = load_manifest(snap.manifest_uri)
    files = local_path_of(client.get_run(snap.run_id).info.artifact_uri) / "snapshot" / "files"
    assert work in files.parents, f"artifacts outside the work dir: {files}"
    total = manifest.total_bytes
    print(f"base: {manifest.reference()} ({len(manifest.files)} files, {total / MB:.1f} MB) in {files}",
          flush=True)
    adapter = make_adapter(Path(snap.local_path), work / "adapter")

    hub = None
    if not a.skip_ppm:
        commit = publish_git_repo(work / "mirror", HUB_REPO, files)
        hub = LocalHub(work / "mirror", startup_timeout=120)
        hub.start()
        hub_env = dict(env, **hf_env(hub.endpoint, work / "hf"))
        offline = dict(env, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9",
                       HF_HOME=str(work / "hf-empty"))
    ours, cps, ppms = [], [], []
    try:
        for i in range(a.repeats):
            uri = log_reference(manifest, adapter, i)
            dst = work / f"cp-{i}"

            def do_cp(dst=dst):
                t_cp, t_sync = timed_cp(files, dst)
                cps.append({"cp_s": t_cp, "sync_s": t_sync, "sha_s": timed_sha256(files)})
                shutil.rmtree(dst)

            def do_ours(uri=uri, i=i):
                ours.append(run_child("ours", env, model_uri=uri, name=f"bench-{i}"))

            for step in ((do_cp, do_ours) if i % 2 == 0 else (do_ours, do_cp)):
                step()
            row = f"repeat {i}: ours copy {ours[-1]['copy_s']:.2f}s (step {ours[-1]['step_s']:.2f}s, " \
                  f"RSS +{ours[-1]['growth'] / MB:.1f} MB), cp {cps[-1]['cp_s']:.2f}s " \
                  f"(+sync {cps[-1]['sync_s']:.2f}s)"
            if hub is not None:
                logged = run_child("ppm-log", hub_env, commit=commit, out=str(work / f"ref-{i}.npy"),
                                   peft=False)
                r = run_child("ppm", hub_env, model_uri=logged["model_uri"])
                if i == 0:
                    r.update(run_child("reload", offline, model_uri=logged["model_uri"],
                                       ref=str(work / f"ref-{i}.npy")))
                ppms.append(r)
                row += f", persist_pretrained_model {r['step_s']:.2f}s (RSS +{r['growth'] / MB:.1f} MB)"
            print(row, flush=True)
        peft = None
        if hub is not None:
            logged = run_child("ppm-log", hub_env, commit=commit, out=str(work / "ref-peft.npy"), peft=True)
            run_child("ppm", hub_env, model_uri=logged["model_uri"])
            peft = run_child("reload", offline, model_uri=logged["model_uri"], ref=str(work / "ref-peft.npy"))
    finally:
        if hub is not None:
            hub.close()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    cp_s, cp_sync_s = median(cps, "cp_s"), statistics.median(c["cp_s"] + c["sync_s"] for c in cps)
    copy_s, step_s, growth = median(ours, "copy_s"), median(ours, "step_s"), median(ours, "growth")
    print()
    print(f"Persisting the default base: {total / MB:.1f} MB, {len(manifest.files)} files; medians of "
          f"{a.repeats} repeats (cp and ours alternating)")
    print(f"{'':38}{'seconds':>9}{'MB/s':>9}{'peak RSS growth':>17}{'/ bytes':>9}{'vs cp':>7}")
    cp_rate = total / cp_s
    sha_s = median(cps, "sha_s")
    rows = [("cp -r", cp_s, total, None), ("cp -r + sync", cp_sync_s, total, None),
            ("sha256 of the files (no copy)", sha_s, total, None),
            ("persist_and_register: copy phase", copy_s, total, growth),
            ("persist_and_register: whole step", step_s, total, growth)]
    if ppms:
        rows.append(("persist_pretrained_model (plain base)", median(ppms, "step_s"),
                     median(ppms, "bytes"), median(ppms, "growth")))
    for label, secs, nbytes, g in rows:
        gtxt = f"{g / MB:>14.1f} MB{g / nbytes:>9.1%}" if g is not None else f"{'':>17}{'':>9}"
        print(f"{label:38}{secs:>9.2f}{nbytes / secs / MB:>9.0f}{gtxt}{(nbytes / secs) / cp_rate:>7.2f}")
    print()
    init = median(ours, "store_init")
    print(f"P2 peak RSS growth / bytes persisted: {growth / total:.2%} (goal <= {P2_GOAL:.0%}) -> "
          f"{'OK' if growth / total <= P2_GOAL else 'MISSED'}; counting the one-off opening of the "
          f"MLflow stores too (+{init / MB:.1f} MB, any step pays it): {(growth + init) / total:.2%}")
    print(f"P6 persist throughput / cp: {cp_s / copy_s:.2f} copy phase, {cp_s / step_s:.2f} whole step "
          f"(goal >= {P6_GOAL}) -> {'OK' if cp_s / copy_s >= P6_GOAL else 'MISSED'}; "
          f"vs cp + sync (the same durability: ours fsyncs): {cp_sync_s / copy_s:.2f}; ceiling of any "
          f"sha256-verified copy here (cp / sha256 alone): {cp_s / sha_s:.2f}")
    if ppms:
        p = ppms[0]
        print(f"persist_pretrained_model: peak RSS growth / bytes {median(ppms, 'growth') / median(ppms, 'bytes'):.0%}, "
              f"throughput / cp {(median(ppms, 'bytes') / median(ppms, 'step_s')) / cp_rate:.2f}; reload with "
              f"the Hub gone: max |dlogits| = {p['max_abs_delta']:.2e} ({p['class']})")
    p2_full = [(o["growth"] + o["store_init"]) / total for o in ours]
    p6_step = [(c["cp_s"] + c["sync_s"]) / o["step_s"] for c, o in zip(cps, ours, strict=True)]
    p2s, p6s = record.spread(p2_full), record.spread(p6_step)
    record.write("persist", figures={
        "bytes": total, "files": len(manifest.files), "repeats": a.repeats, "p2_from_before_stores": p2s,
        "p6_whole_step_vs_cp_sync": p6s, "step_s": record.spread([o["step_s"] for o in ours]),
        "copy_s": record.spread([o["copy_s"] for o in ours]),
        "cp_sync_s": record.spread([c["cp_s"] + c["sync_s"] for c in cps]),
        "store_init_bytes": init},
        rows=[{"figure": "P2 `persist_and_register` peak RSS growth (from before the stores open) / bytes "
                         f"persisted ({total / MB:.0f} MB default base)", "goal": f"<= {P2_GOAL:.0%}",
               "measured": f"{100 * p2s['median']:.1f}% (range {100 * p2s['min']:.1f}-{100 * p2s['max']:.1f}%, "
                           f"n={p2s['n']})"},
              {"figure": "P6 `cp -r` + `sync` time / whole `persist_and_register` step time", "goal": f">= {P6_GOAL}",
               "measured": record.fmt_spread(p6s, 2) + (" (inside the noise of 1.0)" if record.within_noise(p6s)
                                                         else "")}])
    if peft:
        print(f"persist_pretrained_model on a PEFT model (same base): reload with the Hub gone gives "
              f"max |dlogits| = {peft['max_abs_delta']:.3g} ({peft['class']}) -> "
              f"{'CORRECT' if peft['max_abs_delta'] <= 1e-4 else 'WRONG: not the model that was logged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
