"""The self-contained copy of a candidate: a NEW logged model holding the candidate's files plus `base/`.

The new model (`e2e-extractor-persisted`) is PENDING while it is written and READY only once every
file is verified; the candidate itself is never modified. Its own files (adapter, base reference,
code, environment) are downloaded and checked against their logged digests, the base files are
streamed and verified by lora_pipeline/registry/persist.py, and its MLmodel (which makes it loadable)
is written last. A copy that fails is discarded (lora_pipeline/registry/recovery.py).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lora_pipeline import artifacts
from lora_pipeline.errors import one_line
from lora_pipeline.registry.candidate import Candidate, artifact_repo, quiet_downloads
from lora_pipeline.registry.recovery import discard, reusable_persisted

log = logging.getLogger(__name__)

# What persisting leaves out of the candidate: optimizer/scheduler state is for resuming training.
_SKIP_ARTIFACTS = (artifacts.TRAINER_STATE_ARTIFACT,)
_BASE_PREFIX = f"{artifacts.MODEL_ARTIFACTS_DIR}/{artifacts.PERSISTED_BASE_ARTIFACT}"


@dataclass
class Persisted:
    model_id: str
    bytes: int = 0  # copied now (0: the candidate already held its weights, or a copy was reused)
    seconds: float = 0.0


def base_source_dir(manifest) -> Path:
    """A local directory holding the manifest's files: the snapshot run's own artifact directory when
    the store is local (read in place: one copy, verified while copying), else the verified copy that
    `serving.resolve_base` fetches (Hub / HF cache, or a download from a remote store)."""
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    from lora_pipeline.registry.persist import local_path_of

    if not manifest.is_hub and manifest.artifact_uri:
        try:
            uri = manifest.artifact_uri
            if RunsArtifactRepository.is_runs_uri(uri):
                uri = RunsArtifactRepository.get_underlying_uri(uri)
            local = local_path_of(uri)
        except Exception as err:  # the snapshot run is gone: resolve_base explains what to do
            log.debug("snapshot %s not readable in place (%s)", manifest.artifact_uri, err)
            local = None
        if local is not None and all((local / f.path).is_file() for f in manifest.files):
            return local
    from lora_pipeline.model.serving import resolve_base

    return resolve_base(manifest)


def _download_candidate_files(candidate: Candidate, dest: Path) -> None:
    """Copy the candidate's files except MLmodel (written last) and training state: whole
    folders where nothing inside is skipped, so a model is a handful of downloads."""
    repo = artifact_repo(candidate.model.artifact_location)
    skip = {f"{artifacts.MODEL_ARTIFACTS_DIR}/{a}" for a in _SKIP_ARTIFACTS} | {artifacts.MLMODEL_FILE}

    def walk(path: str | None) -> None:
        for info in repo.list_artifacts(path):
            if info.path in skip:
                continue
            if info.is_dir and any(s.startswith(info.path + "/") for s in skip):
                walk(info.path)
            else:
                (dest / info.path).parent.mkdir(parents=True, exist_ok=True)
                repo.download_artifacts(info.path, str(dest))

    with quiet_downloads():
        walk(None)


def _verify_candidate_files(candidate: Candidate, local: Path) -> None:
    from lora_pipeline.model.serving import verify_artifacts

    paths = {name: local / spec["path"] for name, spec in candidate.artifact_names.items()
             if name not in _SKIP_ARTIFACTS and (local / spec["path"]).exists()}
    verify_artifacts(paths, candidate.uri)


def write_mlmodel(candidate: Candidate, new, run_id: str, dest: Path) -> None:
    """The candidate's MLmodel, re-identified as the new model, with `base` among its artifacts."""
    from datetime import UTC, datetime

    import yaml

    mlmodel = dict(candidate.mlmodel)
    pyfunc = dict(mlmodel["flavors"]["python_function"])
    arts = {k: v for k, v in (pyfunc.get("artifacts") or {}).items() if k not in _SKIP_ARTIFACTS}
    arts[artifacts.PERSISTED_BASE_ARTIFACT] = {"path": _BASE_PREFIX, "uri": candidate.manifest.reference()}
    pyfunc["artifacts"] = arts
    mlmodel["flavors"] = {**mlmodel["flavors"], "python_function": pyfunc}
    mlmodel.update(artifact_path=new.artifact_location, model_id=new.model_id,
                   model_uuid=new.model_id, run_id=run_id,
                   utc_time_created=str(datetime.now(UTC).replace(tzinfo=None)))
    meta = dict(mlmodel.get("metadata") or {})
    meta.update(persisted_from=candidate.uri, base_persisted=True)
    mlmodel["metadata"] = meta
    if isinstance(mlmodel.get("model_size_bytes"), int):
        mlmodel["model_size_bytes"] += candidate.manifest.total_bytes
    (dest / artifacts.MLMODEL_FILE).write_text(yaml.safe_dump(mlmodel, sort_keys=False))


def persist(client, candidate: Candidate, run, lineage: dict[str, str]):
    """Log the self-contained copy of `candidate` in `run`; returns (LoggedModel READY, PersistStats)."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    from lora_pipeline.registry.persist import PersistStats, check_sizes, persist_files

    run_id = run.info.run_id
    src_root = base_source_dir(candidate.manifest)  # before creating anything: a missing base leaves nothing
    new = client.create_logged_model(
        run.info.experiment_id, name=artifacts.PERSISTED_MODEL_NAME, source_run_id=run_id,
        tags={artifacts.SOURCE_MODEL_ID_TAG: candidate.model_id,
              artifacts.PERSIST_STATE_TAG: artifacts.STATE_COPYING, **lineage},
        params={"source_model": candidate.uri})
    client.log_outputs(run_id, [LoggedModelOutput(new.model_id, step=0)])
    log.info("persisting %s into %s (%d base files, %.1f MB from %s)",
             candidate.uri, artifacts.model_uri(new.model_id),
             len(candidate.manifest.files), candidate.manifest.total_bytes / 1e6, src_root)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            small = Path(tmp) / "model"
            small.mkdir()
            _download_candidate_files(candidate, small)
            # Never register a copy of a corrupt adapter: check it against its logged digests first.
            _verify_candidate_files(candidate, small)
            client.log_model_artifacts(new.model_id, str(small))
            stats: PersistStats = persist_files(src_root, candidate.manifest, new.artifact_location,
                                                _BASE_PREFIX)
            check_sizes(candidate.manifest, new.artifact_location, _BASE_PREFIX)
            # MLmodel last: until every base file is verified, the new model is not even loadable.
            meta = Path(tmp) / "meta"
            meta.mkdir()
            write_mlmodel(candidate, new, run_id, meta)
            client.log_model_artifact(new.model_id, str(meta / artifacts.MLMODEL_FILE))
        if candidate.metrics:
            mlflow.log_metrics(candidate.metrics, model_id=new.model_id, run_id=run_id)
        client.set_logged_model_tags(new.model_id, {artifacts.PERSIST_STATE_TAG: artifacts.STATE_COMPLETE})
        new = client.finalize_logged_model(new.model_id, "READY")
    except BaseException as err:
        try:
            discard(client, client.get_logged_model(new.model_id),
                    f"persist failed: {type(err).__name__}: {one_line(err)}")
        except Exception as cleanup_err:  # the store itself failed: a rerun discards it instead
            log.warning("could not discard %s (%s: %s)", new.model_id, type(cleanup_err).__name__,
                        one_line(cleanup_err))
        raise
    log.info("persisted %.1f MB in %.1fs (%.0f MB/s)", stats.bytes / 1e6, stats.seconds, stats.mb_per_s)
    return new, stats


def ensure_persisted(client, candidate: Candidate, run, lineage: dict[str, str]) -> Persisted:
    """A READY self-contained model of `candidate`: the candidate itself if it already holds its
    weights, one a killed run persisted, or a new one persisted now (its numbers logged in `run`)."""
    import mlflow

    if candidate.self_contained:
        log.info("%s already holds its weights: registering it as is", candidate.uri)
        return Persisted(candidate.model_id)
    exps = sorted({run.info.experiment_id, candidate.model.experiment_id})
    earlier = reusable_persisted(client, exps, candidate.model_id)
    if earlier is not None:
        log.info("reusing %s, persisted by run %s", earlier.model_id, earlier.source_run_id)
        return Persisted(earlier.model_id)
    started = time.perf_counter()
    new, stats = persist(client, candidate, run, lineage)
    done = Persisted(new.model_id, stats.bytes, round(time.perf_counter() - started, 3))
    mlflow.log_metrics({"persist.bytes": stats.bytes, "persist.seconds": stats.seconds,
                        "persist.mb_per_s": stats.mb_per_s})
    return done
