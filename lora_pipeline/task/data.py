"""E2E-format examples: loading (local CSV/JSONL or a Hub dataset), checking, and the held-out split.

Shared by `finetune` (training data) and `evaluate_checkpoint` (evaluation data), so both read and
check data the same way. Every problem is an `InputError` naming the parameter (`dataset` by
default) and the fix.

  * `load_examples(source, revision)` -> `datasets.Dataset` with columns `mr`, `ref` (strings);
  * `split_by_mr(ds, validation_fraction, seed)` -> (train, validation): split by distinct
    (normalised) meaning representation, so one MR never lands on both sides;
  * `to_mlflow_dataset(ds, source, revision, name)` -> an MLflow dataset (digest, source) to log as
    a run input.
"""

from __future__ import annotations

import codecs
import csv
import logging
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from lora_pipeline.errors import InputError, Problem, one_line
from lora_pipeline.paths import PROJECT_ROOT
from lora_pipeline.task.e2e import SLOTS, normalise_mr, parse_mr

log = logging.getLogger(__name__)

DEFAULT_DATASET = "data/sample.csv"
LOCAL_SUFFIXES = (".csv", ".jsonl", ".json")
# Hub dataset ids: `name` or `org/name` (huggingface_hub's rule); anything else must be a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
# Column names of the Hub's `e2e_nlg` dataset, mapped to the E2E CSV names.
_HUB_COLUMNS = {"meaning_representation": "mr", "human_reference": "ref"}
_SLOT_NAME = re.compile(r"([A-Za-z][A-Za-z ]*?)\s*\[")
# How many offending line numbers a message lists (the count is always complete).
_SHOW_LINES = 5


@dataclass
class Source:
    kind: str  # csv | json | hub | missing
    location: str  # resolved local path, or the Hub id
    revision: str = ""


def resolve_source(source: str, revision: str = "", *, field: str = "dataset") -> Source:
    """Where `source` points. Relative paths are tried against the cwd, then the project root
    (`mlflow run` works in the project directory, a direct call may not)."""
    text = (source or "").strip()
    if not text:
        raise InputError(Problem(field, source, "is empty",
                                 f"pass a .csv/.jsonl file with columns mr, ref (e.g. {DEFAULT_DATASET}) "
                                 "or a Hub dataset id"))
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, PROJECT_ROOT / path]
    for cand in candidates:
        if cand.exists():
            if cand.is_dir():
                raise InputError(Problem(field, source, "is a directory",
                                         "pass the .csv or .jsonl file inside it"))
            suffix = cand.suffix.lower()
            if suffix not in LOCAL_SUFFIXES:
                raise InputError(Problem(field, source, f"has unsupported extension {suffix or '(none)'!r}",
                                         "pass a .csv, .jsonl or .json file with columns mr, ref"))
            return Source("csv" if suffix == ".csv" else "json", str(cand.resolve()))
    # Hub ids have at most one '/', no extension we read, and do not start like a path.
    looks_like_path = (path.suffix.lower() in LOCAL_SUFFIXES or text.startswith((".", "/", "~"))
                       or text.count("/") > 1)
    if looks_like_path or not _HUB_ID.match(text):
        where = " or ".join(str(c) for c in candidates)
        raise InputError(Problem(field, source, f"no such file ({where})",
                                 f"check the path, or use the project's sample {DEFAULT_DATASET}"))
    return Source("hub", text, revision)


def _check_utf8(path: Path, field: str, value: str) -> None:
    """Fail with the line of the first byte that is not UTF-8 (reads in 1 MiB chunks)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as err:
                bad_line = line + chunk[: err.start].count(b"\n")
                raise InputError(Problem(
                    field, value, f"is not UTF-8 text (first bad byte 0x{chunk[err.start]:02x} on line "
                    f"{bad_line})", "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")) from None
            line += chunk.count(b"\n")
        try:
            dec.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InputError(Problem(field, value, "is not UTF-8 text (truncated character at the end)",
                                     "re-save the file as UTF-8")) from None


def _record_lines(src: Source) -> list[int] | None:
    """The file line on which each data record starts (CSV quoting can span lines), or None."""
    if src.kind == "csv":
        with open(src.location, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            starts = []
            prev_end = 0
            for i, _row in enumerate(reader):
                if i > 0:
                    starts.append(prev_end + 1)
                prev_end = reader.line_num
            # Blank lines are skipped by pandas and csv alike, so the counts agree.
            return starts
    if src.kind == "json" and src.location.lower().endswith(".jsonl"):
        with open(src.location, encoding="utf-8") as fh:
            return [i for i, ln in enumerate(fh, start=1) if ln.strip()]
    return None


def _load_local(src: Source, field: str, value: str):
    import datasets

    path = Path(src.location)
    if path.stat().st_size == 0:
        raise InputError(Problem(field, value, "is an empty file",
                                 "pass a file with a header line (mr,ref) and at least one example"))
    _check_utf8(path, field, value)
    if _record_lines(src) == []:  # datasets cannot build a split from zero rows; say so plainly
        raise InputError(Problem(field, value, "has no examples (only a header)",
                                 "add rows with columns mr, ref"))
    try:
        if src.kind == "csv":
            # keep_default_na=False: a value such as "None" or "NA" stays text, never a missing cell.
            ds = datasets.load_dataset("csv", data_files=str(path), split="train",
                                       keep_default_na=False)
        else:
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as err:  # pandas/pyarrow parse errors come in many types
        msg = one_line(err)
        raise InputError(Problem(field, value, f"cannot be parsed as {src.kind.upper()} "
                                 f"({type(err).__name__}: {msg})",
                                 "check the file format: CSV with a header line mr,ref, or JSON lines "
                                 '{"mr": ..., "ref": ...}')) from None
    return ds


def _load_hub(src: Source, field: str, value: str):
    import datasets

    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    try:
        ds = datasets.load_dataset(src.location, revision=src.revision or None, split="train")
    except Exception as err:  # network, not found, auth: datasets raises many types
        msg = one_line(err)
        raise InputError(Problem(
            field, value, f"cannot load Hub dataset {src.location}"
            f"{'@' + src.revision if src.revision else ''} from {endpoint} ({type(err).__name__}: {msg})",
            "check the dataset id, dataset_revision and HF_ENDPOINT/HF_TOKEN, or download the data "
            "and pass a local .csv/.jsonl file")) from None
    renames = {k: v for k, v in _HUB_COLUMNS.items() if k in ds.column_names and v not in ds.column_names}
    return ds.rename_columns(renames) if renames else ds


def _bad_rows(ds) -> tuple[list[int], dict[str, int]]:
    """Indices of rows whose MR does not parse, names an unknown slot, or whose sentence is empty."""
    bad, reasons = [], {"unparsable MR": 0, "repeated slot": 0, "unknown slot": 0, "empty ref": 0}
    known = set(SLOTS)
    for i, (mr, ref) in enumerate(zip(ds["mr"], ds["ref"], strict=True)):
        parsed = parse_mr(mr or "")
        reason = None
        if parsed is None:
            names = [n.strip().lower() for n in _SLOT_NAME.findall(mr or "")]
            reason = "repeated slot" if len(names) != len(set(names)) else "unparsable MR"
        elif set(parsed) - known:
            reason = "unknown slot"
        elif not (ref or "").strip():
            reason = "empty ref"
        if reason:
            bad.append(i)
            reasons[reason] += 1
    return bad, {k: v for k, v in reasons.items() if v}


def load_examples(source: str, revision: str = "", *, skip_malformed: bool = False,
                  field: str = "dataset", revision_field: str = "dataset_revision",
                  skip_field: str = "skip_malformed"):
    """Load and check E2E examples; returns a `datasets.Dataset` with string columns `mr`, `ref`.

    Raises InputError (naming `field`) for a missing/empty/non-UTF-8/unparsable file, missing
    columns, or malformed rows (how many, and the first line numbers) unless `skip_malformed`.
    """
    return load_examples_report(source, revision, skip_malformed=skip_malformed, field=field,
                                revision_field=revision_field, skip_field=skip_field)[0]


@dataclass
class LoadReport:
    source: Source
    rows_read: int
    rows_skipped: int


def load_examples_report(source: str, revision: str = "", *, skip_malformed: bool = False,
                         field: str = "dataset", revision_field: str = "dataset_revision",
                         skip_field: str = "skip_malformed"):
    """`load_examples`, plus a `LoadReport` (resolved source, rows read, rows skipped)."""
    import datasets

    src = resolve_source(source, revision, field=field)
    if src.kind != "hub" and revision:
        raise InputError(Problem(revision_field, revision, "applies only to Hub dataset ids",
                                 "leave it empty for a local file"))
    ds = _load_hub(src, field, source) if src.kind == "hub" else _load_local(src, field, source)
    missing = [c for c in ("mr", "ref") if c not in ds.column_names]
    if missing:
        raise InputError(Problem(field, source, f"has no column {' / '.join(missing)} (columns: "
                                 f"{', '.join(ds.column_names) or 'none'})",
                                 "name the columns mr (meaning representation) and ref (sentence)"))
    ds = ds.select_columns(["mr", "ref"])
    for col in ("mr", "ref"):
        if ds.features[col] != datasets.Value("string"):
            ds = ds.cast_column(col, datasets.Value("string"))
    if len(ds) == 0:
        raise InputError(Problem(field, source, "has no examples (only a header)",
                                 "add rows with columns mr, ref"))
    bad, reasons = _bad_rows(ds)
    if not bad:
        return ds, LoadReport(src, len(ds), 0)
    lines = _record_lines(src)
    where = ("lines " + ", ".join(str(lines[i]) for i in bad[:_SHOW_LINES]) if lines
             else "rows " + ", ".join(str(i + 1) for i in bad[:_SHOW_LINES]))
    more = ", ..." if len(bad) > _SHOW_LINES else ""
    why = ", ".join(f"{n} {r}" for r, n in reasons.items())
    if not skip_malformed:
        raise InputError(Problem(
            field, source, f"{len(bad)} of {len(ds)} rows are malformed ({why}; first at {where}{more})",
            f"fix those rows (MR format: slot[value], slot[value], ... with slots "
            f"{', '.join(SLOTS)}), or pass {skip_field}=true to skip them"))
    if len(bad) == len(ds):
        raise InputError(Problem(field, source, f"all {len(ds)} rows are malformed ({why})",
                                 "fix the MR column (format: slot[value], slot[value], ...)"))
    log.warning("skipping %d malformed rows of %s (%s; first at %s%s)", len(bad), source, why,
                where, more)
    drop = set(bad)
    kept = ds.select([i for i in range(len(ds)) if i not in drop])
    return kept, LoadReport(src, len(ds), len(bad))


def split_by_mr(ds, validation_fraction: float, seed: int, *, field: str = "validation_fraction"):
    """(train, validation) split by distinct normalised MR; deterministic for a seed.

    The validation side gets round(fraction x distinct MRs) MRs, at least 1, and leaves at least 1
    for training.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise InputError(Problem(field, validation_fraction, "must be between 0 and 1 (exclusive)",
                                 "pass e.g. 0.1 for 10% of the distinct MRs"))
    keys = [normalise_mr(mr) or mr for mr in ds["mr"]]
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise InputError(Problem("dataset", f"{len(distinct)} distinct MR",
                                 "needs at least 2 distinct MRs to hold some out for validation",
                                 "add examples with other MRs"))
    rng = random.Random(seed)
    rng.shuffle(distinct)
    n_val = min(max(1, round(validation_fraction * len(distinct))), len(distinct) - 1)
    val_mrs = set(distinct[:n_val])
    train_idx = [i for i, k in enumerate(keys) if k not in val_mrs]
    val_idx = [i for i, k in enumerate(keys) if k in val_mrs]
    return ds.select(train_idx), ds.select(val_idx)


def to_mlflow_dataset(ds, source: str, revision: str = "", name: str | None = None, *,
                      location: str = ""):
    """An MLflow dataset (for `mlflow.log_input`) of exactly the examples used, with its digest.

    `location`: where the source was resolved to already (formats.py reads files this module does
    not, e.g. Parquet); a Hub id resolves the same either way."""
    import mlflow.data

    src = (Source("local", location) if location and Path(location).is_file()
           else resolve_source(source, revision))
    df = ds.to_pandas()
    if src.kind == "hub":
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

        source_obj = HuggingFaceDatasetSource(path=src.location, revision=src.revision or None)
    else:
        source_obj = src.location
    with warnings.catch_warnings():
        # MLflow registers the local-file source type twice and warns that the path is ambiguous
        # between the two identical candidates; either one records the same path.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_pandas(df, source=source_obj, name=name or Path(src.location).name)
