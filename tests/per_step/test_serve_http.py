"""`mlflow models serve` of a logged model answers /invocations with a batch, on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

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


def _post_any(url: str, payload: dict) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a POST, error statuses included."""
    try:
        return 200, _post(url, payload)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _request(sentences: list, params: dict | None = None) -> dict:
    return {"dataframe_split": {"columns": ["prompt"], "data": [[s] for s in sentences]},
            "params": params or {}}


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


@contextlib.contextmanager
def _served(uri: str, tmp_path, env: dict[str, str] | None = None):
    """`mlflow models serve` of `uri` on a free loopback port; yields its URL, stops it after."""
    port = free_port()
    log_path = tmp_path / f"serve-{port}.log"
    with open(log_path, "w") as log:
        # Own session: the server and the workers it starts are stopped together below.
        proc = subprocess.Popen(
            ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
             "-p", str(port)], env={**subprocess_env(), **(env or {})}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log_path)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_served_model_answers_a_batch(tracking, sharp_model_dir, tmp_path):
    # The sharp tiny model: its answers differ from sentence to sentence, so equal rows also prove
    # the server keeps each answer on its own row (the plain tiny model answers alike to all).
    ckpt = log_checkpoint(snapshot(str(sharp_model_dir)), make_adapter(sharp_model_dir, tmp_path / "a"))
    uri = lr.run(lr.Args(checkpoint_uri=ckpt)).model_uri
    batch = SENTENCES[:3]
    expected = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"prompt": batch}),
                                                     params={"max_new_tokens": 6})
    assert expected["mr"].nunique() == len(batch)

    with _served(uri, tmp_path) as url:
        answer = _post(url + "/invocations", {
            "dataframe_split": {"columns": ["prompt"], "data": [[s] for s in batch]},
            "params": {"max_new_tokens": 6},
        })
    rows = answer["predictions"]
    assert len(rows) == len(batch)
    assert [set(r) for r in rows] == [{"mr", "attributes", "valid", "error"}] * len(batch)
    assert [r["error"] for r in rows] == [None] * len(batch)
    # The HTTP answers are the in-process ones, row for row (greedy decoding is deterministic).
    assert [r["mr"] for r in rows] == expected["mr"].tolist()
    assert [r["valid"] for r in rows] == expected["valid"].tolist()
    # ... and in full: every column, the same values, the same order (None for NaN from pandas).
    assert rows == [{k: (None if v != v else v) for k, v in r.items()}
                    for r in expected.to_dict(orient="records")]


def test_served_json_model_answers_a_messages_column_as_in_process(tracking, sharp_model_dir, tmp_path):
    """A json-task model over HTTP: an OpenAI-style `messages` column (lists of {role, content}, as
    JSON) gets the json outputs, equal row for row to in-process `predict` on the same turns."""
    from lora_pipeline.task.tasks import task_spec

    ckpt = log_checkpoint(snapshot(str(sharp_model_dir)), make_adapter(sharp_model_dir, tmp_path / "a"),
                          task_spec=task_spec("json", "Extract JSON."))
    uri = lr.run(lr.Args(checkpoint_uri=ckpt)).model_uri
    conversations = [
        [{"role": "user", "content": SENTENCES[0]}],
        [{"role": "user", "content": SENTENCES[1]}, {"role": "assistant", "content": '{"name": "x"}'},
         {"role": "user", "content": "And the area?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": SENTENCES[2]}],
    ]
    params = {"max_new_tokens": 6}
    expected = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"messages": conversations}), params=params)
    assert expected["error"].isna().all() and expected["text"].nunique() > 1  # rows answered apart

    with _served(uri, tmp_path) as url:
        answer = _post(url + "/invocations", {
            "dataframe_split": {"columns": ["messages"], "data": [[c] for c in conversations]},
            "params": params})
    rows = answer["predictions"]
    assert [set(r) for r in rows] == [{"text", "parsed", "valid", "error"}] * len(conversations)
    assert rows == [{k: (None if v != v else v) for k, v in r.items()}
                    for r in expected.to_dict(orient="records")]


def test_served_model_refuses_bad_requests_with_400_and_keeps_serving(tracking, tiny_model_dir, tmp_path):
    """Each bad request gets its own answer (400 naming the param and its range, or error rows for
    bad prompts), and the server answers the good request after them all as if they never came."""
    uri = log_checkpoint(snapshot(str(tiny_model_dir)), make_adapter(tiny_model_dir, tmp_path / "a"))
    good = _request(SENTENCES[:2], {"max_new_tokens": 6})
    expected = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"prompt": SENTENCES[:2]}),
                                                     params={"max_new_tokens": 6})
    bad_params = [
        ({"max_new_tokens": 17}, "param max_new_tokens=17 is out of range; use an integer from 1 to 16 "
                                 "(the model's max_new_tokens_cap)"),
        ({"temperature": -0.5}, "param temperature=-0.5 is out of range; use a number >= 0"),
        ({"max_tokens": 5}, "param 'max_tokens' is not supported; the params are: temperature"),
        ({"precision": "fp16"}, "param precision='fp16' is not supported; use one of: auto, bf16, fp32"),
    ]
    # The model config of a served model, set at serve time (the cap is 256 by default).
    env = {"MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps({"max_new_tokens_cap": 16})}
    with _served(uri, tmp_path, env) as url:
        for params, message in bad_params:
            status, body = _post_any(url + "/invocations", _request(SENTENCES[:2], params))
            assert status == 400, (params, body)
            assert body["error_code"] == "INVALID_PARAMETER_VALUE" and message in body["message"], body
        # No 'prompt' column: MLflow's own schema check refuses it.
        status, body = _post_any(url + "/invocations", {"dataframe_split": {"columns": ["text"],
                                                                            "data": [["x"]]}})
        assert status == 400 and "prompt" in body["message"]
        # Bad prompts: 200, an error row each, and the good row of the same request answered.
        status, body = _post_any(url + "/invocations", _request([None, "", 5, SENTENCES[0]],
                                                                {"max_new_tokens": 6}))
        assert status == 200, body
        rows = body["predictions"]
        assert [r["error"] for r in rows] == ["prompt is null; fix: send one sentence as text",
                                              "prompt is empty; fix: send one sentence as text",
                                              "prompt is int, not text; fix: send one sentence as text",
                                              None]
        assert [r["valid"] for r in rows][:3] == [False] * 3 and [r["mr"] for r in rows][:3] == [""] * 3
        assert rows[3]["mr"] == expected["mr"].iloc[0]
        # The `inputs` format (MLflow turns its nulls into the text 'None'): a null all the same.
        status, body = _post_any(url + "/invocations", {"inputs": {"prompt": [None, SENTENCES[0]]},
                                                        "params": {"max_new_tokens": 6}})
        assert status == 200, body
        assert [r["error"] for r in body["predictions"]] == [
            "prompt is null; fix: send one sentence as text", None]
        assert body["predictions"][1]["mr"] == expected["mr"].iloc[0]
        status, body = _post_any(url + "/invocations", good)
        # Concurrent clients (their rows generated together by the cross-request batcher) get the
        # answers a lone client gets.
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(lambda _: _post_any(url + "/invocations", good), range(4)))
    assert status == 200, body
    assert [r["mr"] for r in body["predictions"]] == expected["mr"].tolist()
    assert [(s, [r["mr"] for r in b["predictions"]]) for s, b in concurrent] == [
        (200, expected["mr"].tolist())] * 4


def test_served_model_batches_more_concurrent_requests_than_the_servers_default_threads(
        tracking, tiny_model_dir, tmp_path):
    """MLflow's scoring server runs `predict` on its event loop's default thread pool: min(32,
    CPUs + 4) threads, 6 on a 2-core machine. The model widens it (mlflow_private.
    widen_scoring_threads) from its first batched request, so that 12 requests can wait in one batch.
    Outcome: with batches of 12 rows and a 10 s window, 12 concurrent requests are answered together
    well inside the window; with 6 threads the first batch could only close at its window (10 s)."""
    uri = log_checkpoint(snapshot(str(tiny_model_dir)), make_adapter(tiny_model_dir, tmp_path / "a"))
    rows, window_s = min(32, (os.cpu_count() or 1) + 4) + 6, 10.0  # 12 on 2 cores
    env = {"MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps({"batch_max_rows": rows,
                                                         "batch_max_wait_ms": window_s * 1000})}
    one = _request(SENTENCES[:1], {"max_new_tokens": 4})
    expected = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"prompt": SENTENCES[:1]}),
                                                     params={"max_new_tokens": 4})["mr"].tolist()
    with _served(uri, tmp_path, env) as url, ThreadPoolExecutor(rows) as pool:
        start = time.monotonic()
        first = pool.submit(_post_any, url + "/invocations", one)  # widens the pool, then waits
        time.sleep(1.0)
        rest = [pool.submit(_post_any, url + "/invocations", one) for _ in range(rows - 1)]
        answers = [f.result() for f in [first, *rest]]
        elapsed = time.monotonic() - start
    assert [(s, [r["mr"] for r in b["predictions"]]) for s, b in answers] == [(200, expected)] * rows
    assert elapsed < window_s - 2, f"{rows} requests took {elapsed:.1f} s: not one batch"
