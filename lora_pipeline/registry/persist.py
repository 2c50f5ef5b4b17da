"""Streaming, verified, atomic copy of a pinned base into a logged model's artifact location.

Each base file is copied chunk by chunk (memory stays at a few chunks, whatever the model size) and
gets its final name only once its sha256 equals the manifest's. A file is therefore either complete
and verified, or absent (a `.partial` file at most, which the caller discards with the rest of an
unfinished model).

Local artifact stores (`file:` URIs and plain paths, MLflow's default) are written directly by
`transfer.copy_tree_hashed` with the manifest as the expected entries: each base file is hashed while
it is copied, not read back afterwards (a separate read-back of the destination cost a second full
pass, and sha256 at ~1.5 GB/s per core was most of the time); a file whose size
differs is refused before it is copied, one whose digest differs never gets its name;
`fsync` before the rename (writeback of each chunk starts right after it is written, so the fsync
costs little) and of each directory at the end: a model marked READY has its bytes on disk.
Other stores (S3, `mlflow-artifacts:` through a tracking server, ...) get each file hashed at the
source and uploaded by MLflow's artifact repository one file at a time (bounded memory; the
repository streams the upload), then its size checked in the store: two reads of each file, since
MLflow's public artifact API uploads from a path and cannot hash what it reads.

Test hook: `E2E_LORA_PERSIST_THROTTLE_S` (seconds) sleeps after every chunk, so a test can kill the
process in the middle of a copy. Never set it in production.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from lora_pipeline.base.manifest import FileEntry, Manifest, sha256_file
from lora_pipeline.base.transfer import PARTIAL_SUFFIX, copy_tree_hashed  # noqa: F401 (named by callers)
from lora_pipeline.errors import StepError

log = logging.getLogger(__name__)

THROTTLE_ENV = "E2E_LORA_PERSIST_THROTTLE_S"


def _throttle_s() -> float:
    try:
        return max(0.0, float(os.environ.get(THROTTLE_ENV) or 0))
    except ValueError:
        return 0.0


def _mismatch(entry: FileEntry, manifest: Manifest, what: str) -> StepError:
    return StepError(f"digest mismatch for base file {entry.path} of {manifest.reference()} while "
                     f"persisting: {what}; the stored base was modified or is corrupt, nothing was "
                     "registered: rerun download_snapshot (and the steps after it)")


def copy_verified_tree(src_root: Path, dst_root: Path, manifest: Manifest,
                       on_progress: Callable[[int], None] | None = None) -> None:
    """Copy every manifest file from `src_root` to `dst_root` (local), each file hashed while it is
    copied (`transfer.copy_tree_hashed` with the manifest as the expected entries): a file gets
    its name only once complete, fsynced and equal to the manifest; the first that differs is a
    StepError naming it."""
    copy_tree_hashed(src_root, dst_root, expected=manifest.files, on_progress=on_progress, durable=True,
                     mismatch=lambda src, entry, what: _mismatch(entry, manifest, f"{what} in the manifest"))


# --- destinations ------------------------------------------------------------------------------
def local_path_of(uri: str) -> Path | None:
    """The local directory behind an artifact location, or None for remote stores."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        from mlflow.utils.file_utils import local_file_uri_to_path

        return Path(local_file_uri_to_path(uri))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


@dataclass
class PersistStats:
    files: int
    bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, nothing in log files (the per-file log lines remain).
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None)


def persist_files(src_root: Path, manifest: Manifest, artifact_location: str, prefix: str) -> PersistStats:
    """Copy every manifest file from `src_root` to `<artifact_location>/<prefix>/`, verified.

    Raises StepError naming the first file that does not match; files already copied stay (the
    caller discards the unfinished model as a whole).
    """
    local = local_path_of(artifact_location)
    start = time.perf_counter()
    with _progress_bar(manifest.total_bytes, "persist base") as bar:
        if local is not None:
            log.info("persisting %d base files (%.1f MB)", len(manifest.files), manifest.total_bytes / 1e6)
            throttle = _throttle_s()

            def progress(n: int) -> None:
                bar.update(n)
                if throttle:  # test hook: after every chunk, so a test can kill a copy under way
                    time.sleep(throttle)

            copy_verified_tree(src_root, local / prefix, manifest, progress)
        else:
            _upload_files(src_root, manifest, artifact_location, prefix, bar.update)
    return PersistStats(len(manifest.files), manifest.total_bytes, time.perf_counter() - start)


def _upload_files(src_root: Path, manifest: Manifest, artifact_location: str, prefix: str,
                  on_progress: Callable[[int], None]) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(artifact_location)
    for entry in manifest.files:
        src = src_root / entry.path
        # The store cannot be read back cheaply: verify the exact local bytes that get uploaded.
        size = src.stat().st_size
        if size != entry.size:
            raise _mismatch(entry, manifest, f"size {size} != {entry.size} in the manifest")
        digest = sha256_file(src)
        if digest != entry.sha256:
            raise _mismatch(entry, manifest, f"sha256 {digest[:12]}… != {entry.sha256[:12]}… in "
                            "the manifest")
        sub = Path(entry.path).parent.as_posix()
        dest_dir = prefix if sub == "." else f"{prefix}/{sub}"
        log.info("uploading %s (%.1f MB)", entry.path, entry.size / 1e6)
        repo.log_artifact(str(src), dest_dir)
        on_progress(entry.size)
    check_sizes(manifest, artifact_location, prefix)


def check_sizes(manifest: Manifest, artifact_location: str, prefix: str) -> None:
    """Every manifest file is in the store with its size (a cheap listing, no download)."""
    local = local_path_of(artifact_location)
    if local is not None:
        found = {e.path: (local / prefix / e.path).stat().st_size
                 for e in manifest.files if (local / prefix / e.path).is_file()}
    else:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(artifact_location)
        found = {}
        dirs = {prefix} | {f"{prefix}/{Path(e.path).parent.as_posix()}" for e in manifest.files
                           if Path(e.path).parent.as_posix() != "."}
        for d in dirs:
            for info in repo.list_artifacts(d):
                if not info.is_dir:
                    found[info.path[len(prefix) + 1:]] = info.file_size
    for entry in manifest.files:
        if found.get(entry.path) != entry.size:
            raise StepError(f"base file {entry.path} is {'missing' if entry.path not in found else 'incomplete'} "
                            f"in the persisted model at {artifact_location}; nothing was registered: "
                            "rerun persist_and_register")
