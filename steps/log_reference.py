"""`log_reference`: log the fine-tuned result as a model that refers to its base instead of copying it.

Two ways in (exactly one):
  * `checkpoint_uri` (default: the best checkpoint of the latest finished `finetune` run): a model
    that `finetune` logged (`models:/<id>`, `runs:/<run>/<name>`, `models:/<name>@<alias>`). Its
    PEFT adapter is re-logged with the pinned base reference, a signature and an input example; the
    trainer state (optimizer, scheduler) stays with the checkpoint. The logged model is then loaded
    back and asked to predict its input example, so a model that cannot serve is an error here and
    not a warning in MLflow's log.
  * `full_model_dir`: a plain local directory holding a complete checkpoint (config.json,
    safetensors weights, tokenizer). Logged file by file without loading the weights (the
    memory-efficient path): only the safetensors headers are read, to reject a truncated file.

The base is never copied: the model stores the snapshot manifest (Hub repo id + commit, or the
snapshot run's artifact URI, plus every file's sha256); loading resolves the base from it and checks
every digest (lora_pipeline/model/serving.py). Output: tag `model` = `models:/<model_id>`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_pipeline import artifacts
from lora_pipeline.cli import param, run_cli
from lora_pipeline.errors import InputError, Problem, Problems, StepError, one_line

log = logging.getLogger(__name__)

ENTRY_POINT = "log_reference"
FINETUNE_ENTRY_POINT = "finetune"
SOURCE_MODEL_TAG = artifacts.SOURCE_MODEL_TAG
MODEL_KIND_TAG = artifacts.MODEL_KIND_TAG
CHECKPOINT_OUTPUT = artifacts.CHECKPOINT_OUTPUT
MODEL_OUTPUT = artifacts.MODEL_OUTPUT
KIND_ADAPTER = artifacts.KIND_ADAPTER
KIND_FULL = artifacts.KIND_FULL
# Files of a full checkpoint that serving needs; optimizer/scheduler states and pickles are left out.
_FULL_MODEL_PATTERNS = ("config.json", "generation_config.json", "*.safetensors",
                        "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
                        "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_MODEL_URI_PREFIXES = ("models:/", "runs:/")


@dataclass
class Args:
    manifest_uri: str = param("", "snapshot manifest URI printed by download_snapshot "
                              "(runs:/<run>/snapshot/manifest.json); default: the one the checkpoint "
                              "refers to; required with full_model_dir")
    checkpoint_uri: str = param("", "checkpoint model logged by finetune: models:/<id>, "
                                "runs:/<run>/<name> or models:/<name>@<alias>; default: the best "
                                "checkpoint of the latest finished finetune run")
    full_model_dir: str = param("", "instead of a checkpoint: a local directory with a complete "
                                "model (config.json, *.safetensors, tokenizer), logged without "
                                "loading its weights")


@dataclass
class Result:
    run_id: str
    model_uri: str
    model_id: str
    kind: str  # adapter | full
    base_reference: str
    logged_bytes: int  # everything the logged model stores
    base_bytes: int  # the base's weights and files, which it refers to instead of storing


# --- input checks ------------------------------------------------------------------------------
def _looks_like_model_uri(uri: str) -> bool:
    return uri.startswith(_MODEL_URI_PREFIXES) and len(uri.split(":/", 1)[1].strip("/")) > 0


def validate_static(args: Args) -> Problems:
    problems = Problems()
    if args.checkpoint_uri and args.full_model_dir:
        problems.add("full_model_dir", args.full_model_dir, "given together with checkpoint_uri",
                     "pass either checkpoint_uri (an adapter checkpoint) or full_model_dir "
                     "(a complete model), not both")
    if args.checkpoint_uri:
        problems.require(_looks_like_model_uri(args.checkpoint_uri), "checkpoint_uri",
                         args.checkpoint_uri, "is not a model URI",
                         "pass models:/<model_id>, runs:/<run_id>/<name> or models:/<name>@<alias>")
    if args.full_model_dir:
        problems.require(bool(args.manifest_uri), "manifest_uri", args.manifest_uri,
                         "is required with full_model_dir (it names the base the model was "
                         "fine-tuned from)", "pass the manifest URI that download_snapshot printed")
        check_full_model_dir(Path(args.full_model_dir).expanduser(), args.full_model_dir, problems)
    return problems


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


def check_full_model_dir(root: Path, value: str, problems: Problems) -> None:
    field = "full_model_dir"
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
    if not names & set(_TOKENIZER_FILES):
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
    hard links to those files (no optimizer states or pickles). Nothing is read into memory: MLflow
    copies files with the OS's copy, page cache not process memory. (MLflow refuses symlinks.)"""
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


# --- resolving the checkpoint ------------------------------------------------------------------
def latest_output(entry_point: str, key: str, field: str) -> str:
    """The output `key` of the latest FINISHED run of `entry_point` in the active experiment."""
    import mlflow

    exp = mlflow.tracking.fluent._get_experiment_id()
    runs = mlflow.MlflowClient().search_runs(
        [exp], filter_string=f"tags.`{artifacts.STEP_TAG}` = '{entry_point}' "
                             "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=20)
    for r in runs:
        value = artifacts.get_outputs(r).get(key)
        if value:
            log.info("%s defaults to %s (output %r of %s run %s)", field, value, key, entry_point,
                     r.info.run_id)
            return value
    raise InputError(Problem(field, "", f"is empty and no finished {entry_point} run in experiment "
                             f"{exp} has an output {key!r}",
                             f"run {entry_point} first, or pass {field} explicitly"))


def model_info(uri: str, field: str):
    """MLflow's ModelInfo of any model URI; an unknown model is an InputError naming the field."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.models.get_model_info(uri)
    except (MlflowException, OSError) as err:
        raise InputError(Problem(field, uri, f"no such model ({one_line(err, 160)})",
                                 "pass a model URI that MLflow lists: models:/<model_id>, "
                                 "runs:/<run_id>/<name> or models:/<name>@<alias>")) from None


def e2e_artifacts(info, field: str, uri: str) -> dict[str, str]:
    """The E2EExtractor artifacts of a logged model (name -> path inside the model), or InputError."""
    from lora_pipeline import artifacts as names

    arts = (info.flavors.get("python_function") or {}).get("artifacts") or {}
    if names.BASE_REF_ARTIFACT not in arts:
        raise InputError(Problem(field, uri, "is not a model of this pipeline (no "
                                 f"{names.BASE_REF_ARTIFACT}: not logged by finetune or log_reference)",
                                 "pass a checkpoint that finetune logged"))
    return {k: v["path"] if isinstance(v, dict) else v for k, v in arts.items()}


def download_model_file(info, inner: str, dst: Path) -> Path:
    """One file or folder of a logged model (`inner`: its path inside the model)."""
    import mlflow

    model_uri = info.model_uri
    try:
        if info.model_id:
            # `models:/<id>/<path>` is read as a registered name; the model's own location is not.
            root = mlflow.MlflowClient().get_logged_model(info.model_id).artifact_location
            return Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root.rstrip('/')}/{inner}", dst_path=str(dst)))
        return Path(mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/{inner}",
                                                        dst_path=str(dst)))
    except Exception as err:  # MLflow raises several types for a missing artifact
        raise StepError(f"cannot download {inner} of model {model_uri} ({type(err).__name__}: "
                        f"{one_line(err, 160)}); its artifacts are gone or "
                        "unreadable: log the checkpoint again") from err


def logged_model_bytes(model_id: str) -> int:
    """Size of everything stored for a logged model (recursive listing of its artifacts)."""
    import mlflow

    client = mlflow.MlflowClient()

    def walk(path: str | None) -> int:
        total = 0
        for f in client.list_logged_model_artifacts(model_id, path):
            total += walk(f.path) if f.is_dir else (f.file_size or 0)
        return total

    return walk(None)


def check_serves(model_uri: str) -> None:
    """Load the logged model (base resolved and verified, adapter applied) and predict its example."""
    import mlflow
    import pandas as pd

    from lora_pipeline.model.serving import INPUT_EXAMPLE_SENTENCE

    try:
        model = mlflow.pyfunc.load_model(model_uri)
        out = model.predict(pd.DataFrame({"prompt": [INPUT_EXAMPLE_SENTENCE]}),
                            params={"max_new_tokens": 16})
    except StepError:
        raise
    except Exception as err:  # anything that stops the model from serving
        raise StepError(f"the logged model {model_uri} does not serve: {type(err).__name__}: "
                        f"{one_line(err)}") from err
    log.info("serving check: %r -> %r", INPUT_EXAMPLE_SENTENCE, out["mr"].iloc[0])


# --- the step ----------------------------------------------------------------------------------
def run(args: Args) -> Result:
    from lora_pipeline.cli import configure_tracking

    validate_static(args).raise_if_any()
    configure_tracking()
    if not args.checkpoint_uri and not args.full_model_dir:
        args.checkpoint_uri = latest_output(FINETUNE_ENTRY_POINT, CHECKPOINT_OUTPUT, "checkpoint_uri")

    import mlflow

    from lora_pipeline.base.manifest import Manifest, load_manifest
    from lora_pipeline.model import serving
    from lora_pipeline.tracking.runs import step_run

    with tempfile.TemporaryDirectory(prefix="log_reference.") as tmp_str:
        tmp = Path(tmp_str)
        source_model_id = ""
        if args.checkpoint_uri:
            info = model_info(args.checkpoint_uri, "checkpoint_uri")
            arts = e2e_artifacts(info, "checkpoint_uri", args.checkpoint_uri)
            source_model_id = info.model_id or ""
            ref_path = download_model_file(info, arts[artifacts.BASE_REF_ARTIFACT], tmp)
            ckpt_manifest = Manifest.from_json(ref_path.read_text())
            manifest = load_manifest(args.manifest_uri) if args.manifest_uri else ckpt_manifest
            if manifest.digest() != ckpt_manifest.digest():
                raise InputError(Problem(
                    "manifest_uri", args.manifest_uri,
                    f"pins base {manifest.reference()}, but the checkpoint was trained on "
                    f"{ckpt_manifest.reference()}", "pass the manifest the finetune run used, or "
                    "leave manifest_uri empty to use the checkpoint's own"))
            if artifacts.ADAPTER_ARTIFACT in arts:
                kind = KIND_ADAPTER
                weights_dir = download_model_file(info, arts[artifacts.ADAPTER_ARTIFACT],
                                                  tmp / "ckpt")
            elif artifacts.FULL_MODEL_ARTIFACT in arts:
                kind = KIND_FULL
                weights_dir = download_model_file(info, arts[artifacts.FULL_MODEL_ARTIFACT],
                                                  tmp / "ckpt")
            else:
                raise InputError(Problem("checkpoint_uri", args.checkpoint_uri,
                                         "holds neither an adapter nor a full model",
                                         "pass a checkpoint that finetune logged"))
        else:
            kind = KIND_FULL
            manifest = load_manifest(args.manifest_uri)
            weights_dir = stage_full_model(Path(args.full_model_dir).expanduser(), tmp / "full_model")
            cfg = json.loads((weights_dir / "config.json").read_text())
            arch = (cfg.get("architectures") or ["unknown"])[0]
            if manifest.architecture not in ("", "unknown", arch):
                raise InputError(Problem(
                    "full_model_dir", args.full_model_dir, f"is a {arch}, but the base "
                    f"{manifest.reference()} is a {manifest.architecture}",
                    "pass the manifest of the base this model was fine-tuned from"))

        source = args.checkpoint_uri or str(Path(args.full_model_dir).expanduser().resolve())
        tags = {SOURCE_MODEL_TAG: (artifacts.model_uri(source_model_id) if source_model_id
                                   else source),
                MODEL_KIND_TAG: kind, "base.reference": manifest.reference(),
                artifacts.MANIFEST_DIGEST_TAG: manifest.digest()}
        with step_run(ENTRY_POINT, args) as active:
            run_id = active.info.run_id
            log.info("logging %s model referring to %s", kind, manifest.reference())
            info = serving.log_e2e_model(
                artifacts.REFERENCE_MODEL_NAME, manifest,
                adapter_dir=weights_dir if kind == KIND_ADAPTER else None,
                full_model_dir=weights_dir if kind == KIND_FULL else None,
                tags=tags, with_input_example=True,
                # MLflow's own check loads the model and only warns when it fails; adapters get the
                # strict check below, full models are never loaded here (memory-efficient path).
                validate_serving_input=False,
            )
            uri = artifacts.model_uri(info.model_id)
            if kind == KIND_ADAPTER:
                check_serves(uri)
            logged = logged_model_bytes(info.model_id)
            mlflow.log_metrics({"logged_model_bytes": logged, "base_bytes": manifest.total_bytes,
                                "logged_to_base_ratio": logged / max(manifest.total_bytes, 1)})
            mlflow.set_tags(tags)
            artifacts.set_outputs(mlflow.MlflowClient(), run_id, {MODEL_OUTPUT: uri})
    log.info("logged %s (%.2f MB, refers to %s of %.1f MB)", uri, logged / 1e6,
             manifest.reference(), manifest.total_bytes / 1e6)
    return Result(run_id=run_id, model_uri=uri, model_id=info.model_id, kind=kind,
                  base_reference=manifest.reference(), logged_bytes=logged,
                  base_bytes=manifest.total_bytes)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(Args, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
