"""persist_and_register, the registry half: the promotion gate, dry runs, idempotency, bad input."""

from __future__ import annotations

import pytest
from test_persist import GOOD, make_candidate, snapshot, versions

from lora_pipeline import artifacts
from lora_pipeline.errors import InputError
from steps import persist_and_register as par

from conftest import runs_with_status

NAME = "e2e-gate"


@pytest.fixture
def snap(tracking, tiny_model_dir):
    return snapshot(tiny_model_dir)


def metrics(f1: float, base: float = 0.30) -> dict[str, float]:
    return {"slot_f1": f1, "base_slot_f1": base, "exact_match": f1 / 2, "base_exact_match": base / 2}


def aliases(client, name: str = NAME) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def test_gate_promotes_a_better_model_and_refuses_a_worse_one(tracking, tiny_model_dir, snap, tmp_path):
    first = make_candidate(tmp_path, tiny_model_dir, snap, seed=1, metrics=metrics(0.80))
    r1 = par.run(par.Args(model_uri=first.uri, registered_name=NAME))
    assert (r1.version, r1.decision, r1.alias) == ("1", "promote", "champion")
    assert aliases(tracking) == {"champion": "1", "challenger": "1"}

    # Better, but by less than the margin (0.805 - 0.80 = 0.005 < 0.01): challenger only.
    close = make_candidate(tmp_path, tiny_model_dir, snap, seed=2, metrics=metrics(0.805))
    r2 = par.run(par.Args(model_uri=close.uri, registered_name=NAME))
    assert (r2.version, r2.decision, r2.alias) == ("2", "keep", "challenger")
    assert r2.champion_version == "1" and r2.champion_value == pytest.approx(0.80)
    assert aliases(tracking) == {"champion": "1", "challenger": "2"}

    # Worse: refused.
    worse = make_candidate(tmp_path, tiny_model_dir, snap, seed=3, metrics=metrics(0.70))
    r3 = par.run(par.Args(model_uri=worse.uri, registered_name=NAME))
    assert (r3.version, r3.decision) == ("3", "keep")
    assert aliases(tracking) == {"champion": "1", "challenger": "3"}

    # Better by exactly the margin (0.81 - 0.80 = 0.01): promoted.
    better = make_candidate(tmp_path, tiny_model_dir, snap, seed=4, metrics=metrics(0.81))
    r4 = par.run(par.Args(model_uri=better.uri, registered_name=NAME))
    assert (r4.version, r4.decision, r4.alias) == ("4", "promote", "champion")
    assert aliases(tracking) == {"champion": "4", "challenger": "4"}

    # The decision and its numbers are on the version and in the run.
    tags = tracking.get_model_version(NAME, "3").tags
    assert tags["gate.decision"] == "keep" and tags["gate.champion_version"] == "1"
    assert float(tags["gate.candidate"]) == 0.70 and float(tags["gate.champion"]) == 0.80
    assert "< margin 0.01" in tags["gate.reason"]
    run = tracking.get_run(r3.run_id)
    assert run.data.metrics["gate.candidate"] == 0.70 and run.data.metrics["gate.champion"] == 0.80
    assert run.data.tags["gate.decision"] == "keep"
    assert run.data.tags["pipeline.output.alias"] == "challenger"


def test_a_model_that_does_not_beat_its_base_never_becomes_champion(tracking, tiny_model_dir, snap, tmp_path):
    cand = make_candidate(tmp_path, tiny_model_dir, snap, metrics=metrics(0.40, base=0.45))
    res = par.run(par.Args(model_uri=cand.uri, registered_name=NAME))
    assert (res.decision, res.alias) == ("keep", "challenger")
    assert "does not beat the base model" in res.reason
    assert aliases(tracking) == {"challenger": "1"}


def test_lower_is_better_metric_and_custom_margin(tracking, tiny_model_dir, snap, tmp_path):
    a = make_candidate(tmp_path, tiny_model_dir, snap, seed=1,
                       metrics={"unparsable_rate": 0.20, "base_unparsable_rate": 0.50})
    par.run(par.Args(model_uri=a.uri, registered_name=NAME, gate_metric="unparsable_rate"))
    b = make_candidate(tmp_path, tiny_model_dir, snap, seed=2,
                       metrics={"unparsable_rate": 0.10, "base_unparsable_rate": 0.50})
    res = par.run(par.Args(model_uri=b.uri, registered_name=NAME, gate_metric="unparsable_rate",
                           gate_margin=0.05))
    assert res.decision == "promote"  # 0.20 - 0.10 = 0.10 fewer unparsable answers >= 0.05
    assert aliases(tracking)["champion"] == "2"


def test_dry_run_reports_the_decision_and_changes_nothing(tracking, tiny_model_dir, snap, tmp_path):
    first = make_candidate(tmp_path, tiny_model_dir, snap, seed=1, metrics=metrics(0.80))
    par.run(par.Args(model_uri=first.uri, registered_name=NAME))
    before = (aliases(tracking), [v.version for v in versions(tracking, NAME)])
    logged_before = len(tracking.search_logged_models([tracking.get_experiment_by_name("tests").experiment_id]))

    better = make_candidate(tmp_path, tiny_model_dir, snap, seed=2, metrics=metrics(0.90))
    res = par.run(par.Args(model_uri=better.uri, registered_name=NAME, dry_run=True))
    assert (res.decision, res.version, res.alias) == ("promote", "", "")
    assert res.champion_version == "1" and res.candidate_value == 0.90
    assert (aliases(tracking), [v.version for v in versions(tracking, NAME)]) == before
    # Nothing persisted either: the only new logged model is the candidate make_candidate logged (+ its checkpoint).
    logged_after = len(tracking.search_logged_models([tracking.get_experiment_by_name("tests").experiment_id]))
    assert logged_after == logged_before + 2
    tags = tracking.get_run(res.run_id).data.tags
    assert tags["gate.decision"] == "promote" and tags["gate.dry_run"] == "true"
    assert tags["pipeline.output.decision"] == "promote" and "pipeline.output.registered" not in tags


def test_running_twice_creates_one_version(tracking, tiny_model_dir, snap, tmp_path):
    cand = make_candidate(tmp_path, tiny_model_dir, snap, metrics=GOOD)
    r1 = par.run(par.Args(model_uri=cand.uri, registered_name=NAME))
    r2 = par.run(par.Args(model_uri=cand.uri, registered_name=NAME))
    assert [v.version for v in versions(tracking, NAME)] == [1]
    assert (r2.version, r2.reused_version, r2.decision, r2.alias) == ("1", True, "already_champion", "champion")
    assert r1.persisted_model_uri == r2.persisted_model_uri
    persisted = [m for m in tracking.search_logged_models([tracking.get_experiment_by_name("tests").experiment_id])
                 if m.name == artifacts.PERSISTED_MODEL_NAME]
    assert len(persisted) == 1  # the second run copied nothing

    # A rerun for an older version leaves the newer challenger where it is.
    newer = make_candidate(tmp_path, tiny_model_dir, snap, seed=2, metrics=metrics(0.805))
    par.run(par.Args(model_uri=newer.uri, registered_name=NAME))
    assert aliases(tracking) == {"champion": "1", "challenger": "2"}
    par.run(par.Args(model_uri=cand.uri, registered_name=NAME))
    assert aliases(tracking) == {"champion": "1", "challenger": "2"}
    assert sorted(int(v.version) for v in versions(tracking, NAME)) == [1, 2]


# --- bad input: one line, exit != 0, registry unchanged ----------------------------------------------
def _assert_untouched(client):
    assert client.search_registered_models() == []
    assert [r for r in runs_with_status(client, "FINISHED") + runs_with_status(client, "FAILED")
            if r.data.tags.get(artifacts.STEP_TAG) == par.ENTRY_POINT] == []


def test_unknown_model_uri(tracking, capsys):
    code = par.main(["--model_uri", "models:/m-" + "0" * 32, "--registered_name", NAME])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"error: model_uri='models:/m-{'0' * 32}': no such logged model in the tracking store; "
                   "fix: pass the models:/<model_id> URI that log_reference printed (same "
                   "MLFLOW_TRACKING_URI)"]
    _assert_untouched(tracking)


def test_all_input_problems_are_reported_at_once(tracking):
    with pytest.raises(InputError) as info:
        par.run(par.Args(model_uri="runs:/abc/model", registered_name="team/e2e", gate_metric="f1!",
                         gate_margin=-0.5))
    assert [p.field for p in info.value.problems] == ["model_uri", "registered_name", "gate_metric",
                                                      "gate_margin"]
    _assert_untouched(tracking)


@pytest.mark.parametrize("name, why", [
    ("", "is empty"), ("a/b", "contains '/'"), ("a:b", "contains ':'"), ("e2e@prod", "contains '@'"),
    ("..", "resolves to another path"), (" e2e", "whitespace"), ("it's", "contains \"'\""),
])
def test_invalid_registered_names(tracking, name, why):
    with pytest.raises(InputError, match=rf"^registered_name=.*: .*{why}"):
        par.run(par.Args(model_uri="models:/m-" + "0" * 32, registered_name=name))


def test_model_never_evaluated_names_the_step_to_run(tracking, tiny_model_dir, snap, tmp_path, capsys):
    cand = make_candidate(tmp_path, tiny_model_dir, snap, metrics=None)
    code = par.main(["--model_uri", cand.uri, "--registered_name", NAME])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1
    assert "has no evaluation metric slot_f1 / base_slot_f1" in err[0]
    assert f"fix: run evaluate_checkpoint --model_uri {cand.uri} first" in err[0]
    _assert_untouched(tracking)


def test_champion_without_the_gate_metric_is_an_error_before_any_change(tracking, tiny_model_dir, snap,
                                                                         tmp_path):
    first = make_candidate(tmp_path, tiny_model_dir, snap, seed=1, metrics=metrics(0.80))
    par.run(par.Args(model_uri=first.uri, registered_name=NAME))
    second = make_candidate(tmp_path, tiny_model_dir, snap, seed=2,
                            metrics={**metrics(0.90), "custom": 1.0, "base_custom": 0.5})
    with pytest.raises(InputError, match=r"^gate_metric='custom': the current champion of e2e-gate "
                                         r"\(version 1\) has no custom metric"):
        par.run(par.Args(model_uri=second.uri, registered_name=NAME, gate_metric="custom"))
    assert [v.version for v in versions(tracking, NAME)] == [1]


def test_unreachable_registry(tracking, monkeypatch, capsys):
    import mlflow

    from hubserver import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    try:
        code = par.main(["--model_uri", "models:/m-" + "0" * 32, "--registered_name", NAME])
    finally:
        mlflow.set_tracking_uri(tracking._tracking_client.tracking_uri)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"error: model registry at {uri} is unreachable (")
    assert err[0].endswith("nothing was changed")
    _assert_untouched(tracking)



def test_registry_failure_after_persisting_keeps_the_copy_and_a_rerun_registers_it(
        tracking, tiny_model_dir, snap, tmp_path, monkeypatch, capsys):
    import mlflow
    from mlflow.exceptions import MlflowException

    cand = make_candidate(tmp_path, tiny_model_dir, snap, metrics=GOOD)

    def down(*args, **kwargs):
        raise MlflowException("API request failed: connection refused")

    with monkeypatch.context() as m:
        m.setattr(mlflow, "register_model", down)
        code = par.main(["--model_uri", cand.uri, "--registered_name", NAME])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(err) == 1
    assert "the persisted model is kept and verified: rerun persist_and_register" in err[0]
    assert versions(tracking, NAME) == []

    res = par.run(par.Args(model_uri=cand.uri, registered_name=NAME))
    persisted = [m for m in tracking.search_logged_models([tracking.get_experiment_by_name("tests").experiment_id])
                 if m.name == artifacts.PERSISTED_MODEL_NAME]
    assert len(persisted) == 1 and res.persisted_model_uri == f"models:/{persisted[0].model_id}"
    assert res.persisted_bytes == 0  # reused, not copied again
    assert [v.version for v in versions(tracking, NAME)] == [1] and res.alias == "champion"
