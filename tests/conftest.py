"""Shared fixtures: an isolated MLflow store per test, an isolated Hugging Face environment, tiny models.

Data: tests use what the project makes (`data/sample.csv`, from data/make_sample.py; `sample_rows`) or
files they write themselves, so `make test` passes on a fresh clone. Only a test whose subject IS the
external E2E corpus reads it (`e2e_corpus_file`), and skips with the reason when it is absent.

Environment: a test that needs something of the machine (root, PostgreSQL, an installed package)
calls `skip_or_fail_in_ci(reason)` when it is missing: a skip on a developer's machine, a failure
under `CI=true`, where the environment is provided on purpose and a skip would only hide that the
test never ran.

Isolation rules every test gets (autouse):
  * `HF_ENDPOINT` points at a closed local port, `HF_HOME` at a temp dir, `HF_TOKEN` unset: no test
    can reach, or be helped by, the real Hub or the developer's cache;
  * the pipeline's cache (`E2E_LORA_CACHE`) is shared per session (converted GGUFs are reused),
    except where a test asks for a fresh one.
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
# Tiers: unit/ (pure functions), per_step/ (each step on a tiny model, temporary store), e2e/ (slow `mlflow
# run`, Git, team server), faults/; support/ holds the local Hub, tiny-model and GGUF factories.
SUPPORT = TESTS / "support"
PER_STEP = TESTS / "per_step"  # tests/faults reuse the tiny-model settings of test_main
for p in (str(ROOT), str(TESTS), str(SUPPORT), str(PER_STEP)):
    if p not in sys.path:
        sys.path.insert(0, p)

VENV_BIN = ROOT / ".venv" / "bin"
SAMPLE_CSV = ROOT / "data" / "sample.csv"  # the project's own data (data/make_sample.py), in every clone
# The external E2E corpus (devset.csv, devset-cleaned.csv): beside the checkout in the development
# setup, absent from a fresh clone; E2E_CORPUS_DIR points elsewhere.
E2E_CORPUS_DIR_ENV = "E2E_CORPUS_DIR"


def in_ci() -> bool:
    """CI=true (GitHub Actions, GitLab CI and most others set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail_in_ci(reason: str) -> NoReturn:
    """Something of the environment this test needs is missing (root, PostgreSQL, a package, ...):
    skip with `reason` locally, fail under CI=true. Not for missing project state or data."""
    if in_ci():
        pytest.fail(f"environment not as CI must provide it (CI=true turns this skip into a failure): "
                    f"{reason}", pytrace=False)
    pytest.skip(reason)


def sample_rows(start: int = 0, rows: int | None = None) -> list[tuple[str, str]]:
    """(mr, ref) rows of the project's data/sample.csv, from row `start` (all the rest when rows is None)."""
    with open(SAMPLE_CSV, newline="", encoding="utf-8") as fh:
        data = [(r["mr"], r["ref"]) for r in csv.DictReader(fh)]
    picked = data[start:] if rows is None else data[start:start + rows]
    assert rows is None or len(picked) == rows, f"data/sample.csv has {len(data)} rows, not {start + rows}"
    return picked


def e2e_corpus_file(name: str) -> Path:
    """A file of the external E2E corpus, for tests whose subject is that corpus; skips when absent
    (a fresh clone has no corpus beside it: that is a data choice, so it stays a skip under CI)."""
    root = Path(os.environ.get(E2E_CORPUS_DIR_ENV) or ROOT.parent / "shared" / "e2e")
    path = root / name
    if not path.is_file():
        pytest.skip(f"the external E2E corpus is absent ({name} not in {root}; set {E2E_CORPUS_DIR_ENV} "
                    "to the folder holding it)")
    return path


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e-lora-cache")


CLOSED_ENDPOINT = "http://127.0.0.1:9"  # port 9 (discard): nothing listens


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path, session_cache):
    from hubserver import point_hf_hub_at

    # Environment for subprocesses AND huggingface_hub's import-time constants for this process.
    point_hf_hub_at(monkeypatch, CLOSED_ENDPOINT, tmp_path / "hf_home")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("E2E_LORA_CACHE", str(session_cache))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    yield


@pytest.fixture(scope="session")
def _store_template(tmp_path_factory) -> Path:
    """One migrated SQLite store per session; tests copy it (migrations take seconds, a copy does not)."""
    import mlflow

    d = tmp_path_factory.mktemp("store-template")
    db = d / "mlflow.db"
    uri = f"sqlite:///{db}"
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()
    return db


@pytest.fixture
def tracking(tmp_path, monkeypatch, _store_template):
    """A fresh tracking store in tmp_path; this process and its subprocesses use experiment 'tests'."""
    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copy(_store_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("tests", artifact_location=(tmp_path / "mlartifacts").as_uri())
    # set_experiment writes MLFLOW_EXPERIMENT_ID into os.environ; setting it through monkeypatch first
    # makes teardown restore it. Subprocesses (`mlflow run`) inherit it. Never also set ..._NAME:
    # `mlflow run` refuses both at once.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp_id)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_experiment(experiment_id=exp_id)
    yield client
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama causal LM + tokenizer with a chat template (made here, < 1 MB)."""
    from hubserver import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def sharp_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with 25x larger initial weights: its greedy outputs differ from sentence to
    sentence with clear margins (the default init repeats one near-tied token whatever the input,
    which would hide a padding bug, or rows served in the wrong order)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from lora_pipeline.model import serving

    out = tmp_path_factory.mktemp("sharp-llama")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.5  # default 0.02
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
    serving.load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture
def venv_env() -> dict[str, str]:
    """Environment for subprocesses (`mlflow run`, `python -m steps...`) using the project's venv."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def runs_with_status(client, status: str) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(exps) if r.info.status == status]
