"""What an interrupted persist left behind: a finished copy to reuse, or unfinished ones to discard.

Every persisted model carries `persist.source_model_id` (the model it copies) and `persist.state`
(copying -> complete, or discarded). A run killed after the copy finished leaves a READY, complete
model that a rerun registers instead of copying again; a run killed (or failed) during the copy leaves
a PENDING or FAILED model that a rerun discards: status FAILED, files deleted, tagged `discarded`.
"""

from __future__ import annotations

import logging

from lora_pipeline import artifacts
from lora_pipeline.errors import one_line
from lora_pipeline.registry.candidate import artifact_repo
from lora_pipeline.tracking.lineage import run_or_none

log = logging.getLogger(__name__)


def persisted_models(client, experiment_ids: list[str], source_id: str) -> list:
    return list(client.search_logged_models(
        experiment_ids=experiment_ids,
        filter_string=f"tags.`{artifacts.SOURCE_MODEL_ID_TAG}` = '{source_id}'"))


def discard(client, lm, why: str, *, stale: bool = False) -> None:
    """Drop an unfinished persisted model: status FAILED, files deleted, tagged `discarded` (the record
    stays, so the run that made it still shows what happened). `stale`: left by an earlier run; if
    that run still reads RUNNING, it was killed (kill -9 ends no run): mark it KILLED."""
    import shutil

    from lora_pipeline.registry.persist import local_path_of

    log.warning("discarding unfinished persisted model %s (%s; run %s)", lm.model_id, why,
                lm.source_run_id)
    try:
        if str(lm.status) != "FAILED":
            client.finalize_logged_model(lm.model_id, "FAILED")
        local = local_path_of(lm.artifact_location)
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)
        else:
            artifact_repo(lm.artifact_location).delete_artifacts()
        client.set_logged_model_tags(lm.model_id, {artifacts.PERSIST_STATE_TAG: artifacts.STATE_DISCARDED})
        run = run_or_none(client, lm.source_run_id) if stale else None
        if run is not None and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
    except Exception as err:  # cleanup is best effort: the model is never READY, never registered
        log.warning("could not fully discard %s (%s: %s)", lm.model_id, type(err).__name__,
                    one_line(err))


def reusable_persisted(client, experiment_ids: list[str], source_id: str):
    """A READY, completely persisted model of this source (a run killed after persisting, before
    registering), after discarding every unfinished one (a killed or failed persist)."""
    ready = None
    for lm in persisted_models(client, experiment_ids, source_id):
        state = (lm.tags or {}).get(artifacts.PERSIST_STATE_TAG)
        if state == artifacts.STATE_DISCARDED:
            continue
        if str(lm.status) == "READY" and state == artifacts.STATE_COMPLETE:
            ready = ready or lm
        else:
            discard(client, lm, f"status {lm.status}, state {state}", stale=True)
    return ready
