"""Tables of a scoring job: reading the input, marking bad rows, scoring, writing the output atomically.

Input: a CSV (header row), JSON Lines (`.jsonl`/`.json`) or Parquet file, a folder of them, any URI Spark
reads (`hdfs://`, `s3a://`), or a table name the session's catalog knows (a Hive metastore, a temporary
view). Output: a Parquet folder with the input's columns, the model's output columns and `error`.

Bad rows never fail the job: a null or blank text, or one longer than MAX_TEXT_CHARS, gets null
outputs and a reason in `error`, and never reaches the model. The output is written to a hidden
folder beside `output` and renamed into place once complete and counted, so a killed job leaves no
half-written table at `output` (only a hidden temporary one, which the next run removes).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from lora_pipeline.errors import InputError, Problem, Problems, StepError, one_line

log = logging.getLogger(__name__)

ERROR_COLUMN = "error"
# E2E sentences are under 400 characters; a text 20x longer is not one sentence, and its prompt alone
# would exceed the context a small base model was fine-tuned with.
MAX_TEXT_CHARS = 8000
ERR_EMPTY = "empty text"
ERR_TOO_LONG = f"text longer than {MAX_TEXT_CHARS} characters"
_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".deflate", ".lz4", ".snappy", ".zst")
_URI = re.compile(r"^[A-Za-z][\w+.\-]*:/")
_TABLE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*){0,2}$")
_TEMP_TAG = ".batch_score-"  # hidden work folder beside the output: .<name>.batch_score-<pid>-<random>
_INPUT_FIX = ("pass a CSV (with a header row), JSON Lines or Parquet file or folder, a URI Spark can "
              "read, or a table name the Spark catalog knows")


def is_uri(path: str) -> bool:
    return bool(_URI.match(path))


def file_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    return _FORMATS.get(suffixes[-1]) if suffixes else None


def _visible_files(folder: Path) -> list[Path]:
    # Spark and Hadoop skip names starting with '_' or '.' (_SUCCESS, .crc files, temporary output).
    return [p for p in folder.rglob("*") if p.is_file()
            and not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts)]


def local_format(path: Path, value: str, problems: Problems) -> str | None:
    """The format of a local input file or folder, or a problem naming why there is none."""
    if path.is_file():
        fmt = file_format(path)
        problems.require(fmt is not None, "input", value, f"has an unknown file type {path.suffix!r}",
                         _INPUT_FIX)
        return fmt
    formats = {file_format(p) for p in _visible_files(path)}
    if not formats or formats == {None}:
        problems.add("input", value, "is a folder with no .csv, .jsonl or .parquet files", _INPUT_FIX)
        return None
    if len(formats - {None}) > 1:
        problems.add("input", value, f"mixes file types ({', '.join(sorted(formats - {None}))})",
                     "keep one format per input folder")
        return None
    return next(iter(formats - {None}))


def check_input(value: str, problems: Problems) -> None:
    """What can be checked without Spark: a local path exists and has a known format."""
    if not value:
        problems.add("input", value, "is empty", _INPUT_FIX)
        return
    if is_uri(value) and not value.startswith("file:"):
        return  # remote: Spark reads it (its errors are reported by read_input)
    path = local_path(value)
    if path.exists():
        local_format(path, value, problems)
    elif not _TABLE_NAME.match(value):
        problems.add("input", value, "no such file or folder", _INPUT_FIX)


def local_path(value: str) -> Path:
    return Path(value.removeprefix("file://") if value.startswith("file://") else value).expanduser()


@dataclass
class InputTable:
    frame: object  # pyspark DataFrame
    rows: int
    source: str  # what was read: an absolute path, a URI or `table <name>`


def read_input(spark, value: str, column: str, reserved: list[str]) -> InputTable:
    """Read and count the input (so an unreadable file fails here, before any run or output), and check
    it has `column` and none of the output's column names."""
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    remote = is_uri(value) and not value.startswith("file:")
    path = None if remote else local_path(value)
    try:
        if path is not None and not path.exists():
            if not spark.catalog.tableExists(value):
                raise InputError(Problem("input", value, "is neither a file or folder nor a table "
                                         "of the Spark catalog", _INPUT_FIX))
            frame, source = spark.table(value), f"table {value}"
        else:
            problems = Problems()
            fmt = local_format(path, value, problems) if path is not None else (
                file_format(Path(value.rstrip("/"))) or "parquet")  # a remote folder: Parquet
            problems.raise_if_any()
            uri = path.resolve().as_uri() if path is not None else value
            reader = spark.read.format(fmt)
            if fmt == "csv":  # RFC 4180: header row, "" escapes a quote, quoted newlines
                reader = reader.option("header", "true").option("escape", '"').option("multiLine", "true")
            frame, source = reader.load(uri), uri
        rows = frame.count()
    except (PySparkException, Py4JError) as err:
        raise InputError(Problem("input", value, f"cannot be read as a table ({type(err).__name__}: "
                                 f"{one_line(err, 200)})", _INPUT_FIX)) from None
    problems = Problems()
    if column not in frame.columns:
        problems.add("input_column", column, f"is not a column of the input (columns: "
                     f"{', '.join(frame.columns)})", "pass the column that holds the text to score")
    clash = sorted(set(frame.columns) & set(reserved + [ERROR_COLUMN]))
    problems.require(not clash, "input", value, f"already has column(s) {', '.join(clash)} that the "
                     "output adds", "rename or drop those columns first")
    problems.raise_if_any()
    log.info("input %s: %d rows, columns %s", source, rows, frame.columns)
    return InputTable(frame, rows, source)


def _col(name: str):
    from pyspark.sql import functions as F

    return F.col("`" + name.replace("`", "``") + "`")


def scored_frame(frame, column: str, udf, result_type, output_names: list[str], partitions: int):
    """The output: input columns, then the model's columns, then `error`. Good rows go through the
    model (spread over `partitions` tasks: one model load per task), bad rows get nulls and a reason."""
    from pyspark.sql import functions as F

    text = _col(column).cast("string")
    error = (F.when(text.isNull() | text.rlike(r"^\s*$"), F.lit(ERR_EMPTY))
             .when(F.length(text) > MAX_TEXT_CHARS, F.lit(ERR_TOO_LONG)))
    marked = frame.withColumn(ERROR_COLUMN, error.cast("string"))
    pred = "__prediction"
    good = (marked.filter(_col(ERROR_COLUMN).isNull()).repartition(partitions)
            .withColumn(pred, udf(text)))
    bad = marked.filter(_col(ERROR_COLUMN).isNotNull()).withColumn(pred, F.lit(None).cast(result_type))
    both = good.unionByName(bad)
    # Models that check their own prompts (an `error` output column: a row the model refused) and
    # rows refused here share one `error` column: this step's reason first, else the model's.
    model_cols = [n for n in output_names if n != ERROR_COLUMN]
    err = (F.coalesce(_col(ERROR_COLUMN), F.col(pred).getField(ERROR_COLUMN).cast("string"))
           if ERROR_COLUMN in output_names else _col(ERROR_COLUMN))
    return both.select(*[_col(c) for c in frame.columns],
                       *[F.col(pred).getField(n).alias(n) for n in model_cols], err.alias(ERROR_COLUMN))


# --- the output: checks, atomic publishing ------------------------------------------------------
class _LocalFs:
    """A local path (the default): checks need no Spark."""

    def exists(self, p: str) -> bool:
        return os.path.lexists(p)

    def non_empty(self, p: str) -> bool:
        return not os.path.isdir(p) or any(os.scandir(p))

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def delete(self, p: str) -> None:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.remove(p)


class _HadoopFs:
    """A URI (`hdfs://`, `s3a://`, `file://`) through Hadoop's FileSystem, the way Spark writes it.
    The one use of pyspark's JVM handles (`_jvm`, `_jsc`): tests cover it with `file://` URIs."""

    def __init__(self, spark, uri: str):
        self._path = spark._jvm.org.apache.hadoop.fs.Path
        self._fs = self._path(uri).getFileSystem(spark._jsc.hadoopConfiguration())

    def exists(self, p: str) -> bool:
        return bool(self._fs.exists(self._path(p)))

    def non_empty(self, p: str) -> bool:
        return not self._fs.getFileStatus(self._path(p)).isDirectory() or \
            len(self._fs.listStatus(self._path(p))) > 0

    def rename(self, src: str, dst: str) -> None:
        if not self._fs.rename(self._path(src), self._path(dst)):
            raise OSError(f"rename {src} -> {dst} failed")

    def delete(self, p: str) -> None:
        self._fs.delete(self._path(p), True)


def output_target(value: str) -> str:
    """`output` as the job writes it: an absolute local path, or the URI as given."""
    return value.rstrip("/") if is_uri(value) else str(Path(value).expanduser().absolute())


def check_output(value: str, overwrite: bool, problems: Problems, spark=None) -> None:
    """An existing, non-empty output needs overwrite=true. URIs are checked once Spark runs."""
    if not value:
        problems.add("output", value, "is empty", "pass the Parquet folder to write")
        return
    if is_uri(value) and spark is None:
        return
    fs = _HadoopFs(spark, value) if is_uri(value) else _LocalFs()
    target = output_target(value)
    if not is_uri(value) and not Path(target).parent.is_dir():
        problems.add("output", value, "its parent folder does not exist", "create it first")
    elif fs.exists(target) and fs.non_empty(target) and not overwrite:
        problems.add("output", value, "already exists and is not empty",
                     "pass overwrite=true to replace it, or another output")


def _spark_path(target: str) -> str:
    # A URI for local paths too: Spark would resolve a bare path against the cluster's default FS.
    return target if is_uri(target) else Path(target).as_uri()


def read_output(spark, target: str):
    return spark.read.parquet(_spark_path(target))


def _remove_stale_temps(target: str) -> None:
    """Remove temporary outputs of earlier jobs on this machine that were killed (their pid is gone)."""
    import psutil

    parent, name = Path(target).parent, Path(target).name
    for p in parent.glob(f".{name}{_TEMP_TAG}*"):
        pid = p.name[len(f".{name}{_TEMP_TAG}"):].split("-")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            if (p / "replaced").exists() and not os.path.lexists(target):
                # Killed between moving the old table aside and renaming the new one in: restore it.
                log.warning("restoring %s, which a killed batch_score was replacing", target)
                os.rename(p / "replaced", target)
            log.info("removing %s, left by a killed batch_score", p)
            shutil.rmtree(p, ignore_errors=True)


def write_atomically(spark, frame, value: str, overwrite: bool, expected_rows: int) -> int:
    """Write `frame` as Parquet beside `output`, check it has `expected_rows`, and rename it into place;
    returns the rows written."""
    remote = is_uri(value)
    fs = _HadoopFs(spark, value) if remote else _LocalFs()
    target = output_target(value)
    if not remote:
        _remove_stale_temps(target)
    parent, name = target.rsplit("/", 1)
    # The table is written inside a hidden folder beside `output` (readers of the parent skip it), under
    # a plain name: Spark refuses to read a path whose own name starts with '.' or '_'.
    work = f"{parent}/.{name}{_TEMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, old = f"{work}/table", f"{work}/replaced"
    moved = False
    try:
        frame.write.mode("errorifexists").parquet(_spark_path(tmp))
        rows = read_output(spark, tmp).count()
        if rows != expected_rows:  # never expected: the UDF returns one row per row it is given
            raise StepError(f"scoring wrote {rows} rows for {expected_rows} input rows; nothing was "
                            f"published at {value}; fix: report this as a bug")
        if fs.exists(target):
            problems = Problems()
            check_output(value, overwrite, problems, spark)  # someone wrote it while this job scored
            problems.raise_if_any()
            fs.rename(target, old)
            moved = True
        fs.rename(tmp, target)
    except BaseException:
        if moved and not fs.exists(target):
            fs.rename(old, target)  # put back what overwrite was about to replace
        fs.delete(work)
        raise
    fs.delete(work)  # with the replaced table, if any
    log.info("wrote %d rows to %s", rows, target)
    return rows


def failure_line(err: BaseException) -> str:
    """One line for a failed Spark job: the Python worker's own exception when there is one (the text
    Spark wraps it in starts with boilerplate and a traceback)."""
    text = str(err)
    if "Traceback (most recent call last)" in text:
        tail = text.split("Traceback (most recent call last)", 1)[1].split("JVM stacktrace:", 1)[0]
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        if lines:
            return one_line(lines[-1], 300)
    return f"{type(err).__name__}: {one_line(err, 300)}"
