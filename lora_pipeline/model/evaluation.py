"""Evaluating a served model against its base: loading both through the served code path, timed
generation, the task's scores (lora_pipeline/task/tasks.py: slot scores for e2e, field scores for
json, exact match / token F1 / ROUGE-L for text), and the per-example table (what
evaluate_checkpoint runs)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from lora_pipeline import artifacts
from lora_pipeline.errors import InputError, Problem, StepError, one_line


@dataclass
class Generated:
    texts: list[str]
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def generate_timed(extractor, sentences: list, *, batch_size: int, max_new_tokens: int,
                   precision: str, desc: str = "generating") -> Generated:
    """The served model's own generation (same prompt, batching and decoding as `predict`), one
    batch at a time for a progress bar; shortest sentences first, as `generate` itself orders them,
    and answers are independent of the batching (tests/per_step/test_serving.py)."""
    from tqdm.auto import tqdm

    from lora_pipeline.model import serving

    order = sorted(range(len(sentences)), key=lambda i: len(str(sentences[i])))
    texts = [""] * len(sentences)
    start = time.perf_counter()
    with tqdm(total=len(sentences), desc=desc, unit="sentence") as bar:
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            out = serving.generate(extractor.generation_model(precision), extractor.tokenizer,
                                   [sentences[i] for i in idx], max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, precision=precision,
                                   task=extractor.task, system_prompt=extractor.system_prompt)
            for i, t in zip(idx, out, strict=True):
                texts[i] = t
            bar.update(len(idx))
    seconds = time.perf_counter() - start
    # Generated tokens, counted from the answers (padding after an early end-of-sequence is not
    # work anyone asked for, so it does not count).
    tokens = sum(len(ids) + 1 for ids in extractor.tokenizer(texts, add_special_tokens=False)["input_ids"])
    return Generated(texts, tokens, seconds)


def score(expected: list[str], generated: Generated, prefix: str, task=None):
    """(metrics, rows): the task's scores of the answers against the expected ones (no task: e2e's
    slot scores), plus tokens/s; one (prediction as shown, row score) per example."""
    from lora_pipeline.task.tasks import get_task

    scored = (task or get_task("e2e")).score(list(zip(expected, generated.texts, strict=True)), prefix)
    metrics = dict(scored.metrics)
    metrics[f"{prefix}tokens_per_s"] = generated.tokens_per_s
    return metrics, scored.rows


def model_task(requested: str, own: str, model_uri: str):
    """The task to score with: the model's own (`own`, from its task.json); a `requested` task other
    than the default must agree with it."""
    from lora_pipeline.task.tasks import DEFAULT_TASK, get_task

    if requested.strip().lower() not in (DEFAULT_TASK, own):
        raise InputError(Problem("task", requested, f"the model {model_uri} was trained for task={own}",
                                 f"pass task={own}, or leave the default"))
    return get_task(own)


def load_candidate(model_uri: str, tmp: Path):
    """(E2EExtractor, artifacts of its base alone) of a model this pipeline logged; StepError /
    InputError otherwise. The base's artifacts load it through the same code (pinned manifest,
    digests checked, or the persisted copy a registered model carries): see `load_base`."""
    import mlflow

    try:
        # Fetched first (what load_model does itself; read in place from a local store) so the
        # model's own folder is known: a persisted base lives there.
        model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
        loaded = mlflow.pyfunc.load_model(str(model_dir))
    except StepError:
        raise  # base unresolvable or digest mismatch: serving.py's message names the reference
    except Exception as err:  # anything else that stops the model from loading
        raise StepError(f"cannot load model {model_uri}: {type(err).__name__}: "
                        f"{one_line(err)}") from err
    extractor = loaded.unwrap_python_model()
    if not all(hasattr(extractor, a) for a in ("model", "tokenizer", "manifest")):
        raise InputError(Problem("model_uri", model_uri, "is not an e2e-extractor model of this "
                                 "pipeline", "pass a model that finetune or log_reference logged"))
    ref = tmp / artifacts.BASE_REF_ARTIFACT
    ref.write_text(extractor.manifest.to_json())
    base = {artifacts.BASE_REF_ARTIFACT: str(ref)}

    saved = (loaded.metadata.flavors.get("python_function") or {}).get("artifacts") or {}
    persisted = saved.get(artifacts.PERSISTED_BASE_ARTIFACT)
    if persisted:
        base[artifacts.PERSISTED_BASE_ARTIFACT] = str(model_dir / persisted["path"])
    spec = saved.get(artifacts.TASK_ARTIFACT)
    if spec:  # the base answers the candidate's task, with the candidate's prompts
        base[artifacts.TASK_ARTIFACT] = str(model_dir / spec["path"])
    return extractor, base


def load_base(base_artifacts: dict[str, str]):
    """The served model's base alone, as an E2EExtractor (same loading code, no adapter)."""
    from lora_pipeline.model import serving

    base = serving.E2EExtractor()
    base.load_context(SimpleNamespace(artifacts=base_artifacts))
    return base


def eval_table(sentences: list, expected: list[str], cand_rows: list, base_rows: list, task: str = "e2e"):
    """The per-example table the MLflow UI shows: sentence, expected, both answers and their F1
    (other tasks: `prompt` (the last user turn) and each row's own `score`)."""
    import pandas as pd

    first, row_score = ("sentence", "f1") if task == "e2e" else ("prompt", "score")
    return pd.DataFrame({
        first: [s if isinstance(s, str) else s[-1]["content"] for s in sentences],
        "expected": expected,
        "predicted": [r[0] for r in cand_rows],
        row_score: [r[1] for r in cand_rows],
        "base_predicted": [r[0] for r in base_rows],
        f"base_{row_score}": [r[1] for r in base_rows],
    })
