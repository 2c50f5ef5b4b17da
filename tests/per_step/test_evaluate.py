"""evaluate_checkpoint: base vs candidate on the same held-out sentences, metrics on run and model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from test_serving import make_adapter, snapshot

from lora_pipeline import artifacts
from lora_pipeline.base.manifest import load_manifest
from lora_pipeline.errors import InputError, StepError
from lora_pipeline.model import serving
from steps import evaluate_checkpoint as ev
from steps import log_reference as lr

from conftest import runs_with_status, sample_rows

# Three examples whose scores are worked out by hand below (`test_scores_...`).
ROWS = [
    ("name[Aromi], food[Thai]", "Aromi serves Thai food."),
    ("name[Blue Spice], eatType[pub], area[riverside]", "Blue Spice is a pub by the riverside."),
    ("name[Cotto]", "There is a place called Cotto."),
]
CANDIDATE_ANSWERS = {
    "Aromi serves Thai food.": "name[Aromi], food[Thai]",  # all right: tp 2
    "Blue Spice is a pub by the riverside.": "name[Blue Spice], area[city centre]",  # tp 1, fp 1, fn 2
    "There is a place called Cotto.": "Cotto, I think",  # unparsable: fn 1
}


def write_csv(path: Path, rows) -> Path:
    pd.DataFrame(rows, columns=["mr", "ref"]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ev-adapter") / "adapter")


def fake_finetune(manifest_uri: str, adapter: Path, validation_rows) -> tuple[str, str]:
    """A run shaped like finetune's: held-out split artifact + checkpoint + output tags."""
    with mlflow.start_run() as run:
        mlflow.set_tag(artifacts.STEP_TAG, "finetune")
        mlflow.log_text("\n".join(json.dumps({"mr": m, "ref": r}) for m, r in validation_rows) + "\n",
                        "data/validation.jsonl")
        info = serving.log_e2e_model(artifacts.checkpoint_model_name(1), load_manifest(manifest_uri),
                                     adapter_dir=adapter, step=1, with_input_example=False)
        ckpt = artifacts.model_uri(info.model_id)
        val = f"runs:/{run.info.run_id}/data/validation.jsonl"
        artifacts.set_outputs(mlflow.MlflowClient(), run.info.run_id,
                              {"checkpoint": ckpt, "validation_data": val})
    return ckpt, val


@pytest.fixture
def reference(tracking, tiny_model_dir, adapter) -> tuple[str, str]:
    """(model URI of log_reference's model, held-out split URI of the finetune run behind it)."""
    manifest_uri = snapshot(str(tiny_model_dir))
    rows = sample_rows(0, 10)
    ckpt, val = fake_finetune(manifest_uri, adapter, rows)
    return lr.run(lr.Args(checkpoint_uri=ckpt)).model_uri, val


def test_defaults_follow_the_lineage_and_log_everything(tracking, reference):
    model_uri, val = reference
    res = ev.run(ev.Args(max_new_tokens=6, batch_size=4))  # every default: latest model, its split

    assert res.model_uri == model_uri and res.eval_data == val and res.examples == 10
    run = tracking.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert artifacts.get_outputs(run) == {"model": model_uri}
    m = run.data.metrics
    for key in ("slot_f1", "slot_precision", "slot_recall", "exact_match", "unparsable_rate",
                "tokens_per_s", "slot_f1.name"):
        assert f"candidate.{key}" in m and f"base.{key}" in m, key
    assert m["eval_examples"] == 10 and m["candidate.tokens_per_s"] > 0
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["validation.jsonl"]

    lm = mlflow.MlflowClient().get_logged_model(res.model_id)
    model_metrics = {x.key: x.value for x in lm.metrics}
    assert model_metrics["slot_f1"] == m["candidate.slot_f1"]
    assert model_metrics["base_slot_f1"] == m["base.slot_f1"]
    assert lm.tags[artifacts.EVAL_RUN_TAG] == res.run_id

    table = json.loads(Path(tracking.download_artifacts(res.run_id, artifacts.EVAL_TABLE_FILE)).read_text())
    df = pd.DataFrame(table["data"], columns=table["columns"])
    assert list(df.columns) == ["sentence", "expected", "predicted", "f1", "base_predicted", "base_f1"]
    assert len(df) == 10 and set(df["sentence"]) == {ref for _, ref in sample_rows(0, 10)}


def test_scores_are_computed_from_the_answers(tracking, reference, tmp_path, monkeypatch):
    """Hand-worked: tp 3, fp 1, fn 3 -> P 3/4, R 3/6, F1 2*3/(2*3+1+3) = 0.6."""
    model_uri, _ = reference
    models, batches = [], []

    def answers(model, tokenizer, sentences, **kw):
        if model not in models:
            models.append(model)
        batches.append((len(models), len(sentences), kw["batch_size"]))
        if model is models[0]:  # the candidate goes first, then the base
            return [CANDIDATE_ANSWERS[s] for s in sentences]
        return ["" for _ in sentences]

    monkeypatch.setattr(serving, "generate", answers)
    data = write_csv(tmp_path / "eval.csv", ROWS)
    res = ev.run(ev.Args(model_uri=model_uri, eval_data=str(data), batch_size=2))

    # Batches of 2: two per model, the candidate's first.
    assert batches == [(1, 2, 2), (1, 1, 2), (2, 2, 2), (2, 1, 2)]
    c = res.candidate
    assert c["slot_precision"] == pytest.approx(3 / 4) and c["slot_recall"] == pytest.approx(3 / 6)
    assert c["slot_f1"] == pytest.approx(0.6)
    assert c["exact_match"] == pytest.approx(1 / 3) and c["unparsable_rate"] == pytest.approx(1 / 3)
    # name: tp 2, fn 1 -> 4/5; area: fp 1, fn 1 -> 0; food: tp 1 -> 1.
    assert c["slot_f1.name"] == pytest.approx(0.8) and c["slot_f1.area"] == 0 and c["slot_f1.food"] == 1
    assert res.base["slot_f1"] == 0 and res.base["unparsable_rate"] == 1
    table = json.loads(Path(tracking.download_artifacts(res.run_id, artifacts.EVAL_TABLE_FILE)).read_text())
    df = pd.DataFrame(table["data"], columns=table["columns"])
    assert df["f1"].tolist() == pytest.approx([1.0, 0.4, 0.0])  # row 2: 2*1/(2*1+1+2)
    assert df["predicted"].tolist()[2] == "Cotto, I think"  # unparsable answers are shown as written


@pytest.mark.parametrize("form", ["runs", "alias"])
def test_runs_and_alias_uris_resolve_to_the_same_model(tracking, reference, tmp_path, monkeypatch,
                                                      form):
    model_uri, _ = reference
    model_id = artifacts.parse_model_id_uri(model_uri)
    lm = mlflow.MlflowClient().get_logged_model(model_id)
    if form == "runs":
        uri = f"runs:/{lm.source_run_id}/{lm.name}"
    else:
        mv = mlflow.register_model(model_uri, "e2e-test")
        tracking.set_registered_model_alias("e2e-test", "champion", mv.version)
        uri = "models:/e2e-test@champion"
    monkeypatch.setattr(serving, "generate", lambda m, t, s, **k: ["name[X]"] * len(s))
    res = ev.run(ev.Args(model_uri=uri, eval_data=str(write_csv(tmp_path / "e.csv", ROWS))))
    assert res.model_id == model_id
    assert artifacts.get_outputs(tracking.get_run(res.run_id)) == {"model": model_uri}
    assert {x.key for x in mlflow.MlflowClient().get_logged_model(model_id).metrics} >= {"slot_f1",
                                                                                          "base_slot_f1"}


# --- bad input: one line, exit != 0, no run left behind ------------------------------------------
def _one_line(capsys) -> str:
    # stderr also carries progress bars (datasets); the error itself is exactly one line.
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("content, pattern", [
    ("", r"is an empty file"),
    ("mr,ref\n", r"has no examples \(only a header\)"),
    ("mr,ref\nname[Aromi,Aromi is here.\n", r"1 of 1 rows are malformed \(1 unparsable MR; first at lines? 2\).*skip_malformed=true"),
    ("meaning,sentence\nname[A],A.\n", r"has no column mr / ref"),
])
def test_bad_eval_set(tracking, reference, tmp_path, capsys, content, pattern):
    model_uri, _ = reference
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    n_runs = len(runs_with_status(tracking, "FINISHED"))
    assert ev.main(["--model_uri", model_uri, "--eval_data", str(bad)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: eval_data='{bad}': ") and re.search(pattern, line)
    assert len(runs_with_status(tracking, "FINISHED")) == n_runs and not runs_with_status(tracking, "FAILED")


def test_unknown_model_uri(tracking, capsys):
    uri = "models:/m-0123456789abcdef0123456789abcdef"
    assert ev.main(["--model_uri", uri, "--eval_data", "x.csv"]) == 2
    assert _one_line(capsys).startswith(f"error: model_uri='{uri}': no such model (")


def test_static_problems_are_reported_together(tracking):
    with pytest.raises(InputError) as err:
        ev.run(ev.Args(model_uri="m-1", batch_size=0, max_new_tokens=-1, max_examples=-2))
    assert [line.split("=")[0] for line in err.value.lines()] == ["model_uri", "max_examples",
                                                                  "batch_size", "max_new_tokens"]


def test_no_held_out_split_in_lineage(tracking, tiny_model_dir, adapter):
    manifest = load_manifest(snapshot(str(tiny_model_dir)))
    with mlflow.start_run():
        uri = artifacts.model_uri(serving.log_e2e_model(
            "m", manifest, adapter_dir=adapter,
            with_input_example=False).model_id)
    with pytest.raises(InputError, match=r"^eval_data='': is empty and no finetune run in the lineage"):
        ev.run(ev.Args(model_uri=uri))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("E2E_LORA_CACHE", str(tmp_path / "fresh-cache"))
    return tmp_path / "fresh-cache"


def _snapshot_files(tracking, manifest_uri: str) -> Path:
    run_id = artifacts.parse_runs_uri(manifest_uri)[0]
    return Path(tracking.get_run(run_id).info.artifact_uri.removeprefix("file://")) / \
        artifacts.SNAPSHOT_FILES_DIR


@pytest.mark.parametrize("damage, pattern", [
    ("delete", r"cannot resolve base runs:/\w+/snapshot/files from the artifact store"),
    ("corrupt", r"digest mismatch for base file model\.safetensors of runs:/\w+/snapshot/files"),
])
def test_base_problems_are_one_line_exit_1(tracking, tiny_model_dir, adapter, tmp_path, capsys,
                                          fresh_cache, damage, pattern):
    manifest_uri = snapshot(str(tiny_model_dir))
    ckpt, _ = fake_finetune(manifest_uri, adapter, ROWS)
    files = _snapshot_files(tracking, manifest_uri)
    if damage == "delete":
        shutil.rmtree(files)
    else:
        w = files / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[100] ^= 0xFF
        w.write_bytes(bytes(data))
    data = write_csv(tmp_path / "e.csv", ROWS)
    assert ev.main(["--model_uri", ckpt, "--eval_data", str(data)]) == 1
    line = _one_line(capsys)
    assert line.startswith("error: ") and re.search(pattern, line)
    assert not [r for r in runs_with_status(tracking, "FAILED") + runs_with_status(tracking, "RUNNING")]
    with pytest.raises(StepError):
        ev.run(ev.Args(model_uri=ckpt, eval_data=str(data)))


def test_persisted_model_evaluates_its_base_from_the_persisted_copy(tracking, tiny_model_dir, adapter,
                                                                    tmp_path, fresh_cache):
    """A registered model carries its base: evaluation needs neither the snapshot run nor the Hub."""
    manifest_uri = snapshot(str(tiny_model_dir))
    with mlflow.start_run():
        uri = artifacts.model_uri(serving.log_e2e_model(
            "persisted", load_manifest(manifest_uri), adapter_dir=adapter,
            persisted_base_dir=tiny_model_dir, with_input_example=False).model_id)
    shutil.rmtree(_snapshot_files(tracking, manifest_uri))
    res = ev.run(ev.Args(model_uri=uri, eval_data=str(write_csv(tmp_path / "e.csv", ROWS)),
                         max_new_tokens=4))
    assert res.examples == 3 and "slot_f1" in res.base and "slot_f1" in res.candidate
    assert not (fresh_cache / "bases").exists()  # nothing was fetched from the artifact store
