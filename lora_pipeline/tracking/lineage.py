"""Following a logged model back through the models and runs it was made from (one walk for all steps).

A model points at what it was made from in several ways: its source run, log_reference's
`pipeline.source_model` tag, persist_and_register's `lineage.source_model` tag, a `checkpoint_uri`
parameter of the run that logged it, ... Any `models:/<model_id>` among its tags, its parameters and
its source run's parameters is followed, breadth first, at most MAX_HOPS models deep (a loop in the
tags stops there instead of spinning). Lineage is best effort: a deleted run or model is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from lora_pipeline import artifacts
from lora_pipeline.training import ENTRY_POINT as FINETUNE_ENTRY_POINT

# persisted model -> reference model (log_reference) -> checkpoint (finetune) -> its run, with room
# for a model logged from another model on the way.
MAX_HOPS = 6


def run_or_none(client: Any, run_id: str | None):
    """The run, or None for no id or a run that is gone (deleted, another store)."""
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:  # a deleted or foreign run: lineage is best effort
        return None


def _references(model: Any, run: Any) -> list[str]:
    """Model ids a logged model refers to, the source-model tag first."""
    tags = model.tags or {}
    refs = [tags.get(artifacts.SOURCE_MODEL_TAG, ""), *tags.values(), *(model.params or {}).values()]
    if run is not None:
        refs += list(run.data.params.values())
    ids = [artifacts.parse_model_id_uri(str(ref)) for ref in refs]
    return [i for i in dict.fromkeys(ids) if i]


def walk(client: Any, model: Any) -> Iterator[tuple[Any, Any]]:
    """(logged model, its source run or None) for `model` and what it was made from, nearest first."""
    frontier, seen = [model], set()
    for _ in range(MAX_HOPS):
        nxt = []
        for m in frontier:
            if m.model_id in seen:
                continue
            seen.add(m.model_id)
            run = run_or_none(client, m.source_run_id)
            yield m, run
            for mid in _references(m, run):
                if mid in seen:
                    continue
                try:
                    nxt.append(client.get_logged_model(mid))
                except Exception:  # a reference to a deleted model: keep looking elsewhere
                    continue
        if not nxt:
            return
        frontier = nxt


def find_run(client: Any, model: Any, wanted: Callable[[Any], bool]):
    """The nearest source run in the lineage of `model` for which `wanted(run)` holds, or None."""
    for _, run in walk(client, model):
        if run is not None and wanted(run):
            return run
    return None


def finetune_run(client: Any, model: Any):
    """The finetune run behind a model, or None."""
    return find_run(client, model,
                    lambda run: run.data.tags.get(artifacts.STEP_TAG) == FINETUNE_ENTRY_POINT)


def validation_data(client: Any, model: Any) -> str | None:
    """The held-out split logged by the nearest run in a model's lineage that logged one, or None."""
    key = artifacts.VALIDATION_DATA_OUTPUT
    run = find_run(client, model, lambda r: bool(artifacts.get_outputs(r).get(key)))
    return artifacts.get_outputs(run)[key] if run is not None else None
