"""The evaluation set: a .csv/.jsonl file, an artifact URI of one, or a Hub dataset id, read through
the same checks as training data (lora_pipeline/task/data.py), and the fixed sample evaluated."""

from __future__ import annotations

import random
from pathlib import Path

from lora_pipeline.errors import InputError, Problem, one_line

_SAMPLE_SEED = 0


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


def eval_dataset(df, source: str):
    """An MLflow dataset for the run's inputs (digest + where it came from)."""
    import mlflow.data

    name = Path(source.rstrip("/")).name or "eval"
    try:
        return mlflow.data.from_pandas(df, source=source, name=name)
    except Exception:  # a source MLflow cannot classify (e.g. a Hub id): keep the digest, not the link
        return mlflow.data.from_pandas(df, name=name)
