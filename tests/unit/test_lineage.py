"""The one lineage walk (lora_pipeline/tracking/lineage.py) on a fake store: what it follows, where it
stops, and the two questions the steps ask it (the finetune run; the held-out split)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lora_pipeline import artifacts
from lora_pipeline.tracking import lineage


def _id(n: int) -> str:
    return f"m-{n:032x}"


class FakeStore:
    """Logged models and runs by id; a missing id raises, as MLflow does."""

    def __init__(self):
        self.models, self.runs = {}, {}

    def model(self, n: int, *, run: str = "", tags=None, params=None):
        self.models[_id(n)] = SimpleNamespace(model_id=_id(n), source_run_id=run, tags=tags or {},
                                              params=params or {})
        return self.models[_id(n)]

    def run(self, run_id: str, *, step: str = "", outputs=None, params=None):
        tags = {artifacts.STEP_TAG: step}
        tags.update({artifacts.OUTPUT_TAG_PREFIX + k: v for k, v in (outputs or {}).items()})
        self.runs[run_id] = SimpleNamespace(info=SimpleNamespace(run_id=run_id),
                                            data=SimpleNamespace(tags=tags, params=params or {}))

    def get_logged_model(self, model_id):
        return self.models[model_id]

    def get_run(self, run_id):
        return self.runs[run_id]


def _ref(n: int) -> str:
    return artifacts.model_uri(_id(n))


@pytest.fixture
def pipeline() -> FakeStore:
    """persisted (lineage tag) -> reference (source-model tag) -> checkpoint (finetune run)."""
    s = FakeStore()
    s.run("ft", step="finetune", outputs={artifacts.VALIDATION_DATA_OUTPUT: "runs:/ft/data/validation.jsonl"})
    s.run("lr", step="log_reference", params={"checkpoint_uri": _ref(1)})
    s.run("pr", step="persist_and_register")
    s.model(1, run="ft")
    s.model(2, run="lr", tags={artifacts.SOURCE_MODEL_TAG: _ref(1)})
    s.model(3, run="pr", tags={artifacts.LINEAGE_PREFIX + "source_model": _ref(2)})
    return s


def test_finds_the_finetune_run_and_its_split_from_any_model_downstream(pipeline):
    for start in (1, 2, 3):
        model = pipeline.get_logged_model(_id(start))
        assert lineage.finetune_run(pipeline, model).info.run_id == "ft"
        assert lineage.validation_data(pipeline, model) == "runs:/ft/data/validation.jsonl"


def test_follows_run_parameters_and_skips_what_is_gone(pipeline):
    # The reference model lost its tag; its run's checkpoint_uri parameter still leads back.
    pipeline.models[_id(2)].tags = {"unrelated": _ref(99)}  # 99: a deleted model
    assert lineage.finetune_run(pipeline, pipeline.get_logged_model(_id(3))).info.run_id == "ft"
    del pipeline.runs["ft"]  # the finetune run is gone: nothing found, nothing raised
    assert lineage.finetune_run(pipeline, pipeline.get_logged_model(_id(3))) is None
    assert lineage.validation_data(pipeline, pipeline.get_logged_model(_id(3))) is None


def test_a_loop_ends_and_the_walk_stops_at_the_hop_limit():
    s = FakeStore()
    s.model(1, tags={artifacts.SOURCE_MODEL_TAG: _ref(2)})
    s.model(2, tags={artifacts.SOURCE_MODEL_TAG: _ref(1)})
    assert [m.model_id for m, _ in lineage.walk(s, s.get_logged_model(_id(1)))] == [_id(1), _id(2)]

    chain = FakeStore()
    chain.run("ft", step="finetune")
    n = lineage.MAX_HOPS + 1
    for i in range(1, n + 1):
        chain.model(i, run="ft" if i == n else "", tags={artifacts.SOURCE_MODEL_TAG: _ref(i + 1)})
    start = chain.get_logged_model(_id(1))
    assert len(list(lineage.walk(chain, start))) == lineage.MAX_HOPS
    assert lineage.finetune_run(chain, start) is None  # one hop too far
    assert lineage.finetune_run(chain, chain.get_logged_model(_id(2))).info.run_id == "ft"
