"""`evaluate_checkpoint`: score a logged model against its base on held-out sentences.

Input: a model URI (`models:/<id>`, `runs:/<run>/<name>`, `models:/<name>@<alias>`) of a model this
pipeline logged, and an evaluation set (default: the held-out split the `finetune` run behind the
model logged, found by following the model's lineage; else a .csv/.jsonl file, an artifact URI of
one, or a Hub dataset id). The base is evaluated on the same sentences through the same code path
(the served model without its adapter, base resolved and verified from the pinned manifest), so
every report shows base vs candidate.

Metrics (lora_pipeline/task/e2e.py `Scores`): slot precision / recall / F1 (micro, and per slot), exact match of
the whole MR, rate of unparsable outputs, generation tokens per second. They go to this run
(`candidate.*`, `base.*`) and to the logged model (`slot_f1`, ..., `base_slot_f1`, ...), with a
per-example table (`eval_table.json`: sentence, expected, predicted, per-row F1) the MLflow UI shows.
"""

from __future__ import annotations

import gc
import logging
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from lora_pipeline import artifacts
from lora_pipeline.cli import param, run_cli
from lora_pipeline.errors import InputError, Problem, Problems, StepError, one_line
from lora_pipeline.model.precision import PRECISIONS

log = logging.getLogger(__name__)

ENTRY_POINT = "evaluate_checkpoint"
LOG_REFERENCE_ENTRY_POINT = "log_reference"
EVAL_TABLE_FILE = artifacts.EVAL_TABLE_FILE
EVAL_RUN_TAG = artifacts.EVAL_RUN_TAG
VALIDATION_DATA_OUTPUT = artifacts.VALIDATION_DATA_OUTPUT
SOURCE_MODEL_TAG = artifacts.SOURCE_MODEL_TAG
MODEL_OUTPUT = artifacts.MODEL_OUTPUT
# Lineage hops followed to find the held-out split (log_reference -> checkpoint -> finetune run, and
# persist_and_register adds one more); a loop in the tags stops here instead of spinning.
_MAX_LINEAGE_HOPS = 6
_SAMPLE_SEED = 0


@dataclass
class Args:
    model_uri: str = param("", "model to evaluate: models:/<id>, runs:/<run>/<name> or "
                           "models:/<name>@<alias>; default: the model of the latest finished "
                           "log_reference run")
    eval_data: str = param("", "evaluation set: a .csv/.jsonl file (columns mr, ref), an artifact "
                           "URI of one, or a Hub dataset id; default: the held-out split of the "
                           "finetune run behind the model")
    eval_data_revision: str = param("", "Hub dataset ids only: branch, tag or commit")
    skip_malformed: bool = param(False, "skip evaluation rows whose MR does not parse (default: "
                                 "refuse the set)")
    max_examples: int = param(200, "evaluate at most this many examples (a fixed random sample); "
                              "0 = all")
    batch_size: int = param(32, "sentences generated together (left-padded batches)")
    max_new_tokens: int = param(64, "longest answer generated, in tokens")
    precision: str = param("auto", "compute precision of generation: bf16 (autocast; weights stay "
                           "fp32), fp32, or auto = bf16 where the hardware has bf16 matmuls (CUDA "
                           "bf16, or a CPU with avx512_bf16 / amx_bf16), as finetune trains")


@dataclass
class Result:
    run_id: str
    model_uri: str
    model_id: str
    eval_data: str
    examples: int
    candidate: dict[str, float] = field(default_factory=dict)
    base: dict[str, float] = field(default_factory=dict)


def validate_static(args: Args) -> Problems:
    from steps.log_reference import _looks_like_model_uri

    problems = Problems()
    if args.model_uri:
        problems.require(_looks_like_model_uri(args.model_uri), "model_uri", args.model_uri,
                         "is not a model URI",
                         "pass models:/<model_id>, runs:/<run_id>/<name> or models:/<name>@<alias>")
    problems.positive("max_examples", args.max_examples, allow_zero=True)
    problems.positive("batch_size", args.batch_size)
    problems.positive("max_new_tokens", args.max_new_tokens)
    problems.require(args.precision in PRECISIONS, "precision", args.precision, "is not supported",
                     f"use one of: {', '.join(PRECISIONS)}")
    return problems


# --- evaluation data ---------------------------------------------------------------------------
def lineage_validation_data(model_id: str) -> str | None:
    """The held-out split logged by the finetune run behind a model, following source-model tags."""
    import mlflow

    client = mlflow.MlflowClient()
    seen = set()
    current = model_id
    for _ in range(_MAX_LINEAGE_HOPS):
        if not current or current in seen:
            return None
        seen.add(current)
        lm = client.get_logged_model(current)
        if lm.source_run_id:
            outputs = artifacts.get_outputs(client.get_run(lm.source_run_id))
            if outputs.get(VALIDATION_DATA_OUTPUT):
                return outputs[VALIDATION_DATA_OUTPUT]
        current = artifacts.parse_model_id_uri((lm.tags or {}).get(SOURCE_MODEL_TAG, ""))
    return None


def _is_artifact_uri(text: str) -> bool:
    return "://" in text or text.startswith(("runs:/", "models:/"))


def load_eval_set(source: str, revision: str, tmp: Path, skip_malformed: bool = False):
    """`datasets.Dataset` (mr, ref) from a file, an artifact URI or a Hub id; InputError if unusable."""
    from lora_pipeline.task.data import load_examples

    local = source
    if _is_artifact_uri(source):
        import mlflow

        try:
            local = mlflow.artifacts.download_artifacts(source, dst_path=str(tmp))
        except Exception as err:  # MLflow raises several types for a missing run or artifact
            raise InputError(Problem("eval_data", source, "cannot be downloaded "
                                     f"({type(err).__name__}: {one_line(err, 160)})",
                                     "pass an existing artifact URI, or a local .csv/.jsonl "
                                     "file")) from None
    try:
        return load_examples(local, revision, skip_malformed=skip_malformed, field="eval_data",
                             revision_field="eval_data_revision", skip_field="skip_malformed")
    except InputError as err:
        if local == source:
            raise
        # Name the URI the user gave, not the temporary download.
        raise InputError([Problem(p.field, source if p.value == local else p.value, p.message, p.fix)
                          for p in err.problems]) from None


def sample(n: int, max_examples: int) -> list[int]:
    """A fixed random subset (seeded, sorted) so repeated evaluations score the same examples."""
    if max_examples <= 0 or n <= max_examples:
        return list(range(n))
    return sorted(random.Random(_SAMPLE_SEED).sample(range(n), max_examples))


# --- generation and scoring --------------------------------------------------------------------
@dataclass
class Generated:
    texts: list[str]
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def generate_timed(extractor, sentences: list[str], args: Args, desc: str = "generating") -> Generated:
    """The served model's own generation (same prompt, batching and decoding as `predict`), one
    batch at a time for a progress bar; shortest sentences first, as `generate` itself orders them,
    and answers are independent of the batching (tests/test_serving.py)."""
    from tqdm.auto import tqdm

    from lora_pipeline.model import serving

    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    texts = [""] * len(sentences)
    start = time.perf_counter()
    with tqdm(total=len(sentences), desc=desc, unit="sentence") as bar:
        for lo in range(0, len(order), args.batch_size):
            idx = order[lo:lo + args.batch_size]
            out = serving.generate(extractor.generation_model(args.precision), extractor.tokenizer,
                                   [sentences[i] for i in idx],
                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                   precision=args.precision)
            for i, t in zip(idx, out, strict=True):
                texts[i] = t
            bar.update(len(idx))
    seconds = time.perf_counter() - start
    # Generated tokens, counted from the answers (padding after an early end-of-sequence is not
    # work anyone asked for, so it does not count).
    tokens = sum(len(ids) + 1 for ids in extractor.tokenizer(texts, add_special_tokens=False)["input_ids"])
    return Generated(texts, tokens, seconds)


def score(expected: list[str], generated: Generated, prefix: str):
    from lora_pipeline.task.e2e import Scores, format_mr, parse_mr

    scores = Scores()
    rows = []
    for exp, text in zip(expected, generated.texts, strict=True):
        predicted = parse_mr(text)
        row_f1 = scores.add(parse_mr(exp) or {}, predicted)
        rows.append((format_mr(predicted) if predicted is not None else text, row_f1))
    metrics = scores.metrics(prefix)
    metrics[f"{prefix}tokens_per_s"] = generated.tokens_per_s
    return metrics, rows


def load_candidate(model_uri: str):
    """(pyfunc model, E2EExtractor) of a model this pipeline logged; StepError/InputError otherwise."""
    import mlflow

    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
    except StepError:
        raise  # base unresolvable or digest mismatch: serving.py's message names the reference
    except Exception as err:  # anything else that stops the model from loading
        raise StepError(f"cannot load model {model_uri}: {type(err).__name__}: "
                        f"{one_line(err)}") from err
    extractor = loaded.unwrap_python_model()
    if not all(hasattr(extractor, a) for a in ("model", "tokenizer", "manifest")):
        raise InputError(Problem("model_uri", model_uri, "is not an e2e-extractor model of this "
                                 "pipeline", "pass a model that finetune or log_reference logged"))
    return loaded, extractor


def base_artifacts(loaded, extractor, tmp: Path) -> dict[str, str]:
    """Artifacts of the served model's base alone: E2EExtractor loads it through the same code
    (pinned manifest, digests checked, or the persisted copy a registered model carries)."""
    ref = tmp / artifacts.BASE_REF_ARTIFACT
    ref.write_text(extractor.manifest.to_json())
    arts = {artifacts.BASE_REF_ARTIFACT: str(ref)}
    context = getattr(getattr(loaded, "_model_impl", None), "context", None)
    persisted = (getattr(context, "artifacts", None) or {}).get(artifacts.PERSISTED_BASE_ARTIFACT)
    if persisted:
        arts[artifacts.PERSISTED_BASE_ARTIFACT] = persisted
    return arts


def _model_uri_default(args: Args) -> str:
    from steps.log_reference import latest_output

    return latest_output(LOG_REFERENCE_ENTRY_POINT, MODEL_OUTPUT, "model_uri")


def run(args: Args) -> Result:
    from lora_pipeline.cli import configure_tracking
    from steps.log_reference import model_info

    validate_static(args).raise_if_any()
    configure_tracking()
    model_uri = args.model_uri or _model_uri_default(args)
    info = model_info(model_uri, "model_uri")
    model_id = info.model_id or ""

    import mlflow
    import pandas as pd

    from lora_pipeline.model import serving
    from lora_pipeline.tracking.runs import step_run

    eval_source = args.eval_data
    if not eval_source:
        eval_source = lineage_validation_data(model_id) if model_id else None
        if not eval_source:
            raise InputError(Problem("eval_data", "", f"is empty and no finetune run in the lineage "
                                     f"of {model_uri} logged a held-out split",
                                     "pass eval_data (a .csv/.jsonl file with columns mr, ref)"))
        log.info("eval_data defaults to the held-out split %s", eval_source)

    with tempfile.TemporaryDirectory(prefix="evaluate.") as tmp_str:
        tmp = Path(tmp_str)
        ds = load_eval_set(eval_source, args.eval_data_revision, tmp, args.skip_malformed)
        idx = sample(len(ds), args.max_examples)
        ds = ds.select(idx)
        sentences, expected = list(ds["ref"]), list(ds["mr"])
        log.info("evaluating %s and its base on %d examples of %s", model_uri, len(ds), eval_source)
        # Loaded before the run starts: an unresolvable base or a digest mismatch leaves no run.
        loaded, extractor = load_candidate(info.model_uri)
        base_arts = base_artifacts(loaded, extractor, tmp)

        with step_run(ENTRY_POINT, args) as active:
            run_id = active.info.run_id
            dataset = _dataset(ds.to_pandas(), eval_source)
            mlflow.log_input(dataset, context="evaluation")

            cand, cand_rows = score(expected, generate_timed(extractor, sentences, args,
                                                             "candidate"), "")
            # One model in memory at a time: the candidate goes before the base loads.
            del loaded, extractor
            gc.collect()
            base_ext = serving.E2EExtractor()
            base_ext.load_context(SimpleNamespace(artifacts=base_arts))
            base, base_rows = score(expected, generate_timed(base_ext, sentences, args, "base"), "")
            del base_ext
            gc.collect()

            run_metrics = {f"candidate.{k}": v for k, v in cand.items()}
            run_metrics.update({f"base.{k}": v for k, v in base.items()})
            run_metrics["eval_examples"] = len(ds)
            mlflow.log_metrics(run_metrics, dataset=dataset)
            model_metrics = dict(cand)
            model_metrics.update({f"base_{k}": v for k, v in base.items()})
            if model_id:
                mlflow.log_metrics(model_metrics, model_id=model_id, dataset=dataset)
                mlflow.MlflowClient().set_logged_model_tags(model_id, {EVAL_RUN_TAG: run_id})
            table = pd.DataFrame({
                "sentence": sentences,
                "expected": expected,
                "predicted": [r[0] for r in cand_rows],
                "f1": [r[1] for r in cand_rows],
                "base_predicted": [r[0] for r in base_rows],
                "base_f1": [r[1] for r in base_rows],
            })
            mlflow.log_table(table, EVAL_TABLE_FILE)
            mlflow.set_tags({"eval.data": eval_source, "eval.model": model_uri})
            artifacts.set_outputs(mlflow.MlflowClient(), run_id,
                                  {MODEL_OUTPUT: artifacts.model_uri(model_id) if model_id
                                   else model_uri})
    log.info("slot F1: candidate %.3f, base %.3f (exact match %.3f vs %.3f; %d examples)",
             cand["slot_f1"], base["slot_f1"], cand["exact_match"], base["exact_match"], len(ds))
    return Result(run_id=run_id, model_uri=model_uri, model_id=model_id, eval_data=eval_source,
                  examples=len(ds), candidate=cand, base=base)


def _dataset(df, source: str):
    """An MLflow dataset for the run's inputs (digest + where it came from)."""
    import mlflow.data

    name = Path(source.rstrip("/")).name or "eval"
    try:
        return mlflow.data.from_pandas(df, source=source, name=name)
    except Exception:  # a source MLflow cannot classify (e.g. a Hub id): keep the digest, not the link
        return mlflow.data.from_pandas(df, name=name)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(Args, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
