"""`main`: run the five steps in order as child runs of one `main` run, reusing unchanged steps.

download_snapshot -> finetune -> log_reference -> evaluate_checkpoint -> persist_and_register, each
started with `mlflow.projects.run` under the same env manager `main` was started with, and wired by the
URIs each step records as `pipeline.output.<key>` tags. Parameters are those of the steps (declared
once, in each step's `Args`; a name two steps share is one parameter passed to both) plus `use_cache`,
`force_steps` and `env_manager`.

Step cache (`lora_pipeline.orchestration.stepcache`): a step whose entry point, parameters (as strings), pipeline code version
and input digests match a FINISHED run with intact outputs is not rerun; its outputs are reused. A
`finetune` that failed after saving a checkpoint is resumed from it (`resume_from`).
Output: the registered model version and alias, and a summary table (printed and logged to this run).
"""

from __future__ import annotations

import dataclasses
import getpass
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_pipeline import artifacts
from lora_pipeline.cli import build_parser, fields_of, param, run_cli
from lora_pipeline.errors import InputError, Problem, Problems, StepError, one_line

log = logging.getLogger(__name__)

ENTRY_POINT = "main"
ENV_MANAGERS = ("local", "virtualenv", "uv", "conda")
# MLflow sets this tag on a project run for every env manager but `local` (mlflow/projects/backend/
# local.py); it is how `main` learns what `mlflow run --env-manager` it was started with.
PROJECT_ENV_TAG = "mlflow.project.env"
STEP_RUN_TAG_PREFIX = "pipeline.steps."  # on the main run: pipeline.steps.<entry point> = run id
SUMMARY_TABLE_FILE = artifacts.SUMMARY_TABLE_FILE
SUMMARY_TEXT_FILE = artifacts.SUMMARY_TEXT_FILE


@dataclass(frozen=True)
class StepSpec:
    """How `main` runs one step: where its URI inputs come from and what to show for it."""

    name: str
    # parameter -> (step, output key) alternatives, first present wins; never user-facing.
    wiring: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # user-facing parameters filled from an upstream output when the user leaves them empty.
    fill_if_empty: dict[str, tuple[str, str]] = field(default_factory=dict)
    # parameters main neither exposes nor passes (alternative inputs that make no sense in a chain).
    hidden: frozenset[str] = frozenset()
    key_metrics: tuple[str, ...] = ()
    resumable: bool = False
    module_name: str = ""  # default steps.<name>; tests point it at stand-in steps

    @property
    def module(self) -> str:
        return self.module_name or f"steps.{self.name}"


PIPELINE: tuple[StepSpec, ...] = (
    StepSpec("download_snapshot", key_metrics=("snapshot_total_bytes",)),
    StepSpec("finetune",
             wiring={"manifest_uri": (("download_snapshot", "manifest"),)},
             key_metrics=("best_eval_loss", "eval_loss", "train_loss"), resumable=True),
    StepSpec("log_reference",
             wiring={"manifest_uri": (("download_snapshot", "manifest"),),
                     "checkpoint_uri": (("finetune", "checkpoint"),)},
             hidden=frozenset({"full_model_dir"})),
    StepSpec("evaluate_checkpoint",
             wiring={"model_uri": (("log_reference", "model"),)},
             # the held-out split finetune did not train on, unless the user names an eval set
             fill_if_empty={"eval_data": ("finetune", "validation_data")},
             key_metrics=("candidate.slot_f1", "slot_f1")),
    StepSpec("persist_and_register",
             wiring={"model_uri": (("evaluate_checkpoint", "model"), ("log_reference", "model"))}),
)
STEP_NAMES = tuple(s.name for s in PIPELINE)
# Step parameters that are not user settings and change nothing in the result: never exposed, never
# part of the cache key.
CONTROL_PARAMS = frozenset({"resume_from"})


# --- Args: composed from the steps' Args -------------------------------------------------------

@dataclass(frozen=True)
class Binding:
    """One `main` parameter and the step parameters it is passed to."""

    name: str
    typ: type
    default: Any
    help: str
    targets: tuple[tuple[str, str], ...]  # (step, step parameter)


def _step_module(spec: StepSpec):
    return importlib.import_module(spec.module)


def compose_bindings(specs: Sequence[StepSpec] = PIPELINE) -> list[Binding]:
    """Every user-facing parameter of every step, once.

    A name that several steps declare with the same type and default is one parameter passed to all
    of them; if they disagree (a different type or default), the later step's one is exposed as
    `<step>_<name>` so that each step keeps its own default.
    """
    out: dict[str, Binding] = {}
    for spec in specs:
        try:
            step_args = _step_module(spec).Args
        except (ImportError, AttributeError) as err:  # a step under construction must not break main
            log.warning("step %s has no Args yet (%s); main exposes none of its parameters", spec.name, err)
            continue
        for f, typ in fields_of(step_args):
            if f.name in spec.wiring or f.name in spec.hidden or f.name in CONTROL_PARAMS:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f.metadata.get("help", "")
            prev = out.get(f.name)
            if prev is None:
                out[f.name] = Binding(f.name, typ, default, f"{spec.name}: {help_text}",
                                      ((spec.name, f.name),))
            elif prev.typ is typ and prev.default == default:
                out[f.name] = dataclasses.replace(prev, help=f"{prev.help} [also {spec.name}]",
                                                  targets=prev.targets + ((spec.name, f.name),))
            else:
                name = f"{spec.name}_{f.name}"
                out[name] = Binding(name, typ, default, f"{spec.name}: {help_text}",
                                    ((spec.name, f.name),))
    return list(out.values())


MAIN_FIELDS = (
    ("use_cache", bool, True, "reuse a FINISHED step run with the same parameters, code and inputs "
     "(false: rerun every step)"),
    ("force_steps", str, "", "comma-separated steps to rerun even if cached (e.g. finetune), or 'all'"),
    ("env_manager", str, "", "env manager of the child steps: local, virtualenv, uv or conda; empty: "
     "the one main was started with (mlflow run --env-manager), else local"),
)


def _make_args_class(bindings: Sequence[Binding]) -> type:
    spec = [(b.name, b.typ, param(b.default, b.help)) for b in bindings]
    taken = {b.name for b in bindings}
    for name, typ, default, help_text in MAIN_FIELDS:
        if name in taken:  # a step declared it: the step's meaning would silently change
            raise TypeError(f"step parameter {name!r} clashes with main's own parameter; rename it")
        spec.append((name, typ, param(default, help_text)))
    cls = dataclasses.make_dataclass("Args", spec)
    cls.__module__ = __name__  # Python 3.11's make_dataclass has no `module=`
    cls.__doc__ = "Parameters of main: the steps' user-facing parameters plus main's own."
    return cls


BINDINGS = compose_bindings()
Args = _make_args_class(BINDINGS)


@dataclass
class StepRow:
    step: str
    run_id: str
    status: str  # ran | cached | resumed | failed
    wall_s: float
    key_metric: str
    note: str = ""


@dataclass
class Result:
    run_id: str
    registered: str
    alias: str
    steps: list[StepRow]


# --- validation --------------------------------------------------------------------------------

def parse_force_steps(text: str, problems: Problems) -> set[str]:
    names = {s.strip() for s in (text or "").split(",") if s.strip()}
    if "all" in names:
        return set(STEP_NAMES)
    unknown = sorted(names - set(STEP_NAMES))
    problems.require(not unknown, "force_steps", text, f"unknown step(s) {', '.join(unknown)}",
                     f"use 'all' or a comma-separated list of: {', '.join(STEP_NAMES)}")
    return names & set(STEP_NAMES)


def _step_values(args: Any, spec: StepSpec, bindings: Sequence[Binding]) -> dict[str, Any]:
    """The step's own parameter values taken from main's Args (wiring ones left out)."""
    out = {}
    for b in bindings:
        for step, pname in b.targets:
            if step == spec.name:
                out[pname] = getattr(args, b.name)
    return out


def _problem_field(bindings: Sequence[Binding], step: str, pname: str) -> str:
    return next((b.name for b in bindings if (step, pname) in b.targets), pname)


def validate(args: Any, specs: Sequence[StepSpec] = PIPELINE,
             bindings: Sequence[Binding] = BINDINGS) -> set[str]:
    """All input problems at once: main's own, and each step's static checks (`validate_static`)."""
    problems = Problems()
    forced = parse_force_steps(args.force_steps, problems)
    problems.require(args.env_manager in ("", *ENV_MANAGERS), "env_manager", args.env_manager,
                     "is not an env manager", f"use one of {', '.join(ENV_MANAGERS)} or leave empty")
    for spec in specs:
        module = _step_module(spec)
        check = getattr(module, "validate_static", None)
        if check is None:
            continue
        values = _step_values(args, spec, bindings)
        try:
            step_args = module.Args(**values)
            found = check(step_args)
        except InputError as err:
            found = err.problems
        except TypeError as err:  # the step's Args changed under us: a bug, but say where
            raise StepError(f"main cannot build {spec.name}'s parameters ({err}); regenerate MLproject "
                            "and check steps/main.py's wiring") from err
        items = found.items if isinstance(found, Problems) else list(found or [])
        for p in items:
            if p.field in spec.wiring or p.field in spec.hidden or (
                    p.field in spec.fill_if_empty and not values.get(p.field)):
                continue  # filled by main from an upstream step
            problems.items.append(Problem(_problem_field(bindings, spec.name, p.field), p.value,
                                          f"{p.message} ({spec.name})", p.fix))
    problems.raise_if_any()
    return forced


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


# --- the pipeline ------------------------------------------------------------------------------

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


# Parameters that may name a Hub repo, and the parameter pinning its revision: a branch or tag can
# move, so main resolves it to the commit it points at now and keys the cache on that.
HUB_INPUTS = {"download_snapshot": ("model", "revision", "model"),
              "finetune": ("dataset", "dataset_revision", "dataset"),
              "evaluate_checkpoint": ("eval_data", "eval_data_revision", "dataset")}


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


def _key_metric(spec: StepSpec, run, outputs: dict[str, str]) -> str:
    metrics = run.data.metrics if run is not None else {}
    for name in spec.key_metrics:
        if name in metrics:
            value = metrics[name]
            if name.endswith("_bytes"):
                return f"base {value / 1e6:.1f} MB"
            base = metrics.get("base." + name.split(".", 1)[-1]) if name.startswith("candidate.") else None
            return f"{name.split('.', 1)[-1]}={value:.4g}" + (f" (base {base:.4g})" if base is not None else "")
    if "registered" in outputs:
        alias = outputs.get("alias", "")
        decision = outputs.get("decision", "")
        return (outputs["registered"] + (f" @{alias}" if alias else "")
                + (f" ({decision})" if decision else ""))
    if "decision" in outputs:
        return f"decision={outputs['decision']} (nothing registered)"
    for key in ("model", "checkpoint", "manifest"):
        if key in outputs:
            return f"{key}={outputs[key]}"
    return ""


def format_table(rows: Sequence[StepRow]) -> str:
    head = ("step", "run id", "cached", "wall s", "key metric")
    body = [(r.step, r.run_id, r.status, f"{r.wall_s:.1f}", r.key_metric) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def _log_summary(client, main_run_id: str, rows: Sequence[StepRow], total_s: float) -> None:
    import mlflow

    table = {"step": [r.step for r in rows], "run_id": [r.run_id for r in rows],
             "cached": [r.status for r in rows], "wall_s": [round(r.wall_s, 2) for r in rows],
             "key_metric": [r.key_metric for r in rows], "note": [r.note for r in rows]}
    mlflow.log_table(table, SUMMARY_TABLE_FILE, run_id=main_run_id)
    client.log_text(main_run_id, format_table(rows) + "\n", SUMMARY_TEXT_FILE)
    client.log_metric(main_run_id, "pipeline_wall_s", total_s)
    client.log_metric(main_run_id, "steps_cached", sum(r.status == "cached" for r in rows))
    client.log_metric(main_run_id, "steps_run", sum(r.status in ("ran", "resumed") for r in rows))


Launcher = Callable[[str, str, dict, str, str, str], None]


def run_pipeline(args: Any, *, specs: Sequence[StepSpec] = PIPELINE,
                 bindings: Sequence[Binding] = BINDINGS, launcher: Launcher | None = None,
                 project_uri: str | None = None) -> Result:
    """The chaining logic; `launcher` and `project_uri` are swappable so tests can drive it with
    light stand-in steps."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from lora_pipeline.cli import configure_tracking
    from lora_pipeline.orchestration import stepcache
    from lora_pipeline.paths import PROJECT_ROOT
    from lora_pipeline.tracking.runs import step_run
    from lora_pipeline.tracking.version import code_version

    forced = validate(args, specs, bindings)
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
        client.set_tag(main_id, stepcache.CODE_VERSION_TAG, code)
        log.info("main: code %s, env manager %s, cache %s", code, env_manager,
                 "on" if args.use_cache else "off")
        try:
            for spec in specs:
                rows.append(_run_step(spec, args, bindings, outputs, client=client, main_run=main_run,
                                      exp_id=exp_id, code=code, forced=spec.name in forced,
                                      env_manager=env_manager, launcher=launcher,
                                      project_uri=project_uri, root=root))
        except StepError:
            _log_summary(client, main_id, rows, time.monotonic() - t_main)
            log.error("summary so far:\n%s", format_table(rows))
            raise
        except MlflowException as err:
            _log_summary(client, main_id, rows, time.monotonic() - t_main)
            raise StepError(f"tracking store error while chaining ({one_line(err)})") from err
        merged: dict[str, str] = {}
        for spec in specs:
            merged.update(outputs.get(spec.name, {}))
        artifacts.set_outputs(client, main_id, merged)
        _log_summary(client, main_id, rows, time.monotonic() - t_main)
    return Result(run_id=main_id, registered=merged.get("registered", ""), alias=merged.get("alias", ""),
                  steps=rows)


def _run_step(spec: StepSpec, args: Any, bindings: Sequence[Binding], outputs: dict, *, client,
              main_run, exp_id: str, code: str, forced: bool, env_manager: str, launcher: Launcher,
              project_uri: str, root: Path) -> StepRow:
    from mlflow.exceptions import MlflowException

    from lora_pipeline.orchestration import stepcache

    t0 = time.monotonic()
    module = _step_module(spec)
    step_fields = {f.name for f, _ in fields_of(module.Args)}
    values = _step_values(args, spec, bindings)
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
                           _key_metric(spec, run, outs), "; ".join(notes))
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
    return StepRow(spec.name, child_id, status, time.monotonic() - t0, _key_metric(spec, run, outs),
                   "; ".join(notes))


def _end_if_running(client, run_id: str, status: str = "FAILED") -> None:
    try:
        if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(run_id, status)
    except Exception:  # best effort: the original error matters more
        log.debug("could not end run %s", run_id, exc_info=True)


def run(args: Any) -> Result:
    return run_pipeline(args)


def _run_and_print(args: Any) -> Result:
    result = run(args)
    print(format_table(result.steps))
    if result.registered:
        print(f"registered: {result.registered}" + (f"  alias: {result.alias}" if result.alias else
                                                   "  (no alias: the gate did not pass)"))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # An unknown parameter (`mlflow run -e main -P typo=1` appends `--typo 1`) is one line, not
    # argparse's usage dump.
    _, unknown = build_parser(Args, "").parse_known_args(argv)
    flags = [a.split("=", 1)[0] for a in unknown if a.startswith("--")]
    if unknown:
        known = ", ".join(f.name for f in dataclasses.fields(Args))
        print(f"error: unknown parameter(s) {' '.join(flags or unknown)} for entry point main; "
              f"known: {known}", file=sys.stderr)
        return 2
    return run_cli(Args, _run_and_print, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
