"""`persist_and_register`: make a reference-only model self-contained, register it, gate its promotion.

Input: `model_uri` = `models:/<model_id>` of an E2E extractor that only refers to its base (what
log_reference logged and evaluate_checkpoint scored). The step
  1. persists: logs a NEW model (`e2e-extractor-persisted`) in this run holding the source model's
     files (adapter, base_reference.json, code, environment) plus `base/` = the pinned base files,
     streamed file by file and verified against the manifest's sha256 (lora_pipeline/registry/persist.py). The new
     model is PENDING while it is written and READY only once every file is verified; the source
     model is never modified. Base + adapter, not merged weights: see the README ("Why base +
     adapter"). Once persisted, the model loads with the Hub unreachable and the snapshot run gone;
  2. registers the READY model (`mlflow.register_model`) with its lineage as version tags;
  3. gates: the version gets alias `challenger`, and `champion` only if its evaluation metric
     (`gate_metric`, on the source model, written by evaluate_checkpoint) beats the current
     champion's by at least `gate_margin` and beats the base model's. `dry_run` reports the
     decision and changes nothing in the registry.
Idempotent: a version already registered for the same source model is reused (no second version),
and a persist interrupted before (PENDING or FAILED leftovers) is discarded and redone.
Every input is checked before anything changes: a bad input leaves the registry as it was.
Output tags: `registered` = models:/<name>/<version>, `alias`, `decision`, `persisted_model`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_pipeline import artifacts
from lora_pipeline.artifacts import (  # shared with the other steps; re-exported for callers and tests
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    DATASET_DIGEST_TAG,
    EVAL_PREFIX,
    EVAL_RUN_TAG,
    GATE_PREFIX,
    LINEAGE_PREFIX,
    MLMODEL_FILE,
    MODEL_ARTIFACTS_DIR,
    PERSIST_STATE_TAG,
    SOURCE_MODEL_ID_TAG,
    SOURCE_MODEL_TAG,
    STATE_COMPLETE,
    STATE_COPYING,
    STATE_DISCARDED,
)
from lora_pipeline.cli import param, run_cli
from lora_pipeline.errors import InputError, Problem, Problems, StepError, one_line

log = logging.getLogger(__name__)

ENTRY_POINT = "persist_and_register"

FINETUNE_ENTRY_POINT = "finetune"

# Metrics for which lower is better; every other metric is "higher is better".
LOWER_IS_BETTER = ("unparsable_rate",)
# A registered name ends up in `models:/<name>@<alias>` and `models:/<name>/<version>` URIs and, in
# file stores, in paths: MLflow rejects '/', ':' and (file store) '%' and names that are not their
# own normalised path; '@' would make `models:/<name>@champion` ambiguous; quotes and backticks
# would break the registry search filters this step (and others) build from the name.
_BAD_NAME_CHARS = ("/", ":", "%", "@", "\\", "'", '"', "`")
_MODEL_ID_LIKE = re.compile(r"^m-[0-9a-f]{32}$")
_METRIC_NAME = re.compile(r"^[\w./\- ]+$")
_MAX_LINEAGE_HOPS = 6
# What persisting leaves out of the source model: optimizer/scheduler state is for resuming training.
_SKIP_ARTIFACTS = (artifacts.TRAINER_STATE_ARTIFACT,)

DECISION_PROMOTE = "promote"
DECISION_KEEP = "keep"
DECISION_ALREADY = "already_champion"


@dataclass
class Args:
    model_uri: str = param("", "model to persist and register: models:/<model_id> printed by "
                           "log_reference or evaluate_checkpoint (an E2E extractor that refers to its "
                           "base and was evaluated)")
    registered_name: str = param(artifacts.DEFAULT_REGISTERED_NAME, "registered model name in the MLflow "
                                 "Model Registry")
    gate_metric: str = param("slot_f1", "evaluation metric the promotion gate compares, as "
                             "evaluate_checkpoint logged it on the model (base_<metric> is the base "
                             "model's); higher is better except unparsable_rate")
    gate_margin: float = param(0.01, "the new version becomes champion only if its gate_metric "
                               "beats the current champion's by at least this much (and beats the "
                               "base model)")
    dry_run: bool = param(False, "report the gate decision only (in the run and the output): "
                          "persist nothing, register nothing, move no alias")


@dataclass
class Decision:
    decision: str  # promote | keep | already_champion
    reason: str
    metric: str
    margin: float
    candidate: float
    base: float
    champion_version: str = ""
    champion: float | None = None

    @property
    def alias(self) -> str:
        return CHAMPION_ALIAS if self.decision in (DECISION_PROMOTE, DECISION_ALREADY) else CHALLENGER_ALIAS

    def tags(self) -> dict[str, str]:
        out = {"decision": self.decision, "reason": self.reason, "metric": self.metric,
               "margin": repr(self.margin), "candidate": repr(self.candidate),
               "base": repr(self.base), "champion_version": self.champion_version,
               "champion": "" if self.champion is None else repr(self.champion)}
        return {GATE_PREFIX + k: v for k, v in out.items()}


@dataclass
class Result:
    run_id: str
    registered_name: str
    version: str  # "" in dry_run
    registered_uri: str  # models:/<name>/<version>, "" in dry_run
    alias: str  # champion | challenger ("" in dry_run)
    decision: str
    reason: str
    gate_metric: str
    candidate_value: float
    base_value: float
    champion_version: str
    champion_value: float | None
    dry_run: bool
    reused_version: bool
    source_model_uri: str
    persisted_model_uri: str
    persisted_bytes: int
    persist_seconds: float
    lineage: dict[str, str] = field(default_factory=dict)


# --- validation --------------------------------------------------------------------------------
def name_problem(name: str) -> str | None:
    """Why `name` cannot be a registered model name, or None."""
    import posixpath

    if not name or not name.strip():
        return "is empty"
    if name != name.strip():
        return "has leading or trailing whitespace"
    bad = [c for c in _BAD_NAME_CHARS if c in name]
    if bad:
        return f"contains {', '.join(repr(c) for c in bad)}"
    if posixpath.normpath(name) != name or name in (".", ".."):
        return "is not a plain name (it resolves to another path)"
    if _MODEL_ID_LIKE.match(name):
        return "looks like a logged model id (models:/m-... would be ambiguous)"
    if len(name) > 256:
        return "is longer than 256 characters"
    return None


def validate_static(args: Args) -> Problems:
    problems = Problems()
    if not args.model_uri:
        problems.add("model_uri", args.model_uri, "is required",
                     "pass the models:/<model_id> URI that log_reference (or evaluate_checkpoint) printed")
    elif artifacts.parse_model_id_uri(args.model_uri) is None:
        problems.add("model_uri", args.model_uri, "is not a logged model URI models:/<model_id>",
                     "pass the models:/m-... URI that log_reference (or evaluate_checkpoint) printed")
    why = name_problem(args.registered_name)
    if why:
        problems.add("registered_name", args.registered_name, why,
                     "use letters, digits, '-', '_', '.' and spaces, e.g. e2e-extractor")
    problems.require(bool(args.gate_metric) and bool(_METRIC_NAME.match(args.gate_metric)),
                     "gate_metric", args.gate_metric, "is not a metric name",
                     "pass a metric evaluate_checkpoint logs, e.g. slot_f1 or exact_match")
    if not math.isfinite(args.gate_margin) or args.gate_margin < 0:
        problems.add("gate_margin", args.gate_margin, "must be a finite number >= 0",
                     "pass e.g. 0.01 (one F1 point)")
    return problems


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {one_line(err)}"


def check_registry(client) -> None:
    """One cheap call, before anything changes: an unreachable registry is a clear error, not a
    half-done persist."""
    import mlflow

    try:
        client.search_registered_models(max_results=1)
    except Exception as err:  # MLflow wraps connection/HTTP/DB errors in several types
        raise StepError(f"model registry at {mlflow.get_registry_uri()} is unreachable ({_short(err)}); "
                        "check MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI and that the server is up; "
                        "nothing was changed") from err


# --- reading the source model --------------------------------------------------------------------
@dataclass
class Source:
    model: Any  # mlflow.entities.LoggedModel
    mlmodel: dict
    manifest: Any  # lora_pipeline.base.manifest.Manifest
    metrics: dict[str, float]
    metric_runs: dict[str, str]

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def artifact_names(self) -> dict:
        return self.mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts") or {}

    @property
    def self_contained(self) -> bool:
        names = self.artifact_names
        return artifacts.FULL_MODEL_ARTIFACT in names or artifacts.PERSISTED_BASE_ARTIFACT in names


@contextlib.contextmanager
def quiet_downloads():
    """MLflow draws a progress bar per download call; a dozen bars for a few kB of small files is noise."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def _repo(location: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(location)


def latest_metrics(model) -> tuple[dict[str, float], dict[str, str]]:
    """The newest value of each metric logged on a LoggedModel, and the run that logged it."""
    best: dict[str, Any] = {}
    for m in model.metrics or []:
        if m.key not in best or (m.timestamp, m.step) >= (best[m.key].timestamp, best[m.key].step):
            best[m.key] = m
    return ({k: float(m.value) for k, m in best.items()},
            {k: m.run_id or "" for k, m in best.items()})


def read_source(client, args: Args) -> Source:
    import yaml
    from mlflow.exceptions import MlflowException

    from lora_pipeline.base.manifest import Manifest

    model_id = artifacts.parse_model_id_uri(args.model_uri)
    try:
        lm = client.get_logged_model(model_id)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise InputError(Problem("model_uri", args.model_uri, "no such logged model in the "
                                     "tracking store", "pass the models:/<model_id> URI that "
                                     "log_reference printed (same MLFLOW_TRACKING_URI)")) from err
        raise StepError(f"cannot read model {args.model_uri} ({_short(err)})") from err
    if str(lm.status) != "READY":
        raise InputError(Problem("model_uri", args.model_uri, f"is {lm.status}, not READY (its "
                                 "logging failed or never finished)", "log the model again with "
                                 "log_reference and evaluate it"))
    repo = _repo(lm.artifact_location)
    with tempfile.TemporaryDirectory() as tmp, quiet_downloads():
        try:
            mlmodel = yaml.safe_load(Path(repo.download_artifacts(MLMODEL_FILE, tmp)).read_text())
            ref = f"{MODEL_ARTIFACTS_DIR}/{artifacts.BASE_REF_ARTIFACT}"
            manifest = Manifest.from_json(Path(repo.download_artifacts(ref, tmp)).read_text())
        except (OSError, MlflowException) as err:
            raise InputError(Problem("model_uri", args.model_uri, "is not an E2E extractor model "
                                     f"(no {artifacts.BASE_REF_ARTIFACT} / MLmodel: {_short(err)})",
                                     "pass the model log_reference logged")) from err
    metrics, runs = latest_metrics(lm)
    return Source(lm, mlmodel or {}, manifest, metrics, runs)


# --- lineage ----------------------------------------------------------------------------------------
def _get_run(client, run_id: str | None):
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:  # a deleted or foreign run: lineage is best effort, the gate does not need it
        return None


def find_finetune_run(client, model):
    """The finetune run behind a model: its source run, or follow models:/ references (log_reference's
    `pipeline.source_model` tag, a `checkpoint_uri` parameter, ...) a few hops back."""
    frontier, seen = [model], set()
    for _ in range(_MAX_LINEAGE_HOPS):
        nxt = []
        for m in frontier:
            if m.model_id in seen:
                continue
            seen.add(m.model_id)
            run = _get_run(client, m.source_run_id)
            if run is not None and run.data.tags.get(artifacts.STEP_TAG) == FINETUNE_ENTRY_POINT:
                return run
            refs = [(m.tags or {}).get(SOURCE_MODEL_TAG, "")] + list((m.tags or {}).values())
            refs += list((m.params or {}).values())
            if run is not None:
                refs += list(run.data.params.values())
            for ref in refs:
                mid = artifacts.parse_model_id_uri(str(ref))
                if mid and mid not in seen:
                    try:
                        nxt.append(client.get_logged_model(mid))
                    except Exception:  # a reference to a deleted model: keep looking elsewhere
                        continue
        if not nxt:
            return None
        frontier = nxt
    return None


def lineage_tags(client, source: Source) -> dict[str, str]:
    from lora_pipeline.tracking.runs import pipeline_git_commit

    man = source.manifest
    tags = {
        "source_model": artifacts.model_uri(source.model_id),
        "base_reference": man.reference(),
        "base_source": man.source,
        "base_manifest_digest": man.digest(),
        "pipeline_git_commit": pipeline_git_commit(),
    }
    if man.is_hub:
        tags.update(base_repo=man.repo_id, base_commit=man.commit)
    if man.artifact_uri:
        tags["base_snapshot_uri"] = man.artifact_uri
    ft = find_finetune_run(client, source.model)
    tags["finetune_run_id"] = ft.info.run_id if ft else ""
    digest = (ft.data.tags.get(DATASET_DIGEST_TAG) if ft else None) or \
        (source.model.tags or {}).get(DATASET_DIGEST_TAG, "")
    tags["dataset_digest"] = digest
    if ft is not None and ft.data.tags.get(artifacts.GIT_COMMIT_TAG):
        tags["finetune_git_commit"] = ft.data.tags[artifacts.GIT_COMMIT_TAG]
    tags["eval_run_id"] = (source.model.tags or {}).get(EVAL_RUN_TAG, "") or \
        source.metric_runs.get("slot_f1", "")
    missing = [k for k in ("finetune_run_id", "dataset_digest", "eval_run_id") if not tags[k]]
    if missing:
        log.warning("lineage incomplete for %s: no %s found", artifacts.model_uri(source.model_id),
                    ", ".join(missing))
    return {LINEAGE_PREFIX + k: str(v) for k, v in tags.items()}


# --- the gate --------------------------------------------------------------------------------------
def _better(metric: str, a: float, b: float) -> float:
    """How much better a is than b (positive = better), whatever the metric's direction."""
    return (b - a) if metric in LOWER_IS_BETTER or metric.endswith("loss") else (a - b)


def _version_metric(client, mv, metric: str) -> float | None:
    tag = (mv.tags or {}).get(EVAL_PREFIX + metric)
    if tag not in (None, ""):
        return float(tag)
    model_id = getattr(mv, "model_id", None) or artifacts.parse_model_id_uri(mv.source or "")
    if model_id:
        try:
            metrics, _ = latest_metrics(client.get_logged_model(model_id))
        except Exception:  # the champion's model is gone: fall through to "unknown"
            return None
        return metrics.get(metric)
    return None


def current_champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None  # no such registered model yet, or no champion alias
        raise StepError(f"cannot read alias {CHAMPION_ALIAS} of {name} ({_short(err)})") from err


def decide(args: Args, source: Source, champion, champion_value: float | None,
           own_version: str | None) -> Decision:
    metric = args.gate_metric
    cand = source.metrics[metric]
    base = source.metrics[f"base_{metric}"]
    d = Decision(DECISION_KEEP, "", metric, args.gate_margin, cand, base)
    if champion is not None:
        d.champion_version, d.champion = str(champion.version), champion_value
    if champion is not None and own_version is not None and str(champion.version) == str(own_version):
        d.decision, d.reason = DECISION_ALREADY, f"version {own_version} already is {CHAMPION_ALIAS}"
        return d
    over_base = _better(metric, cand, base)
    if over_base <= 0:
        d.reason = f"{metric} {cand:.4f} does not beat the base model's {base:.4f}"
        return d
    if champion is None:
        d.decision = DECISION_PROMOTE
        d.reason = f"no {CHAMPION_ALIAS} yet; {metric} {cand:.4f} beats the base model's {base:.4f}"
        return d
    gain = _better(metric, cand, champion_value)
    # 1e-12: a gain of exactly the margin passes despite float rounding (0.81 - 0.80 = 0.0100000000000000089).
    if gain + 1e-12 >= args.gate_margin:
        d.decision = DECISION_PROMOTE
        d.reason = (f"{metric} {cand:.4f} beats {CHAMPION_ALIAS} v{champion.version} "
                    f"({champion_value:.4f}) by {gain:+.4f} >= margin {args.gate_margin} and the "
                    f"base model ({base:.4f})")
    else:
        d.reason = (f"{metric} {cand:.4f} vs {CHAMPION_ALIAS} v{champion.version} "
                    f"({champion_value:.4f}): {gain:+.4f} < margin {args.gate_margin}")
    return d


def check_gate_inputs(args: Args, source: Source) -> None:
    metric = args.gate_metric
    missing = [k for k in (metric, f"base_{metric}") if k not in source.metrics]
    if missing:
        have = ", ".join(sorted(source.metrics)) or "none"
        raise InputError(Problem(
            "model_uri", args.model_uri,
            f"has no evaluation metric {' / '.join(missing)} (metrics on the model: {have}); the "
            "promotion gate needs it",
            f"run evaluate_checkpoint --model_uri {args.model_uri} first"
            + ("" if not source.metrics else ", or pick a gate_metric it has")))


# --- finding earlier work ---------------------------------------------------------------------------
def registered_version_for(client, name: str, source_id: str):
    versions = client.search_model_versions(
        f"name = '{name}' and tags.`{SOURCE_MODEL_ID_TAG}` = '{source_id}'")
    versions = [v for v in versions if v.status == "READY"]
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _persisted_models(client, experiment_ids: list[str], source_id: str) -> list:
    return list(client.search_logged_models(
        experiment_ids=experiment_ids,
        filter_string=f"tags.`{SOURCE_MODEL_ID_TAG}` = '{source_id}'"))


def _discard(client, lm, why: str, *, stale: bool = False) -> None:
    """Drop an unfinished persisted model: status FAILED, files deleted, tagged `discarded` (the record
    stays, so the run that made it still shows what happened). `stale`: left by an earlier run; if
    that run still reads RUNNING, it was killed (kill -9 ends no run): mark it KILLED."""
    import shutil

    from lora_pipeline.registry.persist import local_path_of

    log.warning("discarding unfinished persisted model %s (%s; run %s)", lm.model_id, why,
                lm.source_run_id)
    try:
        if str(lm.status) != "FAILED":
            client.finalize_logged_model(lm.model_id, "FAILED")
        local = local_path_of(lm.artifact_location)
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)
        else:
            _repo(lm.artifact_location).delete_artifacts()
        client.set_logged_model_tags(lm.model_id, {PERSIST_STATE_TAG: STATE_DISCARDED})
        run = _get_run(client, lm.source_run_id) if stale else None
        if run is not None and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
    except Exception as err:  # cleanup is best effort: the model is never READY, never registered
        log.warning("could not fully discard %s (%s)", lm.model_id, _short(err))


def reusable_persisted(client, experiment_ids: list[str], source_id: str):
    """A READY, completely persisted model of this source (a run killed after persisting, before
    registering), after discarding every unfinished one (a killed or failed persist)."""
    ready = None
    for lm in _persisted_models(client, experiment_ids, source_id):
        state = (lm.tags or {}).get(PERSIST_STATE_TAG)
        if state == STATE_DISCARDED:
            continue
        if str(lm.status) == "READY" and state == STATE_COMPLETE:
            ready = ready or lm
        else:
            _discard(client, lm, f"status {lm.status}, state {state}", stale=True)
    return ready


# --- persisting ---------------------------------------------------------------------------------------
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


def _download_source_files(source: Source, dest: Path) -> None:
    """Copy the source model's files except MLmodel (written last) and training state: whole
    folders where nothing inside is skipped, so a model is a handful of downloads."""
    repo = _repo(source.model.artifact_location)
    skip = {f"{MODEL_ARTIFACTS_DIR}/{a}" for a in _SKIP_ARTIFACTS} | {MLMODEL_FILE}

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


def _verify_source_files(source: Source, local: Path) -> None:
    from lora_pipeline.model.serving import verify_artifacts

    arts = (source.mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts") or {})
    paths = {name: local / spec["path"] for name, spec in arts.items()
             if name not in _SKIP_ARTIFACTS and (local / spec["path"]).exists()}
    verify_artifacts(paths, artifacts.model_uri(source.model_id))


def _write_mlmodel(source: Source, new, run_id: str, dest: Path) -> None:
    """The source's MLmodel, re-identified as the new model, with `base` among its artifacts."""
    from datetime import UTC, datetime

    import yaml

    mlmodel = dict(source.mlmodel)
    pyfunc = dict(mlmodel["flavors"]["python_function"])
    arts = {k: v for k, v in (pyfunc.get("artifacts") or {}).items() if k not in _SKIP_ARTIFACTS}
    arts[artifacts.PERSISTED_BASE_ARTIFACT] = {
        "path": f"{MODEL_ARTIFACTS_DIR}/{artifacts.PERSISTED_BASE_ARTIFACT}",
        "uri": source.manifest.reference()}
    pyfunc["artifacts"] = arts
    mlmodel["flavors"] = {**mlmodel["flavors"], "python_function": pyfunc}
    mlmodel.update(artifact_path=new.artifact_location, model_id=new.model_id,
                   model_uuid=new.model_id, run_id=run_id,
                   utc_time_created=str(datetime.now(UTC).replace(tzinfo=None)))
    meta = dict(mlmodel.get("metadata") or {})
    meta.update(persisted_from=artifacts.model_uri(source.model_id), base_persisted=True)
    mlmodel["metadata"] = meta
    if isinstance(mlmodel.get("model_size_bytes"), int):
        mlmodel["model_size_bytes"] += source.manifest.total_bytes
    (dest / MLMODEL_FILE).write_text(yaml.safe_dump(mlmodel, sort_keys=False))


def persist(client, source: Source, run, lineage: dict[str, str]):
    """Log the self-contained copy of `source` in `run`; returns (LoggedModel READY, PersistStats)."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    from lora_pipeline.registry.persist import PersistStats, check_sizes, persist_files

    run_id = run.info.run_id
    src_root = base_source_dir(source.manifest)  # before creating anything: a missing base leaves nothing
    new = client.create_logged_model(
        run.info.experiment_id, name=artifacts.PERSISTED_MODEL_NAME, source_run_id=run_id,
        tags={SOURCE_MODEL_ID_TAG: source.model_id, PERSIST_STATE_TAG: STATE_COPYING, **lineage},
        params={"source_model": artifacts.model_uri(source.model_id)})
    client.log_outputs(run_id, [LoggedModelOutput(new.model_id, step=0)])
    log.info("persisting %s into %s (%d base files, %.1f MB from %s)",
             artifacts.model_uri(source.model_id), artifacts.model_uri(new.model_id),
             len(source.manifest.files), source.manifest.total_bytes / 1e6, src_root)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            small = Path(tmp) / "model"
            small.mkdir()
            _download_source_files(source, small)
            # Never register a copy of a corrupt adapter: check it against its logged digests first.
            _verify_source_files(source, small)
            client.log_model_artifacts(new.model_id, str(small))
            stats: PersistStats = persist_files(
                src_root, source.manifest, new.artifact_location,
                f"{MODEL_ARTIFACTS_DIR}/{artifacts.PERSISTED_BASE_ARTIFACT}")
            check_sizes(source.manifest, new.artifact_location,
                        f"{MODEL_ARTIFACTS_DIR}/{artifacts.PERSISTED_BASE_ARTIFACT}")
            # MLmodel last: until every base file is verified, the new model is not even loadable.
            meta = Path(tmp) / "meta"
            meta.mkdir()
            _write_mlmodel(source, new, run_id, meta)
            client.log_model_artifact(new.model_id, str(meta / MLMODEL_FILE))
        if source.metrics:
            mlflow.log_metrics(source.metrics, model_id=new.model_id, run_id=run_id)
        client.set_logged_model_tags(new.model_id, {PERSIST_STATE_TAG: STATE_COMPLETE})
        new = client.finalize_logged_model(new.model_id, "READY")
    except BaseException as err:
        try:
            _discard(client, client.get_logged_model(new.model_id), f"persist failed: {_short(err)}")
        except Exception as cleanup_err:  # the store itself failed: a rerun discards it instead
            log.warning("could not discard %s (%s)", new.model_id, _short(cleanup_err))
        raise
    log.info("persisted %.1f MB in %.1fs (%.0f MB/s)", stats.bytes / 1e6, stats.seconds, stats.mb_per_s)
    return new, stats


# --- the step ---------------------------------------------------------------------------------------
def gate(client, args: Args, source: Source, existing_version: str | None) -> Decision:
    """The promotion decision against the registry as it is now."""
    name = args.registered_name
    champion = current_champion(client, name)
    champion_value = None
    if champion is not None and str(champion.version) != str(existing_version):
        champion_value = _version_metric(client, champion, args.gate_metric)
        if champion_value is None:
            raise InputError(Problem(
                "gate_metric", args.gate_metric,
                f"the current {CHAMPION_ALIAS} of {name} (version {champion.version}) has no "
                f"{args.gate_metric} metric to compare with",
                f"evaluate that version, or pick a gate_metric it has (version tags {EVAL_PREFIX}*)"))
    return decide(args, source, champion, champion_value, existing_version)


def _record(decision: Decision, dry_run: bool) -> None:
    import mlflow

    numbers = {"gate.candidate": decision.candidate, "gate.base": decision.base}
    if decision.champion is not None:
        numbers["gate.champion"] = decision.champion
    mlflow.log_metrics(numbers)
    mlflow.set_tags({**decision.tags(), "gate.dry_run": str(dry_run).lower()})


def ensure_persisted(client, source: Source, active, lineage: dict[str, str], result: Result) -> str:
    """The id of a READY self-contained model of `source`: the source itself if it already holds
    its weights, one a killed run persisted, or a new one persisted now."""
    import mlflow

    if source.self_contained:
        log.info("%s already holds its weights: registering it as is", result.source_model_uri)
        return source.model_id
    exps = sorted({active.info.experiment_id, source.model.experiment_id})
    persisted = reusable_persisted(client, exps, source.model_id)
    if persisted is not None:
        log.info("reusing %s, persisted by run %s", persisted.model_id, persisted.source_run_id)
        return persisted.model_id
    started = time.perf_counter()
    persisted, stats = persist(client, source, active, lineage)
    result.persisted_bytes = stats.bytes
    result.persist_seconds = round(time.perf_counter() - started, 3)
    mlflow.log_metrics({"persist.bytes": stats.bytes, "persist.seconds": stats.seconds,
                        "persist.mb_per_s": stats.mb_per_s})
    return persisted.model_id


def run(args: Args) -> Result:
    import mlflow
    from mlflow.exceptions import MlflowException

    from lora_pipeline.cli import configure_tracking
    from lora_pipeline.tracking.runs import step_run

    # Everything is checked before the run starts: a bad input leaves no run and no registry change.
    validate_static(args).raise_if_any()
    configure_tracking()
    client = mlflow.MlflowClient()
    check_registry(client)
    source = read_source(client, args)
    check_gate_inputs(args, source)
    name = args.registered_name
    existing = registered_version_for(client, name, source.model_id)
    decision = gate(client, args, source, str(existing.version) if existing else None)
    lineage = lineage_tags(client, source)
    log.info("gate: %s (%s)", decision.decision, decision.reason)

    with step_run(ENTRY_POINT, args) as active:
        run_id = active.info.run_id
        mlflow.set_tags(lineage)
        result = Result(run_id=run_id, registered_name=name, version="", registered_uri="", alias="",
                        decision=decision.decision, reason=decision.reason, gate_metric=decision.metric,
                        candidate_value=decision.candidate, base_value=decision.base,
                        champion_version=decision.champion_version, champion_value=decision.champion,
                        dry_run=args.dry_run, reused_version=existing is not None,
                        source_model_uri=artifacts.model_uri(source.model_id), persisted_model_uri="",
                        persisted_bytes=0, persist_seconds=0.0, lineage=lineage)
        if args.dry_run:
            _record(decision, dry_run=True)
            artifacts.set_outputs(client, run_id, {"decision": decision.decision})
            log.info("dry run: %s (%s); the registry is unchanged", decision.decision, decision.reason)
            return result

        if existing is not None:
            persisted_id = (getattr(existing, "model_id", None)
                            or artifacts.parse_model_id_uri(existing.source or "") or "")
            log.info("%s is already registered as %s version %s: reusing it",
                     result.source_model_uri, name, existing.version)
        else:
            persisted_id = ensure_persisted(client, source, active, lineage, result)
        try:
            version = existing or mlflow.register_model(
                artifacts.model_uri(persisted_id), name,
                tags={SOURCE_MODEL_ID_TAG: source.model_id,
                      **{EVAL_PREFIX + k: repr(v) for k, v in source.metrics.items()},
                      **lineage, LINEAGE_PREFIX + "persisted_model": artifacts.model_uri(persisted_id)})
            v = str(version.version)
            # Decided again now: the champion may have moved while the base was being copied.
            decision = gate(client, args, source, v)
            _record(decision, dry_run=False)
            for key, value in {**decision.tags(), GATE_PREFIX + "run_id": run_id}.items():
                client.set_model_version_tag(name, v, key, value)
            # A rerun for an older version must not pull `challenger` back from a newer one; only a
            # version without any alias yet (new, or registered by a run killed before this) gets it.
            # (search_model_versions leaves `aliases` empty: ask for the version itself.)
            if existing is None or not client.get_model_version(name, v).aliases:
                client.set_registered_model_alias(name, CHALLENGER_ALIAS, v)
            if decision.decision == DECISION_PROMOTE:
                client.set_registered_model_alias(name, CHAMPION_ALIAS, v)
                log.info("%s version %s is the new %s", name, v, CHAMPION_ALIAS)
        except MlflowException as err:
            raise StepError(f"registering {artifacts.model_uri(persisted_id)} as {name} failed "
                            f"({_short(err)}); the persisted model is kept and verified: rerun "
                            "persist_and_register to finish (it reuses it)") from err
        registered = f"models:/{name}/{v}"
        artifacts.set_outputs(client, run_id, {
            "decision": decision.decision, "registered": registered, "alias": decision.alias,
            "persisted_model": artifacts.model_uri(persisted_id)})
        result.version, result.registered_uri, result.alias = v, registered, decision.alias
        result.persisted_model_uri = artifacts.model_uri(persisted_id)
        result.decision, result.reason = decision.decision, decision.reason
        result.champion_version, result.champion_value = decision.champion_version, decision.champion
    log.info("registered %s (%s): %s", registered, decision.alias, decision.reason)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(Args, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
