"""The evaluation set: a .csv/.jsonl file, an artifact URI of one, or a Hub dataset id, read through
the same checks as training data (lora_pipeline/task/data.py), and the fixed sample evaluated."""

from __future__ import annotations

import random
from pathlib import Path

from lora_pipeline.errors import InputError, Problem, one_line

_SAMPLE_SEED = 0


def _is_artifact_uri(text: str) -> bool:
    return "://" in text or text.startswith(("runs:/", "models:/"))


def local_copy(source: str, tmp: Path) -> str:
    """`source` itself, or the local download of an artifact URI; InputError if it cannot be had."""
    if _is_artifact_uri(source):
        import mlflow

        try:
            return mlflow.artifacts.download_artifacts(source, dst_path=str(tmp))
        except Exception as err:  # MLflow raises several types for a missing run or artifact
            raise InputError(Problem("eval_data", source, "cannot be downloaded "
                                     f"({type(err).__name__}: {one_line(err, 160)})",
                                     "pass an existing artifact URI, or a local data file")) from None
    return source


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


def load_task_examples(source: str, revision: str, task, layout, tmp: Path, *,
                       skip_malformed: bool = False, max_examples: int = 0):
    """(prompts, expected answers, table for the run's dataset input) of the evaluation set, sampled.

    e2e on mr/ref data: `load_eval_set` as always (the pinned figures). Otherwise formats.py, with
    `layout` (formats.DataArgs: the user's data_format and columns) for a set the user named, or the
    pipeline's own layout (None) for finetune's held-out split. A prompt is the user's text, or the
    turns before the answer when the conversation has more than one.
    """
    import pandas as pd

    from lora_pipeline.task import formats

    e2e_error = None
    if task.name == "e2e" and (layout is None or layout.data_format in ("auto", "e2e")):
        try:
            ds = load_eval_set(source, revision, tmp, skip_malformed)
            ds = ds.select(sample(len(ds), max_examples))
            return list(ds["ref"]), list(ds["mr"]), ds.to_pandas()
        except InputError as err:
            if layout is None or layout.data_format == "e2e":
                raise
            e2e_error = err
    local = local_copy(source, tmp)
    try:
        loaded = formats.load(local, revision, task=task, args=layout or formats.DataArgs(task=task.name),
                              field="eval_data", revision_field="eval_data_revision")
    except InputError:
        if e2e_error is not None:
            raise e2e_error from None  # the mr/ref reader's message is the more specific one
        raise
    examples = [loaded.examples[i] for i in sample(len(loaded.examples), max_examples)]
    prompts = [ex.prompt_turns if len(ex.prompt_turns) > 1 else ex.prompt_turns[0]["content"]
               for ex in examples]
    expected = [task.target_text(ex.completion) for ex in examples]
    return prompts, expected, pd.DataFrame([formats.to_record(ex) for ex in examples])


def sample(n: int, max_examples: int) -> list[int]:
    """A fixed random subset (seeded, sorted) so repeated evaluations score the same examples."""
    if max_examples <= 0 or n <= max_examples:
        return list(range(n))
    return sorted(random.Random(_SAMPLE_SEED).sample(range(n), max_examples))


def eval_dataset(df, source: str):
    """An MLflow dataset for the run's inputs (digest + where it came from)."""
    import mlflow.data

    name = Path(source.rstrip("/")).name or "eval"
    try:
        return mlflow.data.from_pandas(df, source=source, name=name)
    except Exception:  # a source MLflow cannot classify (e.g. a Hub id): keep the digest, not the link
        return mlflow.data.from_pandas(df, name=name)
