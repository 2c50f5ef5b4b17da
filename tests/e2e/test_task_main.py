"""`mlflow run . -e main` on your own data: the json task on the project's messages sample and the text
task on its prompt/completion sample, end to end on the tiny random Llama (slow: one process per step).

What they check is what the task changes along the way: the model the registry holds carries the
task (task.json), evaluation logged that task's metrics for candidate and base, and the gate compared
the task's primary metric (persist_and_register's default)."""

from __future__ import annotations

import json
import subprocess

import mlflow
import pytest
from test_main import _require_all_steps, runs_of, tiny_params

from lora_pipeline import artifacts

from conftest import ROOT, VENV_BIN

pytestmark = pytest.mark.slow


def _mlflow_run_main(env: dict[str, str], model, **params: str) -> subprocess.CompletedProcess:
    argv = [str(VENV_BIN / "mlflow"), "run", str(ROOT), "-e", "main", "--env-manager", "local",
            "-P", f"model={model}"]
    for k, v in params.items():
        argv += ["-P", f"{k}={v}"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)


def _children(client, main_run) -> dict:
    exps = [e.experiment_id for e in client.search_experiments()]
    return {r.data.tags[artifacts.STEP_TAG]: r for r in client.search_runs(exps)
            if r.data.tags.get("mlflow.parentRunId") == main_run.info.run_id}


def _registered_task(client, registered: str) -> tuple[dict, set[str]]:
    """(task.json, aliases) of a registered version `models:/<name>/<version>`."""
    name, version = registered.removeprefix("models:/").split("/")
    mv = client.get_model_version(name, version)
    root = client.get_model_version_download_uri(name, version).rstrip("/")
    spec = json.loads(mlflow.artifacts.load_text(f"{root}/artifacts/{artifacts.TASK_ARTIFACT}"))
    return spec, set(mv.aliases)


def test_main_on_json_messages_registers_a_json_model(tracking, tiny_model_dir, venv_env):
    _require_all_steps()
    # augment_fraction left at its default: it must resolve to none for task=json (no error)
    proc = _mlflow_run_main(venv_env, tiny_model_dir, **tiny_params(max_seq_length="2048"), task="json",
                            dataset=str(ROOT / "data" / "json_messages.jsonl"), group_column="venue")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (main_run,) = runs_of(tracking, "main")
    steps = _children(tracking, main_run)
    assert {s: r.info.status for s, r in steps.items()} == dict.fromkeys(
        ("download_snapshot", "finetune", "log_reference", "evaluate_checkpoint", "persist_and_register"),
        "FINISHED")
    assert steps["finetune"].data.params["data.augment_fraction"] == "0.0"
    ev = steps["evaluate_checkpoint"].data
    assert ev.tags["eval.task"] == "json"
    assert {"candidate.field_f1", "base.field_f1", "candidate.valid_json_rate"} <= set(ev.metrics)
    gate = steps["persist_and_register"].data.tags
    assert gate[artifacts.GATE_PREFIX + "metric"] == "field_f1"  # the json task's primary metric

    registered = artifacts.get_outputs(main_run)["registered"]
    spec, aliases = _registered_task(tracking, registered)
    assert spec["task"] == "json"
    # A new version is the challenger; champion only where it beat the base model on field_f1 (a
    # 2-step tiny model writes no valid JSON and may tie the base at 0).
    beat = float(gate[artifacts.GATE_PREFIX + "candidate"]) > float(gate[artifacts.GATE_PREFIX + "base"])
    assert aliases == {artifacts.CHALLENGER_ALIAS} | ({artifacts.CHAMPION_ALIAS} if beat else set())


def test_main_on_text_prompt_completion_registers_a_text_model(tracking, tiny_model_dir, venv_env):
    _require_all_steps()
    # 30 steps at a high rate: the tiny random model learns some of the samples' words, but whether
    # its ROUGE-L beats the random base's is not sure (measured: it did not, once), so the aliases
    # are checked against the gate's own logged numbers, as for json.
    proc = _mlflow_run_main(venv_env, tiny_model_dir,
                            **tiny_params(max_seq_length="2048", max_steps="30", eval_steps="10", save_steps="30",
                                          learning_rate="0.01", max_new_tokens="16"),
                            task="text", dataset=str(ROOT / "data" / "text_prompt_completion.csv"),
                            group_column="venue")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (main_run,) = runs_of(tracking, "main")
    steps = _children(tracking, main_run)
    ev = steps["evaluate_checkpoint"].data
    assert ev.tags["eval.task"] == "text"
    assert {"candidate.rouge_l", "candidate.token_f1", "base.rouge_l"} <= set(ev.metrics)
    assert steps["persist_and_register"].data.tags[artifacts.GATE_PREFIX + "metric"] == "rouge_l"
    spec, aliases = _registered_task(tracking, artifacts.get_outputs(main_run)["registered"])
    assert spec["task"] == "text"
    gate = steps["persist_and_register"].data.tags
    beat = float(gate[artifacts.GATE_PREFIX + "candidate"]) > float(gate[artifacts.GATE_PREFIX + "base"])
    assert aliases == {artifacts.CHALLENGER_ALIAS} | ({artifacts.CHAMPION_ALIAS} if beat else set())
