"""Copying a checkpoint while hashing it (lora_pipeline/base/transfer.py): the digests and order
`describe_dir` gives, by both ways of copying (the kernel copy hashed alongside, and read once), complete
files only under their names, one fsync per file, a source changed during the copy refused."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re

import pytest

from lora_pipeline.base import transfer
from lora_pipeline.base.manifest import describe_dir
from lora_pipeline.errors import StepError

CHUNK = 4096
# The two ways transfer copies a file: `kernel` lowers KERNEL_COPY_MIN so that every non-empty test
# file takes the kernel copy (real checkpoints' weights do: they are far above 16 MiB).
WAYS = ["read_once", "kernel"]


def _kernel_copy_for_every_file(monkeypatch) -> None:
    if not transfer._HAS_KERNEL_COPY:
        pytest.skip("no os.copy_file_range on this platform")
    monkeypatch.setattr(transfer, "KERNEL_COPY_MIN", 1)


@pytest.fixture(params=WAYS)
def way(request, monkeypatch):
    if request.param == "kernel":
        _kernel_copy_for_every_file(monkeypatch)
    return request.param


def _tree(root):
    files = {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "model-00001-of-00002.safetensors": os.urandom(5 * CHUNK + 123),  # several chunks, a tail
        "model-00002-of-00002.safetensors": os.urandom(CHUNK),  # exactly one chunk
        "empty.txt": b"",
        # Names whose string order differs from their path order ('-' < '/' < 'a'): the manifest
        # order must stay describe_dir's.
        "a-b/x.json": b"1", "a/x.json": b"2", "a.b": b"3",
        "sub/deeper/tokenizer.json": os.urandom(100),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_copies_every_byte_and_returns_describe_dirs_entries(tmp_path, way):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = _tree(src)
    entries = transfer.copy_tree_hashed(src, dst, list(files), chunk=CHUNK)
    assert entries == describe_dir(src)  # same paths, sizes, digests and order
    for name, data in files.items():
        assert (dst / name).read_bytes() == data
    assert not [p for p in dst.rglob("*") if p.name.endswith(transfer.PARTIAL_SUFFIX)]


def test_only_the_named_files_are_copied(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    entries = transfer.copy_tree_hashed(src, dst, ["config.json", "sub/deeper/tokenizer.json"], chunk=CHUNK)
    assert [e.path for e in entries] == ["config.json", "sub/deeper/tokenizer.json"]
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == [
        "config.json", "sub/deeper/tokenizer.json"]


def test_one_worker_and_several_give_the_same_result(tmp_path, way):
    src = tmp_path / "src"
    _tree(src)
    names = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()]
    one = transfer.copy_tree_hashed(src, tmp_path / "d1", names, chunk=CHUNK, workers=1)
    many = transfer.copy_tree_hashed(src, tmp_path / "d4", names, chunk=CHUNK, workers=4)
    assert one == many == describe_dir(src)


def test_each_source_byte_is_read_once(tmp_path, monkeypatch):
    """Read once (files under KERNEL_COPY_MIN): hashing comes from the bytes read for the copy, not a
    second read."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = _tree(src)
    read = {"bytes": 0}
    real_open = open

    class Counting(io.RawIOBase):
        def __init__(self, f):
            self._f = f

        def readinto(self, b):
            n = self._f.readinto(b)
            read["bytes"] += n or 0
            return n

        def fileno(self):
            return self._f.fileno()

        def close(self):
            self._f.close()
            super().close()

    def counting_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Counting(f) if "r" in mode else f

    monkeypatch.setattr(transfer, "open", counting_open, raising=False)
    transfer.copy_tree_hashed(src, dst, list(files), chunk=CHUNK)
    assert read["bytes"] == sum(len(d) for d in files.values())


def test_each_file_and_directory_is_fsynced_once(tmp_path, monkeypatch, way):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = _tree(src)
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    transfer.copy_tree_hashed(src, dst, list(files), chunk=CHUNK, workers=1)
    dirs = {(dst / n).parent for n in files} | {dst}
    assert len(calls) == len(files) + len(dirs)
    calls.clear()
    transfer.copy_tree_hashed(src, tmp_path / "fast", list(files), chunk=CHUNK, durable=False)
    assert calls == []


def test_copy_file_hashed_returns_size_and_digest(tmp_path, way):
    src = tmp_path / "w.safetensors"
    data = os.urandom(3 * CHUNK + 7)
    src.write_bytes(data)
    progress = []
    size, sha = transfer.copy_file_hashed(src, tmp_path / "out" / "w.safetensors", chunk=CHUNK,
                                          on_progress=progress.append)
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert progress == [CHUNK, CHUNK, CHUNK, 7]


def test_a_source_that_grows_while_copied_is_an_error_and_leaves_no_file(tmp_path, way):
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(3 * CHUNK))
    dst = tmp_path / "out" / "w.bin"

    def writer_appends(_n):
        with open(src, "ab") as f:
            f.write(b"x")

    with pytest.raises(StepError, match=re.escape(f"{src} changed while it was copied ({3 * CHUNK} bytes "
                                                  "when the copy started")):
        transfer.copy_file_hashed(src, dst, chunk=CHUNK, on_progress=writer_appends)
    assert list(dst.parent.iterdir()) == []


def test_a_missing_source_leaves_no_partial_file(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(FileNotFoundError):
        transfer.copy_tree_hashed(tmp_path / "src", tmp_path / "dst", ["nope.bin"])
    assert not [p for p in (tmp_path / "dst").rglob("*") if p.is_file()]


@pytest.mark.parametrize("name", ["../escape.bin", "/etc/passwd", ""])
def test_names_must_stay_inside_the_tree(tmp_path, name):
    with pytest.raises(ValueError, match="is not a relative path inside the tree"):
        transfer.copy_tree_hashed(tmp_path, tmp_path / "dst", [name])


def test_the_kernel_copies_big_files_and_each_byte_is_hashed_from_one_read(tmp_path, monkeypatch):
    """A file of KERNEL_COPY_MIN bytes: copied by copy_file_range, hashed by one read of each byte."""
    src = tmp_path / "w.safetensors"
    data = os.urandom(transfer.KERNEL_COPY_MIN + 3 * CHUNK + 5)
    src.write_bytes(data)
    if not transfer._HAS_KERNEL_COPY:
        pytest.skip("no os.copy_file_range on this platform")
    counted = {"copied": 0, "hashed": 0}
    real_cfr, real_preadv = os.copy_file_range, os.preadv

    def cfr(*a):
        n = real_cfr(*a)
        counted["copied"] += n
        return n

    def preadv(*a):
        n = real_preadv(*a)
        counted["hashed"] += n
        return n

    monkeypatch.setattr(os, "copy_file_range", cfr)
    monkeypatch.setattr(os, "preadv", preadv)
    size, sha = transfer.copy_file_hashed(src, tmp_path / "out" / "w.safetensors", chunk=CHUNK)
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert counted == {"copied": len(data), "hashed": len(data)}
    assert (tmp_path / "out" / "w.safetensors").read_bytes() == data


@pytest.mark.parametrize("kernel_says", ["EXDEV", "copies nothing"])
def test_where_the_kernel_refuses_the_file_is_read_once_instead(tmp_path, monkeypatch, kernel_says):
    _kernel_copy_for_every_file(monkeypatch)
    src = tmp_path / "w.bin"
    data = os.urandom(3 * CHUNK + 7)
    src.write_bytes(data)

    def refuse(*_a):
        if kernel_says == "EXDEV":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return 0

    monkeypatch.setattr(os, "copy_file_range", refuse)
    size, sha = transfer.copy_file_hashed(src, tmp_path / "out" / "w.bin", chunk=CHUNK)
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert (tmp_path / "out" / "w.bin").read_bytes() == data
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["w.bin"]


def test_a_source_written_to_in_place_during_the_kernel_copy_is_refused(tmp_path, monkeypatch):
    """Same size, other bytes: the hash and the kernel's copy may have read different bytes, so the
    modification time moving is an error and the file never gets its name. (Read once hashes the very
    bytes it writes.)"""
    _kernel_copy_for_every_file(monkeypatch)
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(3 * CHUNK))
    os.utime(src, ns=(10**18, 10**18))  # a past write: the kernel's mtime clock is coarse (ms)

    def overwrite_first_byte(_n):
        with open(src, "r+b") as f:
            f.write(b"\0")

    dst = tmp_path / "out" / "w.bin"
    with pytest.raises(StepError, match=re.escape(f"{src} changed while it was copied ({3 * CHUNK} bytes when "
                                                  f"the copy started, {3 * CHUNK} copied, then written to)")):
        transfer.copy_file_hashed(src, dst, chunk=CHUNK, on_progress=overwrite_first_byte)
    assert list(dst.parent.iterdir()) == []


def test_an_expected_digest_that_differs_is_refused_by_both_ways(tmp_path, way):
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(2 * CHUNK + 1))
    wrong = transfer.FileEntry("w.bin", 2 * CHUNK + 1, "0" * 64)
    dst = tmp_path / "out" / "w.bin"
    with pytest.raises(StepError, match=r"differs from its recorded size and digest \(sha256 \w+… != 000000000000…"):
        transfer.copy_file_hashed(src, dst, chunk=CHUNK, expect=wrong)
    assert list(dst.parent.iterdir()) == []
