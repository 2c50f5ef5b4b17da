"""`main`'s runner: the steps in order, as child runs of one `main` run, reusing unchanged ones.

Each step is started with `mlflow.projects.run` (`mlflow_launcher`) under the env manager `main` was
started with, into a run `main` creates first and tags with the step's cache key
(`lora_pipeline.orchestration.stepcache`), and is wired by the URIs each step records as
`pipeline.output.<key>` tags. A step whose key matches a FINISHED run with intact outputs is not
rerun; a `finetune` that failed after saving a checkpoint is resumed from it (`resume_from`).
The caller validates `args` first (steps/main.py); `run_pipeline` starts with the tracking store.
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_pipeline import artifacts
from lora_pipeline.cli import fields_of
from lora_pipeline.errors import StepError, one_line
from lora_pipeline.orchestration.compose import (
    CONTROL_PARAMS,
    ENV_MANAGERS,
    PIPELINE,
    Binding,
    StepSpec,
    compose_bindings,
    step_module,
    step_values,
)
from lora_pipeline.orchestration.summary import StepRow, format_table, key_metric, log_summary

log = logging.getLogger(__name__)

ENTRY_POINT = "main"  # the run `main` itself logs to; its children are the steps
# MLflow sets this tag on a project run for every env manager but `local` (mlflow/projects/backend/
# local.py); it is how `main` learns what `mlflow run --env-manager` it was started with.
PROJECT_ENV_TAG = "mlflow.project.env"
STEP_RUN_TAG_PREFIX = "pipeline.steps."  # on the main run: pipeline.steps.<entry point> = run id
# Parameters that may name a Hub repo, and the parameter pinning its revision: a branch or tag can
# move, so main resolves it to the commit it points at now and keys the cache on that.
HUB_INPUTS = {"download_snapshot": ("model", "revision", "model"),
              "finetune": ("dataset", "dataset_revision", "dataset"),
              "evaluate_checkpoint": ("eval_data", "eval_data_revision", "dataset")}

Launcher = Callable[[str, str, dict, str, str, str], None]


@dataclass
class Result:
    run_id: str
    registered: str
    alias: str
    steps: list[StepRow]


# --- tracking ----------------------------------------------------------------------------------

@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tracking(uri: str) -> None:
    """One cheap call to the tracking store before anything runs; a clear error if it fails.

    MLflow's HTTP client retries 7 times with exponential backoff by default (minutes); the check
    allows one retry and 10 s per request, so a down server is reported in seconds.
    """
    import mlflow

    try:
        with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:
        short = one_line(err)
        raise StepError(f"tracking server {uri} is unreachable ({type(err).__name__}: {short}); "
                        "start it or point MLFLOW_TRACKING_URI at a running one; nothing was run") from err


def detect_env_manager(requested: str, main_run) -> str:
    """The env manager for the children: the requested one, else the one `mlflow run` used for main.

    `mlflow run` passes nothing to the entry point about it; it only tags the run (see
    PROJECT_ENV_TAG) and, left to itself, `mlflow.projects.run` would build a conda env for every
    child of this conda_env project (MLflow issue #6611). `docker` means main runs inside the image:
    the children run there too, i.e. `local`.
    """
    if requested:
        return requested
    tag = main_run.data.tags.get(PROJECT_ENV_TAG, "")
    return tag if tag in ENV_MANAGERS else "local"


def _child_tags(main_run, spec: StepSpec, env_manager: str) -> dict[str, str]:
    """The tags `mlflow.projects.run` would set on a run it creates (we create it first, to tag the
    cache key on it before the step starts, so a crashed step can still be found and resumed)."""
    from mlflow.utils import mlflow_tags as t

    parent = main_run.data.tags
    tags = {
        t.MLFLOW_PARENT_RUN_ID: main_run.info.run_id,
        t.MLFLOW_SOURCE_TYPE: "PROJECT",
        t.MLFLOW_PROJECT_ENTRY_POINT: spec.name,
        t.MLFLOW_USER: parent.get(t.MLFLOW_USER) or getpass.getuser(),
        artifacts.STEP_TAG: spec.name,
    }
    for key in (t.MLFLOW_SOURCE_NAME, t.MLFLOW_GIT_COMMIT, t.MLFLOW_GIT_REPO_URL, t.MLFLOW_GIT_BRANCH):
        if parent.get(key):
            tags[key] = parent[key]
    if env_manager != "local":
        tags[PROJECT_ENV_TAG] = env_manager
    return tags


def mlflow_launcher(project_uri: str, entry_point: str, params: dict[str, str], run_id: str,
                    env_manager: str, experiment_id: str) -> None:
    """Run one step with `mlflow.projects.run` into the run `main` created for it; blocks."""
    import mlflow

    path = os.environ.get("PATH", "")
    exe_dir = str(Path(sys.executable).parent)
    # `local` means this interpreter: the MLproject command says `python`, which must be ours even
    # when main was started as `.venv/bin/python -m steps.main` without the venv on PATH.
    new_path = path if env_manager != "local" else os.pathsep.join([exe_dir, path])
    with _env(PATH=new_path):
        mlflow.projects.run(project_uri, entry_point=entry_point, parameters=params,
                            experiment_id=experiment_id, run_id=run_id, env_manager=env_manager,
                            synchronous=True)


# --- a step's parameters and inputs --------------------------------------------------------------

def _as_param(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _resolve_path_param(value: str, project_root: Path) -> str:
    """A relative path is made absolute, tried from main's cwd, then the project root (the steps'
    own rule): the children run in the project directory, and the cache keys files by content."""
    from lora_pipeline.orchestration.stepcache import local_path

    if not value or Path(value).is_absolute():
        return value
    found = local_path(value, Path.cwd()) or local_path(value, project_root)
    return str(found) if found is not None else value


def _first_output(spec: StepSpec, pname: str, outputs: dict[str, dict[str, str]]) -> str | None:
    for step, key in spec.wiring[pname]:
        value = outputs.get(step, {}).get(key)
        if value:
            return value
    return None


def _hub_commit(repo_id: str, revision: str, repo_type: str) -> str:
    from huggingface_hub import HfApi

    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    api = HfApi(endpoint=endpoint)
    info = (api.model_info if repo_type == "model" else api.dataset_info)(repo_id, revision=revision or None)
    return info.sha


def _external_digests(spec: StepSpec, params: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """Digests that the parameter text cannot give, and why a step must not be cached (or None)."""
    from lora_pipeline.orchestration import stepcache

    if spec.name not in HUB_INPUTS:
        return {}, None
    name, rev_name, repo_type = HUB_INPUTS[spec.name]
    value = params.get(name, "").strip()
    revision = params.get(rev_name, "")
    if spec.name == "download_snapshot" and value in ("", "default"):
        try:
            from lora_pipeline.base.gguf_convert import DEFAULT_GGUF_PACKAGE
        except ImportError:
            DEFAULT_GGUF_PACKAGE = "default"
        # A pinned PyPI release cannot change: its name==version stands for its content.
        return {name: f"pypi:{DEFAULT_GGUF_PACKAGE}"}, None
    if (not value or stepcache.local_path(value) is not None or "://" in value
            or value.startswith(("runs:/", "models:/")) or value.lower().endswith(".gguf")):
        return {}, None  # a path (keyed by content) or an immutable URI
    if stepcache.is_full_sha(revision):
        return {}, None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return {}, f"{name}={value}@{revision or 'main'} cannot be resolved offline: rerun"
    try:
        commit = _hub_commit(value, revision, repo_type)
    except Exception as err:  # the step itself reports Hub problems properly
        return {}, (f"could not resolve {value}@{revision or 'main'} on the Hub "
                    f"({type(err).__name__}): rerun")
    return {name: f"hub:{value}@{commit}"}, None


# --- the pipeline ------------------------------------------------------------------------------

def run_pipeline(args: Any, *, forced: Collection[str] = (), specs: Sequence[StepSpec] = PIPELINE,
                 bindings: Sequence[Binding] | None = None, launcher: Launcher | None = None,
                 project_uri: str | None = None) -> Result:
    """Run `specs` in order with main's (validated) `args`; `forced` steps are rerun even if cached.

    `project_uri` is what the launcher runs, and, when it is a local folder, whose pipeline files make
    the code version (a git checkout: the committed tree; `lora_pipeline.tracking.version`); default:
    this project. `launcher` and `project_uri` are swappable so tests can drive the chaining with light
    stand-in steps.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from lora_pipeline.cli import configure_tracking
    from lora_pipeline.paths import PROJECT_ROOT
    from lora_pipeline.tracking.runs import step_run
    from lora_pipeline.tracking.version import code_version

    bindings = compose_bindings(specs) if bindings is None else bindings
    uri = configure_tracking()
    check_tracking(uri)
    launcher = launcher or mlflow_launcher
    root = Path(project_uri) if project_uri and Path(project_uri).is_dir() else PROJECT_ROOT
    project_uri = project_uri or str(PROJECT_ROOT)
    code = code_version(root)

    rows: list[StepRow] = []
    outputs: dict[str, dict[str, str]] = {}
    t_main = time.monotonic()
    with step_run(ENTRY_POINT, args) as active:
        client = mlflow.MlflowClient()
        main_run = client.get_run(active.info.run_id)
        main_id, exp_id = main_run.info.run_id, main_run.info.experiment_id
        env_manager = detect_env_manager(args.env_manager, main_run)
        client.set_tag(main_id, artifacts.CODE_VERSION_TAG, code)
        log.info("main: code %s, env manager %s, cache %s", code, env_manager,
                 "on" if args.use_cache else "off")
        try:
            for spec in specs:
                rows.append(_run_step(spec, args, bindings, outputs, client=client, main_run=main_run,
                                      exp_id=exp_id, code=code, forced=spec.name in forced,
                                      env_manager=env_manager, launcher=launcher,
                                      project_uri=project_uri, root=root))
        except StepError:
            log_summary(client, main_id, rows, time.monotonic() - t_main)
            log.error("summary so far:\n%s", format_table(rows))
            raise
        except MlflowException as err:
            log_summary(client, main_id, rows, time.monotonic() - t_main)
            raise StepError(f"tracking store error while chaining ({one_line(err)})") from err
        merged: dict[str, str] = {}
        for spec in specs:
            merged.update(outputs.get(spec.name, {}))
        artifacts.set_outputs(client, main_id, merged)
        log_summary(client, main_id, rows, time.monotonic() - t_main)
    return Result(run_id=main_id, registered=merged.get("registered", ""), alias=merged.get("alias", ""),
                  steps=rows)


def _run_step(spec: StepSpec, args: Any, bindings: Sequence[Binding], outputs: dict, *, client,
              main_run, exp_id: str, code: str, forced: bool, env_manager: str, launcher: Launcher,
              project_uri: str, root: Path) -> StepRow:
    from mlflow.exceptions import MlflowException

    from lora_pipeline.orchestration import stepcache

    t0 = time.monotonic()
    step_fields = {f.name for f, _ in fields_of(step_module(spec).Args)}
    values = step_values(args, spec, bindings)
    params = {k: _as_param(v) for k, v in values.items()}
    for pname in spec.wiring:
        if pname in step_fields:
            value = _first_output(spec, pname, outputs)
            if value is None:
                raise StepError(f"{spec.name} needs {pname}, but no earlier step recorded "
                                f"{' or '.join(f'{s}.{k}' for s, k in spec.wiring[pname])}")
            params[pname] = value
    for pname, (step, key) in spec.fill_if_empty.items():
        if pname in params and not params[pname] and outputs.get(step, {}).get(key):
            params[pname] = outputs[step][key]
    params = {k: _resolve_path_param(v, root) for k, v in params.items()}
    if "resume_from" in step_fields:
        params.setdefault("resume_from", "")

    fixed, volatile = _external_digests(spec, params)
    key = stepcache.make_key(client, spec.name, params, code=code, exclude=CONTROL_PARAMS,
                             fixed_digests=fixed)
    notes: list[str] = []
    status = "ran"
    if not args.use_cache:
        notes.append("cache off")
    elif forced:
        notes.append("forced")
    elif volatile:
        notes.append(volatile)
    else:
        lookup = stepcache.find_finished(client, exp_id, key)
        for note in lookup.notes:
            log.warning("%s", note)
        notes += lookup.notes
        if lookup.run is not None:
            run = lookup.run
            outs = artifacts.get_outputs(run)
            outputs[spec.name] = outs
            client.set_tag(main_run.info.run_id, STEP_RUN_TAG_PREFIX + spec.name, run.info.run_id)
            log.info("%s: reusing FINISHED run %s (same parameters, code and inputs)", spec.name,
                     run.info.run_id)
            return StepRow(spec.name, run.info.run_id, "cached", time.monotonic() - t0,
                           key_metric(spec, run, outs), "; ".join(notes))
        if spec.resumable and "resume_from" in step_fields:
            found = stepcache.find_resumable(client, exp_id, key)
            if found is not None:
                failed, models = found
                params["resume_from"] = failed.info.run_id
                status = "resumed"
                notes.append(f"resumed from {failed.info.status} run {failed.info.run_id} "
                             f"({len(models)} checkpoint(s))")
                log.warning("%s: resuming %s run %s from its last checkpoint", spec.name,
                            failed.info.status, failed.info.run_id)

    tags = _child_tags(main_run, spec, env_manager)
    tags.update(key.tags())
    child = client.create_run(exp_id, tags=tags, run_name=spec.name)
    child_id = child.info.run_id
    client.set_tag(main_run.info.run_id, STEP_RUN_TAG_PREFIX + spec.name, child_id)
    log.info("%s: run %s (%s)", spec.name, child_id, "; ".join(notes) or "not cached")
    try:
        launcher(project_uri, spec.name, params, child_id, env_manager, exp_id)
    except MlflowException as err:  # ExecutionException: the step exited non-zero
        _end_if_running(client, child_id)
        first = one_line(err, 160)
        resumable = spec.resumable and "resume_from" in step_fields and stepcache.find_resumable(
            client, exp_id, key, run_ids={child_id}) is not None
        raise StepError(f"step {spec.name} failed (run {child_id}: {first}); its error is above; "
                        "fix it and rerun main: finished steps are reused"
                        + (f" and {spec.name} resumes from its last checkpoint" if resumable else "")) from err
    except BaseException:
        _end_if_running(client, child_id, "KILLED")
        raise
    run = client.get_run(child_id)
    if run.info.status != "FINISHED":
        raise StepError(f"step {spec.name} ended {run.info.status} (run {child_id}); rerun main")
    outs = artifacts.get_outputs(run)
    if not outs:
        raise StepError(f"step {spec.name} finished but recorded no outputs (run {child_id}); "
                        "it does not follow the pipeline's contract")
    outputs[spec.name] = outs
    return StepRow(spec.name, child_id, status, time.monotonic() - t0, key_metric(spec, run, outs),
                   "; ".join(notes))


def _end_if_running(client, run_id: str, status: str = "FAILED") -> None:
    try:
        if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(run_id, status)
    except Exception:  # best effort: the original error matters more
        log.debug("could not end run %s", run_id, exc_info=True)
