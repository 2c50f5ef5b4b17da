"""Find a secret anywhere in a tracking store: not a test module.

`scan_store` walks everything MLflow keeps through its API (experiments, runs: name, params, tags,
metric keys, dataset inputs; logged models: params, tags, metric keys; registered models and
versions: names, descriptions, tags, aliases; every artifact file of every run and logged model,
downloaded) and `scan_paths` greps raw bytes of files (the SQLite database, the artifact folder, log
files), so a secret that only reaches the store's own files (a column the API does not show) is found
too. Both return human-readable locations ("run <id> param key=...") for the assertion message.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path


def _hit(where: list[str], location: str, *texts: object, needle: str) -> None:
    for t in texts:
        if t is not None and needle in str(t):
            where.append(location)
            return


def _scan_artifacts(client, run_id: str, needle: bytes, where: list[str], label: str) -> int:
    """Download a run's artifacts and grep them; returns the number of files looked at."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=tmp,
                                                             tracking_uri=client.tracking_uri))
        except Exception:  # a run with no artifacts at all
            return 0
        return _grep_tree(local, needle, where, label)


def _grep_tree(root: Path, needle: bytes, where: list[str], label: str) -> int:
    n = 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            n += 1
            if needle in p.read_bytes() or needle in str(p.relative_to(root)).encode():
                where.append(f"{label} artifact {p.relative_to(root)}")
    return n


def scan_store(client, needle: str) -> tuple[list[str], dict[str, int]]:
    """(locations of `needle`, counts of what was looked at) in everything the API shows."""
    import mlflow

    where: list[str] = []
    seen = {"experiments": 0, "runs": 0, "params": 0, "tags": 0, "metrics": 0, "logged_models": 0,
            "registered_versions": 0, "artifact_files": 0}
    needle_b = needle.encode()
    exps = client.search_experiments(view_type=3)  # ALL: active and deleted
    for exp in exps:
        seen["experiments"] += 1
        _hit(where, f"experiment {exp.experiment_id} name/tags", exp.name, exp.tags, needle=needle)
        for run in client.search_runs([exp.experiment_id], run_view_type=3, max_results=10000):
            rid = run.info.run_id
            seen["runs"] += 1
            _hit(where, f"run {rid} name", run.info.run_name, needle=needle)
            for k, v in run.data.params.items():
                seen["params"] += 1
                _hit(where, f"run {rid} param {k}", k, v, needle=needle)
            for k, v in run.data.tags.items():
                seen["tags"] += 1
                _hit(where, f"run {rid} tag {k}", k, v, needle=needle)
            for k in run.data.metrics:
                seen["metrics"] += 1
                _hit(where, f"run {rid} metric name {k}", k, needle=needle)
            for d in (run.inputs.dataset_inputs if run.inputs else []):
                _hit(where, f"run {rid} dataset input", d.dataset.name, d.dataset.source,
                     d.dataset.profile, d.dataset.schema, needle=needle)
            seen["artifact_files"] += _scan_artifacts(client, rid, needle_b, where, f"run {rid}")
        for model in client.search_logged_models(experiment_ids=[exp.experiment_id]):
            seen["logged_models"] += 1
            mid = model.model_id
            _hit(where, f"logged model {mid} name", model.name, needle=needle)
            for k, v in (model.params or {}).items():
                _hit(where, f"logged model {mid} param {k}", k, v, needle=needle)
            for k, v in (model.tags or {}).items():
                _hit(where, f"logged model {mid} tag {k}", k, v, needle=needle)
            for m in model.metrics or []:
                _hit(where, f"logged model {mid} metric name {m.key}", m.key, needle=needle)
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mid}", dst_path=tmp))
                except Exception as err:  # a model without files is itself worth a look
                    where.append(f"logged model {mid}: artifacts not readable ({type(err).__name__})")
                    continue
                seen["artifact_files"] += _grep_tree(local, needle_b, where, f"logged model {mid}")
    for rm in client.search_registered_models():
        _hit(where, f"registered model {rm.name}", rm.name, rm.description, rm.tags, rm.aliases, needle=needle)
        for mv in client.search_model_versions(f"name = '{rm.name}'"):
            seen["registered_versions"] += 1
            _hit(where, f"registered model {rm.name} version {mv.version}", mv.description, mv.tags,
                 mv.source, mv.run_id, needle=needle)
    return where, seen


def scan_paths(paths: Iterable[Path], needle: str) -> tuple[list[str], int]:
    """(files whose bytes contain needle, files looked at) under the given files and folders."""
    needle_b = needle.encode()
    where, n = [], 0
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            n += 1
            if needle_b in p.read_bytes():
                where.append(str(p))
    return where, n
