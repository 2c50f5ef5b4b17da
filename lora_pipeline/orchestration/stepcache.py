"""The step cache of `main`: reuse a FINISHED step run whose inputs were exactly the same.

A step run is reusable when all of these match what `main` is about to run:
  * the entry point;
  * every parameter, compared as the strings MLflow stores (booleans lower-case, numbers through the
    step's own type, so `lr=1e-4` and `lr=0.0001` are the same value and `5` never differs from 5);
  * the pipeline's code version (`lora_pipeline.tracking.version.code_version`): a digest of the
    pipeline's own files (steps, core package, MLproject, requirements), never the commit, so a commit
    that touches only docs, tests or benchmarks reuses every step;
  * the digests of the step's inputs (`input digests`): a parameter that names a local file or folder
    is compared by content (sha256), not by path; a snapshot manifest URI by the manifest's digest,
    so a re-pinned but identical base still hits.
`main` records these as tags on each step run before it starts (`pipeline.cache.key` = sha256 of all
of them, plus the parts, for people reading the run), so a lookup is one indexed search. A hit is
used only after checking that everything it produced still exists (artifacts, logged models,
registered versions, the alias); a run whose outputs were deleted is reported and rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lora_pipeline import artifacts
from lora_pipeline.base.manifest import sha256_file

log = logging.getLogger(__name__)

_FULL_SHA = re.compile(r"^[0-9a-f]{40}$")


# --- input digests -----------------------------------------------------------------------------

def path_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's (relative path, sha256) list: content, not location."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_file() and not any(part in (".git", ".cache", "__pycache__") for part in rel.parts):
            h.update(rel.as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return "dir-" + h.hexdigest()


def local_path(value: str, cwd: Path | None = None) -> Path | None:
    """The existing local file or folder a parameter value names, else None (URIs are not paths)."""
    if not value or "://" in value or value.startswith(("runs:/", "models:/")):
        return None
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = (cwd or Path.cwd()) / p
    return p.resolve() if p.exists() else None


def uri_digest(client, uri: str) -> str:
    """What a URI input is compared by. A snapshot manifest: its digest (the same base pinned
    twice is the same input). Anything else (`models:/<id>`, other `runs:/` URIs) names something
    immutable and unique already: the URI itself."""
    parsed = artifacts.parse_runs_uri(uri)
    if parsed and parsed[1] == artifacts.MANIFEST_PATH:
        try:
            digest = client.get_run(parsed[0]).data.tags.get(artifacts.MANIFEST_DIGEST_TAG)
        except Exception:  # a deleted or foreign run: fall back to the URI (a miss, never a false hit)
            digest = None
        if digest:
            return "manifest-" + digest
    return uri


# --- the key -----------------------------------------------------------------------------------

@dataclass
class CacheKey:
    """Everything a step run is reused by; `digest` is what gets stored and searched."""

    entry_point: str
    params: dict[str, str]  # compared as strings
    input_digests: dict[str, str]  # param name -> content digest (these params are not in `params`)
    code_version: str
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        payload = {"entry_point": self.entry_point, "params": self.params,
                   "inputs": self.input_digests, "code": self.code_version}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        self.digest = hashlib.sha256(canonical.encode()).hexdigest()

    def tags(self) -> dict[str, str]:
        out = {artifacts.CACHE_KEY_TAG: self.digest, artifacts.CODE_VERSION_TAG: self.code_version}
        out.update({artifacts.INPUT_DIGEST_TAG_PREFIX + k: v for k, v in self.input_digests.items()})
        return out


def make_key(client, entry_point: str, params: Mapping[str, str], *, code: str,
             exclude: Iterable[str] = (), cwd: Path | None = None,
             fixed_digests: Mapping[str, str] | None = None) -> CacheKey:
    """Build the key of running `entry_point` with `params` (all strings).

    `exclude`: parameters that do not change the result (e.g. `resume_from`). A parameter naming an
    existing local path, or a manifest URI, is keyed by its content digest instead of its text;
    `fixed_digests` overrides the digest of named parameters (e.g. a pinned package for `default`).
    """
    skip = set(exclude)
    fixed = dict(fixed_digests or {})
    keyed: dict[str, str] = {}
    digests: dict[str, str] = {}
    for name, value in sorted(params.items()):
        if name in skip:
            continue
        value = str(value)
        if name in fixed:
            digests[name] = fixed[name]
            continue
        path = local_path(value, cwd)
        if path is not None:
            digests[name] = path_digest(path)
        elif artifacts.parse_runs_uri(value) and artifacts.parse_runs_uri(value)[1] == artifacts.MANIFEST_PATH:
            digests[name] = uri_digest(client, value)
        else:
            keyed[name] = value
    return CacheKey(entry_point, keyed, digests, code)


# --- lookup ------------------------------------------------------------------------------------

def _search(client, experiment_id: str, key: CacheKey, statuses: Iterable[str]) -> list:
    # (MLflow's run search accepts IN only for run_id: statuses are filtered here.)
    wanted = set(statuses)
    flt = (f"tags.`{artifacts.CACHE_KEY_TAG}` = '{key.digest}' AND tags.`{artifacts.STEP_TAG}` = "
           f"'{key.entry_point}'")
    runs = client.search_runs([experiment_id], filter_string=flt, max_results=200,
                              order_by=["attributes.start_time DESC"])
    return [r for r in runs if r.info.status in wanted]


def params_match(run, key: CacheKey) -> list[str]:
    """Differences between the run's logged parameters and the key's (as strings); [] when equal."""
    logged = run.data.params
    return [f"{k}: run has {logged.get(k)!r}, wanted {v!r}" for k, v in key.params.items()
            if logged.get(k) != v]


def _model_files_problem(client, model_id: str) -> str | None:
    try:
        model = client.get_logged_model(model_id)
    except Exception:
        return f"logged model {model_id} no longer exists"
    status = str(getattr(model, "status", "")).upper()
    if "READY" not in status:
        return f"logged model {model_id} is {status or 'not READY'}"
    try:
        names = {Path(f.path).name for f in client.list_logged_model_artifacts(model_id)}
    except Exception as err:
        return f"artifacts of logged model {model_id} cannot be listed ({type(err).__name__})"
    if "MLmodel" not in names:
        return f"artifacts of logged model {model_id} were deleted"
    return None


def _run_artifact_problem(client, run_id: str, path: str) -> str | None:
    try:
        run = client.get_run(run_id)
    except Exception:
        return f"run {run_id} no longer exists"
    if run.info.lifecycle_stage == "deleted":
        return f"run {run_id} was deleted"
    parent = str(Path(path).parent.as_posix())
    try:
        listing = client.list_artifacts(run_id, None if parent == "." else parent)
    except Exception as err:
        return f"artifacts of run {run_id} cannot be listed ({type(err).__name__})"
    entry = next((f for f in listing if f.path == path), None)
    if entry is None:
        return f"artifact {path} of run {run_id} was deleted"
    if entry.is_dir and not client.list_artifacts(run_id, path):
        return f"artifact folder {path} of run {run_id} is empty"
    return None


_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_ALIASED = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>.+)$")


def output_problems(client, outputs: Mapping[str, str]) -> list[str]:
    """Why the outputs of a finished step run can no longer be used ([] when all are intact)."""
    problems: list[str] = []
    registered: tuple[str, str] | None = None
    for key, value in sorted(outputs.items()):
        runs = artifacts.parse_runs_uri(value)
        model_id = artifacts.parse_model_id_uri(value)
        reg = _REGISTERED.match(value)
        problem = None
        if runs:
            problem = _run_artifact_problem(client, *runs)
        elif model_id:
            problem = _model_files_problem(client, model_id)
        elif reg:
            registered = (reg["name"], reg["version"])
            try:
                mv = client.get_model_version(reg["name"], reg["version"])
            except Exception:
                problem = f"registered model version {value} no longer exists"
            else:
                source_id = getattr(mv, "model_id", None) or artifacts.parse_model_id_uri(mv.source or "")
                if source_id:
                    problem = _model_files_problem(client, source_id)
        if problem:
            problems.append(f"{key}: {problem}")
    alias = outputs.get("alias", "")
    if alias and registered:
        aliased = _ALIASED.match(alias)
        name, alias_name = (aliased["name"], aliased["alias"]) if aliased else (registered[0], alias)
        try:
            now = client.get_model_version_by_alias(name, alias_name).version
        except Exception:
            now = None
        if str(now) != registered[1]:
            problems.append(f"alias: {name}@{alias_name} now points to version {now}, not "
                            f"{registered[1]}")
    return problems


@dataclass
class Lookup:
    """The outcome of a cache lookup: a usable run, or why none was used."""

    run: object | None = None
    notes: list[str] = field(default_factory=list)


def find_finished(client, experiment_id: str, key: CacheKey) -> Lookup:
    """The newest FINISHED run with this key whose outputs are intact; notes say what was skipped."""
    out = Lookup()
    for run in _search(client, experiment_id, key, ["FINISHED"]):
        rid = run.info.run_id
        if run.info.lifecycle_stage == "deleted":
            continue
        diff = params_match(run, key)
        if diff:
            out.notes.append(f"run {rid} has the cache key but other parameters ({diff[0]}); not reused")
            continue
        outputs = artifacts.get_outputs(run)
        if not outputs:
            out.notes.append(f"run {rid} recorded no outputs; not reused")
            continue
        problems = output_problems(client, outputs)
        if problems:
            out.notes.append(f"cached run {rid} of {key.entry_point} cannot be reused: "
                             + "; ".join(problems) + ": rerunning the step")
            continue
        out.run = run
        return out
    return out


def find_resumable(client, experiment_id: str, key: CacheKey,
                   run_ids: set[str] | None = None) -> tuple[object, list] | None:
    """The newest FAILED/KILLED run with this key (among `run_ids` if given) that logged at least
    one intact checkpoint model."""
    for run in _search(client, experiment_id, key, ["FAILED", "KILLED"]):
        if run_ids is not None and run.info.run_id not in run_ids:
            continue
        flt = f"source_run_id = '{run.info.run_id}'"
        models = [m for m in client.search_logged_models([experiment_id], filter_string=flt)
                  if m.name.startswith(artifacts.CHECKPOINT_MODEL_PREFIX + "-")
                  and _model_files_problem(client, m.model_id) is None]
        if models:
            return run, models
    return None


# --- default inputs ----------------------------------------------------------------------------

def is_full_sha(text: str) -> bool:
    return bool(_FULL_SHA.match(text or ""))
