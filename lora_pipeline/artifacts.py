"""Artifact names, tags and URI building: the only place that knows how steps find each other.

Steps talk only through MLflow. Each step records what it produced as run tags
`pipeline.output.<key>` holding URIs (`runs:/...`, `models:/<id>`), and the next step takes those URIs
as parameters. Nothing else about a step's layout leaks into another step.
"""

from __future__ import annotations

import re

# --- download_snapshot -------------------------------------------------------------------------
SNAPSHOT_DIR = "snapshot"
MANIFEST_FILE = "manifest.json"
MANIFEST_PATH = f"{SNAPSHOT_DIR}/{MANIFEST_FILE}"
# For bases with no remote to refer to (local dir, GGUF, default), the checkpoint copy lives here.
SNAPSHOT_FILES_DIR = f"{SNAPSHOT_DIR}/files"

# --- finetune / log_reference ------------------------------------------------------------------
CHECKPOINT_MODEL_PREFIX = "checkpoint"  # logged model name: checkpoint-<global step>
REFERENCE_MODEL_NAME = "e2e-extractor"
PERSISTED_MODEL_NAME = "e2e-extractor-persisted"
# Inside a logged pyfunc model's artifacts:
ADAPTER_ARTIFACT = "adapter"  # PEFT adapter dir (adapter_config.json + adapter_model.safetensors)
FULL_MODEL_ARTIFACT = "full_model"  # a complete checkpoint dir (full-model logging)
BASE_REF_ARTIFACT = "base_reference.json"  # the snapshot manifest the model refers to
TRAINER_STATE_ARTIFACT = "trainer_state"  # optimizer/scheduler/RNG, for resume
PERSISTED_BASE_ARTIFACT = "base"  # the base weights once persist_and_register copied them in
# size + sha256 of every file of the weight artifacts above (adapter / full_model), recorded at
# logging and checked at every load: the base is checked against its manifest, this checks the rest.
ARTIFACT_DIGESTS = "artifact_digests.json"
DIGESTED_ARTIFACTS = (ADAPTER_ARTIFACT, FULL_MODEL_ARTIFACT)
# The task the model was trained for and its system prompt (lora_pipeline/task/tasks.py:task_spec), so
# serving and evaluation build the prompts training used and parse answers the task's way. Models
# logged before it existed have none: they are e2e models.
TASK_ARTIFACT = "task.json"

# --- tags --------------------------------------------------------------------------------------
OUTPUT_TAG_PREFIX = "pipeline.output."
STEP_TAG = "pipeline.step"
GIT_COMMIT_TAG = "pipeline.git_commit"
INPUT_DIGEST_TAG_PREFIX = "pipeline.input_digest."

# --- step outputs (the <key> of pipeline.output.<key>) ------------------------------------------
CHECKPOINT_OUTPUT = "checkpoint"  # finetune: its best checkpoint model
VALIDATION_DATA_OUTPUT = "validation_data"  # finetune: runs:/<run>/data/validation.jsonl
MODEL_OUTPUT = "model"  # log_reference / persist_and_register: models:/<id>
VALIDATION_DATA_PATH = "data/validation.jsonl"  # finetune's held-out split, read by evaluate_checkpoint
EVAL_TABLE_FILE = "eval_table.json"  # evaluate_checkpoint's per-example table
SUMMARY_TABLE_FILE = "summary/steps.json"  # main's summary, machine-readable
SUMMARY_TEXT_FILE = "summary/steps.txt"  # main's summary, as printed
SCORED_TABLE_OUTPUT = "scored_table"  # batch_score: the Parquet folder it wrote
OUTPUT_SCHEMA_FILE = "output_schema.json"  # batch_score: that table's Spark schema

# --- inside logged models -----------------------------------------------------------------------
MLMODEL_FILE = "MLmodel"
MODEL_ARTIFACTS_DIR = "artifacts"  # where pyfunc keeps `artifacts=` inside a model
KIND_ADAPTER = "adapter"  # value of MODEL_KIND_TAG
KIND_FULL = "full"

# --- lineage tags (runs and logged models) ------------------------------------------------------
# On a logged model: the model it was made from (evaluate_checkpoint follows it back to the finetune
# run's held-out split; persist_and_register records it as lineage).
SOURCE_MODEL_TAG = "pipeline.source_model"
MODEL_KIND_TAG = "pipeline.model_kind"  # adapter | full
EVAL_RUN_TAG = "pipeline.eval_run_id"  # on an evaluated model: the run that evaluated it
DATASET_DIGEST_TAG = "dataset.digest"  # on the finetune run
MANIFEST_DIGEST_TAG = "base.manifest_digest"  # on the download_snapshot run
RESUMED_FROM_TAG = "finetune.resumed_from"
CHECKPOINT_STEP_TAG = "finetune.global_step"  # on checkpoint models
CHECKPOINT_EVAL_LOSS_TAG = "finetune.eval_loss"
BEST_TAG = "finetune.best"

# --- registry (persist_and_register) ------------------------------------------------------------
DEFAULT_REGISTERED_NAME = "e2e-extractor"  # persist_and_register's default; batch_score scores its champion
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"
# On the persisted logged model and on the registered version: the model it was made from.
# Idempotency searches by it, so one source model never gets two versions.
SOURCE_MODEL_ID_TAG = "persist.source_model_id"
PERSIST_STATE_TAG = "persist.state"  # on the persisted logged model: one of the three below
STATE_COPYING, STATE_COMPLETE, STATE_DISCARDED = "copying", "complete", "discarded"
LINEAGE_PREFIX = "lineage."
EVAL_PREFIX = "eval."
GATE_PREFIX = "gate."

# --- process bookkeeping (stale-run detection) and the step cache -------------------------------
HOST_TAG = "pipeline.host"
PID_TAG = "pipeline.pid"
PID_STARTED_TAG = "pipeline.pid_started"
HEARTBEAT_TAG = "pipeline.heartbeat"
STALE_REASON_TAG = "pipeline.stale_reason"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own
CACHE_KEY_TAG = "pipeline.cache.key"
CODE_VERSION_TAG = "pipeline.cache.code_version"

_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[0-9a-f]{32})/(?P<path>.+)$")
_MODELS_ID_URI = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")


def checkpoint_model_name(step: int) -> str:
    return f"{CHECKPOINT_MODEL_PREFIX}-{step}"


def manifest_uri(run_id: str) -> str:
    return f"runs:/{run_id}/{MANIFEST_PATH}"


def snapshot_files_uri(run_id: str) -> str:
    return f"runs:/{run_id}/{SNAPSHOT_FILES_DIR}"


def model_uri(model_id: str) -> str:
    return f"models:/{model_id}"


def registered_alias_uri(name: str, alias: str) -> str:
    return f"models:/{name}@{alias}"


def parse_runs_uri(uri: str) -> tuple[str, str] | None:
    """`runs:/<run_id>/<path>` -> (run_id, path), or None for any other URI."""
    m = _RUNS_URI.match(uri)
    return (m["run_id"], m["path"]) if m else None


def parse_model_id_uri(uri: str) -> str | None:
    m = _MODELS_ID_URI.match(uri)
    return m["model_id"] if m else None


def set_outputs(client, run_id: str, outputs: dict[str, str]) -> None:
    for key, value in outputs.items():
        client.set_tag(run_id, OUTPUT_TAG_PREFIX + key, value)


def get_outputs(run) -> dict[str, str]:
    """Outputs recorded by a finished step run (an `mlflow.entities.Run`)."""
    n = len(OUTPUT_TAG_PREFIX)
    return {k[n:]: v for k, v in run.data.tags.items() if k.startswith(OUTPUT_TAG_PREFIX)}
