"""batch_score throughput: rows/s of the step on Spark `local[2]` against the same model's in-process
`predict`, with the same batch size and generation settings.

  * batch_score: `steps.batch_score.run` on one SparkSession (started once, outside the timing); its
    rows/s is the step's own figure: rows / seconds of the write job, which includes the Python
    workers loading the model (one load per Spark task, `local[2]`: two);
  * in-process: `mlflow.pyfunc.load_model(...).predict` of the same rows in one call (the model is
    loaded once, before the timing, so this side has no load cost in its figure).
The two alternate (A B, B A, ...) `--repeats` times; each side's median and range and the ratio of the
medians (batch_score / in-process) are printed and written to bench/results/batch_score.json with the
command, the git commit and the machine.

Rows: `--rows` sentences (default 2,000) from ../shared/e2e/devset.csv when it is there, else generated.
Model: `--model-uri` (default the registered champion in $MLFLOW_TRACKING_URI), or `--tiny`: a tiny
random Llama logged into a temporary store (for smoke tests of this script only: its figures say
nothing about a real model).

    flock /tmp/heavy.lock .venv/bin/python bench/bench_batch_score.py [--rows 2000] [--repeats 3]
    .venv/bin/python bench/bench_batch_score.py --tiny --rows 40 --repeats 1   # smoke test
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
for _p in (ROOT, ROOT / "bench", ROOT / "tests" / "support"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
DEVSET = ROOT.parent / "shared" / "e2e" / "devset.csv"
# Spark settings of the run: the step's local defaults plus a bounded driver (the workers are separate
# Python processes and are not bounded by it).
SPARK_CONF = {"spark.driver.memory": "2g", "spark.sql.shuffle.partitions": "2"}


def sentences(n: int) -> tuple[list[str], str]:
    import pandas as pd

    if DEVSET.is_file():
        refs = pd.read_csv(DEVSET)["ref"].dropna().tolist()
        return [refs[i % len(refs)] for i in range(n)], str(DEVSET.relative_to(ROOT.parent))
    names, foods = ["The Eagle", "Aromi", "Zizzi", "Cotto", "Blue Spice"], ["Italian", "Chinese", "French"]
    return [f"{names[i % 5]} serves {foods[i % 3]} food near the river. ({i})" for i in range(n)], "generated"


def tiny_model(work: Path) -> str:
    """A tiny random Llama logged as the project's pyfunc in a temporary store; returns its URI."""
    import mlflow

    from lora_pipeline.base.manifest import load_manifest
    from lora_pipeline.model import serving
    from steps import download_snapshot

    from hubserver import make_tiny_llama

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    tiny = make_tiny_llama(work / "tiny-llama")
    manifest = load_manifest(download_snapshot.run(download_snapshot.Args(model=str(tiny))).manifest_uri)
    with mlflow.start_run():
        info = serving.log_e2e_model("tiny", manifest, full_model_dir=tiny, with_input_example=False)
    return f"models:/{info.model_id}"


def main(argv: list[str] | None = None) -> int:
    from steps.batch_score import Args

    defaults = Args()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-uri", default=defaults.model_uri, help="a model batch_score accepts")
    p.add_argument("--tiny", action="store_true", help="score with a tiny random model (smoke test)")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--spark-master", default=defaults.spark_master)
    p.add_argument("--out", default=None, help="where the JSON result goes (default: "
                   "bench/results/batch_score.json)")
    opts = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import mlflow
    import pandas as pd

    from lora_pipeline.cli import configure_tracking
    from lora_pipeline.scoring import spark as spark_session
    from lora_pipeline.scoring.model import resolve
    from steps import batch_score

    work = Path(tempfile.mkdtemp(prefix="bench_batch_score."))
    model_uri = tiny_model(work) if opts.tiny else opts.model_uri
    configure_tracking()
    model = resolve(model_uri)  # pinned once: both sides score the same version
    texts, source = sentences(opts.rows)
    pd.DataFrame({"id": range(len(texts)), "prompt": texts}).to_parquet(work / "in.parquet")
    params = {"batch_size": opts.batch_size, "max_new_tokens": opts.max_new_tokens}
    print(f"{len(texts)} rows ({source}); model {model.describe()}; batch {opts.batch_size}, "
          f"max_new_tokens {opts.max_new_tokens}; spark {opts.spark_master}; work dir {work}")

    spark, _ = spark_session.session(opts.spark_master, SPARK_CONF)
    loaded = mlflow.pyfunc.load_model(model.uri)
    loaded.predict(pd.DataFrame({"prompt": texts[:2]}), params={**params, "max_new_tokens": 2})  # warm-up

    def run_spark(i: int) -> float:
        res = batch_score.run(Args(model_uri=model.uri, input=str(work / "in.parquet"),
                                   output=str(work / f"scored-{i}"), spark_master=opts.spark_master,
                                   batch_size=opts.batch_size, max_new_tokens=opts.max_new_tokens,
                                   overwrite=True))
        assert res.output_rows == len(texts)
        return res.rows_per_s

    def run_in_process(i: int) -> float:
        t0 = time.perf_counter()
        out = loaded.predict(pd.DataFrame({"prompt": texts}), params=params)
        assert len(out) == len(texts)
        return len(texts) / (time.perf_counter() - t0)

    rates: dict[str, list[float]] = {"batch_score": [], "in_process": []}
    for i in range(opts.repeats):
        order = ["batch_score", "in_process"] if i % 2 == 0 else ["in_process", "batch_score"]
        for side in order:
            rate = run_spark(i) if side == "batch_score" else run_in_process(i)
            rates[side].append(rate)
            print(f"repeat {i + 1}/{opts.repeats} {side}: {rate:.2f} rows/s", flush=True)
    spark.stop()

    import pyspark
    import record
    import torch

    figures = {side: record.spread(v) for side, v in rates.items()}
    ratio = figures["batch_score"]["median"] / figures["in_process"]["median"]
    # Per repeat too (the two sides of one repeat ran back to back), for the range of the ratio.
    per_repeat = record.spread([b / i for b, i in zip(rates["batch_score"], rates["in_process"], strict=True)])
    print(f"batch_score {record.fmt_spread(figures['batch_score'], 2, ' rows/s')}; in-process "
          f"{record.fmt_spread(figures['in_process'], 2, ' rows/s')}; ratio of medians {ratio:.3f}, "
          f"per repeat {record.fmt_spread(per_repeat, 3)}")
    settings = {"rows": len(texts), "rows_source": source, "model": model.describe(), "tiny_model": opts.tiny,
                "batch_size": opts.batch_size, "max_new_tokens": opts.max_new_tokens,
                "spark_master": opts.spark_master, "repeats": opts.repeats, "pyspark": pyspark.__version__,
                "torch_threads": torch.get_num_threads()}
    noise = "; inside the noise" if record.within_noise(per_repeat, 0.8) else ""
    record.write("batch_score", figures={**figures, "ratio_of_medians": ratio, "ratio_per_repeat": per_repeat,
                                         "settings": settings},
                 rows=[{"figure": f"`batch_score` rows/s on Spark `{opts.spark_master}` / the same model's in-process "
                                  f"`predict` ({len(texts)} sentences, batch {opts.batch_size}, <= "
                                  f"{opts.max_new_tokens} new tokens; {'TINY random model: plumbing only' if opts.tiny else 'champion of the default pipeline'})",
                        "goal": ">= 0.8x",
                        "measured": f"{ratio:.2f}x ({figures['batch_score']['median']:.2f} vs "
                                    f"{figures['in_process']['median']:.2f} rows/s, medians of {opts.repeats}; "
                                    f"per repeat {record.fmt_spread(per_repeat, 2)}{noise})"}],
                 out=Path(opts.out) if opts.out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
