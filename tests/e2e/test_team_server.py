"""Team mode: `scripts/server.sh` runs a real MLflow server on PostgreSQL with proxied artifacts.

Every server here lives in its own temporary state directory on free loopback ports (never the
repository's `.server/`), is started through the script exactly as `make server` does, and is stopped
in fixture teardown. Tests check outcomes where they land: rows in PostgreSQL, files under the
artifact destination, HTTP status codes, ports closed after `stop`.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, skip_or_fail_in_ci

SCRIPT = ROOT / "scripts" / "server.sh"
HOST = "127.0.0.1"
# The script bounds each wait itself (PostgreSQL start, then MLflow health: 60 s each, plus initdb and
# the first schema migration, ~10 s on an idle machine); this outer bound only catches a hung script.
SCRIPT_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the script targets Linux")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0


def _script_env(state: Path, port: int, pg_port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("E2E_SERVER_", "MLFLOW_AUTH_", "MLFLOW_TRACKING_"))}
    env.update(E2E_SERVER_DIR=str(state), E2E_SERVER_PORT=str(port), E2E_SERVER_PG_PORT=str(pg_port),
               E2E_SERVER_WORKERS="1", E2E_SERVER_VENV=str(ROOT / ".venv"))
    env.update(extra)
    return env


def _state_parent() -> Path:
    """A fresh directory the PostgreSQL user can enter.

    Run as root, the script runs PostgreSQL as the `postgres` user, which cannot pass through
    pytest's 0700 `tmp_path` parents; a world-searchable directory under the system temp dir can.
    """
    d = Path(tempfile.mkdtemp(prefix="e2e-team-server-"))
    d.chmod(0o755)
    return d


@dataclasses.dataclass
class Server:
    state: Path
    port: int
    pg_port: int
    env: dict[str, str]

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def artifacts_dir(self) -> Path:
        return self.state / "artifacts"

    def script(self, command: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
        res = subprocess.run(["bash", str(SCRIPT), command], env={**self.env, **extra_env},
                             capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
        if check and res.returncode != 0:
            raise AssertionError(f"server.sh {command} exited {res.returncode}:\n{res.stderr}\n{res.stdout}")
        return res

    def start(self) -> subprocess.CompletedProcess:
        res = self.script("start", check=False)
        if res.returncode != 0 and "needs root" in res.stderr:
            skip_or_fail_in_ci(f"PostgreSQL is not installed and cannot be installed as non-root: "
                               f"{res.stderr.strip()}")
        if res.returncode != 0:
            raise AssertionError(f"server.sh start exited {res.returncode}:\n{res.stderr}")
        return res

    def stop(self) -> None:
        self.script("stop", check=False)

    def pg(self, db: str = "mlflow"):
        """A psycopg2 connection as the server's database role (password from the script's pgpass)."""
        import psycopg2

        return psycopg2.connect(host=HOST, port=self.pg_port, user="mlflow", dbname=db,
                                passfile=str(self.state / "secrets" / "pgpass"), connect_timeout=10)

    def artifact_file(self, artifact_uri: str, rel: str) -> Path:
        """Where a proxied artifact (`mlflow-artifacts:/<path>`) lies under --artifacts-destination."""
        prefix = "mlflow-artifacts:/"
        assert artifact_uri.startswith(prefix), f"not a proxied artifact URI: {artifact_uri}"
        return self.artifacts_dir / artifact_uri[len(prefix):].lstrip("/") / rel


def _keep_logs(srv: Server, keep: Path) -> None:
    """Copy the server's logs somewhere pytest keeps, before its state directory is removed."""
    keep.mkdir(parents=True, exist_ok=True)
    for log in ("mlflow.log", "postgres.log", "initdb.log"):
        if (srv.state / log).is_file():
            shutil.copy(srv.state / log, keep / log)


@pytest.fixture
def make_server(tmp_path):
    """Factory: a configured (not yet started) server; every one is stopped and removed at teardown."""
    made: list[tuple[Server, Path]] = []

    def make(**extra_env: str) -> Server:
        parent = _state_parent()
        port, pg_port = _free_port(), _free_port()
        while pg_port == port:
            pg_port = _free_port()
        state = parent / "server"
        srv = Server(state, port, pg_port, _script_env(state, port, pg_port, **extra_env))
        made.append((srv, parent))
        return srv

    yield make
    for i, (srv, parent) in enumerate(made):
        srv.stop()
        _keep_logs(srv, tmp_path / f"server-logs-{i}")
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One plain (no auth) server shared by this module's read/write tests (logs kept by pytest)."""
    parent = _state_parent()
    port, pg_port = _free_port(), _free_port()
    state = parent / "server"
    srv = Server(state, port, pg_port, _script_env(state, port, pg_port))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        _keep_logs(srv, tmp_path_factory.mktemp("server-logs"))
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def use_server(server, monkeypatch):
    """Point this process (and subprocesses) at `server`, in an experiment of this test's own."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # Restored at teardown, so later tests do not inherit this server as their tracking store.
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)
    name = f"team-{secrets.token_hex(4)}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    mlflow.set_tracking_uri(server.uri)
    mlflow.set_experiment(name)
    yield mlflow.MlflowClient(tracking_uri=server.uri)
    while mlflow.active_run():
        mlflow.end_run()


# --- fast: refusals that happen before anything starts ------------------------------------------

def _run_script(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=60)


def test_bad_settings_are_refused_with_the_variable_named(tmp_path):
    res = _run_script("start", _script_env(tmp_path / "s", 5000, 0, E2E_SERVER_PORT="http"))
    assert res.returncode == 1
    assert "E2E_SERVER_PORT='http' is not a number" in res.stderr
    res = _run_script("start", _script_env(tmp_path / "s", 5000, 5000))
    assert res.returncode == 1 and "both 5000" in res.stderr
    res = _run_script("start", _script_env(tmp_path / "s", 5000, 5001,
                                           E2E_SERVER_AUTH_DEFAULT_PERMISSION="ALL"))
    assert res.returncode == 1 and "E2E_SERVER_AUTH_DEFAULT_PERMISSION='ALL' must be" in res.stderr
    res = _run_script("restart", _script_env(tmp_path / "s", 5000, 5001))
    assert res.returncode == 2 and "usage:" in res.stderr
    assert not (tmp_path / "s").exists(), "a refused start must not create the state directory"
    res = _run_script("start", _script_env(tmp_path / "s", 5000, 5001, E2E_SERVER_PG_BIN=str(tmp_path)))
    assert res.returncode == 1
    assert f"E2E_SERVER_PG_BIN='{tmp_path}' holds no initdb/pg_ctl" in res.stderr
    assert not (tmp_path / "s" / "pgdata").exists()


def test_auth_without_admin_password_is_refused_before_starting_anything(tmp_path):
    env = _script_env(tmp_path / "s", _free_port(), _free_port(), E2E_SERVER_AUTH="1")
    res = _run_script("start", env)
    assert res.returncode == 1
    assert "needs MLFLOW_AUTH_ADMIN_PASSWORD" in res.stderr
    assert not (tmp_path / "s").exists()


def test_status_and_stop_of_a_server_never_started(tmp_path):
    env = _script_env(tmp_path / "s", _free_port(), _free_port())
    res = _run_script("status", env)
    assert res.returncode == 3, res.stderr
    assert "MLflow: not running" in res.stderr and "PostgreSQL: not running" in res.stderr
    assert _run_script("stop", env).returncode == 0
    res = _run_script("uri", env)
    assert res.returncode == 1 and "not running" in res.stderr


# --- slow: real servers -------------------------------------------------------------------------

@pytest.mark.slow
def test_run_with_param_and_artifact_lands_in_postgres_and_artifact_store(server, use_server, tmp_path):
    import mlflow

    payload = tmp_path / "notes.txt"
    payload.write_text("logged through the proxy\n")
    with mlflow.start_run() as run:
        mlflow.log_param("lora_r", "8")
        mlflow.log_artifact(str(payload), "docs")
    run_id = run.info.run_id

    with server.pg() as conn, conn.cursor() as cur:
        cur.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'lora_r'", (run_id,))
        assert cur.fetchall() == [("8",)]
        cur.execute("SELECT status, artifact_uri FROM runs WHERE run_uuid = %s", (run_id,))
        status, artifact_uri = cur.fetchone()
    assert status == "FINISHED"
    # The client only knows the proxy URI; the bytes are under the server's artifact destination.
    on_disk = server.artifact_file(artifact_uri, "docs/notes.txt")
    assert on_disk.read_text() == "logged through the proxy\n"
    fetched = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/docs/notes.txt", dst_path=str(tmp_path / "dl"))
    assert Path(fetched).read_text() == "logged through the proxy\n"


@pytest.mark.slow
def test_registered_model_version_and_alias_through_the_server(server, use_server, tmp_path):
    import mlflow
    import pandas as pd

    class Doubler(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input * 2

    name = f"team-model-{secrets.token_hex(4)}"
    with mlflow.start_run():
        # pip_requirements given: requirement inference would import and probe the environment.
        mlflow.pyfunc.log_model(name="model", python_model=Doubler(), pip_requirements=["mlflow"],
                                registered_model_name=name)
    client = use_server
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"]
    client.set_registered_model_alias(name, "champion", "1")

    assert client.get_model_version_by_alias(name, "champion").version == "1"
    with server.pg() as conn, conn.cursor() as cur:
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (name,))
        assert cur.fetchall() == [("champion", 1)]
    # Loading by alias downloads the model's files through the proxy.
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(pd.DataFrame({"x": [1, 2]}))
    assert out["x"].tolist() == [2, 4]


@pytest.mark.slow
def test_download_snapshot_against_the_server(server, use_server, tiny_model_dir, tmp_path):
    import mlflow

    from lora_pipeline import artifacts
    from lora_pipeline.base.manifest import load_manifest, verify_dir
    from steps import download_snapshot

    result = download_snapshot.run(download_snapshot.Args(model=str(tiny_model_dir)))
    assert result.manifest_uri == artifacts.manifest_uri(result.run_id)
    run = use_server.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert artifacts.get_outputs(run)["manifest"] == result.manifest_uri

    manifest = load_manifest(result.manifest_uri)  # read back through the server
    assert {e.path for e in manifest.files} >= {"config.json", "model.safetensors"}
    # The pinned copy went through the proxy into the artifact destination, byte for byte...
    stored = server.artifact_file(run.info.artifact_uri, artifacts.SNAPSHOT_FILES_DIR)
    verify_dir(stored, manifest)
    assert server.artifact_file(run.info.artifact_uri, artifacts.MANIFEST_PATH).read_text() \
        == manifest.to_json()
    # ...and comes back out of it intact.
    fetched = mlflow.artifacts.download_artifacts(manifest.artifact_uri, dst_path=str(tmp_path / "dl"))
    verify_dir(Path(fetched), manifest)


def _main_is_implemented() -> tuple[bool, str]:
    """`main` and every step it chains are real (not the `placeholder` stubs of the skeleton)."""
    import importlib

    import steps.main as main_step
    from lora_pipeline.orchestration.compose import STEP_NAMES

    if [f.name for f in dataclasses.fields(main_step.Args)] == ["placeholder"]:
        return False, "steps.main is still the 'not implemented' placeholder (Args has only `placeholder`)"
    for name in STEP_NAMES:
        mod = importlib.import_module(f"steps.{name}")
        if [f.name for f in dataclasses.fields(mod.Args)] == ["placeholder"]:
            return False, f"step {name} is not implemented yet (Args has only `placeholder`)"
    return True, ""


# Tiny-model settings: 2 optimizer steps, a checkpoint at each, 4 evaluation examples; the tiny
# byte-level tokenizer makes a prompt+answer ~450 tokens, hence max_seq_length 1024.
_TINY_MAIN_ARGS = ["--max_steps", "2", "--eval_steps", "1", "--save_steps", "1", "--logging_steps", "1",
                   "--warmup_steps", "0", "--batch_size", "2", "--max_seq_length", "1024",
                   "--validation_fraction", "0.25", "--max_examples", "4", "--max_new_tokens", "8",
                   "--use_cache", "false"]


@pytest.mark.slow
def test_main_pipeline_against_the_server(server, use_server, tiny_model_dir, venv_env, tmp_path):
    implemented, why = _main_is_implemented()
    if not implemented:
        pytest.skip(why)
    from lora_pipeline import artifacts

    lines = (ROOT / "data" / "sample.csv").read_text().splitlines(keepends=True)
    data = tmp_path / "train.csv"
    data.write_text("".join(lines[:41]))  # header + 40 rows: 30 to train on, 10 held out
    experiment = os.environ["MLFLOW_EXPERIMENT_NAME"]
    name = f"team-e2e-{secrets.token_hex(4)}"
    env = {**venv_env, "MLFLOW_TRACKING_URI": server.uri, "MLFLOW_EXPERIMENT_NAME": experiment}
    res = subprocess.run([sys.executable, "-m", "steps.main", "--model", str(tiny_model_dir),
                          "--registered_name", name, "--dataset", str(data), *_TINY_MAIN_ARGS],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    client = use_server
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    steps_seen = {r.data.tags.get("pipeline.step") for r in runs}
    assert {"main", "download_snapshot", "finetune", "log_reference", "evaluate_checkpoint",
            "persist_and_register"} <= steps_seen
    assert all(r.info.status == "FINISHED" for r in runs)
    # Every run's artifacts went through the proxy into the server's artifact destination.
    for r in runs:
        assert r.info.artifact_uri.startswith("mlflow-artifacts:/"), r.info.artifact_uri
    snapshot = next(r for r in runs if r.data.tags.get("pipeline.step") == "download_snapshot")
    assert server.artifact_file(snapshot.info.artifact_uri, "snapshot/manifest.json").is_file()
    # The registered version and its alias resolve through the server; the persisted model's
    # files are in the server's artifact store.
    outputs = artifacts.get_outputs(next(r for r in runs if r.data.tags.get("pipeline.step") == "main"))
    assert outputs["registered"].startswith(f"models:/{name}/")
    version = outputs["registered"].rsplit("/", 1)[1]
    assert client.get_model_version_by_alias(name, outputs["alias"]).version == version
    persisted = client.get_logged_model(artifacts.parse_model_id_uri(outputs["persisted_model"]))
    stored = server.artifact_file(persisted.artifact_location, "")
    assert stored.is_dir() and any(p.is_file() for p in stored.rglob("*"))
    # The prompt is in the server's prompt registry (PostgreSQL), linked to the persisted model.
    from lora_pipeline.registry import prompts

    prompt_uri = client.get_model_version(name, version).tags[prompts.PROMPT_URI_TAG]
    assert prompt_uri == f"prompts:/{prompts.prompt_name(name)}/1"
    assert client.load_prompt(prompt_uri).template[-1]["content"].endswith("{{text}}")
    assert prompts.prompt_name(name) in persisted.tags["mlflow.linkedPrompts"]
    with server.pg() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),))
        assert cur.fetchone()[0] == len(runs)


@pytest.mark.slow
def test_start_is_idempotent_stop_closes_ports_and_data_survives_restart(make_server, tmp_path):
    import mlflow

    srv = make_server()
    first = srv.start()
    assert f"export MLFLOW_TRACKING_URI={srv.uri}" in first.stdout
    pid = (srv.state / "mlflow.pid").read_text().strip()
    assert _port_open(srv.port) and _port_open(srv.pg_port)

    again = srv.start()  # idempotent: nothing restarted
    assert "already running" in again.stderr
    assert (srv.state / "mlflow.pid").read_text().strip() == pid
    assert srv.script("status").returncode == 0
    assert srv.script("uri").stdout.strip() == f"export MLFLOW_TRACKING_URI={srv.uri}"

    client = mlflow.MlflowClient(tracking_uri=srv.uri)
    exp_id = client.create_experiment("survives-restart")
    run_id = client.create_run(exp_id).info.run_id
    client.log_param(run_id, "kept", "yes")
    client.set_terminated(run_id)

    srv.script("stop")
    # Bounded: the script waits for both to exit; ports must be closed right after it returns.
    deadline = time.monotonic() + 10
    while (_port_open(srv.port) or _port_open(srv.pg_port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _port_open(srv.port), "MLflow still listens after stop"
    assert not _port_open(srv.pg_port), "PostgreSQL still listens after stop"
    assert not (srv.state / "mlflow.pid").exists()
    assert srv.script("status", check=False).returncode == 3
    assert srv.script("stop").returncode == 0  # stopping a stopped server is fine

    srv.start()
    assert client.get_run(run_id).data.params == {"kept": "yes"}
    for log in ("mlflow.log", "postgres.log"):
        assert (srv.state / log).stat().st_size > 0


@pytest.mark.slow
def test_basic_auth_refuses_anonymous_and_accepts_the_admin(make_server, monkeypatch, tmp_path):
    import mlflow
    import requests
    from mlflow.exceptions import MlflowException

    password = "pw-" + secrets.token_urlsafe(18)
    srv = make_server(E2E_SERVER_AUTH="1", MLFLOW_AUTH_ADMIN_USERNAME="team-admin",
                      MLFLOW_AUTH_ADMIN_PASSWORD=password)
    started = srv.start()
    api = f"{srv.uri}/api/2.0/mlflow/experiments/search?max_results=1"

    assert requests.get(api, timeout=10).status_code == 401
    assert requests.get(api, auth=("team-admin", "wrong-" + password), timeout=10).status_code == 401
    assert requests.get(api, auth=("team-admin", password), timeout=10).status_code == 200
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        mlflow.MlflowClient(tracking_uri=srv.uri).search_experiments()

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "team-admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = mlflow.MlflowClient(tracking_uri=srv.uri)
    exp_id = client.create_experiment("authed")
    run_id = client.create_run(exp_id).info.run_id
    client.log_param(run_id, "who", "admin")
    payload = tmp_path / "a.txt"
    payload.write_text("secret artifact\n")
    client.log_artifact(run_id, str(payload))
    client.set_terminated(run_id)
    assert client.get_run(run_id).data.params == {"who": "admin"}
    artifact_uri = client.get_run(run_id).info.artifact_uri
    assert srv.artifact_file(artifact_uri, "a.txt").read_text() == "secret artifact\n"
    # The artifact proxy is behind the same login.
    proxied = f"{srv.uri}/api/2.0/mlflow-artifacts/artifacts/{artifact_uri.split(':/', 1)[1].lstrip('/')}/a.txt"
    assert requests.get(proxied, timeout=10).status_code == 401
    assert requests.get(proxied, auth=("team-admin", password), timeout=10).text == "secret artifact\n"

    # A team member, created the way docs/team.md says, works in an experiment of their own.
    from mlflow.server import get_app_client

    member_pw = "m-" + secrets.token_urlsafe(12)
    get_app_client("basic-auth", tracking_uri=srv.uri).create_user("alice", member_pw)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", member_pw)
    alice = mlflow.MlflowClient(tracking_uri=srv.uri)
    alice_run = alice.create_run(alice.create_experiment("alice-exp")).info.run_id
    alice.log_param(alice_run, "by", "alice")
    assert alice.get_run(alice_run).data.params == {"by": "alice"}

    # The auth store is in PostgreSQL, and the admin password is written nowhere in clear.
    with srv.pg("mlflow_auth") as conn, conn.cursor() as cur:
        cur.execute("SELECT username, is_admin FROM users ORDER BY username")
        assert cur.fetchall() == [("alice", False), ("team-admin", True)]
    srv.stop()
    assert password not in started.stdout + started.stderr
    leaked = [p for p in srv.state.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
    assert leaked == []
