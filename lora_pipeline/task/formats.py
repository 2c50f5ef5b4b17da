"""Training and evaluation data in the formats TRL's SFT trainer accepts, read into `Example`s.

Formats (`data_format`):
  prompt_completion  a prompt column and a completion column (`prompt_column`, `completion_column`;
                     e.g. prompt_column=question, completion_column=answer). TRL's conversational
                     variant too: the prompt a list of turns, the completion a list of assistant turns.
  messages           one column (`messages_column`) holding a conversation: a list of {role, content},
                     an optional system turn, then user and assistant alternating, ending on an
                     assistant turn. Multi-turn: every assistant turn is a target (the loss covers
                     assistant turns only).
  e2e                the project's E2E columns mr, ref: prompt = ref, completion = mr.
  auto               the first of messages, prompt_completion, e2e whose columns the data has.

Files: .csv (a conversation in a cell is JSON text), .jsonl, .json (an array of objects), .parquet;
or a Hub dataset id + revision, loaded through `datasets` from HF_ENDPOINT as
lora_pipeline/task/data.py loads them.

Checks report every problem at once (InputError): missing columns, empty targets, conversations
that do not end on an assistant turn or whose roles are out of order, targets the task cannot use
(`Task.check_target`: a JSON target that does not parse, an MR that does not), each naming the
column, how many rows, their line numbers and the fix. `length_problem` counts examples longer than
max_seq_length with any token-count function. `split` holds out whole groups (a `group_column`, the
MR for E2E data) or rows, deterministically for a seed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_pipeline.cli import param
from lora_pipeline.errors import InputError, Problem, Problems
from lora_pipeline.paths import PROJECT_ROOT
from lora_pipeline.task.base import ROLES, Example, Task
from lora_pipeline.task.data import _HUB_ID, Source, _check_utf8, _load_hub
from lora_pipeline.task.e2e import normalise_mr
from lora_pipeline.task.tasks import DEFAULT_TASK, TASKS, get_task

FORMATS = ("auto", "prompt_completion", "messages", "e2e")
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
E2E_COLUMNS = ("ref", "mr")  # prompt, completion
# How many offending line numbers a message lists (the count is always complete).
SHOW_ROWS = 5


@dataclass(frozen=True)
class DataArgs:
    """The data parameters of the entry points that read examples (declared once, here)."""

    task: str = param(DEFAULT_TASK, f"what the model learns: {', '.join(TASKS)}")
    data_format: str = param("auto", f"layout of the data: {', '.join(FORMATS)} (auto: from the columns)")
    prompt_column: str = param("prompt", "prompt_completion data: the column with the prompt")
    completion_column: str = param("completion", "prompt_completion data: the column with the answer")
    messages_column: str = param("messages", "messages data: the column with the conversation")
    group_column: str = param("", "keep rows with the same value of this column on one side of the "
                                  "validation split (empty: by row; E2E data: by MR)")
    system_prompt: str = param("", "system prompt in front of every conversation (empty: the task's own)")


def data_param(name: str) -> Any:
    """A step's `Args` field for the data parameter `name`, with DataArgs' default and help, so an
    entry point that reads examples declares it by name and the two cannot drift apart."""
    f = next(f for f in dataclasses.fields(DataArgs) if f.name == name)
    return param(f.default, f.metadata["help"])


def data_args(args: Any) -> DataArgs:
    """The DataArgs part of a step's Args."""
    return DataArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DataArgs)})


def check_args(a: DataArgs, problems: Problems) -> None:
    """Static checks of the data parameters (no file read); every problem goes to `problems`."""
    try:
        get_task(a.task)
    except InputError as err:
        problems.items.extend(err.problems)
    problems.require(a.data_format in FORMATS, "data_format", a.data_format, "is not a data format",
                     f"pass one of: {', '.join(FORMATS)}")
    for name in ("prompt_column", "completion_column", "messages_column"):
        problems.require(bool(getattr(a, name).strip()), name, getattr(a, name), "is empty",
                         "pass the name of the column")


@dataclass
class Loaded:
    examples: list[Example]
    source: Source
    data_format: str  # the format used (auto resolved)
    unit: str  # what `split` holds out whole: "MR", "<group_column> value" or "row"


# --- reading -------------------------------------------------------------------------------------
def resolve_source(source: str, revision: str = "", *, field: str = "dataset") -> Source:
    """Where `source` points: a local file (tried against the cwd, then the project root) or a Hub id."""
    text = (source or "").strip()
    if not text:
        raise InputError(Problem(field, source, "is empty",
                                 "pass a .csv/.jsonl/.json/.parquet file or a Hub dataset id"))
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, PROJECT_ROOT / path]
    for cand in candidates:
        if cand.exists():
            if cand.is_dir():
                raise InputError(Problem(field, source, "is a directory", "pass the data file inside it"))
            kind = SUFFIXES.get(cand.suffix.lower())
            if kind is None:
                raise InputError(Problem(field, source, f"has unsupported extension "
                                         f"{cand.suffix.lower() or '(none)'!r}",
                                         "pass a .csv, .jsonl, .json or .parquet file"))
            return Source(kind, str(cand.resolve()))
    looks_like_path = (path.suffix.lower() in SUFFIXES or text.startswith((".", "/", "~"))
                       or text.count("/") > 1)
    if looks_like_path or not _HUB_ID.match(text):
        where = " or ".join(str(c) for c in candidates)
        raise InputError(Problem(field, source, f"no such file ({where})", "check the path"))
    return Source("hub", text, revision)


def _read_csv(path: Path, field: str, value: str) -> tuple[list[dict], list[int]]:
    records, lines, bad = [], [], []
    # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name.
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header: list[str] | None = None
        prev_end = 0
        for row in reader:
            start, prev_end = prev_end + 1, reader.line_num
            if not row:
                continue  # a blank line
            if header is None:
                header = row
                continue
            if len(row) != len(header):
                bad.append(start)
                continue
            records.append(dict(zip(header, row, strict=True)))
            lines.append(start)
    if header is not None and len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise InputError(Problem(field, value, f"repeats column {', '.join(map(repr, dup))} in its header",
                                 "give every column its own name"))
    if bad:
        raise InputError(Problem(field, value, f"{len(bad)} rows have another number of cells than the "
                                 f"header's {len(header or [])} ({_lines(bad)})",
                                 "quote cells that contain commas, e.g. \"a, b\""))
    return records, lines


def _read_jsonl(path: Path, field: str, value: str) -> tuple[list[dict], list[int]]:
    records, lines, bad = [], [], []
    with open(path, encoding="utf-8") as fh:
        for n, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except ValueError:
                rec = None
            if not isinstance(rec, dict):
                bad.append(n)
                continue
            records.append(rec)
            lines.append(n)
    if bad:
        raise InputError(Problem(field, value, f"{len(bad)} lines are not a JSON object ({_lines(bad)})",
                                 'write one object per line, e.g. {"prompt": "...", "completion": "..."}'))
    return records, lines


def _read_json(path: Path, field: str, value: str) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise InputError(Problem(field, value, f"is not valid JSON ({err})",
                                 "fix the file, or write one object per line as .jsonl")) from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(Problem(field, value, "is not a JSON array of objects",
                                 'write [{"prompt": "...", "completion": "..."}, ...], or .jsonl'))
    return data


def _read_parquet(path: Path, field: str, value: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged or foreign file
        raise InputError(Problem(field, value, f"cannot be read as Parquet ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())[:160]})",
                                 "check that the file is Parquet, or pass CSV/JSONL")) from None


def read_records(src: Source, field: str, value: str) -> tuple[list[dict], list[int] | None]:
    """The rows of a source as dicts, and the file line each starts on (None: rows are numbered)."""
    if src.kind == "hub":
        ds = _load_hub(src, field, value)
        return ds.to_list(), None
    path = Path(src.location)
    if path.stat().st_size == 0:
        raise InputError(Problem(field, value, "is an empty file", "pass a file with examples"))
    if src.kind == "parquet":
        return _read_parquet(path, field, value), None
    _check_utf8(path, field, value)
    if src.kind == "csv":
        return _read_csv(path, field, value)
    if src.kind == "jsonl" or path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, field, value)
    return _read_json(path, field, value), None


# --- formats -------------------------------------------------------------------------------------
def _columns(records: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for rec in records:
        seen.update(dict.fromkeys(rec))
    return list(seen)


def detect_format(columns: Sequence[str], a: DataArgs, *, field: str, value: str) -> str:
    """The data format `a` asks for (or the columns imply, for auto); InputError if columns are missing."""
    needs = {"messages": [("messages_column", a.messages_column)],
             "prompt_completion": [("prompt_column", a.prompt_column),
                                   ("completion_column", a.completion_column)],
             "e2e": [("", c) for c in E2E_COLUMNS]}
    have = ", ".join(columns) or "none"
    if a.data_format == "auto":
        for fmt in ("messages", "prompt_completion", "e2e"):
            if all(col in columns for _, col in needs[fmt]):
                return fmt
        raise InputError(Problem(
            field, value, f"has no column {a.messages_column!r}, nor {a.prompt_column!r} and "
            f"{a.completion_column!r}, nor mr and ref (columns: {have})",
            "name your columns in messages_column, or in prompt_column and completion_column "
            "(e.g. prompt_column=question completion_column=answer), and set data_format"))
    missing = [(param_name, col) for param_name, col in needs[a.data_format] if col not in columns]
    if missing:
        names = " / ".join(repr(col) for _, col in missing)
        mapping = ", ".join(f"{p}=<column>" for p, _ in missing if p)
        raise InputError(Problem(field, value, f"has no column {names} for data_format={a.data_format} "
                                 f"(columns: {have})",
                                 f"map yours with {mapping}" if mapping else "name the columns mr and ref"))
    return a.data_format


_FIXES = {
    "are empty": "fill in those cells, or drop the rows",
    "are not a list of {role, content} turns":
        'write each conversation as [{"role": "user", "content": "..."}, {"role": "assistant", ...}]',
    "have a role other than system, user, assistant": "use the roles system, user and assistant",
    "have turns out of order": "start with an optional system turn, then alternate user and assistant, "
                               "user first",
    "do not end on an assistant turn": "end each conversation with the assistant's answer (the turn "
                                       "the model learns to write)",
    "have an empty turn": "give every turn some content, or drop the rows",
}


def _turns(cell: Any) -> list[dict[str, str]] | None:
    """A conversation cell as a list of {role, content} (JSON text in CSV cells); None if it is not one."""
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except ValueError:
            return None
    if not isinstance(cell, list) or not cell:
        return None
    if not all(isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
               for t in cell):
        return None
    return [{"role": t["role"], "content": t["content"]} for t in cell]


def conversation_problem(turns: list[dict[str, str]]) -> str | None:
    """Why a conversation cannot be trained on (a key of _FIXES), or None."""
    roles = [t["role"] for t in turns]
    if any(r not in ROLES for r in roles):
        return "have a role other than system, user, assistant"
    body = roles[1:] if roles[0] == "system" else roles
    if any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body)):
        return "have turns out of order"
    if not body or body[-1] != "assistant":
        return "do not end on an assistant turn"
    if any(not t["content"].strip() for t in turns):
        return "have an empty turn"
    return None


def _text(cell: Any) -> str:
    if cell is None:
        return ""
    if isinstance(cell, (dict, list)):  # a JSON target written as an object in JSONL/Parquet
        return json.dumps(cell, ensure_ascii=False)
    return str(cell)


def _example(rec: dict, fmt: str, a: DataArgs, task: Task) -> tuple[Example | None, str, str, str]:
    """(example, "", "", "") or (None, column, reason, detail) for a row that cannot be used."""
    if fmt == "messages":
        col = a.messages_column
        turns = _turns(rec.get(col))
        if turns is None:
            return None, col, "are not a list of {role, content} turns", ""
        targets = [t["role"] == "assistant" for t in turns]
    else:
        pcol, ccol = (a.prompt_column, a.completion_column) if fmt == "prompt_completion" else E2E_COLUMNS
        prompt, completion = rec.get(pcol), rec.get(ccol)
        col = ccol
        if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational form
            p_turns = _turns(prompt) if isinstance(prompt, list) else [_turn("user", prompt)]
            c_turns = _turns(completion) if isinstance(completion, list) else [_turn("assistant", completion)]
            for c, part in ((pcol, p_turns), (ccol, c_turns)):
                if part is None:
                    return None, c, "are not a list of {role, content} turns", ""
        else:
            for c, cell in ((pcol, prompt), (ccol, completion)):
                if not _text(cell).strip():
                    return None, c, "are empty", ""
            p_turns, c_turns = [_turn("user", prompt)], [_turn("assistant", completion)]
        turns = p_turns + c_turns
        targets = [False] * len(p_turns) + [t["role"] == "assistant" for t in c_turns]
    why = conversation_problem(turns)
    if why:
        return None, col, why, ""
    for t, is_target in zip(turns, targets, strict=True):
        bad = task.check_target(t["content"]) if is_target else None
        if bad:
            return None, col, bad[0], bad[1]
    return Example(turns, targets), "", "", ""


def _turn(role: str, cell: Any) -> dict[str, str]:
    return {"role": role, "content": _text(cell)}


def to_examples(records: list[dict], task: Task, a: DataArgs = DataArgs(), *,
                lines: list[int] | None = None, field: str = "dataset",
                value: str = "") -> tuple[list[Example], str, str]:
    """(examples, format, unit) from rows; InputError listing every problem of every column at once."""
    if not records:
        raise InputError(Problem(field, value, "has no examples", "add rows"))
    fmt = detect_format(_columns(records), a, field=field, value=value)
    group_col = a.group_column.strip()
    if group_col and group_col not in _columns(records):
        raise InputError(Problem("group_column", group_col, f"is not a column of {value} (columns: "
                                 f"{', '.join(_columns(records))})",
                                 "pass one of the columns, or leave it empty to split by row"))
    examples: list[Example] = []
    bad: dict[tuple[str, str], list[int]] = {}
    details: dict[tuple[str, str], str] = {}
    for i, rec in enumerate(records):
        ex, col, reason, detail = _example(rec, fmt, a, task)
        if ex is not None and group_col and not _text(rec.get(group_col)).strip():
            ex, col, reason = None, group_col, "are empty"
        if ex is None:
            bad.setdefault((col, reason), []).append(i)
            details.setdefault((col, reason), detail)
            continue
        ex.row, ex.line = i + 1, lines[i] if lines else None
        if group_col:
            ex.group = _text(rec[group_col])
        elif fmt == "e2e":
            ex.group = normalise_mr(ex.completion) or ex.completion
        examples.append(ex)
    problems = Problems()
    for (col, reason), idx in bad.items():
        first = f"; first: {details[(col, reason)]}" if details[(col, reason)] else ""
        fix = _FIXES.get(reason, task.target_fix)
        if col == group_col and reason == "are empty":
            fix = "give every row a group, or leave group_column empty to split by row"
        problems.add(field, value, f"column {col!r}: {len(idx)} of {len(records)} rows {reason} "
                     f"({_where(idx, lines)}{first})", fix)
    problems.raise_if_any()
    unit = f"{group_col} value" if group_col else "MR" if fmt == "e2e" else "row"
    return examples, fmt, unit


def load(source: str, revision: str = "", *, task: Task, args: DataArgs = DataArgs(),
         field: str = "dataset", revision_field: str = "dataset_revision") -> Loaded:
    """Read, check and convert a data source; InputError naming `field` for anything unusable."""
    src = resolve_source(source, revision, field=field)
    if src.kind != "hub" and revision:
        raise InputError(Problem(revision_field, revision, "applies only to Hub dataset ids",
                                 "leave it empty for a local file"))
    records, lines = read_records(src, field, source)
    examples, fmt, unit = to_examples(records, task, args, lines=lines, field=field, value=source)
    return Loaded(examples, src, fmt, unit)


def _lines(numbers: list[int]) -> str:
    more = ", ..." if len(numbers) > SHOW_ROWS else ""
    word = "line" if len(numbers) == 1 else "lines"
    return f"{word} {', '.join(map(str, numbers[:SHOW_ROWS]))}{more}"


def _where(indices: list[int], lines: list[int] | None) -> str:
    """Rows by file line where the source has lines, else by 1-based row number."""
    if lines:
        return _lines([lines[i] for i in indices])
    more = ", ..." if len(indices) > SHOW_ROWS else ""
    word = "row" if len(indices) == 1 else "rows"
    return f"{word} {', '.join(str(i + 1) for i in indices[:SHOW_ROWS])}{more}"


# --- after loading -------------------------------------------------------------------------------
def to_record(ex: Example) -> dict[str, str]:
    """An example as a flat row (turns and targets as JSON text): the staged splits and the logged
    held-out file, which `to_examples` reads back as messages data, and which MLflow can digest."""
    return {"messages": json.dumps(ex.messages, ensure_ascii=False), "targets": json.dumps(ex.targets),
            "group": "" if ex.group is None else ex.group}


def from_record(rec: dict) -> Example:
    return Example(json.loads(rec["messages"]), json.loads(rec["targets"]), group=rec.get("group") or None)


def split(examples: list[Example], validation_fraction: float, seed: int, *, unit: str = "row",
          field: str = "validation_fraction") -> tuple[list[Example], list[Example]]:
    """(train, validation), holding out whole groups (or rows); deterministic for a seed.

    The validation side gets round(fraction x distinct groups), at least 1, leaving at least 1 for
    training; for E2E data (groups = normalised MRs) it is exactly data.split_by_mr's split.
    """
    distinct_word = "" if unit == "row" else "distinct "
    if not 0.0 < validation_fraction < 1.0:
        raise InputError(Problem(field, validation_fraction, "must be between 0 and 1 (exclusive)",
                                 f"pass e.g. 0.1 for 10% of the {distinct_word}{unit}s"))
    keys: list[Any] = [ex.group if ex.group is not None else i for i, ex in enumerate(examples)]
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise InputError(Problem("dataset", f"{len(distinct)} {distinct_word}{unit}",
                                 f"needs at least 2 {distinct_word}{unit}s to hold some out for validation",
                                 f"add examples with other {unit}s" if unit != "row" else "add examples"))
    rng = random.Random(seed)
    rng.shuffle(distinct)
    n_val = min(max(1, round(validation_fraction * len(distinct))), len(distinct) - 1)
    held = set(distinct[:n_val])
    return ([ex for ex, k in zip(examples, keys, strict=True) if k not in held],
            [ex for ex, k in zip(examples, keys, strict=True) if k in held])


def length_problem(examples: list[Example], count_tokens: Callable[[Example], int], max_seq_length: int,
                   *, field: str = "max_seq_length") -> tuple[list[int], Problem | None]:
    """Each example's length in tokens (prompt + answer, by `count_tokens`), and a Problem if any is
    longer than `max_seq_length` (it would be cut, and the cut part is the answer)."""
    lengths = [count_tokens(ex) for ex in examples]
    too_long = [i for i, n in enumerate(lengths) if n > max_seq_length]
    if not too_long:
        return lengths, None
    if all(ex.line is not None for ex in examples):
        where = _lines([examples[i].line for i in too_long])
    else:
        where = _where([examples[i].row - 1 for i in too_long], None)
    return lengths, Problem(field, max_seq_length,
                            f"{len(too_long)} of {len(lengths)} examples are longer (prompt+answer up to "
                            f"{max(lengths)} tokens) and would be cut",
                            f"pass max_seq_length={max(lengths)} or more, or drop those examples ({where})")
