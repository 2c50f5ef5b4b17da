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

# --- tags --------------------------------------------------------------------------------------
OUTPUT_TAG_PREFIX = "pipeline.output."
STEP_TAG = "pipeline.step"
GIT_COMMIT_TAG = "pipeline.git_commit"
INPUT_DIGEST_TAG_PREFIX = "pipeline.input_digest."

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
