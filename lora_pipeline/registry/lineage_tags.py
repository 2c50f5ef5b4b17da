"""Lineage tags (`lineage.*`) a registered version carries: where its base, its data, its training and
its evaluation came from, so a version in the registry can be traced without opening any run."""

from __future__ import annotations

import logging

from lora_pipeline import artifacts
from lora_pipeline.registry.candidate import Candidate

log = logging.getLogger(__name__)


def lineage_tags(client, candidate: Candidate) -> dict[str, str]:
    from lora_pipeline.tracking.lineage import finetune_run
    from lora_pipeline.tracking.runs import pipeline_git_commit

    man = candidate.manifest
    model_tags = candidate.model.tags or {}
    tags = {
        "source_model": candidate.uri,
        "base_reference": man.reference(),
        "base_source": man.source,
        "base_manifest_digest": man.digest(),
        "pipeline_git_commit": pipeline_git_commit(),
    }
    if man.is_hub:
        tags.update(base_repo=man.repo_id, base_commit=man.commit)
    if man.artifact_uri:
        tags["base_snapshot_uri"] = man.artifact_uri
    ft = finetune_run(client, candidate.model)
    tags["finetune_run_id"] = ft.info.run_id if ft else ""
    tags["dataset_digest"] = ((ft.data.tags.get(artifacts.DATASET_DIGEST_TAG) if ft else None)
                              or model_tags.get(artifacts.DATASET_DIGEST_TAG, ""))
    if ft is not None and ft.data.tags.get(artifacts.GIT_COMMIT_TAG):
        tags["finetune_git_commit"] = ft.data.tags[artifacts.GIT_COMMIT_TAG]
    tags["eval_run_id"] = model_tags.get(artifacts.EVAL_RUN_TAG, "") or candidate.metric_runs.get("slot_f1", "")
    missing = [k for k in ("finetune_run_id", "dataset_digest", "eval_run_id") if not tags[k]]
    if missing:
        log.warning("lineage incomplete for %s: no %s found", candidate.uri, ", ".join(missing))
    return {artifacts.LINEAGE_PREFIX + k: str(v) for k, v in tags.items()}


def version_tags(candidate: Candidate, lineage: dict[str, str], persisted_id: str) -> dict[str, str]:
    """Tags of a new registered version: the model it was made from (idempotency searches by it),
    its evaluation metrics (`eval.*`, what the gate compares later), lineage, the persisted model."""
    return {artifacts.SOURCE_MODEL_ID_TAG: candidate.model_id,
            **{artifacts.EVAL_PREFIX + k: repr(v) for k, v in candidate.metrics.items()},
            **lineage, artifacts.LINEAGE_PREFIX + "persisted_model": artifacts.model_uri(persisted_id)}
