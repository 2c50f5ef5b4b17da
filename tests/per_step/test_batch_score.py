"""batch_score: a registered tiny model scores generated tables on Spark `local[2]`.

One SparkSession serves the whole test session (a JVM start costs seconds); the step scores on it and
leaves it running. Every table mixes good rows with bad ones (null, empty, blank, over-long text).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from test_serving import SENTENCES, log_checkpoint, make_adapter, snapshot

from lora_pipeline import artifacts
from lora_pipeline.errors import InputError
from lora_pipeline.scoring import table
from steps import batch_score as bs

from conftest import ROOT, VENV_BIN

NAME = artifacts.DEFAULT_REGISTERED_NAME
MAX_NEW_TOKENS = 8
BATCH_SIZE = 4
# What a test JVM may use: small, quiet, two shuffle partitions (the default 200 is for clusters).
TEST_SPARK_CONF = {"spark.driver.memory": "1g", "spark.sql.shuffle.partitions": "2",
                   "spark.default.parallelism": "2", "spark.ui.enabled": "false"}
BAD_ROWS = {  # text -> the error it must get
    None: table.ERR_EMPTY,
    "": table.ERR_EMPTY,
    "   ": table.ERR_EMPTY,
    "\t\n ": table.ERR_EMPTY,
    "Zizzi is a pub. " * 600: table.ERR_TOO_LONG,
}


@pytest.fixture(scope="session")
def spark():
    from lora_pipeline.scoring import spark as spark_session

    session, _ = spark_session.session("local[2]", TEST_SPARK_CONF)
    yield session
    session.stop()


@pytest.fixture(scope="module")
def adapter(sharp_model_dir, tmp_path_factory) -> Path:
    return make_adapter(sharp_model_dir, tmp_path_factory.mktemp("bs-adapter") / "adapter")


@pytest.fixture
def champion(tracking, sharp_model_dir, adapter) -> str:
    """The tiny model registered as version 1 of the default name, with the champion alias. The sharp
    variant (conftest): the default tiny init repeats a near-tied token, which the Spark workers and
    this process broke differently in some runs ('' against NUL characters), so the comparison with
    in-process predict failed by chance."""
    uri = log_checkpoint(snapshot(str(sharp_model_dir)), adapter)
    version = mlflow.register_model(uri, NAME).version
    tracking.set_registered_model_alias(NAME, artifacts.CHAMPION_ALIAS, version)
    return uri


def batch_score_runs(client) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, filter_string=f"tags.`{artifacts.STEP_TAG}` = '{bs.ENTRY_POINT}'")


def make_table(n_good: int = 24) -> pd.DataFrame:
    """`n_good` distinct sentences with the bad rows spread among them; `id` keys every row."""
    texts = [f"{SENTENCES[i % len(SENTENCES)]} Row {i}." for i in range(n_good)]
    for k, bad in enumerate(BAD_ROWS):
        texts.insert(3 + 5 * k, bad)
    return pd.DataFrame({"id": range(len(texts)), "prompt": texts, "source": "generated"})


def in_process(model_uri: str, texts: list[str]) -> pd.DataFrame:
    return mlflow.pyfunc.load_model(model_uri).predict(
        pd.DataFrame({"prompt": texts}), params={"max_new_tokens": MAX_NEW_TOKENS, "batch_size": BATCH_SIZE})


def args(input_: Path | str, output: Path | str, **kw) -> bs.Args:
    return bs.Args(input=str(input_), output=str(output), max_new_tokens=MAX_NEW_TOKENS,
                   batch_size=BATCH_SIZE, **kw)


def read_scored(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output).sort_values("id").reset_index(drop=True)


def assert_scored(out: pd.DataFrame, src: pd.DataFrame, model_uri: str) -> None:
    """Row count in == out, the input's columns kept, good rows = in-process predict, bad rows: errors."""
    assert len(out) == len(src)
    assert list(out.columns) == list(src.columns) + ["mr", "attributes", "valid", table.ERROR_COLUMN]
    bad = src["prompt"].isna() | src["prompt"].isin([b for b in BAD_ROWS if b is not None])
    good = out[~bad.to_numpy()].reset_index(drop=True)
    expected = in_process(model_uri, src.loc[~bad, "prompt"].tolist())
    assert good["mr"].tolist() == expected["mr"].tolist()
    assert good["attributes"].tolist() == expected["attributes"].tolist()
    assert good["valid"].tolist() == expected["valid"].tolist()
    assert good[table.ERROR_COLUMN].isna().all()
    for text, row in zip(src.loc[bad, "prompt"], out[bad.to_numpy()].itertuples(), strict=True):
        assert row.error == BAD_ROWS[None if pd.isna(text) else text]
        assert pd.isna(row.mr) and pd.isna(row.attributes) and pd.isna(row.valid)


def test_scores_a_table_with_bad_rows_like_in_process_predict(spark, tracking, champion, tmp_path):
    src = make_table()
    src.to_parquet(tmp_path / "sentences.parquet")
    res = bs.run(args(tmp_path / "sentences.parquet", tmp_path / "scored"))

    out = read_scored(tmp_path / "scored")
    assert_scored(out, src, champion)
    assert (res.input_rows, res.output_rows, res.error_rows) == (len(src), len(src), len(BAD_ROWS))
    # The alias was resolved once, at the start: the run says which version scored.
    assert (res.model_uri, res.model_version, res.model_alias) == (f"models:/{NAME}/1", "1", "champion")
    run = tracking.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[bs.MODEL_VERSION_TAG] == "1" and run.data.tags[bs.MODEL_ALIAS_TAG] == "champion"
    assert run.data.tags[bs.INPUT_TAG] == (tmp_path / "sentences.parquet").as_uri()
    assert run.data.params["input"] == str(tmp_path / "sentences.parquet")
    assert artifacts.get_outputs(run) == {artifacts.SCORED_TABLE_OUTPUT: str(tmp_path / "scored")}
    m = run.data.metrics
    assert (m["input_rows"], m["output_rows"], m["error_rows"]) == (len(src), len(src), len(BAD_ROWS))
    assert m["rows_per_s"] > 0
    schema = mlflow.artifacts.load_dict(f"runs:/{res.run_id}/{artifacts.OUTPUT_SCHEMA_FILE}")
    assert [f["name"] for f in schema["fields"]] == list(out.columns)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".scored")]  # no temporary left


def test_csv_input_with_quotes_and_an_existing_output(spark, tracking, champion, tmp_path, capsys):
    src = make_table(6)
    src.loc[1, "prompt"] = 'The "Eagle", a pub, serves\nItalian food.'  # quotes, commas, a newline
    src.to_csv(tmp_path / "in.csv", index=False)
    output = tmp_path / "scored"
    output.mkdir()
    (output / "keep.txt").write_text("not ours")

    with pytest.raises(InputError, match=r"^output='.*scored': already exists and is not empty; "
                                         r"fix: pass overwrite=true to replace it, or another output$"):
        bs.run(args(tmp_path / "in.csv", output))
    assert bs.main(["--input", str(tmp_path / "in.csv"), "--output", str(output)]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line
    assert [p.name for p in output.iterdir()] == ["keep.txt"] and batch_score_runs(tracking) == []

    res = bs.run(args(tmp_path / "in.csv", output, overwrite=True))
    assert not (output / "keep.txt").exists()
    src["id"] = src["id"].astype(str)  # CSV columns are read as text
    out = read_scored(output)
    out["id_num"] = out["id"].astype(int)
    out = out.sort_values("id_num").drop(columns="id_num").reset_index(drop=True)
    assert_scored(out, src, champion)
    assert res.error_rows == len(BAD_ROWS)


def test_table_name_input_and_a_file_uri_output(spark, tracking, champion, tmp_path):
    """A name the Spark catalog knows (here a temporary view); output through Hadoop's FileSystem."""
    src = make_table(6)
    path = tmp_path / "view.jsonl"
    src.to_json(path, orient="records", lines=True)
    spark.read.json(str(path)).select("id", "prompt", "source").createOrReplaceTempView("sentences")
    res = bs.run(args("sentences", (tmp_path / "scored").as_uri()))
    assert res.output == (tmp_path / "scored").as_uri()
    assert_scored(read_scored(tmp_path / "scored"), src, champion)


def test_missing_model_is_one_line_exit_2_and_nothing_is_written(tracking, tmp_path, capsys):
    make_table(4).to_parquet(tmp_path / "in.parquet")
    code = bs.main(["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "scored")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: model_uri='models:/e2e-extractor@champion': no such model (")
    assert err.count("\n") == 1
    assert not (tmp_path / "scored").exists() and batch_score_runs(tracking) == []


def test_unreadable_input_is_one_line_exit_2_and_nothing_is_written(spark, tracking, champion, tmp_path,
                                                                     capsys):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    code = bs.main(["--input", str(tmp_path / "broken.parquet"), "--output", str(tmp_path / "scored")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: input='{tmp_path / 'broken.parquet'}': cannot be read as a table (")
    assert err.count("\n") == 1
    assert not (tmp_path / "scored").exists() and batch_score_runs(tracking) == []


def test_missing_input_column_names_the_columns(spark, tracking, champion, tmp_path):
    make_table(4).rename(columns={"prompt": "text"}).to_parquet(tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"^input_column='prompt': is not a column of the input "
                                         r"\(columns: id, text, source\); fix: pass the column"):
        bs.run(args(tmp_path / "in.parquet", tmp_path / "scored"))


def test_all_input_problems_are_reported_at_once(tracking, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "part-0.parquet").write_bytes(b"x")
    with pytest.raises(InputError) as info:
        bs.run(bs.Args(model_uri="champion", input=str(tmp_path / "missing.csv"), output=str(taken),
                       spark_master="local[two]", batch_size=0, max_new_tokens=-1, device="gpu"))
    assert [p.field for p in info.value.problems] == ["model_uri", "input", "output", "spark_master",
                                                      "batch_size", "max_new_tokens", "device"]
    assert "device='gpu': is not a device; fix: pass one of: auto, cpu, cuda" in str(info.value)


def test_cuda_on_a_machine_without_it_is_one_line_exit_2(tracking, champion, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make_table(4).to_parquet(tmp_path / "in.parquet")
    code = bs.main(["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "o"),
                    "--device", "cuda"])
    assert code == 2
    assert capsys.readouterr().err == ("error: device='cuda': no CUDA device on this machine; fix: pass "
                                       "device=auto or device=cpu, or run on a machine with a CUDA GPU\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_mlflow_run_batch_score(tracking, champion, tmp_path):
    """The entry point through `mlflow run . -e batch_score --env-manager local` (its own JVM)."""
    src = make_table(6)
    src.to_parquet(tmp_path / "in.parquet")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [str(VENV_BIN / "mlflow"), "run", str(ROOT), "-e", "batch_score", "--env-manager", "local",
         "-P", f"input={tmp_path / 'in.parquet'}", "-P", f"output={tmp_path / 'scored'}",
         "-P", f"max_new_tokens={MAX_NEW_TOKENS}", "-P", f"batch_size={BATCH_SIZE}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_scored(read_scored(tmp_path / "scored"), src, champion)
    (run,) = batch_score_runs(tracking)
    assert run.info.status == "FINISHED"
    assert run.data.tags[artifacts.STEP_TAG] == "batch_score"
    assert run.data.tags[bs.MODEL_VERSION_TAG] == "1"
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["output_rows"] == len(src)


def test_a_table_a_killed_job_was_replacing_is_restored(tmp_path):
    """kill -9 between moving the old output aside and renaming the new one in: the next run puts the old
    table back before removing the killed job's work folder."""
    import psutil

    dead = next(pid for pid in range(4_000_000, 4_100_000) if not psutil.pid_exists(pid))
    work = tmp_path / f".scored.batch_score-{dead}-0123abcd"
    (work / "replaced").mkdir(parents=True)
    (work / "replaced" / "part-0.parquet").write_bytes(b"old table")
    (work / "table").mkdir()
    table._remove_stale_temps(str(tmp_path / "scored"))
    assert (tmp_path / "scored" / "part-0.parquet").read_bytes() == b"old table"
    assert not work.exists()


def test_the_device_reaches_the_model_through_the_environment(tracking, champion, monkeypatch):
    """What batch_score hands its Spark workers (E2E_LORA_DEVICE) is what the model loads on."""
    import torch

    from lora_pipeline.errors import StepError
    from lora_pipeline.model.device import DEVICE_ENV

    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert mlflow.pyfunc.load_model(champion).unwrap_python_model().model.device.type == "cpu"
    if not torch.cuda.is_available():
        monkeypatch.setenv(DEVICE_ENV, "cuda")
        with pytest.raises(StepError, match=r"^E2E_LORA_DEVICE='cuda': CUDA is not available"):
            mlflow.pyfunc.load_model(champion)


_FAILING_MODEL = '''
import mlflow
import mlflow.pyfunc


class Failing(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        raise ValueError("the model broke on purpose")


mlflow.models.set_model(Failing())
'''


def log_code_model(code: str, name: str, tmp_path: Path):
    """A pyfunc model logged from `code` (models from code), taking `prompt` and returning `mr`."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    (tmp_path / f"{name}.py").write_text(code)
    with mlflow.start_run():
        return mlflow.pyfunc.log_model(name=name, python_model=str(tmp_path / f"{name}.py"),
                                       signature=ModelSignature(Schema([ColSpec("string", "prompt")]),
                                                                Schema([ColSpec("string", "mr")])))


def test_a_model_that_fails_in_the_workers_is_one_line_and_publishes_nothing(spark, tracking, tmp_path):
    """The worker's own exception, not Spark's wrapper and traceback, is the one line; no output."""
    from lora_pipeline.errors import StepError

    info = log_code_model(_FAILING_MODEL, "failing", tmp_path)
    make_table(4).to_parquet(tmp_path / "in.parquet")
    with pytest.raises(StepError, match=r"^scoring into .*scored failed \(ValueError: the model broke on "
                                        r"purpose\); nothing was written there; fix: "):
        bs.run(args(tmp_path / "in.parquet", tmp_path / "scored", model_uri=info.model_uri))
    assert not (tmp_path / "scored").exists() and not list(tmp_path.glob(".scored*"))
    (run,) = batch_score_runs(tracking)
    assert run.info.status == "FAILED"


_ENV_MODEL = '''
import os

import mlflow
import mlflow.pyfunc
import pandas as pd


class Env(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"mr": [os.environ.get("E2E_LORA_PACK_PROCESSES", "unset")] * len(model_input)})


mlflow.models.set_model(Env())
'''


def test_the_workers_know_how_many_of_them_share_the_machines_memory(spark, tracking, tmp_path, monkeypatch):
    """local[2]: two Python workers load the model side by side, so each is told 2 (and packs its Linear
    weights only within half its usual memory budget: tests/unit/test_packed_linear.py)."""
    from lora_pipeline.model.packed_linear import ENV_PROCESSES

    monkeypatch.delenv(ENV_PROCESSES, raising=False)
    info = log_code_model(_ENV_MODEL, "env", tmp_path)
    make_table(4).to_parquet(tmp_path / "in.parquet")
    bs.run(args(tmp_path / "in.parquet", tmp_path / "scored", model_uri=info.model_uri))
    out = read_scored(tmp_path / "scored")
    assert set(out.loc[out[table.ERROR_COLUMN].isna(), "mr"]) == {"2"}


def test_a_json_task_model_is_refused_up_front_and_says_why(tracking, tiny_model_dir, tmp_path):
    """A json/text task model takes `prompt` or `messages`; mlflow 3.17's spark_udf cannot feed it (it
    fills the missing `messages` with NaN, then refuses its own input), so the step refuses it in one
    line before Spark starts, naming what it scores."""
    from test_tasks_pipeline import VENUES, _train

    data = tmp_path / "chat.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for name in VENUES:
            fh.write(json.dumps({"venue": name, "messages": [
                {"role": "user", "content": f"{name} is a pub."},
                {"role": "assistant", "content": json.dumps({"name": name})}]}) + "\n")
    ref = _train(tracking, tiny_model_dir, data, task="json", group_column="venue")
    pd.DataFrame({"id": [0], "prompt": ["Kobo is a pub."]}).to_parquet(tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"takes input columns \['prompt', 'messages'\].*json and text task "
                                         r"models are not batch-scored yet"):
        bs.run(args(tmp_path / "in.parquet", tmp_path / "scored", model_uri=ref.model_uri))
    assert not (tmp_path / "scored").exists()
