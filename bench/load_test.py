"""Load test: serve a registered model with `mlflow models serve` on loopback and hold bounded load.

    flock /tmp/heavy.lock .venv/bin/python bench/load_test.py \
        [--model-uri models:/e2e-extractor@champion] [--clients 8] [--duration 60] [--batch-size 1] \
        [--batching on,off] [--bad-every 10]

What it does, side by side in one process:
  1. serving, once per `--batching` setting (on: the served model's cross-request batching,
     lora_pipeline/model/batching.py; off: each request generated alone), set through MLflow's
     `MLFLOW_PYFUNC_INFERENCE_CONFIG`: `mlflow models serve -m MODEL --env-manager local -h 127.0.0.1`
     (loopback only, one worker), waits for /ping, then `--clients` threads each send requests of
     `--batch-size` sentences (default 1: single-sentence clients) to /invocations, back to back, for
     `--duration` seconds or `--max-requests` requests in all, whichever comes first (bounded in count
     and time). A request is an error unless it answers 200 with one prediction per sentence, each
     with `mr`, `attributes`, `valid`, `error`. With `--bad-every K`, every K-th request is a bad one
     (`max_new_tokens` over the model's cap) and is an error unless it is refused with HTTP 400: the
     server must refuse it and keep answering the others.
  2. baseline: the same model loaded in this process (`mlflow.pyfunc.load_model`) predicting the same
     requests one after another for `--baseline-seconds` (no HTTP, no JSON, no queueing).
Prints requests, errors, p50/p99 latency, throughput (requests/s, sentences/s) for each, the ratio
served / in-process sentences per second (how much HTTP serving with this many clients keeps of what
the model does in-process) and batching on / off. Writes bench/results/load_test.json (`--out`;
figures, command, commit, machine). The last line is `RESULT {json}` for scripts and tests.
Exit code 1 if any request failed.
Sentences: the `ref` column of `--data` (default: the project's data/sample.csv), cycled.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)
# A request every server refuses (HTTP 400): far over any max_new_tokens cap.
BAD_PARAMS = {"max_new_tokens": 1_000_000}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_sentences(path: Path, limit: int = 1000) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        out = [row["ref"] for row in csv.DictReader(fh)][:limit]
    if not out:
        raise SystemExit(f"{path} has no rows with a 'ref' column")
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


class Batches:
    """Thread-safe round-robin over the sentences, `size` at a time."""

    def __init__(self, sentences: list[str], size: int):
        self.sentences, self.size, self._i = sentences, size, 0
        self._lock = threading.Lock()

    def next(self) -> list[str]:
        with self._lock:
            i, self._i = self._i, self._i + self.size
        n = len(self.sentences)
        return [self.sentences[(i + j) % n] for j in range(self.size)]


def valid_answer(body: bytes, n: int) -> str | None:
    """None if the answer holds n well-formed predictions, else why not."""
    try:
        rows = json.loads(body)["predictions"]
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable answer ({type(err).__name__})"
    if len(rows) != n:
        return f"{len(rows)} predictions for {n} sentences"
    for r in rows:
        if not isinstance(r, dict) or set(r) != {"mr", "attributes", "valid", "error"}:
            return f"malformed prediction {str(r)[:80]}"
    return None


# --- serving -------------------------------------------------------------------------------------
class Server:
    def __init__(self, model_uri: str, port: int, log_path: Path, startup_timeout: float,
                 model_config: dict | None = None):
        self.model_uri, self.port, self.log_path = model_uri, port, log_path
        self.startup_timeout, self.model_config = startup_timeout, model_config
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        mlflow_exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_exe) if mlflow_exe.exists() else "mlflow", "models", "serve", "-m", self.model_uri,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(self.port), "-w", "1"]
        env = dict(os.environ)
        # `--env-manager local` runs `python` from PATH: make it this interpreter.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        if self.model_config:  # the served model's config (MLflow applies it at load)
            env["MLFLOW_PYFUNC_INFERENCE_CONFIG"] = json.dumps(self.model_config)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"mlflow models serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - t0 > self.startup_timeout:
                self.__exit__()
                raise SystemExit(f"server not ready after {self.startup_timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - t0
        return self

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def load(url: str, batches: Batches, *, clients: int, duration: float, max_requests: int,
         max_new_tokens: int, request_timeout: float, bad_every: int = 0) -> dict:
    """`clients` threads posting requests until the time or the request budget is spent; with
    `bad_every`, every bad_every-th request is one the server must refuse with 400."""
    latencies: list[float] = []
    errors: list[str] = []
    refused = [0]
    lock = threading.Lock()
    issued = [0]
    deadline = time.monotonic() + duration

    def take() -> int | None:
        with lock:
            if issued[0] >= max_requests or time.monotonic() >= deadline:
                return None
            issued[0] += 1
            return issued[0]

    def post(batch: list[str], params: dict) -> tuple[int | None, bytes | str]:
        body = json.dumps({"dataframe_split": {"columns": ["prompt"], "data": [[s] for s in batch]},
                           "params": params}).encode()
        req = urllib.request.Request(url + "/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=request_timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, OSError) as err:
            return None, f"{type(err).__name__}: {err}"

    def client() -> None:
        while (n := take()) is not None:
            batch = batches.next()
            if bad_every and n % bad_every == 0:
                status, body = post(batch, BAD_PARAMS)
                with lock:
                    if status == 400 and b"max_new_tokens" in body:
                        refused[0] += 1
                    else:
                        errors.append(f"bad request answered {status}")
                continue
            t0 = time.perf_counter()
            status, body = post(batch, {"max_new_tokens": max_new_tokens})
            dt = time.perf_counter() - t0
            why = (valid_answer(body, len(batch)) if status == 200 else
                   f"HTTP {status}" if status is not None else body)
            with lock:
                latencies.append(dt)
                if why:
                    errors.append(why)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    n = len(latencies)
    good = n - sum(1 for e in errors if not e.startswith("bad request"))
    return {"requests": n, "errors": len(errors), "error_kinds": sorted(set(errors))[:5],
            "bad_requests_refused": refused[0],
            "wall_s": wall, "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "requests_per_s": n / wall if wall else 0.0,
            "sentences_per_s": good * batches.size / wall if wall else 0.0}


def baseline(model_uri: str, batches: Batches, seconds: float, max_new_tokens: int) -> dict:
    """The same batches through the model in this process, one after another."""
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    model.predict(pd.DataFrame({"prompt": batches.next()}), params={"max_new_tokens": max_new_tokens})  # warm-up
    latencies = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s = time.perf_counter()
        model.predict(pd.DataFrame({"prompt": batches.next()}), params={"max_new_tokens": max_new_tokens})
        latencies.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    n = len(latencies)
    return {"requests": n, "errors": 0, "wall_s": wall, "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99), "requests_per_s": n / wall,
            "sentences_per_s": n * batches.size / wall}


def serve_and_load(a, sentences: list[str], batching: bool) -> dict:
    config = {"batching": batching}
    if batching:
        config.update({k: v for k, v in (("batch_max_rows", a.batch_max_rows),
                                         ("batch_max_wait_ms", a.batch_max_wait_ms)) if v is not None})
    log_path = a.log if batching else a.log.with_name(f"{a.log.stem}-batching-off{a.log.suffix}")
    with Server(a.model_uri, free_port(), log_path, a.startup_timeout, config) as server:
        print(f"server ready on {server.url} after {server.startup_s:.1f}s (model config {config})", flush=True)
        result = load(server.url, Batches(sentences, a.batch_size), clients=a.clients, duration=a.duration,
                      max_requests=a.max_requests, max_new_tokens=a.max_new_tokens,
                      request_timeout=a.request_timeout, bad_every=a.bad_every)
        if result["errors"]:
            print(f"server log tail:\n{server.tail()}", flush=True)
    return {**result, "model_config": config}


def main(argv: list[str] | None = None) -> int:
    import record

    from lora_pipeline import artifacts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-uri", default=f"models:/{artifacts.DEFAULT_REGISTERED_NAME}@{artifacts.CHAMPION_ALIAS}")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load, per batching setting")
    p.add_argument("--max-requests", type=int, default=100_000, help="requests in all, at most, per setting")
    p.add_argument("--batch-size", type=int, default=1, help="sentences per request")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batching", default="on,off", help="served model's cross-request batching: on, off or both")
    p.add_argument("--batch-max-rows", type=int, default=None, help="model config batch_max_rows (batching on)")
    p.add_argument("--batch-max-wait-ms", type=float, default=None, help="model config batch_max_wait_ms")
    p.add_argument("--bad-every", type=int, default=0, help="every K-th request is a bad one (0: none)")
    p.add_argument("--baseline-seconds", type=float, default=20.0, help="0: skip the in-process baseline")
    p.add_argument("--baseline-batch-size", type=int, default=0,
                   help="sentences per in-process predict call (0: clients x batch size, the most the "
                        "server can gather at once)")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "sample.csv")
    p.add_argument("--log", type=Path, default=Path("load_test_server.log"))
    p.add_argument("--out", type=Path, default=None, help="results file (default: bench/results/load_test.json)")
    a = p.parse_args(argv)
    settings = [x.strip() for x in a.batching.split(",") if x.strip()]
    if a.clients < 1 or a.batch_size < 1 or a.duration <= 0 or a.max_requests < 1 or a.bad_every < 0:
        p.error("--clients, --batch-size, --max-requests must be >= 1, --duration > 0, --bad-every >= 0")
    if not settings or set(settings) - {"on", "off"} or len(set(settings)) != len(settings):
        p.error(f"--batching={a.batching!r}: use on, off, or on,off")

    sentences = read_sentences(a.data)
    print(f"model {a.model_uri}; {a.clients} clients x requests of {a.batch_size} sentence(s); "
          f"{a.duration:.0f}s or {a.max_requests} requests per setting; max_new_tokens={a.max_new_tokens}; "
          f"batching {', '.join(settings)}", flush=True)
    served = {s: serve_and_load(a, sentences, s == "on") for s in settings}
    base_batch = a.baseline_batch_size or a.clients * a.batch_size
    base = (baseline(a.model_uri, Batches(sentences, base_batch), a.baseline_seconds, a.max_new_tokens)
            if a.baseline_seconds > 0 else None)

    print(f"{'':<26}{'requests':>9}{'errors':>8}{'p50 s':>9}{'p99 s':>9}{'req/s':>8}{'sent/s':>9}")
    labels = {"on": f"served (HTTP, {a.clients} cl.)", "off": "served, batching off"}
    rows = [(labels[s], served[s]) for s in settings] + ([(f"in-process, batches of {base_batch}", base)] if base else [])
    for name, r in rows:
        print(f"{name:<26}{r['requests']:>9}{r['errors']:>8}{r['p50_s']:>9.3f}{r['p99_s']:>9.3f}"
              f"{r['requests_per_s']:>8.2f}{r['sentences_per_s']:>9.2f}")
    main_row = served[settings[0]]
    ratio = main_row["sentences_per_s"] / base["sentences_per_s"] if base and base["sentences_per_s"] else None
    if ratio is not None:
        print(f"ratio served / in-process sentences per second: {ratio:.2f}")
    batching_ratio = (served["on"]["sentences_per_s"] / served["off"]["sentences_per_s"]
                      if len(served) == 2 and served["off"]["sentences_per_s"] else None)
    if batching_ratio is not None:
        print(f"ratio batching on / off sentences per second: {batching_ratio:.2f}")
    if a.bad_every:
        print("bad requests refused with 400: " + ", ".join(
            f"{labels[s]} {served[s]['bad_requests_refused']}" for s in settings))
    failed = {s: r["error_kinds"] for s, r in served.items() if r["errors"]}
    if failed:
        print(f"errors: {failed}")
    result = {"served": main_row, "served_batching_off": served.get("off"), "in_process": base,
              "ratio": ratio, "batching_ratio": batching_ratio, "clients": a.clients,
              "batch_size": a.batch_size, "baseline_batch_size": base_batch, "max_new_tokens": a.max_new_tokens,
              "bad_every": a.bad_every, "model_uri": a.model_uri}
    rows = []
    if ratio is not None:
        rows.append({"figure": f"P9 served sentences/s, {a.clients} concurrent clients x {a.batch_size} sentence, "
                               f"cross-request batching on / in-process `predict` on batches of {base_batch}",
                     "goal": ">= 0.8x",
                     "measured": f"{ratio:.2f}x ({main_row['sentences_per_s']:.2f} vs "
                                 f"{base['sentences_per_s']:.2f} sentences/s; p50 {main_row['p50_s']:.2f} s, "
                                 f"p99 {main_row['p99_s']:.2f} s; {main_row['requests']} requests, "
                                 f"{main_row['errors']} errors)"})
    if batching_ratio is not None:
        off = served["off"]
        rows.append({"figure": "P9 the same server, batching on / batching off (sentences/s)", "goal": ">= 3x",
                     "measured": f"{batching_ratio:.2f}x (off: {off['sentences_per_s']:.2f} sentences/s, "
                                 f"p50 {off['p50_s']:.2f} s, p99 {off['p99_s']:.2f} s, {off['errors']} errors)"})
    if a.bad_every:
        rows.append({"figure": f"bad requests (every {a.bad_every}th) refused with 400 while serving",
                     "goal": "all, 0 errors",
                     "measured": ", ".join(f"{s}: {served[s]['bad_requests_refused']} refused, "
                                           f"{served[s]['errors']} errors" for s in settings)})
    record.write("load_test", figures=result, rows=rows, out=a.out)
    print("RESULT " + json.dumps(result))
    return 1 if failed or any(r["requests"] == 0 for r in served.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
