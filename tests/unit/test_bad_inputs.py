"""Every bad input the steps handle, in one table: the message, the exit code, and nothing changed.

Each case runs a step's (or main's) `main(argv)` in this process, exactly as `mlflow run` / the CLI
would, against a store that already holds a finished snapshot run and a registered model version with
an alias. It asserts
  * the exit code (2: bad input, 1: a failure found while working),
  * stderr: only `error: ...` lines, each on one line, the expected one first (a case that has several
    problems lists them all),
  * that no run finished, no registered model, version or alias appeared or moved, and no run was
    left RUNNING (the step did not start, or ended its run FAILED).
Placeholders in argv (`{manifest}`, `{tiny}`, ...) are filled from the `world` fixture.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import sample_rows

RUN0 = "0" * 32


@dataclass(frozen=True)
class Case:
    id: str
    step: str  # module under steps/
    argv: tuple[str, ...]
    message: str  # regex the first error line must match (after "error: ")
    code: int = 2
    lines: int = 1  # error lines expected
    xfail: str = ""  # a known defect: the reason (strict: the case fails loudly once it is fixed)


def C(id: str, step: str, argv: str | tuple[str, ...], message: str, code: int = 2, lines: int = 1,
      xfail: str = "") -> Case:
    if isinstance(argv, str):
        argv = tuple(argv.split())
    return Case(id, step, argv, message, code, lines, xfail)


FIX = r"; fix: "
CASES = [
    # --- download_snapshot --------------------------------------------------------------------
    C("ds-model-unrecognised", "download_snapshot", ("--model", "not a repo!!"),
      r"^model='not a repo!!': is neither a Hub repo id \(org/name\), an existing path, a \.gguf file nor 'default'" + FIX),
    C("ds-local-dir-missing", "download_snapshot", "--model /nonexistent/checkpoint",
      r"^model='/nonexistent/checkpoint': no such directory" + FIX),
    C("ds-gguf-missing", "download_snapshot", "--model /nonexistent/model.gguf",
      r"^model='/nonexistent/model\.gguf': no such \.gguf file" + FIX + "check the path"),
    C("ds-gguf-broken", "download_snapshot", "--model {broken_gguf}",
      r"^model='.*broken\.gguf': .*broken\.gguf: unsupported GGUF version 0 \(readable: 2 and 3\); re-export it "
      r"with a current llama\.cpp .*" + FIX
      + r"pass a readable \.gguf file"),
    C("ds-task-unsupported", "download_snapshot", "--model {tiny} --pipeline_task summarization",
      r"^pipeline_task='summarization': is not supported" + FIX + "use one of: text-generation"),
    C("ds-retries-negative", "download_snapshot", "--model {tiny} --hub_retries -1",
      r"^hub_retries=-1: must be >= 0" + FIX),
    C("ds-revision-bad-sha", "download_snapshot", ("--model", "org/name", "--revision", "g" * 40),
      r"^revision='g{40}': looks like a commit SHA but is not 40 hex digits" + FIX),
    C("ds-pickle-refused", "download_snapshot", "--model {pickle_dir}",
      r"^allow_pickle=False: directory .* has only pickle weights \(\.bin/\.pt\), which can run code when "
      r"loaded" + FIX + "convert them to safetensors, or pass allow_pickle=true if you trust the source"),
    C("ds-remote-code-refused", "download_snapshot", "--model {remote_code_dir}",
      r"^trust_remote_code=False: \w+ needs custom code from the model repository to load" + FIX
      + "pass trust_remote_code=true only if you trust that repository's code"),
    C("ds-no-tokenizer", "download_snapshot", "--model {no_tokenizer_dir}",
      r"^model='.*': directory .* has no tokenizer \(tokenizer\.json / tokenizer_config\.json\)" + FIX),
    C("ds-not-causal", "download_snapshot", "--model {not_causal_dir}",
      r"^pipeline_task='text-generation': architecture BertForMaskedLM cannot do text-generation \(it is not a "
      r"causal language model\)" + FIX),
    C("ds-no-weights", "download_snapshot", "--model {no_weights_dir}",
      r"^model='.*': directory .* has no weights \(\*\.safetensors\)" + FIX),
    C("ds-bad-bool", "download_snapshot", "--model {tiny} --allow_pickle maybe",
      r"^argument --allow_pickle: expected true or false, got 'maybe'; fix: see `--help`"),
    # --- finetune -----------------------------------------------------------------------------
    C("ft-manifest-empty", "finetune", "--dataset {train}",
      r"^manifest_uri='': is empty" + FIX + "pass the manifest URI that download_snapshot printed"),
    C("ft-manifest-missing-run", "finetune", f"--manifest_uri runs:/{RUN0}/snapshot/manifest.json --dataset {{train}}",
      rf"^manifest_uri='runs:/{RUN0}/snapshot/manifest\.json': cannot read the snapshot manifest"),
    C("ft-dropout-range", "finetune", "--manifest_uri {manifest} --dataset {train} --lora_dropout 1.5",
      r"^lora_dropout=1\.5: must be in \[0, 1\)" + FIX),
    C("ft-validation-fraction", "finetune", "--manifest_uri {manifest} --dataset {train} --validation_fraction 0",
      r"^validation_fraction=0(\.0)?: must be between 0 and 1 \(exclusive\)" + FIX),
    C("ft-augment-fraction", "finetune", "--manifest_uri {manifest} --dataset {train} --augment_fraction 1.5",
      r"^augment_fraction=1\.5: must be between 0 and 1, or -1 \(the task's default\)" + FIX + r"pass e\.g\. 0\.5"),
    C("ft-scheduler", "finetune", "--manifest_uri {manifest} --dataset {train} --lr_scheduler bogus",
      r"^lr_scheduler='bogus': is not supported" + FIX + "use one of: linear, cosine"),
    C("ft-save-not-multiple", "finetune", "--manifest_uri {manifest} --dataset {train} --save_steps 15 --eval_steps 10",
      r"^save_steps=15: is not a multiple of eval_steps=10, so some checkpoints would have no validation "
      r"loss to rank them by" + FIX + "pass save_steps=20"),
    C("ft-resume-garbage", "finetune", "--manifest_uri {manifest} --dataset {train} --resume_from xyz",
      r"^resume_from='xyz': is neither a run id \(32 hex digits\) nor 'last'" + FIX),
    C("ft-resume-unknown-run", "finetune", f"--manifest_uri {{manifest}} --dataset {{train}} --resume_from {RUN0}",
      rf"^resume_from='{RUN0}': no run with this id" ),
    C("ft-resume-last-none", "finetune", "--manifest_uri {manifest} --dataset {train} --resume_from last",
      r"^resume_from='last': no finetune run in experiment \d+ has a logged checkpoint" + FIX),
    C("ft-data-not-utf8", "finetune", "--manifest_uri {manifest} --dataset {latin1_csv}",
      r"is not UTF-8 text \(first bad byte 0xe9 on line 2\)"),
    C("ft-data-malformed", "finetune", "--manifest_uri {manifest} --dataset {malformed_csv}",
      r"^dataset='.*malformed\.csv': 2 of 2 rows are malformed \(2 unparsable MR; first at lines 2, 3\)"
      + FIX + r".*or pass skip_malformed=true"),
    C("ft-data-missing-file", "finetune", "--manifest_uri {manifest} --dataset /nonexistent/train.csv",
      r"^dataset='/nonexistent/train\.csv': "),
    C("ft-data-revision-local", "finetune", "--manifest_uri {manifest} --dataset {train} --dataset_revision v1",
      r"^dataset_revision='v1': applies only to Hub dataset ids" + FIX),
    C("ft-target-modules", "finetune", "--manifest_uri {manifest} --dataset {train} --max_seq_length 512 --target_modules q_proj,attn_qkv",
      r"^target_modules='q_proj,attn_qkv': attn_qkv is not a linear module of LlamaForCausalLM" + FIX + "choose from: "),
    C("ft-seq-too-short", "finetune", "--manifest_uri {manifest} --dataset {train} --max_seq_length 8",
      r"^max_seq_length=8: \d+ of \d+ examples are longer \(prompt\+answer up to \d+ tokens\) and would be cut" + FIX),
    C("ft-all-problems-at-once", "finetune", "--dataset {train} --lora_r 0 --learning_rate -1",
      r"^manifest_uri='': is empty", lines=3),
    # --- log_reference ------------------------------------------------------------------------
    C("lr-checkpoint-not-uri", "log_reference", "--checkpoint_uri notauri",
      r"^checkpoint_uri='notauri': is not a model URI" + FIX),
    C("lr-both-inputs", "log_reference", "--checkpoint_uri models:/m-0 --full_model_dir {tiny} --manifest_uri {manifest}",
      r"^full_model_dir='.*': given together with checkpoint_uri" + FIX),
    C("lr-full-without-manifest", "log_reference", "--full_model_dir {tiny}",
      r"^manifest_uri='': is required with full_model_dir \(it names the base the model was fine-tuned "
      r"from\)" + FIX),
    C("lr-no-finetune-yet", "log_reference", "",
      r"^checkpoint_uri='': is empty and no finished finetune run"),
    C("lr-unknown-model", "log_reference", "--checkpoint_uri models:/m-0123456789abcdef",
      r"^checkpoint_uri='models:/m-0123456789abcdef': no such model \(Logged model with ID "
      r"'m-0123456789abcdef' not found\.\)" + FIX),
    # --- evaluate_checkpoint ------------------------------------------------------------------
    C("ev-model-not-uri", "evaluate_checkpoint", "--model_uri bogus",
      r"^model_uri='bogus': is not a model URI" + FIX),
    C("ev-batch-size", "evaluate_checkpoint", "--model_uri models:/m-0 --batch_size 0",
      r"^batch_size=0: must be > 0" + FIX),
    C("ev-max-examples", "evaluate_checkpoint", "--model_uri models:/m-0 --max_examples -1",
      r"^max_examples=-1: must be >= 0" + FIX),
    C("ev-precision", "evaluate_checkpoint", "--model_uri models:/m-0 --precision fp16",
      r"^precision='fp16': is not supported" + FIX),
    C("ev-unknown-model", "evaluate_checkpoint", "--model_uri models:/m-0123456789abcdef --eval_data {train}",
      r"^model_uri='models:/m-0123456789abcdef': no such model \(Logged model with ID "
      r"'m-0123456789abcdef' not found\.\)" + FIX),
    # --- persist_and_register -----------------------------------------------------------------
    C("pr-model-required", "persist_and_register", "",
      r"^model_uri='': is required" + FIX),
    C("pr-model-not-logged-model", "persist_and_register", f"--model_uri runs:/{RUN0}/model",
      rf"^model_uri='runs:/{RUN0}/model': is not a logged model URI models:/<model_id>" + FIX),
    C("pr-gate-margin", "persist_and_register", "--model_uri models:/m-0 --gate_margin -1",
      r"^gate_margin=-1(\.0)?: must be a finite number >= 0" + FIX),
    C("pr-gate-metric", "persist_and_register", ("--model_uri", "models:/m-0", "--gate_metric", "bad metric!"),
      r"^gate_metric='bad metric!': is not a metric name" + FIX),
    C("pr-registered-name", "persist_and_register", ("--model_uri", "models:/m-0", "--registered_name", "a/b:c"),
      r"^registered_name='a/b:c': contains '/', ':'" + FIX),
    C("pr-unknown-model", "persist_and_register", "--model_uri models:/m-0123456789abcdef",
      r"^model_uri='models:/m-0123456789abcdef': no such logged model in the tracking store" + FIX),
    # --- main ---------------------------------------------------------------------------------
    C("main-unknown-param", "main", "--typo 1",
      r"^unknown parameter\(s\) --typo for entry point main; known: "),
    C("main-force-steps", "main", "--force_steps bogus",
      r"^force_steps='bogus': unknown step\(s\) bogus" + FIX),
    C("main-env-manager", "main", "--env_manager docker",
      r"^env_manager='docker': is not an env manager" + FIX),
    C("main-step-problem", "main", "--lora_dropout 2",
      r"^lora_dropout=2(\.0)?: must be in \[0, 1\) \(finetune\)" + FIX),
    # --- batch_score (the cases found before Spark starts; Spark-side ones: tests/per_step) ------
    C("bs-no-champion", "batch_score", "--input {train} --output {train}.scored",
      r"^model_uri='models:/e2e-extractor@champion': no such model \(.*\)" + FIX),
    C("bs-not-model-uri", "batch_score", "--model_uri champion --input {train} --output {train}.scored",
      r"^model_uri='champion': is not a model URI" + FIX),
    C("bs-input-missing", "batch_score", "--input /nonexistent/in.parquet --output {train}.scored",
      r"^input='/nonexistent/in\.parquet': no such file or folder" + FIX, lines=2),
    C("bs-output-exists", "batch_score", "--model_uri models:/m-0 --input {train} --output {tiny}",
      r"^output='.*': already exists and is not empty" + FIX + "pass overwrite=true", lines=2),
    C("bs-device", "batch_score", "--model_uri models:/m-0 --input {train} --output {train}.scored --device gpu",
      r"^device='gpu': is not a device" + FIX + "pass one of: auto, cpu, cuda", lines=2),
]


# --- the world the cases run in -----------------------------------------------------------------
def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """Bad (and good) inputs on disk; made once for the module."""
    root = tmp_path_factory.mktemp("bad-inputs")
    out: dict[str, str] = {"tiny": str(tiny_model_dir)}
    d = _copy_model(tiny_model_dir, root / "pickle")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    out["pickle_dir"] = str(d)
    d = _copy_model(tiny_model_dir, root / "remote-code")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    out["remote_code_dir"] = str(d)
    d = _copy_model(tiny_model_dir, root / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    out["no_tokenizer_dir"] = str(d)
    d = _copy_model(tiny_model_dir, root / "not-causal")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["BertForMaskedLM"], "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    out["not_causal_dir"] = str(d)
    d = _copy_model(tiny_model_dir, root / "no-weights")
    (d / "model.safetensors").unlink()
    out["no_weights_dir"] = str(d)
    gguf = root / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 20)
    out["broken_gguf"] = str(gguf)
    import csv

    train = root / "train.csv"
    with open(train, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mr", "ref"])
        w.writerows(sample_rows(0, 40))
    out["train"] = str(train)
    latin1 = root / "latin1.csv"
    latin1.write_bytes("mr,ref\nname[Caf\u00e9 Rouge],Caf\u00e9 Rouge is a pub.\n".encode("latin-1"))
    out["latin1_csv"] = str(latin1)
    malformed = root / "malformed.csv"
    malformed.write_text("mr,ref\nname[oops,This is broken.\neatType pub,No brackets.\n")
    out["malformed_csv"] = str(malformed)
    return out


def state(client) -> dict:
    """What a bad input must not change: finished/running runs, registered versions and aliases."""
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps)
    registry = {}
    for rm in client.search_registered_models():
        versions = {v.version: (v.status, v.source) for v in client.search_model_versions(f"name = '{rm.name}'")}
        registry[rm.name] = (versions, dict(rm.aliases or {}))
    return {"finished": sorted(r.info.run_id for r in runs if r.info.status == "FINISHED"),
            "running": sorted(r.info.run_id for r in runs if r.info.status == "RUNNING"),
            "registry": registry}


@pytest.fixture
def world(tracking, files, tiny_model_dir) -> dict[str, str]:
    """A store with a finished snapshot run and a registered version holding the `champion` alias."""
    import mlflow

    from steps import download_snapshot as ds

    manifest = ds.run(ds.Args(model=str(tiny_model_dir))).manifest_uri
    with mlflow.start_run():
        mlflow.log_text("x", "dummy/model.txt")
        run_id = mlflow.active_run().info.run_id
    version = tracking.create_registered_model("e2e-bad-inputs")
    mv = tracking.create_model_version(version.name, f"runs:/{run_id}/dummy", run_id=run_id)
    tracking.set_registered_model_alias(version.name, "champion", mv.version)
    return {**files, "manifest": manifest}


def _run_main(step: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(f"steps.{step}")
    try:
        return module.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return int(exit_.code)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)]
                                               if c.xfail else []) for c in CASES])
def test_bad_input(case: Case, world, tracking, capsys):
    argv = [a.format(**world) for a in case.argv]
    before = state(tracking)
    code = _run_main(case.step, argv)
    out = capsys.readouterr()
    errors = [ln for ln in out.err.splitlines() if re.match(r"^(\S+: )?error: ", ln)]
    assert code == case.code, out.err[-3000:]
    assert errors, out.err[-3000:]
    first = re.sub(r"^(\S+: )?error: ", "", errors[0])
    assert re.search(case.message, first), f"{first!r} !~ {case.message!r}"
    assert len(errors) == case.lines, errors
    assert not any(ln.startswith("usage:") for ln in out.err.splitlines()), "a usage dump, not one line"
    assert "Traceback" not in out.err
    after = state(tracking)
    assert after == before, (before, after)


def test_the_matrix_is_broad():
    steps = {c.step for c in CASES}
    assert len(CASES) >= 20 and steps >= {"download_snapshot", "finetune", "log_reference",
                                          "evaluate_checkpoint", "persist_and_register", "main"}
    assert len({c.id for c in CASES}) == len(CASES)
