"""`mlflow models serve` of a logged model answers /invocations with a batch, on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import mlflow
import pandas as pd
from test_serving import SENTENCES, log_checkpoint, make_adapter, snapshot, subprocess_env

from steps import log_reference as lr

from hubserver import free_port

STARTUP_TIMEOUT_S = 180  # a fresh process imports torch/transformers and resolves the base


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _wait_ready(proc: subprocess.Popen, url: str, log_path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"server not ready in {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")


def test_served_model_answers_a_batch(tracking, sharp_model_dir, tmp_path):
    # The sharp tiny model: its answers differ from sentence to sentence, so equal rows also prove
    # the server keeps each answer on its own row (the plain tiny model answers alike to all).
    ckpt = log_checkpoint(snapshot(str(sharp_model_dir)), make_adapter(sharp_model_dir, tmp_path / "a"))
    uri = lr.run(lr.Args(checkpoint_uri=ckpt)).model_uri
    batch = SENTENCES[:3]
    expected = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"prompt": batch}),
                                                     params={"max_new_tokens": 6})
    assert expected["mr"].nunique() == len(batch)

    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        # Own session: the server and the workers it starts are stopped together below.
        proc = subprocess.Popen(
            ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
             "-p", str(port)], env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log_path)
        answer = _post(url + "/invocations", {
            "dataframe_split": {"columns": ["prompt"], "data": [[s] for s in batch]},
            "params": {"max_new_tokens": 6},
        })
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rows = answer["predictions"]
    assert len(rows) == len(batch)
    assert [set(r) for r in rows] == [{"mr", "attributes", "valid"}] * len(batch)
    # The HTTP answers are the in-process ones, row for row (greedy decoding is deterministic).
    assert [r["mr"] for r in rows] == expected["mr"].tolist()
    assert [r["valid"] for r in rows] == expected["valid"].tolist()
    # ... and in full: every column, the same values, the same order.
    assert rows == expected.to_dict(orient="records")
