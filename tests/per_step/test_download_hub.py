"""download_snapshot against a real local Hub (olah serving git repos made here): no mocks of the Hub."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from lora_pipeline import artifacts
from lora_pipeline.base.manifest import load_manifest, sha256_file
from lora_pipeline.errors import InputError
from steps import download_snapshot as ds

from conftest import runs_with_status
from hubserver import LocalHub, point_hf_hub_at, publish_git_repo

REPO = "tiny-org/tiny-llama"


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_model_dir):
    mirror = tmp_path / "mirror"
    sha = publish_git_repo(mirror, REPO, tiny_model_dir, message="v1")
    with LocalHub(mirror) as server:
        point_hf_hub_at(monkeypatch, server.endpoint, tmp_path / "hf_home")
        server.first_sha = sha
        yield server


def _digests(d: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in d.iterdir() if p.is_file()}


def test_branch_resolves_to_commit_and_digests_match(tracking, hub, tiny_model_dir):
    res = ds.run(ds.Args(model=REPO, revision="main"))
    m = load_manifest(res.manifest_uri)
    assert (m.source, m.repo_id, m.revision, m.commit) == ("hub", REPO, "main", hub.first_sha)
    assert {f.path: f.sha256 for f in m.files} == _digests(tiny_model_dir)
    assert m.artifact_uri == ""  # refers to repo + commit: no weights in the artifact store
    assert not tracking.list_artifacts(res.run_id, artifacts.SNAPSHOT_FILES_DIR)
    assert res.reference == f"{REPO}@{hub.first_sha}"
    assert tracking.get_run(res.run_id).data.tags["base.reference"] == res.reference


def test_pinned_sha_keeps_old_files_after_a_new_commit(tracking, hub, tiny_model_dir, tmp_path):
    v2 = tmp_path / "v2"
    shutil.copytree(tiny_model_dir, v2)
    (v2 / "generation_config.json").write_text('{"max_new_tokens": 7}')
    new_sha = publish_git_repo(hub.mirror_root, REPO, v2, message="v2")
    assert new_sha != hub.first_sha

    by_branch = load_manifest(ds.run(ds.Args(model=REPO, revision="main")).manifest_uri)
    by_sha = load_manifest(ds.run(ds.Args(model=REPO, revision=hub.first_sha)).manifest_uri)
    assert by_branch.commit == new_sha and by_sha.commit == hub.first_sha
    gen = "generation_config.json"
    assert {f.path: f.sha256 for f in by_sha.files}[gen] == sha256_file(tiny_model_dir / gen)
    assert {f.path: f.sha256 for f in by_branch.files}[gen] == sha256_file(v2 / gen)


def test_repeated_call_reuses_the_hf_cache(tracking, hub):
    first = ds.run(ds.Args(model=REPO, revision=hub.first_sha))
    blobs = sorted((Path(first.local_path).parent.parent / "blobs").glob("*"))  # <repo>/snapshots/<sha>
    assert blobs, "expected downloaded blobs in the HF cache"
    stamps = {b: b.stat().st_mtime_ns for b in blobs}
    t0 = time.perf_counter()
    second = ds.run(ds.Args(model=REPO, revision=hub.first_sha))
    assert time.perf_counter() - t0 < 15
    assert second.local_path == first.local_path
    assert {b: b.stat().st_mtime_ns for b in blobs} == stamps  # nothing downloaded again


def test_offline_mode_uses_the_cache(tracking, hub, monkeypatch):
    online = load_manifest(ds.run(ds.Args(model=REPO, revision=hub.first_sha)).manifest_uri)
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = load_manifest(ds.run(ds.Args(model=REPO, revision=hub.first_sha)).manifest_uri)
    assert offline.commit == online.commit and offline.files == online.files


def test_unknown_repo(tracking, hub):
    with pytest.raises(InputError, match=r"^model='tiny-org/nope': no accessible model repository 'tiny-org/nope' on http://127\.0\.0\.1:\d+ \(RepositoryNotFoundError\); fix: check the repo id"):
        ds.run(ds.Args(model="tiny-org/nope", revision="main"))
    assert runs_with_status(tracking, "FINISHED") == []


def test_unknown_revision(tracking, hub):
    with pytest.raises(InputError, match=r"^revision='v9': tiny-org/tiny-llama has no branch, tag or commit 'v9' on .*; fix: pass an existing branch, tag or full commit SHA"):
        ds.run(ds.Args(model=REPO, revision="v9"))
    assert runs_with_status(tracking, "FINISHED") == []


def test_pickle_only_repo_is_refused(tracking, hub, tiny_model_dir, tmp_path):
    d = tmp_path / "pickle"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    publish_git_repo(hub.mirror_root, "tiny-org/pickled", d)
    with pytest.raises(InputError, match=r"^allow_pickle=False: tiny-org/pickled@\w{12} has only pickle weights"):
        ds.run(ds.Args(model="tiny-org/pickled", revision="main"))


def test_hub_unreachable_retries_with_backoff_then_fails(tracking, hub):
    hub.stop()
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"^model='tiny-org/tiny-llama': Hub at http://127\.0\.0\.1:\d+ unreachable: model_info\(tiny-org/tiny-llama@main\) failed 3 times .*; fix: check the network and HF_ENDPOINT"):
        ds.run(ds.Args(model=REPO, revision="main", hub_retries=2, hub_backoff_s=0.2))
    # Backoff 0.2 s then 0.4 s: at least 0.6 s waited, and bounded.
    assert 0.6 <= time.perf_counter() - t0 < 30
    assert runs_with_status(tracking, "FINISHED") == []


def test_token_is_never_logged(tracking, hub, monkeypatch, tmp_path):
    from faults.hubproxy import FaultyProxy  # no fault set: it only forwards and records headers
    from faults.secscan import scan_paths, scan_store

    sentinel = "hf_SENTINEL_do_not_log_7d1c"
    with FaultyProxy(hub.endpoint) as recorder:
        point_hf_hub_at(monkeypatch, recorder.endpoint, tmp_path / "hf_home")
        monkeypatch.setenv("HF_TOKEN", sentinel)  # after point_hf_hub_at, which clears it
        res = ds.run(ds.Args(model=REPO, revision="main"))
    # The token reached the Hub (else "not logged" would prove nothing): every request carried it.
    assert recorder.requests and len(recorder.authorizations) == len(recorder.requests)
    assert set(recorder.authorizations) == {f"Bearer {sentinel}"}
    run = tracking.get_run(res.run_id)
    blob = repr(run.data.params) + repr(run.data.tags) + repr(run.data.metrics)
    blob += "".join(Path(p).read_text(errors="ignore") for p in Path.cwd().rglob("*") if p.is_file()
                    and p.suffix in (".json", ".txt", ".yaml", ".log", ""))
    assert sentinel not in blob
    # Everything the store shows through its API, artifacts downloaded, then its raw files (the
    # SQLite database and the artifact folder, byte for byte).
    where, seen = scan_store(tracking, sentinel)
    files, n_files = scan_paths([tmp_path / "mlflow.db", tmp_path / "mlartifacts"], sentinel)
    assert where == [] and files == [], where + files
    assert seen["runs"] == 1 and seen["params"] > 0 and seen["tags"] > 0 and seen["artifact_files"] > 0
    assert n_files > 1  # the database and at least the manifest
