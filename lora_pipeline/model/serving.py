"""The logged model: a custom `mlflow.pyfunc.PythonModel` that refers to its base instead of copying it.

Why custom: with mlflow 3.17 + transformers 5.23, `mlflow.transformers` saves a PEFT model on a local
base with LoRA-renamed base weights and reloads it with the LoRA-targeted layers randomly initialised,
without any error (tests/test_serving.py shows it). This model instead stores
  * `adapter/` (PEFT adapter, a few MB) or `full_model/` (a complete checkpoint, copied file by file),
  * `base_reference.json` (the snapshot manifest: repo id + commit, or artifact URI, and every
    file's sha256),
  * `artifact_digests.json` (size and sha256 of every adapter / full-model file, taken at logging),
  * optionally `trainer_state/` (optimizer, scheduler, RNG: finetune checkpoints, for resume),
  * optionally `base/` (the base weights, once persist_and_register copied them in),
and on load resolves the base from the pinned reference, checks every digest (base and adapter),
and applies the adapter.

Serving: input column `prompt` (sentences), or for json/text models an OpenAI-style `messages`
column (a list of {role, content} ending on a user turn) in its place; params `temperature`,
`max_new_tokens`, `do_sample`, `batch_size`, `precision` (auto | bf16 | fp32: the compute precision of
generation). The task the model was trained for (`task.json`, lora_pipeline/task/tasks.py) builds the
prompt and parses the answer. Output columns of an e2e model: `mr` (normalised MR, or the raw text if
unparsable), `attributes` (JSON object slot -> value), `valid` (whether the output parsed), `error` (why
a row was not answered: bad prompt; null otherwise); of a json/text model: `text` (the answer),
`parsed` (json: the object as JSON text; text: the answer), `valid`, `error`. Params and prompts are checked first (lora_pipeline/model/requests.py): a bad param
refuses the request (HTTP 400 when served), a bad prompt only its row. Generation is batched with
left padding, so results do not depend on the batch size; concurrent requests share batches
(lora_pipeline/model/batching.py). The model loads on the device
`E2E_LORA_DEVICE` names (lora_pipeline/model/device.py; default cpu).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from lora_pipeline import artifacts as names
from lora_pipeline.base.cache import cache_dir, publish_dir, temp_dir_beside
from lora_pipeline.base.manifest import Manifest, describe_dir, sha256_file, verify_dir
from lora_pipeline.errors import StepError, one_line
from lora_pipeline.model import requests
from lora_pipeline.model.requests import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_PRECISION
from lora_pipeline.paths import PACKAGE_DIR

log = logging.getLogger(__name__)

# Pinned requirements written into every logged model (never inferred by loading the model:
# inference imports torchvision, which has no CPU build here, and crashes).
_REQUIREMENT_PACKAGES = ("mlflow", "torch", "transformers", "peft", "huggingface_hub", "safetensors",
                         "accelerate", "pandas")


def pip_requirements() -> list[str]:
    reqs = []
    for pkg in _REQUIREMENT_PACKAGES:
        version = metadata.version(pkg).split("+")[0]  # torch "2.13.0+cpu" -> the PyPI pin 2.13.0
        reqs.append(f"{pkg}=={version}")
    return reqs


# --- resolving the pinned base -----------------------------------------------------------------
def resolve_base(manifest: Manifest) -> Path:
    """A local directory holding the exact base files of the manifest, digests verified."""
    if manifest.is_hub:
        return _resolve_hub_base(manifest)
    return _resolve_artifact_base(manifest)


def _resolve_hub_base(manifest: Manifest) -> Path:
    from huggingface_hub import snapshot_download

    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    patterns = [f.path for f in manifest.files]
    # A commit never changes: a complete copy in the HF cache needs no request (and serves while the
    # Hub is down, instead of ~25 s of huggingface_hub's retries first). Digests are checked either way.
    try:
        cached = Path(snapshot_download(manifest.repo_id, revision=manifest.commit,
                                        allow_patterns=patterns, local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError and kin): ask the Hub below
        cached = None
    if cached is not None and all((cached / f.path).is_file() for f in manifest.files):
        verify_dir(cached, manifest)
        return cached
    try:
        path = Path(snapshot_download(manifest.repo_id, revision=manifest.commit,
                                      allow_patterns=patterns, endpoint=endpoint))
    except Exception as err:  # huggingface_hub raises many types (HTTP, offline, not found)
        if manifest.artifact_uri:
            log.warning("Hub failed for %s (%s); using the artifact copy", manifest.reference(), err)
            return _resolve_artifact_base(manifest)
        raise StepError(f"cannot resolve base {manifest.reference()} from the Hub at {endpoint} "
                        f"({type(err).__name__}: {one_line(err, 160)}); check "
                        "HF_ENDPOINT/HF_TOKEN, or persist the model with persist_and_register") from err
    verify_dir(path, manifest)
    return path


def _resolve_artifact_base(manifest: Manifest) -> Path:
    import mlflow

    # Keyed by the manifest's digest: one local copy per pinned base, however many models use it.
    final = cache_dir("bases", manifest.digest()[:32])
    if not final.is_dir():
        local = _local_snapshot_dir(manifest)
        if local is not None:
            return _copy_local_base(local, final, manifest)
        tmp = temp_dir_beside(final)
        try:
            mlflow.artifacts.download_artifacts(manifest.artifact_uri, dst_path=str(tmp))
        except Exception as err:  # MLflow raises several types for a missing run or artifact
            shutil.rmtree(tmp, ignore_errors=True)
            raise StepError(f"cannot resolve base {manifest.reference()} from the artifact store "
                            f"({type(err).__name__}: {one_line(err, 160)}); the "
                            "snapshot run's artifacts are gone: rerun download_snapshot, or use a "
                            "model persisted by persist_and_register") from err
        inner = tmp / Path(manifest.artifact_uri.rstrip("/")).name
        try:
            verify_dir(inner, manifest)
        except StepError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_dir(inner, final)
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    verify_dir(final, manifest)
    return final


def _local_snapshot_dir(manifest: Manifest) -> Path | None:
    """The snapshot run's own `snapshot/files` folder when the store is local and holds every file,
    else None (a remote store, or a snapshot run that is gone: the download path explains)."""
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    from lora_pipeline.registry.persist import local_path_of

    try:
        uri = manifest.artifact_uri
        if RunsArtifactRepository.is_runs_uri(uri):
            uri = RunsArtifactRepository.get_underlying_uri(uri)
        local = local_path_of(uri)
    except Exception as err:  # MLflow raises several types for a run that is gone
        log.debug("snapshot %s not readable in place (%s)", manifest.artifact_uri, err)
        return None
    if local is None or not all((local / f.path).is_file() for f in manifest.files):
        return None
    return local


def _copy_local_base(src: Path, final: Path, manifest: Manifest) -> Path:
    """Copy the pinned files into the cache, hashing them on the way (`transfer.copy_tree_hashed`),
    where a download followed by `verify_dir` reads them twice one after the other."""
    from lora_pipeline.base.transfer import copy_tree_hashed

    tmp = temp_dir_beside(final)
    try:
        entries = copy_tree_hashed(src, tmp, [f.path for f in manifest.files], durable=False)
        if entries != manifest.files:
            verify_dir(tmp, manifest)  # names the first file that differs, with the usual message
            raise StepError(f"the files of {manifest.reference()} differ from its manifest; rerun "
                            "download_snapshot")
        publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- loading and generating --------------------------------------------------------------------
def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    # Left padding: a decoder-only model continues from the last position of each row.
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: Path, dtype: str = "fp32", **from_pretrained_kwargs):
    """The checkpoint's model in `dtype` (fp32 | bf16 | fp16), on the CPU unless a `device_map` in
    `from_pretrained_kwargs` places it."""
    from transformers import AutoModelForCausalLM

    from lora_pipeline.model.device import torch_dtype

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), trust_remote_code=False,
                                                **from_pretrained_kwargs)


@dataclass(frozen=True)
class LoadOptions:
    """How a model being loaded now is placed: `device` (cpu | cuda, resolved), `dtype` of its weights
    (auto | fp32 | bf16: resolved against the checkpoint at load) and the memory plan (device_map,
    max_memory). Served models read theirs from the environment (`E2E_LORA_DEVICE`,
    `E2E_LORA_DTYPE`) when they load, so a model logged on one machine runs as the serving one
    decides; `evaluate_checkpoint` sets them in-process with `loading`."""

    device: str = "cpu"
    dtype: str = "auto"
    memory: Any = None  # device.MemoryPlan, or None: the whole model on `device`

    @classmethod
    def from_env(cls) -> LoadOptions:
        from lora_pipeline.model.device import DTYPE_ENV, DTYPES, serving_device

        try:
            device = serving_device()
        except ValueError as err:  # InputError: one line naming the variable and the fix
            raise StepError(str(err)) from None
        dtype = os.environ.get(DTYPE_ENV, "").strip() or "auto"
        if dtype not in DTYPES:
            raise StepError(f"{DTYPE_ENV}={dtype!r} is not supported; use one of: {', '.join(DTYPES)}")
        return cls(device=device, dtype=dtype)


_LOAD_OPTIONS: contextvars.ContextVar[LoadOptions | None] = contextvars.ContextVar("load_options", default=None)


@contextlib.contextmanager
def loading(options: LoadOptions):
    """Models loaded (`load_context`) inside this block use `options` instead of the environment's."""
    token = _LOAD_OPTIONS.set(options)
    try:
        yield
    finally:
        _LOAD_OPTIONS.reset(token)


def load_placed(path: Path, options: LoadOptions):
    """`load_causal_lm` for `options`: the weight dtype resolved against the checkpoint's stored one,
    then the model placed (moved to the device, or dispatched by its device_map)."""
    from lora_pipeline.model.device import resolve_dtype

    try:
        dtype = resolve_dtype(options.dtype, path, device=options.device)
    except ValueError as err:
        raise StepError(str(err)) from None
    kwargs = options.memory.from_pretrained_kwargs() if options.memory is not None else {}
    model = load_causal_lm(path, dtype=dtype, **kwargs)
    return model if "device_map" in kwargs else model.to(options.device)


def apply_adapter(base_model, adapter_dir: Path, *, merge: bool = True):
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    # Merging folds B@A into the frozen weights: same function, no per-layer LoRA overhead at serve time.
    return model.merge_and_unload() if merge else model


def bf16_linear_copy(model):
    """`model` with every Linear weight held in bf16, sharing all other tensors with it.

    Under bf16 autocast this computes exactly what `model` computes under autocast (autocast casts
    each Linear weight to bf16 before its matmul; here that cast is done once), bit for bit
    (tests/test_serving.py), while the fp32 model stays as it was for anything else. Measured on the
    default base with a trained adapter, 32 sentences, batch 16: 7.4 s against 9.4 s re-casting the
    weights at every token, and 12.7 s in fp32.
    Extra memory: the bf16 weights, half of the Linear weights' fp32 bytes (~270 MB here).
    """
    import copy

    import torch

    # Share every existing tensor: the copy gets new modules, not new embeddings, norms or buffers.
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    fast = copy.deepcopy(model, memo)
    for module in fast.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(module.weight.detach().to(torch.bfloat16),
                                               requires_grad=False)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(module.bias.detach().to(torch.bfloat16),
                                                 requires_grad=False)
    return fast.eval()


def encode_prompts(tokenizer, sentences: list, task=None, system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of each prompt (a sentence, or the turns before the answer) as the task renders it
    with the model's chat template, unpadded; no task: e2e's prompt."""
    if task is None:
        from lora_pipeline.task.e2e import format_prompt

        prompts = [format_prompt(tokenizer, s) for s in sentences]
    else:
        prompts = [task.format_prompt(tokenizer, s, system_prompt) for s in sentences]
    return tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []


def generate(model, tokenizer, sentences: list[str], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             temperature: float = 0.0, do_sample: bool = False,
             batch_size: int = DEFAULT_BATCH_SIZE, precision: str = DEFAULT_PRECISION,
             encoded: list[list[int]] | None = None, task=None, system_prompt: str | None = None
             ) -> list[str]:
    """Batched generation with left padding; returns the decoded answers in input order.

    `encoded`: the sentences' prompt token ids when the caller has them already (`predict` checks
    prompt lengths first), else they are made here with `encode_prompts`.
    `precision` (lora_pipeline/model/precision.py): `auto` generates under bf16 autocast where bf16 matmuls are
    native, as `finetune` trains by default; the weights stay fp32, so logits in fp32 are unchanged.
    Greedy decoding prefills the prompt prefix a batch shares once and drops each row from its batch
    at its end of sequence (lora_pipeline/model/decoding.py: the same tokens as `model.generate`, less
    work); sampling runs `model.generate`.
    """
    import torch

    from lora_pipeline.model.decoding import greedy_decode, left_padded
    from lora_pipeline.model.precision import autocast

    if encoded is None:
        encoded = encode_prompts(tokenizer, sentences, task, system_prompt)
    # Length buckets: sorted by prompt length, each batch pads to nearly its own length (padding is
    # wasted compute); the order is restored at the end.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = left_padded([encoded[i] for i in idx], tokenizer.pad_token_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        with torch.inference_mode(), autocast(model, precision, model.device.type):
            if do_sample:
                tokens = _sample(model, tokenizer, ids, mask, max_new_tokens, temperature)
            else:
                tokens = greedy_decode(model, ids, mask, max_new_tokens=max_new_tokens,
                                       eos_token_ids=[tokenizer.eos_token_id])
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for i, t in zip(idx, texts, strict=True):
            out[i] = t.strip()
    return out


def _sample(model, tokenizer, ids, mask, max_new_tokens: int, temperature: float) -> list[list[int]]:
    from transformers import GenerationConfig

    from lora_pipeline.model.decoding import last_position_only

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                           top_p=None, top_k=None,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    # The last position by index (see last_position_only): generate's own `logits_to_keep=1` is slow
    # on frozen bf16 weights.
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                          **last_position_only(model, ids.device))[:, ids.shape[1]:].tolist()


MESSAGES_COLUMN = "messages"


def _prompt_values(model_input: Any) -> list[Any]:
    """The prompt cells of a request, as sent (checked per row by `requests.prompt_problem`); a row
    whose `prompt` is missing or null takes its `messages` cell (a list of turns) instead."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        cols = model_input.columns
        if "prompt" not in cols and MESSAGES_COLUMN not in cols:
            raise requests.BadRequest(f"input has columns {list(cols)}; send a column 'prompt' with "
                                      "one sentence per row, or 'messages' with one conversation per row")
        prompts = model_input["prompt"].tolist() if "prompt" in cols else [None] * len(model_input)
        if MESSAGES_COLUMN not in cols:
            return prompts
        return [m if requests.prompt_problem(p) and _is_turns(m) else p
                for p, m in zip(prompts, model_input[MESSAGES_COLUMN].tolist(), strict=True)]
    if isinstance(model_input, dict):
        v = model_input.get("prompt")
        return list(v) if isinstance(v, (list, tuple)) else [v]
    if isinstance(model_input, str):
        return [model_input]
    return list(model_input)


def _is_turns(cell: Any) -> bool:
    return not isinstance(cell, str) and hasattr(cell, "__len__") and len(cell) > 0


def messages_problem(cell: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """(turns, None) for a `messages` cell the model can answer, else (None, why): a list of
    {role, content} (system, user, assistant), ending on the user turn to answer."""
    from lora_pipeline.task.base import ROLES

    fix = 'fix: send [{"role": "user", "content": "..."}], earlier turns first'
    try:
        turns = [{"role": str(t["role"]), "content": t["content"]} for t in list(cell)]
    except (TypeError, KeyError, IndexError):
        return None, f"messages is not a list of {{role, content}} turns; {fix}"
    if any(t["role"] not in ROLES or not isinstance(t["content"], str) or not t["content"].strip()
           for t in turns):
        return None, f"messages has a turn with another role than system/user/assistant or no text; {fix}"
    if turns[-1]["role"] != "user":
        return None, f"messages ends on a {turns[-1]['role']} turn; the model answers the last user turn; {fix}"
    return turns, None


def _precision(value: Any) -> str:
    if problem := requests.precision_problem(value):
        raise requests.BadRequest(problem)
    return str(value)


# --- digests of the model's own weight files ---------------------------------------------------
def describe_artifacts(dirs: dict[str, Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """{artifact: {relative path: {size, sha256}}} for the weight artifacts being logged."""
    return {name: {e.path: {"size": e.size, "sha256": e.sha256} for e in describe_dir(d)}
            for name, d in dirs.items() if name in names.DIGESTED_ARTIFACTS}


def verify_artifacts(paths: dict[str, Any], model: str = "the model") -> None:
    """Check the adapter / full-model files against the digests recorded when they were logged.

    `paths` maps artifact names to local paths (a pyfunc context's `artifacts`). A file that is
    missing, or whose size or sha256 differ, is a StepError naming it: a flipped byte in an adapter
    otherwise loads silently different LoRA weights.
    """
    digest_file = paths.get(names.ARTIFACT_DIGESTS)
    if digest_file is None and not {names.ADAPTER_ARTIFACT, names.FULL_MODEL_ARTIFACT} & set(paths):
        return  # a base alone (evaluate_checkpoint's base side): its files are checked by its manifest
    if digest_file is None:
        log.warning("%s records no %s (logged by an older version): its adapter / full-model files "
                    "are not checked", model, names.ARTIFACT_DIGESTS)
        return
    recorded = json.loads(Path(digest_file).read_text())
    checked = 0
    for name, files in recorded.items():
        if name not in paths:
            raise StepError(f"{model} lists artifact {name!r} in {names.ARTIFACT_DIGESTS}, but it is "
                            "missing from the model: the logged model is incomplete; log it again")
        root = Path(paths[name])
        for rel, want in sorted(files.items()):
            f = root / rel
            where = f"{name} file {rel} of {model}"
            if not f.is_file():
                raise StepError(f"{where} is missing: the logged model is incomplete; log it again")
            size = f.stat().st_size
            if size != want["size"]:
                raise StepError(f"digest mismatch for {where}: size {size} != {want['size']} recorded "
                                "at logging; the stored model was modified or is corrupt: log it again")
            digest = sha256_file(f)
            if digest != want["sha256"]:
                raise StepError(f"digest mismatch for {where}: sha256 {digest[:12]}… != "
                                f"{want['sha256'][:12]}… recorded at logging; the stored model was "
                                "modified or is corrupt: log it again")
            checked += 1
    log.info("verified %d model files against %s", checked, names.ARTIFACT_DIGESTS)


_COPY_LOCK = threading.Lock()


def in_passing_thread(fn) -> None:
    """Run `fn()` in a new thread (with this context's context variables) and wait for it to end;
    what it raises is raised here.

    Why: PyTorch's CPU ops run on OpenMP (libgomp), which keeps a pool of worker threads for every
    thread that has run a parallel region; once it manages more threads than there are CPUs it
    stops spinning between regions, and every op then pays a sleep and a wake-up. The scoring server
    generates in other threads than the one that loads the model (the batcher's, or each request's),
    so the pool that loading and warm-up left in the loading thread slowed every served batch. A
    thread's pool goes when the thread ends. Measured on the default base with a fine-tuned adapter
    (fp32, 8 sentences, <= 48 new tokens, 2-core Xeon without AMX): 6.3-6.9 s in a second thread after
    loading in the main one, 3.3-4.1 s in the main thread, 3.3-3.9 s in a second thread after loading
    in a passing one."""
    from concurrent.futures import ThreadPoolExecutor

    # Leaving the block joins the thread, whether `result()` returned or raised.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="e2e-load") as pool:
        pool.submit(contextvars.copy_context().run, fn).result()


class E2EExtractor(mlflow.pyfunc.PythonModel):
    """Sentence -> E2E MR. Loads the pinned base (verified) plus adapter or full checkpoint."""

    _bf16_model = None  # made on the first bf16 generation (bf16_linear_copy, then packed)
    _fp32_model = None  # made on the first fp32 generation (packed_linear.packed_linear_copy)
    task = None  # the Task the model was trained for (load_context; None: e2e as always)
    system_prompt: str | None = None
    config = requests.ServingConfig()  # the model config (set by load_context)
    context_length: int | None = None  # the model's, in tokens (prompt + answer); None: unknown

    def generation_model(self, precision: str = DEFAULT_PRECISION):
        """The module `generate` runs for `precision`: in bf16 the model's bf16-weight copy, in fp32
        the model; on a CPU either with its Linear weights packed once (MKL for fp32, oneDNN for bf16)
        where that is supported (lora_pipeline/model/packed_linear.py)."""
        from lora_pipeline.model.packed_linear import packed_linear_copy
        from lora_pipeline.model.precision import resolve_precision

        resolved = resolve_precision(_precision(precision), self.model.device.type)
        if resolved not in ("bf16", "fp32"):
            return self.model
        with _COPY_LOCK:  # concurrent unbatched requests would each make a copy
            if resolved == "bf16" and self._bf16_model is None:
                self._bf16_model = packed_linear_copy(bf16_linear_copy(self.model))
            if resolved == "fp32" and self._fp32_model is None:
                self._fp32_model = packed_linear_copy(self.model)
        return self._bf16_model if resolved == "bf16" else self._fp32_model

    _batcher = None  # cross-request batching (made by load_context when the config turns it on)
    _widened = False  # whether the first batched request has asked the scoring server for more threads

    def load_context(self, context) -> None:
        from lora_pipeline.model import param_guard
        from lora_pipeline.model.batching import Batcher
        self._bf16_model = self._fp32_model = None  # a copy of an earlier load's weights must never serve this one
        # Decided now, on the machine that loads the model (before the weights: a bad setting
        # fails in a second).
        options = _LOAD_OPTIONS.get() or LoadOptions.from_env()
        self.config = requests.ServingConfig.from_model_config(getattr(context, "model_config", None))
        self._load_task(context.artifacts)
        param_guard.install()

        def load_and_warm_up() -> None:
            self._load_weights(context.artifacts, options)
            self._warm_up()

        in_passing_thread(load_and_warm_up)
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self._batcher = (Batcher(self._run_batch, max_rows=self.config.batch_max_rows,
                                 max_wait_s=self.config.batch_max_wait_ms / 1000)
                         if self.config.batching else None)

    def _load_task(self, arts: dict[str, str]) -> None:
        from lora_pipeline.task.tasks import task_from_spec

        spec_file = arts.get(names.TASK_ARTIFACT)
        spec = json.loads(Path(spec_file).read_text()) if spec_file else None
        self.task, self.system_prompt = task_from_spec(spec)
        if not spec:
            self.task = None  # e2e's own prompt path (a model logged before tasks existed)

    @property
    def task_name(self) -> str:
        return self.task.name if self.task is not None else "e2e"

    def _warm_up(self) -> None:
        """One token for one sentence, here in the loading thread, on the module a request at the
        default precision generates with (`generation_model`: its bf16 or packed copy is made now,
        not by the first request). The first forward pass of a process
        pays one-off set-up (3 s on the default base on a busy 2-core machine); paid by the first request
        instead, in the batcher's thread while the other requests' threads prepare theirs, it took 30-50 s
        (measured with 8 concurrent clients on a 2-core AMD EPYC, where a batch of 8 then took 6-8 s;
        the P9 benchmark's machine answers a batch of 8 in ~3.8 s, its p50)."""
        import torch

        from lora_pipeline.model.decoding import greedy_decode, left_padded
        from lora_pipeline.model.precision import autocast

        ids, mask = left_padded(encode_prompts(self.tokenizer, [INPUT_EXAMPLE_SENTENCE], self.task,
                                               self.system_prompt), self.tokenizer.pad_token_id)
        model = self.generation_model()
        with torch.inference_mode(), autocast(model, DEFAULT_PRECISION, self.model.device.type):
            greedy_decode(model, ids.to(self.model.device), mask.to(self.model.device), max_new_tokens=1,
                          eos_token_ids=[self.tokenizer.eos_token_id])

    def _load_weights(self, arts: dict[str, str], options: LoadOptions | None = None) -> None:
        options = options or LoadOptions(dtype="fp32")
        manifest = Manifest.from_json(Path(arts[names.BASE_REF_ARTIFACT]).read_text())
        self.manifest = manifest
        verify_artifacts(arts)
        if names.FULL_MODEL_ARTIFACT in arts:
            path = Path(arts[names.FULL_MODEL_ARTIFACT])
            self.model, self.tokenizer = load_placed(path, options).eval(), load_tokenizer(path)
            return
        if names.PERSISTED_BASE_ARTIFACT in arts:
            base_dir = Path(arts[names.PERSISTED_BASE_ARTIFACT])
            verify_dir(base_dir, manifest)
        else:
            base_dir = resolve_base(manifest)
        self.tokenizer = load_tokenizer(base_dir)
        model = load_placed(base_dir, options)
        if names.ADAPTER_ARTIFACT in arts:
            model = apply_adapter(model, Path(arts[names.ADAPTER_ARTIFACT]))
        self.model = model.eval()

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        """One row per prompt: the answer, or (bad prompt) `valid=false` and the `error`, never an
        answer made up for it. A bad param refuses the whole request (`requests.BadRequest`)."""
        import pandas as pd

        from lora_pipeline.task.e2e import format_mr, parse_mr

        gen = requests.check_params(params, self.config)
        values = _prompt_values(model_input)
        errors: list[str | None] = []
        for i, v in enumerate(values):
            if _is_turns(v):
                values[i], problem = messages_problem(v)
                errors.append(problem)
            else:
                errors.append(requests.prompt_problem(v))
        todo = [i for i, e in enumerate(errors) if e is None]
        encoded = dict(zip(todo, encode_prompts(self.tokenizer, [values[i] for i in todo], self.task,
                                                self.system_prompt), strict=True))
        limit, source = requests.prompt_limit(self.config, self.context_length, gen.max_new_tokens)
        for i in todo:
            errors[i] = requests.length_problem(len(encoded[i]), limit, source)
        todo = [i for i in todo if errors[i] is None]
        texts = dict(zip(todo, self._generate([values[i] for i in todo], [encoded[i] for i in todo], gen),
                         strict=True)) if todo else {}
        if self.task is not None and self.task.name != "e2e":
            return self._task_output(texts, errors)
        cols: dict[str, list] = {c: [] for c in OUTPUT_COLUMNS}
        for i, error in enumerate(errors):
            parsed = parse_mr(texts[i]) if error is None else None
            cols["mr"].append("" if error else format_mr(parsed) if parsed is not None else texts[i])
            cols["attributes"].append(json.dumps(parsed or {}, ensure_ascii=False))
            cols["valid"].append(parsed is not None)
            cols["error"].append(error)
        # `error` as objects: None stays None (JSON null); a string column would hold NaN.
        return pd.DataFrame({**cols, "error": pd.Series(cols["error"], dtype=object)},
                            columns=list(OUTPUT_COLUMNS))

    def _task_output(self, texts: dict[int, str], errors: list[str | None]):
        """json/text models: the answer, the task's parse of it, whether it parsed, the row's error."""
        import pandas as pd

        cols: dict[str, list] = {c: [] for c in TASK_OUTPUT_COLUMNS}
        for i, error in enumerate(errors):
            parsed = self.task.parse(texts[i]) if error is None else None
            cols["text"].append("" if error else texts[i])
            cols["parsed"].append(None if parsed is None else
                                  parsed if isinstance(parsed, str) else json.dumps(parsed, ensure_ascii=False))
            cols["valid"].append(parsed is not None)
            cols["error"].append(error)
        return pd.DataFrame({c: pd.Series(v, dtype=object) if c in ("parsed", "error") else v
                             for c, v in cols.items()}, columns=list(TASK_OUTPUT_COLUMNS))

    def _generate(self, sentences: list[str], encoded: list[list[int]], gen: requests.Generation) -> list[str]:
        """The answers to one request's good prompts: generated with the rows of concurrent requests
        of the same settings when batching is on, else alone."""
        items = list(zip(sentences, encoded, strict=True))
        if self._batcher is None:
            return self._run_batch(gen, items)
        if not self._widened:
            # Room in the scoring server for a full batch generating and the next one gathering.
            from lora_pipeline.model import mlflow_private

            self._widened = True
            if mlflow_private.widen_scoring_threads(2 * self.config.batch_max_rows):
                log.info("scoring server: up to %d requests at once", 2 * self.config.batch_max_rows)
        return self._batcher.submit(gen, items)

    def _run_batch(self, gen: requests.Generation, items: list[tuple[str, list[int]]]) -> list[str]:
        return generate(self.generation_model(gen.precision), self.tokenizer, [s for s, _ in items],
                        max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                        do_sample=gen.do_sample, batch_size=gen.batch_size, precision=gen.precision,
                        encoded=[e for _, e in items], task=self.task, system_prompt=self.system_prompt)


OUTPUT_COLUMNS = ("mr", "attributes", "valid", "error")
TASK_OUTPUT_COLUMNS = ("text", "parsed", "valid", "error")  # json and text models


_PARAM_TYPES = {"temperature": "double", "max_new_tokens": "long", "do_sample": "boolean",
                "batch_size": "long", "precision": "string"}


def signature(task: str = "e2e"):
    """The logged model's signature. e2e: today's (a `prompt` column of sentences; batch_score's
    schema); json/text: `prompt` or an OpenAI-style `messages` column, and their own outputs."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    params = ParamSchema([ParamSpec(name, _PARAM_TYPES[name], default)
                          for name, default in requests.PARAM_DEFAULTS.items()])
    if task != "e2e":
        turn = Object([Property("role", "string"), Property("content", "string")])
        return ModelSignature(
            inputs=Schema([ColSpec("string", "prompt", required=False),
                           ColSpec(Array(turn), MESSAGES_COLUMN, required=False)]),
            outputs=Schema([ColSpec("string", "text"), ColSpec("string", "parsed", required=False),
                            ColSpec("boolean", "valid"), ColSpec("string", "error", required=False)]),
            params=params)
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "mr"), ColSpec("string", "attributes"),
                        ColSpec("boolean", "valid"), ColSpec("string", "error", required=False)]),
        params=ParamSchema([ParamSpec(name, _PARAM_TYPES[name], default)
                            for name, default in requests.PARAM_DEFAULTS.items()]),
    )


INPUT_EXAMPLE_SENTENCE = ("The Punter is a high-priced coffee shop serving Chinese food near "
                          "Café Sicilia.")


def log_e2e_model(name: str, manifest: Manifest, *, adapter_dir: Path | None = None,
                  full_model_dir: Path | None = None, trainer_state_dir: Path | None = None,
                  persisted_base_dir: Path | None = None, step: int = 0,
                  tags: dict[str, str] | None = None, params: dict[str, Any] | None = None,
                  with_input_example: bool = True, validate_serving_input: bool = True,
                  task_spec: dict[str, Any] | None = None):
    """Log an `E2EExtractor` model into the active run; returns MLflow's ModelInfo.

    Weights are never loaded here: the adapter / checkpoint folders are copied file by file, so memory
    stays flat however large the model (the memory-efficient path for full checkpoints). A full
    checkpoint going to a local store is copied by this project straight into the model's artifact
    location, hashed on the way (`transfer.copy_tree_hashed`: written once, fsynced), and listed in the
    MLmodel; MLflow's own logging would read it three times (hash, copy into a temp model dir, copy
    into the store) and write it twice.
    With an input example MLflow validates serving by loading the model and predicting once (seconds
    on a small base); training checkpoints skip it (`with_input_example=False`) so logging a
    checkpoint never stalls training on a full model load.
    `validate_serving_input=False` keeps the input example but skips that load: for callers that
    must not load the weights (full checkpoints) or that check the logged model themselves (MLflow
    only logs a warning when its check fails).
    `task_spec` (lora_pipeline/task/tasks.py:task_spec): the task and system prompt the model was
    trained with, stored as `task.json` and in the model's metadata; None: e2e.
    """
    import mlflow
    import pandas as pd

    if (adapter_dir is None) == (full_model_dir is None):
        raise ValueError("log_e2e_model needs exactly one of adapter_dir / full_model_dir")
    # A full checkpoint is written straight into a local store and hashed on the way (no hashing
    # pass, no temp copy), unless MLflow's serving check must load the model from the temp copy it makes.
    place_full = full_model_dir is not None and not (validate_serving_input and with_input_example)
    model = placed_dir = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ref = Path(tmp) / names.BASE_REF_ARTIFACT
            ref.write_text(manifest.to_json())
            arts = {names.BASE_REF_ARTIFACT: str(ref)}
            if adapter_dir is not None:
                arts[names.ADAPTER_ARTIFACT] = str(adapter_dir)
            if trainer_state_dir is not None:
                arts[names.TRAINER_STATE_ARTIFACT] = str(trainer_state_dir)
            if persisted_base_dir is not None:
                arts[names.PERSISTED_BASE_ARTIFACT] = str(persisted_base_dir)
            if task_spec is not None:
                spec_file = Path(tmp) / names.TASK_ARTIFACT
                spec_file.write_text(json.dumps(task_spec, indent=1, sort_keys=True))
                arts[names.TASK_ARTIFACT] = str(spec_file)
            placed: dict[str, tuple[str, int]] = {}
            recorded: dict[str, dict[str, dict[str, Any]]] = {}
            if place_full:
                model = _init_logged_model(name, tags, params)
                placed_dir = _full_model_dest(model)  # before copying: a failed copy is removed
                if placed_dir is not None:
                    entries = _place_full_model(Path(full_model_dir), placed_dir)
                    recorded[names.FULL_MODEL_ARTIFACT] = _digest_table(entries)
                    placed[names.FULL_MODEL_ARTIFACT] = (str(full_model_dir), sum(e.size for e in entries))
            if full_model_dir is not None and not placed:
                arts[names.FULL_MODEL_ARTIFACT] = str(full_model_dir)
            # Hashing reads the files MLflow copies once more (an adapter: a few MB; a full checkpoint
            # only where it cannot be placed: a remote store, or MLflow's serving check).
            recorded.update(describe_artifacts({k: Path(v) for k, v in arts.items()}))
            digests = Path(tmp) / names.ARTIFACT_DIGESTS
            digests.write_text(json.dumps(recorded, indent=1, sort_keys=True))
            arts[names.ARTIFACT_DIGESTS] = str(digests)
            kwargs = dict(
                name=name,
                python_model=E2EExtractor(),
                artifacts=arts,
                code_paths=[str(PACKAGE_DIR)],
                signature=signature(task_spec["task"] if task_spec else "e2e"),
                input_example=(pd.DataFrame({"prompt": [INPUT_EXAMPLE_SENTENCE]})
                               if with_input_example else None),
                pip_requirements=pip_requirements(),
                # Logged with every key at its default: MLflow lets a load-time config override only
                # the keys the logged one has.
                model_config=requests.ServingConfig().as_model_config(),
                metadata={"base_reference": manifest.reference(), "base_source": manifest.source,
                          "base_manifest_digest": manifest.digest(),
                          **({"task": task_spec["task"]} if task_spec else {})},
                step=step,
                tags=tags,
                params=params,
            )
            if model is not None:
                kwargs["model_id"] = model.model_id  # created with its tags and params already
            if validate_serving_input and model is None:
                return mlflow.pyfunc.log_model(**kwargs)
            # pyfunc.log_model has no switch for MLflow's serving check: the private part lives in one
            # place, with the listing of artifacts placed in the store beforehand.
            from lora_pipeline.model.mlflow_private import log_pyfunc_without_serving_check

            return log_pyfunc_without_serving_check(placed_artifacts=placed or None, **kwargs)
    except BaseException:
        if model is not None:
            _abandon(model.model_id, placed_dir)
        raise


def _digest_table(entries) -> dict[str, dict[str, Any]]:
    return {e.path: {"size": e.size, "sha256": e.sha256} for e in entries}


def _init_logged_model(name: str, tags: dict[str, str] | None, params: dict[str, Any] | None):
    """A PENDING logged model in the active run, with the tags and params `pyfunc.log_model` gives the
    models it creates itself (the run's params included)."""
    import mlflow

    run = mlflow.active_run()
    run_id = run.info.run_id if run else None
    all_params = {**(params or {}), **(mlflow.MlflowClient().get_run(run_id).data.params if run_id else {})}
    return mlflow.initialize_logged_model(
        name=name, source_run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()} or None,
        params={k: str(v) for k, v in all_params.items()})


def _full_model_dest(model) -> Path | None:
    """Where a full checkpoint goes in `model`'s local store; None where the store is not local."""
    from lora_pipeline.registry.persist import local_path_of

    local = local_path_of(model.artifact_location)
    return None if local is None else local / names.MODEL_ARTIFACTS_DIR / names.FULL_MODEL_ARTIFACT


def _place_full_model(src: Path, dst: Path) -> list:
    """Copy the checkpoint's files to `dst`, hashing each byte as it is copied
    (`transfer.copy_tree_hashed`: fsynced, complete files only under their names); their entries."""
    from lora_pipeline.base.transfer import copy_tree_hashed

    files = [p.relative_to(src).as_posix() for p in sorted(src.rglob("*"))
             if p.is_file() and p.relative_to(src).parts[0] not in (".git", ".cache")]
    log.info("copying %d full-model files into %s with their sha256", len(files), dst)
    return copy_tree_hashed(src, dst, files)


def _abandon(model_id: str, placed_dir: Path | None) -> None:
    """A model whose logging failed: FAILED (if MLflow left it PENDING), its placed copy removed."""
    import mlflow

    if placed_dir is not None:
        shutil.rmtree(placed_dir, ignore_errors=True)
    try:
        client = mlflow.MlflowClient()
        if str(client.get_logged_model(model_id).status).endswith("PENDING"):
            client.finalize_logged_model(model_id, "FAILED")
    except Exception as err:  # the store itself failed: the model stays PENDING, never READY
        log.warning("could not mark %s failed (%s: %s)", model_id, type(err).__name__, one_line(err))
