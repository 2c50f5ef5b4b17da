"""`kill -9` of persist_and_register at the registry calls (the copy itself: tests/test_persist.py::
test_killed_persist_leaves_no_version_and_rerun_completes).

SIGKILL arrives exactly when the step calls the registry (`mlflow.register_model`, the first version tag,
the first alias): the subprocess patches that call to kill its own process. What must hold: no alias
ever points at a half-registered version (consumers load `@champion`); a kill before registering leaves
the registry unchanged; the rerun finishes with exactly one version (the persisted copy is reused, not
copied again) carrying the alias; the killed run is closed as KILLED by the rerun's start.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from lora_pipeline import artifacts
from steps import persist_and_register as par

from conftest import runs_with_status

pytestmark = [pytest.mark.faults, pytest.mark.slow]

NAME = "e2e-kill-registry"
_KILL_AT = textwrap.dedent("""
    import os, signal, sys
    import mlflow
    where = sys.argv[1]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "register":
        mlflow.register_model = die
    elif where == "version_tag":
        mlflow.MlflowClient.set_model_version_tag = die
    elif where == "alias":
        mlflow.MlflowClient.set_registered_model_alias = die
    from steps import persist_and_register
    sys.exit(persist_and_register.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("where", ["register", "version_tag", "alias"])
def test_kill_at_the_registry_then_rerun(where, tracking, tiny_model_dir, tmp_path, venv_env):
    from test_persist import GOOD, make_candidate, snapshot

    cand = make_candidate(tmp_path, tiny_model_dir, snapshot(tiny_model_dir), metrics=GOOD)
    proc = subprocess.run([sys.executable, "-c", _KILL_AT, where, "--model_uri", cand.uri,
                           "--registered_name", NAME], env=venv_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    versions = tracking.search_model_versions(f"name = '{NAME}'")
    if where == "register":
        assert versions == []  # the registry is unchanged
    else:
        assert [str(v.version) for v in versions] == ["1"]
        assert tracking.get_model_version(NAME, "1").aliases == []  # nothing points at it
    killed = [r for r in runs_with_status(tracking, "RUNNING") if r.data.tags.get(artifacts.STEP_TAG) == par.ENTRY_POINT]
    assert len(killed) == 1  # what MLflow leaves behind
    persisted = [m for m in tracking.search_logged_models([killed[0].info.experiment_id])
                 if m.name == artifacts.PERSISTED_MODEL_NAME]
    assert len(persisted) == 1 and str(persisted[0].status).endswith("READY")  # the copy was complete

    res = par.run(par.Args(model_uri=cand.uri, registered_name=NAME))
    assert [str(v.version) for v in tracking.search_model_versions(f"name = '{NAME}'")] == ["1"]
    assert res.registered_uri == f"models:/{NAME}/1" and res.alias == artifacts.CHAMPION_ALIAS
    assert str(tracking.get_model_version_by_alias(NAME, artifacts.CHAMPION_ALIAS).version) == "1"
    assert res.persisted_bytes == 0  # the complete copy was reused, not made again
    after = [m for m in tracking.search_logged_models([killed[0].info.experiment_id])
             if m.name == artifacts.PERSISTED_MODEL_NAME]
    assert len(after) == 1
    assert tracking.get_run(killed[0].info.run_id).info.status == "KILLED"  # closed by the rerun's start
