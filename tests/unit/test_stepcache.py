"""The step cache's pure parts, against a real (temporary SQLite) tracking store."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lora_pipeline import artifacts
from lora_pipeline.orchestration import stepcache
from lora_pipeline.tracking import version


def _exp(client) -> str:
    return client.get_experiment_by_name("tests").experiment_id


def _git(root: Path, *argv: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *argv], cwd=root,
                   check=True, capture_output=True)


# --- code version ------------------------------------------------------------------------------

@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv(version.CODE_VERSION_ENV, raising=False)
    root = tmp_path / "repo"
    (root / "steps").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "steps" / "a.py").write_text("X = 1\n")
    (root / "tests" / "t.py").write_text("T = 1\n")
    (root / "MLproject").write_text("name: x\n")
    (root / ".gitignore").write_text("mlflow.db\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "init")
    return root


def _commit(repo: Path, msg: str) -> None:
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", msg)


def test_code_version_of_a_clean_checkout_is_the_pipeline_tree_not_the_commit(repo):
    clean = version.code_version(repo)
    assert clean.startswith("tree-")
    # Files that cannot change what a step produces keep the checkout "clean" for the cache.
    (repo / "tests" / "t.py").write_text("T = 2\n")
    (repo / "mlflow.db").write_text("ignored")
    assert version.code_version(repo) == clean


def test_a_commit_touching_only_readme_docs_tests_or_bench_keeps_the_code_version(repo):
    """The shipped schedule is `git pull && make run`: a docs-only commit must not retrain."""
    before = version.code_version(repo)
    for rel, text in (("README.md", "# new\n"), ("docs/x.md", "doc\n"), ("tests/t.py", "T = 3\n"),
                      ("bench/b.py", "B = 1\n"), ("build_tools/r.py", "R = 1\n")):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
        _commit(repo, f"touch {rel}")
        assert version.code_version(repo) == before, rel
    assert version.pipeline_git_commit(repo) != before  # the lineage commit still moves


@pytest.mark.parametrize("rel", ["steps/a.py", "lora_pipeline/core.py", "MLproject", "requirements.txt"])
def test_a_commit_touching_pipeline_code_changes_the_code_version(repo, rel):
    before = version.code_version(repo)
    (repo / rel).parent.mkdir(parents=True, exist_ok=True)
    (repo / rel).write_text("changed = True\n")
    _commit(repo, f"touch {rel}")
    after = version.code_version(repo)
    assert after.startswith("tree-") and after != before


def test_code_version_of_edited_pipeline_code_is_dirty_and_content_addressed(repo):
    clean = version.code_version(repo)
    (repo / "steps" / "a.py").write_text("X = 2\n")
    edited = version.code_version(repo)
    assert edited.startswith(clean + "-dirty-")
    assert version.code_version(repo) == edited  # same edits, same version: the cache still hits
    (repo / "steps" / "a.py").write_text("X = 3\n")
    assert version.code_version(repo) not in (clean, edited)
    (repo / "steps" / "a.py").write_text("X = 1\n")
    assert version.code_version(repo) == clean
    # An untracked module the pipeline may import is code too.
    (repo / "steps" / "new.py").write_text("Y = 1\n")
    assert version.code_version(repo).startswith(clean + "-dirty-")


def test_code_version_env_override_and_no_git(repo, tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    shutil.copytree(repo, plain, ignore=shutil.ignore_patterns(".git"))
    v1 = version.code_version(plain)
    assert v1.startswith("nogit-")
    (plain / "steps" / "a.py").write_text("X = 9\n")
    assert version.code_version(plain) != v1
    monkeypatch.setenv(version.CODE_VERSION_ENV, "pinned-version")
    assert version.code_version(repo) == "pinned-version"


# --- key ---------------------------------------------------------------------------------------

def test_params_are_compared_as_strings_and_paths_by_content(tracking, tmp_path):
    a = tmp_path / "a.csv"
    b = tmp_path / "sub" / "b.csv"
    b.parent.mkdir()
    a.write_text("mr,ref\nx,y\n")
    b.write_text("mr,ref\nx,y\n")
    k1 = stepcache.make_key(tracking, "finetune", {"lr": "0.0001", "steps": "5", "dataset": str(a),
                                                   "resume_from": ""}, code="c1", exclude={"resume_from"})
    # The same values, one given as an int, the other path to identical content, a resume marker.
    k2 = stepcache.make_key(tracking, "finetune", {"lr": "0.0001", "steps": 5, "dataset": str(b),
                                                   "resume_from": "abc"}, code="c1", exclude={"resume_from"})
    assert k1.digest == k2.digest
    assert k1.params == {"lr": "0.0001", "steps": "5"}
    assert set(k1.input_digests) == {"dataset"}
    b.write_text("mr,ref\nx,z\n")
    k3 = stepcache.make_key(tracking, "finetune", {"lr": "0.0001", "steps": "5", "dataset": str(b)},
                            code="c1")
    assert k3.digest != k1.digest
    assert stepcache.make_key(tracking, "finetune", {"lr": "0.0001", "steps": "5", "dataset": str(a)},
                              code="c2").digest != k1.digest
    assert stepcache.make_key(tracking, "evaluate", {"lr": "0.0001", "steps": "5", "dataset": str(a)},
                              code="c1").digest != k1.digest


def test_folder_digest_follows_content_not_location(tmp_path):
    for name in ("m1", "m2"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "sub" / "w.bin").write_bytes(b"\x00\x01")
    d1, d2 = stepcache.path_digest(tmp_path / "m1"), stepcache.path_digest(tmp_path / "m2")
    assert d1 == d2 and d1.startswith("dir-")
    (tmp_path / "m2" / "sub" / "w.bin").write_bytes(b"\x00\x02")
    assert stepcache.path_digest(tmp_path / "m2") != d1


def test_manifest_uri_is_keyed_by_the_manifest_digest(tracking):
    exp = _exp(tracking)
    runs = []
    for _ in range(2):
        r = tracking.create_run(exp)
        tracking.set_tag(r.info.run_id, artifacts.MANIFEST_DIGEST_TAG, "abc123")
        runs.append(r.info.run_id)
    keys = [stepcache.make_key(tracking, "finetune", {"manifest_uri": artifacts.manifest_uri(rid)},
                               code="c") for rid in runs]
    assert keys[0].digest == keys[1].digest
    assert keys[0].input_digests == {"manifest_uri": "manifest-abc123"}
    assert keys[0].params == {}


# --- lookup ------------------------------------------------------------------------------------

def _step_run(client, key: stepcache.CacheKey, status: str = "FINISHED", params: dict | None = None,
              artifact: str | None = "snapshot/manifest.json") -> str:
    exp = _exp(client)
    run = client.create_run(exp, tags={**key.tags(), artifacts.STEP_TAG: key.entry_point})
    rid = run.info.run_id
    for k, v in (params if params is not None else key.params).items():
        client.log_param(rid, k, v)
    if artifact:
        client.log_text(rid, "{}", artifact)
        artifacts.set_outputs(client, rid, {"manifest": f"runs:/{rid}/{artifact}"})
    client.set_terminated(rid, status)
    return rid


def _logged_model(client, run_id: str, name: str, tmp_path: Path) -> str:
    exp = _exp(client)
    model = client.create_logged_model(exp, name=name, source_run_id=run_id)
    d = tmp_path / f"art-{model.model_id}"
    d.mkdir()
    (d / "MLmodel").write_text("flavors: {}\n")
    client.log_model_artifacts(model.model_id, str(d))
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def test_finished_run_with_same_key_is_found_other_statuses_are_not(tracking):
    key = stepcache.make_key(tracking, "download_snapshot", {"model": "x", "n": "3"}, code="c")
    assert stepcache.find_finished(tracking, _exp(tracking), key).run is None
    _step_run(tracking, key, status="FAILED")
    assert stepcache.find_finished(tracking, _exp(tracking), key).run is None
    rid = _step_run(tracking, key)
    assert stepcache.find_finished(tracking, _exp(tracking), key).run.info.run_id == rid
    other = stepcache.make_key(tracking, "download_snapshot", {"model": "x", "n": "4"}, code="c")
    assert stepcache.find_finished(tracking, _exp(tracking), other).run is None


def test_run_whose_logged_params_differ_is_not_reused(tracking):
    key = stepcache.make_key(tracking, "download_snapshot", {"model": "x", "n": "3"}, code="c")
    _step_run(tracking, key, params={"model": "x", "n": "3.0"})
    found = stepcache.find_finished(tracking, _exp(tracking), key)
    assert found.run is None
    assert "other parameters" in found.notes[0] and "'3.0'" in found.notes[0]


def test_run_whose_artifacts_were_deleted_is_reported_and_skipped(tracking, tmp_path):
    key = stepcache.make_key(tracking, "download_snapshot", {"model": "x"}, code="c")
    old = _step_run(tracking, key)
    newer = _step_run(tracking, key)
    store = tmp_path / "mlartifacts"
    manifest = next(p for p in store.rglob("manifest.json") if newer in p.as_posix())
    manifest.unlink()
    found = stepcache.find_finished(tracking, _exp(tracking), key)
    assert found.run is not None and found.run.info.run_id == old  # falls back to the intact one
    assert any(newer in n and "was deleted" in n and "rerunning" in n for n in found.notes)


def test_deleted_logged_model_and_moved_alias_are_problems(tracking, tmp_path):
    exp = _exp(tracking)
    rid = tracking.create_run(exp).info.run_id
    mid = _logged_model(tracking, rid, "checkpoint-2", tmp_path)
    assert stepcache.output_problems(tracking, {"checkpoint": f"models:/{mid}"}) == []
    tracking.create_registered_model("e2e")
    v1 = tracking.create_model_version("e2e", f"models:/{mid}", run_id=rid, model_id=mid)
    tracking.set_registered_model_alias("e2e", "champion", v1.version)
    outs = {"registered": f"models:/e2e/{v1.version}", "alias": "champion"}
    assert stepcache.output_problems(tracking, outs) == []
    v2 = tracking.create_model_version("e2e", f"models:/{mid}", run_id=rid, model_id=mid)
    tracking.set_registered_model_alias("e2e", "champion", v2.version)
    problems = stepcache.output_problems(tracking, outs)
    assert problems == [f"alias: e2e@champion now points to version {v2.version}, not {v1.version}"]
    # Delete the model's files from the artifact store (what `mlflow gc` or a cleanup job does).
    mlmodel = next(p for p in (tmp_path / "mlartifacts").rglob("MLmodel") if mid in p.as_posix())
    shutil.rmtree(mlmodel.parent)
    assert stepcache.output_problems(tracking, {"checkpoint": f"models:/{mid}"}) == [
        f"checkpoint: artifacts of logged model {mid} were deleted"]
    assert stepcache.output_problems(tracking, {"checkpoint": "models:/m-0123abcd"})[0].endswith(
        "no longer exists")


def test_failed_run_with_a_checkpoint_is_resumable(tracking, tmp_path):
    key = stepcache.make_key(tracking, "finetune", {"lr": "0.1"}, code="c")
    no_ckpt = _step_run(tracking, key, status="FAILED", artifact=None)
    assert no_ckpt and stepcache.find_resumable(tracking, _exp(tracking), key) is None
    failed = _step_run(tracking, key, status="FAILED", artifact=None)
    _logged_model(tracking, failed, "checkpoint-4", tmp_path)
    run, models = stepcache.find_resumable(tracking, _exp(tracking), key)
    assert run.info.run_id == failed and [m.name for m in models] == ["checkpoint-4"]
    other = stepcache.make_key(tracking, "finetune", {"lr": "0.2"}, code="c")
    assert stepcache.find_resumable(tracking, _exp(tracking), other) is None
