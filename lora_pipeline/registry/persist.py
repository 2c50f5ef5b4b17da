"""Streaming, verified, atomic copy of a pinned base into a logged model's artifact location.

Each base file is copied chunk by chunk (memory stays at a few chunks, whatever the model size), its
destination is read back and hashed while the copy goes on, and it gets its final name only once
its sha256 equals the manifest's. A file is therefore either complete and verified, or absent
(a `.partial` file at most, which the caller discards with the rest of an unfinished model).

Local artifact stores (`file:` URIs and plain paths, MLflow's default) are written directly:
  * the kernel copies each 8 MiB chunk (`os.copy_file_range`, what `cp` uses; no bytes pass through
    Python), and a second thread reads the chunk back from the destination and hashes it, so hashing
    (~1.1 GB/s with SHA-NI) overlaps the copy instead of adding to it;
  * where the kernel cannot copy between the two files (another filesystem on old kernels), plain
    `pread`/`pwrite` of the same chunks, with the same read-back hashing;
  * `fsync` before the rename: a model marked READY has its bytes on disk (writeback of each chunk
    starts right after it is copied, so the fsync costs little);
Other stores (S3, `mlflow-artifacts:` through a tracking server, ...) get each file hashed at the
source and uploaded by MLflow's artifact repository one file at a time (bounded memory; the
repository streams the upload), then its size checked in the store.

Test hook: `E2E_LORA_PERSIST_THROTTLE_S` (seconds) sleeps after every chunk, so a test can kill the
process in the middle of a copy. Never set it in production.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from lora_pipeline.base.manifest import CHUNK, FileEntry, Manifest, sha256_file
from lora_pipeline.base.transfer import PARTIAL_SUFFIX, start_writeback
from lora_pipeline.errors import StepError

log = logging.getLogger(__name__)

THROTTLE_ENV = "E2E_LORA_PERSIST_THROTTLE_S"
# The copy may run at most this many chunks ahead of the read-back hash: 4 x 8 MiB of page cache
# that is still hot when the hasher reads it, and no unbounded queue.
_HASH_QUEUE = 4
# errnos with which copy_file_range says "not between these two files": fall back to pread/pwrite.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM,
                   errno.ENOTSUP}
_HAS_PREADV = hasattr(os, "preadv")


def _throttle_s() -> float:
    try:
        return max(0.0, float(os.environ.get(THROTTLE_ENV) or 0))
    except ValueError:
        return 0.0


class _ReadBackHasher:
    """Hashes ranges of the destination file on a worker thread, in the order they were written."""

    def __init__(self, fd: int):
        self._fd = fd
        self._h = hashlib.sha256()
        self._q: queue.Queue = queue.Queue(maxsize=_HASH_QUEUE)
        self._err: BaseException | None = None
        self._buf = bytearray(CHUNK)  # one reusable buffer: the hasher allocates nothing per chunk
        self._thread = threading.Thread(target=self._work, name="persist-hash", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        view = memoryview(self._buf)
        while (item := self._q.get()) is not None:
            if self._err is not None:
                continue  # drain the queue so the producer never blocks after a failure
            offset, length = item
            try:
                done = 0
                while done < length:
                    if _HAS_PREADV:
                        n = os.preadv(self._fd, [view[:length - done]], offset + done)
                        data = view[:n]
                    else:  # macOS: pread allocates a buffer per chunk, still bounded
                        data = os.pread(self._fd, length - done, offset + done)
                        n = len(data)
                    if n <= 0:
                        raise OSError(errno.EIO, f"short read back at offset {offset + done}")
                    self._h.update(data)  # hashlib releases the GIL on large buffers
                    done += n
            except BaseException as err:  # reported to the copying thread by finish()
                self._err = err

    def submit(self, offset: int, length: int) -> None:
        if self._err is not None:
            raise self._err
        self._q.put((offset, length))

    def finish(self) -> str:
        self._q.put(None)
        self._thread.join()
        if self._err is not None:
            raise self._err
        return self._h.hexdigest()

    def abort(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()


def _kernel_copy(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    done = 0
    while done < length:
        n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done, offset + done)
        if n == 0:
            break  # the source ended early: the size check below names the file
        done += n
    return done


def _user_copy(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    data = os.pread(src_fd, length, offset)
    view, done = memoryview(data), 0
    while done < len(data):
        done += os.pwrite(dst_fd, view[done:], offset + done)
    return done


def _mismatch(entry: FileEntry, manifest: Manifest, what: str) -> StepError:
    return StepError(f"digest mismatch for base file {entry.path} of {manifest.reference()} while "
                     f"persisting: {what}; the stored base was modified or is corrupt, nothing was "
                     "registered: rerun download_snapshot (and the steps after it)")


def copy_verified(src: Path, dst: Path, entry: FileEntry, manifest: Manifest,
                  on_progress: Callable[[int], None] | None = None) -> None:
    """Copy one base file to `dst` (local), verified against the manifest; atomic rename at the end."""
    size = src.stat().st_size
    if size != entry.size:
        raise _mismatch(entry, manifest, f"size {size} != {entry.size} in the manifest")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + PARTIAL_SUFFIX)
    throttle = _throttle_s()
    copy = _kernel_copy if hasattr(os, "copy_file_range") else _user_copy
    src_fd = os.open(src, os.O_RDONLY)
    try:
        dst_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        hasher = _ReadBackHasher(dst_fd)
        try:
            offset = 0
            while offset < size:
                length = min(CHUNK, size - offset)
                try:
                    n = copy(src_fd, dst_fd, offset, length)
                except OSError as err:
                    if copy is not _kernel_copy or err.errno not in _NO_KERNEL_COPY:
                        raise
                    log.debug("copy_file_range unavailable (%s); copying through user space", err)
                    copy = _user_copy
                    n = copy(src_fd, dst_fd, offset, length)
                if n != length:
                    raise _mismatch(entry, manifest, f"the source ended at byte {offset + n} of "
                                    f"{entry.size}")
                start_writeback(dst_fd, offset, n)
                hasher.submit(offset, n)
                offset += n
                if on_progress:
                    on_progress(n)
                if throttle:
                    time.sleep(throttle)
            digest = hasher.finish()
            os.fsync(dst_fd)
        except BaseException:
            hasher.abort()
            raise
        finally:
            os.close(dst_fd)
        if digest != entry.sha256:
            raise _mismatch(entry, manifest, f"sha256 {digest[:12]}… != {entry.sha256[:12]}… in "
                            "the manifest")
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(src_fd)


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
            root = local / prefix
            for entry in manifest.files:
                log.info("persisting %s (%.1f MB)", entry.path, entry.size / 1e6)
                copy_verified(src_root / entry.path, root / entry.path, entry, manifest, bar.update)
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
