"""Copy checkpoint files once, hashing them on the way: no separate hashing pass, no read-back.

Logging a checkpoint used to read every byte more than once: `describe_dir` hashed the files, then
MLflow copied them (another full read), and `pyfunc.log_model` copies a model twice (into a temp
dir, then into the store). sha256 runs at ~1.5 GB/s per core here, so on a multi-GB checkpoint the
reads and hashes, not the disk, were most of the time. Two ways of copying, one result:

- **Kernel copy, hashed alongside** (files of `KERNEL_COPY_MIN` bytes or more, on Linux): the kernel
  copies the file (`copy_file_range`, as `cp` does: no pass through user space), writeback starting
  after each CHUNK, while a second thread hashes the source from the page cache. The copy and the
  hash overlap on two cores, and the disk writes start at once, where reading, hashing and writing in
  one thread did all three in turn (`bench/bench_scale.py`, P7, measures the steps that copy).
  The hash and the copy are two reads of the source, so a source written to during the copy (its
  modification time moves) is refused as "changed while it was copied"; the kernel's clock for
  that time is coarse (a few ms), which is why a file must not be written while it is pinned at all.
- **Read once** (smaller files, or where the kernel refuses: another filesystem, an old kernel): each
  chunk is read, hashed while it is still in the CPU cache and written out, so the digest is of the
  very bytes written.

Files are copied in parallel (a few workers), so a sharded checkpoint uses every core.

Durability: writeback of each chunk starts as soon as it is written (Linux `sync_file_range`), each
file is fsynced once when it is complete and only then renamed from `<name>.partial` to its name,
and each destination directory is fsynced once at the end. A file under its final name is
therefore complete and on disk; a crash leaves `.partial` files at most.

With expected entries (a manifest's files), the same hashing verifies the copy: a file of another
size is refused before it is written, one whose sha256 differs never gets its name
(persist_and_register's base copy).

The destination is a local directory (a `file:` artifact location: `registry.persist.local_path_of`
gives it). Remote stores cannot be written this way: hash with `manifest.describe_dir` and upload.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from lora_pipeline.base.manifest import CHUNK, FileEntry
from lora_pipeline.errors import StepError

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
# Read, hash and write 512 KiB at a time: the chunk is still in the core's L2 cache when it is hashed
# and written. Measured on this project's 2-core machine, 400 MB: a median 0.44 s of CPU with 512 KiB
# chunks against 0.68 s with 8 MiB ones (which leave the cache between the three passes).
COPY_CHUNK = 512 * 1024
# Files this large or larger are copied by the kernel while a second thread hashes them (see the
# module docstring); below it the copy takes milliseconds, and a thread per file does not pay.
KERNEL_COPY_MIN = 16 * 1024 * 1024
_HAS_KERNEL_COPY = hasattr(os, "copy_file_range") and hasattr(os, "preadv")
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range, do not wait for it


def _writeback_starter() -> Callable[[int, int, int], None]:
    """Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)` (not in `os`): start writing each chunk to disk
    as soon as it is copied, so the final fsync waits for the last chunks only instead of the whole
    file (measured on 538 MB: fsync at the end 0.53 s, with early writeback 0.37 s, no fsync 0.36 s).
    Elsewhere a no-op: the final fsync alone gives the same durability, later."""
    if not sys.platform.startswith("linux"):
        return lambda fd, offset, length: None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    except (OSError, AttributeError):
        return lambda fd, offset, length: None

    def start(fd: int, offset: int, length: int) -> None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # an error only loses the head start

    return start


start_writeback = _writeback_starter()
# What a verified copy raises when a file differs from its expected entry: (source, entry, what differs).
Mismatch = Callable[[Path, FileEntry, str], Exception]


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _default_mismatch(src: Path, want: FileEntry, what: str) -> Exception:
    return StepError(f"{src} differs from its recorded size and digest ({what} recorded); copy it again "
                     "from a good source")


def copy_file_hashed(src: Path, dst: Path, *, chunk: int = COPY_CHUNK, durable: bool = True,
                     on_progress: Callable[[int], None] | None = None, expect: FileEntry | None = None,
                     mismatch: Mismatch | None = None) -> tuple[int, str]:
    """Copy `src` to `dst` (parents created), returning (size, sha256 of the source's bytes).

    Written as `<dst>.partial` and renamed once complete (and fsynced, if `durable`); on any error
    the partial file is removed. A source that changes while it is copied (its size, or for the
    kernel copy its modification time) is a StepError.
    With `expect` (the file's recorded size and sha256) the copy is verified by the same hashing:
    a source of another size is refused before anything is written, and a digest that differs
    (a corrupt or modified source, a byte changed on the way) is raised as `mismatch(src, expect,
    what)` before the file gets its name, so only verified files ever appear under their names.

    Files of `KERNEL_COPY_MIN` bytes or more take `_kernel_copy` where the OS has it (see the module
    docstring), smaller ones (and any file where the kernel refuses) the single-read loop."""
    size = src.stat().st_size
    if expect is not None and size != expect.size:
        raise (mismatch or _default_mismatch)(src, expect, f"size {size} != {expect.size}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + PARTIAL_SUFFIX)
    try:
        with open(src, "rb", buffering=0) as fin, open(tmp, "wb", buffering=0) as fout:
            before = os.fstat(fin.fileno()).st_mtime_ns
            copied, digest, written_to = None, None, False
            if size >= KERNEL_COPY_MIN and _HAS_KERNEL_COPY:
                copied, digest = _kernel_copy(fin.fileno(), fout.fileno(), size, chunk, on_progress)
                # The hash and the copy are two reads of the source: unchanged in between only if
                # nothing wrote to it.
                written_to = os.fstat(fin.fileno()).st_mtime_ns != before
            if copied is None:  # small file, or the kernel cannot copy between these files
                copied, digest = _read_once_copy(fin, fout, size, chunk, on_progress)
            if copied != size or written_to or os.fstat(fin.fileno()).st_size != size:
                raise StepError(f"{src} changed while it was copied ({size} bytes when the copy started, "
                                f"{copied} copied{', then written to' if written_to else ''}); copy it "
                                "again once nothing writes to it")
            sha = digest.hexdigest()
            if expect is not None and sha != expect.sha256:
                raise (mismatch or _default_mismatch)(
                    src, expect, f"sha256 {sha[:12]}… != {expect.sha256[:12]}…")
            if durable:
                os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, sha


def _read_once_copy(fin, fout, size: int, chunk: int, on_progress) -> tuple[int, object]:
    """Read, hash and write `chunk` bytes at a time: each byte read once, hashed while in cache."""
    digest = hashlib.sha256()
    buf = memoryview(bytearray(max(1, min(chunk, size))))
    out_fd = fout.fileno()
    copied = synced = 0
    # At most the size the file had when the copy started: a file still being written would
    # otherwise never end; the caller's size check reports it.
    while copied < size:
        n = fin.readinto(buf[:size - copied])
        if not n:
            break
        view = buf[:n]
        digest.update(view)  # the bytes just read, still in cache: no second read
        written = 0
        while written < n:
            written += fout.write(view[written:])
        copied += n
        if copied - synced >= CHUNK:
            start_writeback(out_fd, synced, copied - synced)
            synced = copied
        if on_progress:
            on_progress(n)
    return copied, digest


def _kernel_copy(in_fd: int, out_fd: int, size: int, chunk: int, on_progress) -> tuple[int | None, object]:
    """The kernel copies (`os.copy_file_range`, CHUNK bytes a call, writeback started after each)
    while a second thread hashes the source from the page cache, `chunk` bytes at a time; both
    release the GIL. Returns (bytes copied, digest), or (None, None) when the kernel refuses the
    first call or copies nothing (another filesystem, an old kernel): nothing has been written then."""
    import threading

    digest = hashlib.sha256()
    failed: list[BaseException] = []
    stop = threading.Event()

    def hash_source() -> None:
        buf = memoryview(bytearray(min(chunk, size)))
        done = 0
        try:
            while done < size and not stop.is_set():
                n = os.preadv(in_fd, [buf[:min(chunk, size - done)]], done)
                if not n:
                    break
                digest.update(buf[:n])
                done += n
                if on_progress:
                    on_progress(n)
        except BaseException as err:  # re-raised by the copying thread
            failed.append(err)

    try:
        first = os.copy_file_range(in_fd, out_fd, min(CHUNK, size), 0, 0)
    except OSError as err:
        if err.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            log.debug("no kernel copy here (%s): reading and writing instead", err)
            os.ftruncate(out_fd, 0)
            return None, None
        raise
    if first == 0:  # nothing copied from a non-empty file: some filesystems answer so (procfs-like)
        log.debug("the kernel copied nothing: reading and writing instead")
        return None, None
    hasher = threading.Thread(target=hash_source, name="copy-hash", daemon=True)
    hasher.start()
    copied = first
    try:
        start_writeback(out_fd, 0, first)
        while 0 < copied < size:
            n = os.copy_file_range(in_fd, out_fd, min(CHUNK, size - copied), copied, copied)
            if not n:  # the source ended early: the caller's size check reports it
                break
            start_writeback(out_fd, copied, n)
            copied += n
    except BaseException:
        stop.set()
        raise
    finally:
        hasher.join()
    if failed:
        raise failed[0]
    return copied, digest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not openable as a directory here (e.g. Windows): file fsyncs are what we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the files themselves are synced
    finally:
        os.close(fd)


def copy_tree_hashed(src_root: Path, dst_root: Path, names: Sequence[str] | None = None, *,
                     chunk: int = COPY_CHUNK, durable: bool = True, workers: int | None = None,
                     on_progress: Callable[[int], None] | None = None,
                     expected: Sequence[FileEntry] | None = None,
                     mismatch: Mismatch | None = None) -> list[FileEntry]:
    """Copy `names` (relative posix paths) from `src_root` to `dst_root`, hashing them on the way, and
    return their entries (path, size, sha256 of the bytes copied) in `describe_dir`'s order, so a
    manifest built from them is the one `describe_dir` would give. `workers` files at a time.

    `expected` (entries with the sizes and digests the files must have; their paths are the names
    when `names` is None) verifies each file in the same read (see `copy_file_hashed`): the first
    file that differs raises `mismatch(src, entry, what)` (default: a StepError) and never gets its
    name; files already verified stay, for the caller to keep or discard as a whole."""
    src_root, dst_root = Path(src_root), Path(dst_root)
    want = {e.path: e for e in expected} if expected is not None else None
    if names is None:
        if want is None:
            raise ValueError("copy_tree_hashed needs names or expected entries")
        names = list(want)
    ordered = sorted(set(names), key=PurePosixPath)
    if want is not None and (missing := [n for n in ordered if n not in want]):
        raise ValueError(f"no expected entry for {', '.join(missing)}")
    for name in ordered:
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"{name!r} is not a relative path inside the tree")
    dst_root.mkdir(parents=True, exist_ok=True)

    def one(name: str) -> FileEntry:
        size, sha = copy_file_hashed(src_root / name, dst_root / name, chunk=chunk, durable=durable,
                                     on_progress=on_progress, expect=want[name] if want else None,
                                     mismatch=mismatch)
        return FileEntry(name, size, sha)

    n_workers = max(1, min(workers or default_workers(), len(ordered) or 1))
    if n_workers == 1:
        entries = [one(name) for name in ordered]
    else:
        with ThreadPoolExecutor(n_workers, thread_name_prefix="copy") as pool:
            entries = list(pool.map(one, ordered))
    if durable:
        for d in sorted({(dst_root / n).parent for n in ordered} | {dst_root}):
            _fsync_dir(d)
    total = sum(e.size for e in entries)
    log.debug("copied %d files (%.1f MB) with their sha256 into %s", len(entries), total / 1e6, dst_root)
    return entries
