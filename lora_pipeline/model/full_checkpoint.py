"""A complete checkpoint in a local folder (config.json, safetensors weights, tokenizer): checked and
staged for logging without loading its weights (the memory-efficient path of log_reference).

Only the safetensors headers are read, to reject a truncated file; the files are hard-linked (or
copied by the OS) into the folder that gets logged, never read into memory. Logging
(serving.log_e2e_model) then copies them once into a local store, hashing the bytes on the way.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

from lora_pipeline import artifacts
from lora_pipeline.base.sources import TOKENIZER_FILES
from lora_pipeline.errors import InputError, Problem, Problems
from lora_pipeline.model.logged import Weights
from lora_pipeline.task.tasks import DEFAULT_TASK, task_spec

# Files of a full checkpoint that serving needs; optimizer/scheduler states and pickles are left out.
_FULL_MODEL_PATTERNS = ("config.json", "generation_config.json", "*.safetensors",
                        "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
                        "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")
# At least one of these makes a folder's tokenizer loadable. (download_snapshot keeps its own list of
# tokenizer files to copy; the two are not the same question, but may be unified.)


def _safetensors_problem(path: Path) -> str | None:
    """Read only the header (8-byte length + JSON) and check the file holds all the bytes it lists."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 * 1024 * 1024:  # safetensors caps headers at 100 MB
                return f"{path.name} is not a safetensors file (header length {n})"
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError) as err:
        return f"{path.name} is not a readable safetensors file ({type(err).__name__})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if 8 + n + end > size:
        return f"{path.name} is truncated ({size} bytes, its header lists {8 + n + end})"
    return None


def check_full_model_dir(root: Path, value: str, problems: Problems, field: str = "full_model_dir") -> None:
    """Every reason `root` is not a complete causal-LM checkpoint, added to `problems`."""
    if not root.is_dir():
        problems.add(field, value, "no such directory", "pass the directory that holds config.json")
        return
    names = {p.name for p in root.iterdir() if p.is_file()}
    if "adapter_config.json" in names and "config.json" not in names:
        problems.add(field, value, "holds a PEFT adapter, not a complete model",
                     "log adapters through finetune's checkpoints (checkpoint_uri), or merge the "
                     "adapter into its base and save_pretrained the result")
        return
    if "config.json" not in names:
        problems.add(field, value, "has no config.json",
                     "point at the folder save_pretrained wrote (config.json + *.safetensors)")
        return
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as err:
        problems.add(field, value, f"config.json is not valid JSON ({err})", "re-save the model")
        return
    weights = sorted(p for p in root.iterdir() if p.name.endswith(".safetensors"))
    if not weights:
        pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
        problems.add(field, value, "has no *.safetensors weights" +
                     (f" (only pickle files: {', '.join(sorted(pickled))})" if pickled else ""),
                     "save the model with save_pretrained(safe_serialization=True)")
    for w in weights:
        bad = _safetensors_problem(w)
        if bad:
            problems.add(field, value, bad, "re-save or re-copy the checkpoint")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as err:
            problems.add(field, value, f"model.safetensors.index.json is unreadable ({err})",
                         "re-save the model")
        else:
            missing = sorted(shards - names)
            if missing:
                problems.add(field, value, f"misses weight shards {', '.join(missing)}",
                             "copy every shard listed in model.safetensors.index.json")
    if not names & set(TOKENIZER_FILES):
        problems.add(field, value, "has no tokenizer (tokenizer.json / tokenizer.model)",
                     "save the tokenizer beside the model (tokenizer.save_pretrained(dir))")
    archs = config.get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        problems.add(field, value, f"architecture {archs[0]} is not a causal language model",
                     "pass a *ForCausalLM checkpoint")


def full_model_files(root: Path) -> list[Path]:
    import fnmatch

    return sorted(p for p in root.iterdir() if p.is_file()
                  and any(fnmatch.fnmatch(p.name, pat) for pat in _FULL_MODEL_PATTERNS))


def stage_full_model(root: Path, dst: Path) -> Path:
    """The folder to log: `root` itself when it holds only what serving needs, else `dst` with
    hard links to those files (no optimizer states or pickles). Nothing is read here, nor into
    memory when logged (chunks of a few hundred KB at a time). (MLflow refuses symlinks, and a remote
    store is still written by MLflow's own copy.)"""
    keep = full_model_files(root)
    if len(keep) == sum(1 for p in root.rglob("*") if p.is_file()):
        return root
    dst.mkdir()
    for f in keep:
        try:
            os.link(f, dst / f.name)
        except OSError:  # another filesystem: copy (still streamed by the OS, not loaded)
            shutil.copy2(f, dst / f.name)
    return dst


def read_full_model(full_model_dir: str, manifest_uri: str, tmp: Path, task: str = DEFAULT_TASK,
                    system_prompt: str = "") -> Weights:
    """The staged folder of a (checked) complete checkpoint, the base it was fine-tuned from and the
    task it was trained for (`task_spec`, as finetune records it for an adapter: a merged json or
    text model then serves and evaluates as one); an InputError when its architecture is not the
    base's."""
    from lora_pipeline.base.manifest import load_manifest

    manifest = load_manifest(manifest_uri)
    weights_dir = stage_full_model(Path(full_model_dir).expanduser(), tmp / "full_model")
    cfg = json.loads((weights_dir / "config.json").read_text())
    arch = (cfg.get("architectures") or ["unknown"])[0]
    if manifest.architecture not in ("", "unknown", arch):
        raise InputError(Problem(
            "full_model_dir", full_model_dir, f"is a {arch}, but the base "
            f"{manifest.reference()} is a {manifest.architecture}",
            "pass the manifest of the base this model was fine-tuned from"))
    return Weights(manifest, artifacts.KIND_FULL, weights_dir, "", task_spec(task, system_prompt))
