"""`batch_score`: score a big table with the registered model on Spark.

The model (default: the registered champion, resolved to its version when the job starts) runs through
`mlflow.pyfunc.spark_udf` (`env_manager=local`: this Python environment) over a Spark DataFrame of the
input, and the result is written as Parquet: the input's columns, the model's output columns (today
`mr`, `attributes`, `valid`) and `error`. Rows with a null, blank or over-long text get null outputs
and a reason in `error`; they never fail the job. The output is written beside `output` and renamed
into place when complete, so a killed job leaves nothing at `output`; an existing, non-empty `output`
is replaced only with `overwrite=true`. Its run records the model version and alias that scored, the
input and its row count, the output and its schema, and rows/s. Output: tag `scored_table` = the
output path.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lora_pipeline import artifacts
from lora_pipeline.cli import param, run_cli
from lora_pipeline.errors import InputError, Problems, StepError
from lora_pipeline.model.device import DEVICES

log = logging.getLogger(__name__)

ENTRY_POINT = "batch_score"
MODEL_VERSION_TAG = "batch_score.model_version"
MODEL_ALIAS_TAG = "batch_score.model_alias"
MODEL_NAME_TAG = "batch_score.model_name"
MODEL_ID_TAG = "batch_score.model_id"
MODEL_URI_TAG = "batch_score.model_uri"  # what the job loaded (pinned to the version)
INPUT_TAG = "batch_score.input"


@dataclass
class Args:
    model_uri: str = param(f"models:/{artifacts.DEFAULT_REGISTERED_NAME}@{artifacts.CHAMPION_ALIAS}",
                           "model to score with: models:/<name>@<alias> (resolved to its version at "
                           "the start), models:/<name>/<version>, models:/<model_id> or runs:/...")
    input: str = param("", "table to score: a CSV (header row), JSON Lines or Parquet file or folder, "
                       "a URI Spark reads (hdfs://, s3a://), or a table name of the Spark catalog")
    input_column: str = param("prompt", "the input's column holding the text (one sentence per row)")
    output: str = param("", "Parquet folder to write (a local path, or a URI such as hdfs://...)")
    spark_master: str = param("local[2]", "Spark master: local[N], spark://host:port, yarn, k8s://...; "
                              "'' takes the one spark-submit --master set")
    batch_size: int = param(32, "sentences per generate() call inside each Spark task")
    max_new_tokens: int = param(64, "most tokens generated per row")
    device: str = param("auto", "where the model computes: auto (cuda when there is one), cpu, cuda")
    overwrite: bool = param(False, "replace an existing, non-empty output")


@dataclass
class Result:
    run_id: str
    output: str
    model_uri: str  # what scored: models:/<name>/<version> when an alias was asked for
    model_version: str
    model_alias: str
    input_rows: int
    output_rows: int
    error_rows: int
    seconds: float
    rows_per_s: float


def validate_static(args: Args) -> Problems:
    """Every check that needs neither MLflow nor Spark."""
    from lora_pipeline.scoring import spark as spark_session
    from lora_pipeline.scoring import table
    from lora_pipeline.scoring.model import looks_like_model_uri

    problems = Problems()
    problems.require(looks_like_model_uri(args.model_uri), "model_uri", args.model_uri,
                     "is not a model URI", "pass models:/<name>@<alias>, models:/<name>/<version>, "
                     "models:/<model_id> or runs:/<run_id>/<name>")
    table.check_input(args.input, problems)
    problems.require(bool(args.input_column), "input_column", args.input_column, "is empty",
                     "pass the input's text column")
    table.check_output(args.output, args.overwrite, problems)
    problems.require(spark_session.valid_master(args.spark_master), "spark_master", args.spark_master,
                     "is not a Spark master URL", "pass local[2], local[*], spark://host:7077, yarn, "
                     "k8s://https://host:443, or '' under spark-submit")
    problems.positive("batch_size", args.batch_size)
    problems.positive("max_new_tokens", args.max_new_tokens)
    if problems.require(args.device in DEVICES, "device", args.device, "is not a device",
                        f"pass one of: {', '.join(DEVICES)}") and args.device == "cuda" \
            and spark_session.is_local(args.spark_master):
        from lora_pipeline.model.device import cuda_available

        problems.require(cuda_available(), "device", args.device, "no CUDA device on this machine",
                         "pass device=auto or device=cpu, or run on a machine with a CUDA GPU")
    return problems


def run(args: Args) -> Result:
    from lora_pipeline.cli import configure_tracking
    from lora_pipeline.scoring import model as scoring_model
    from lora_pipeline.scoring import spark as spark_session

    problems = validate_static(args)
    configure_tracking()
    model = None
    if not any(p.field == "model_uri" for p in problems.items):
        try:  # a missing model is reported with the other bad inputs, before Spark starts
            model = scoring_model.resolve(args.model_uri)
        except InputError as err:
            problems.items.extend(err.problems)
    problems.raise_if_any()

    spark, started_here = spark_session.session(args.spark_master)
    try:
        return _score(spark, model, args)
    finally:
        if started_here:
            spark.stop()


def _score(spark, model, args: Args) -> Result:
    import mlflow
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    from lora_pipeline.scoring import table
    from lora_pipeline.scoring.model import spark_udf
    from lora_pipeline.tracking.runs import step_run

    # Spark-side input checks (unreadable input, missing column, output URI taken) before any run.
    source = table.read_input(spark, args.input, args.input_column, model.output_names)
    later = Problems()
    table.check_output(args.output, args.overwrite, later, spark)
    later.raise_if_any()

    udf = spark_udf(spark, model, device=args.device,
                    params={"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens})
    scored = table.scored_frame(source.frame, args.input_column, udf, model.result_type(),
                                model.output_names, spark.sparkContext.defaultParallelism)
    target = table.output_target(args.output)

    with step_run(ENTRY_POINT, args) as run:
        mlflow.set_tags({MODEL_URI_TAG: model.uri, MODEL_NAME_TAG: model.name,
                         MODEL_VERSION_TAG: model.version, MODEL_ALIAS_TAG: model.alias,
                         MODEL_ID_TAG: model.model_id, INPUT_TAG: source.source})
        mlflow.log_metric("input_rows", source.rows)
        start = time.monotonic()
        try:
            rows = table.write_atomically(spark, scored, args.output, args.overwrite, source.rows)
        except (PySparkException, Py4JError, OSError) as err:
            raise StepError(f"scoring into {args.output} failed ({table.failure_line(err)}); nothing "
                            "was written there; fix: see the worker's error above, then rerun") from err
        seconds = time.monotonic() - start
        written = table.read_output(spark, target)
        error_rows = written.filter(written[table.ERROR_COLUMN].isNotNull()).count()
        rate = rows / seconds if seconds > 0 else 0.0
        mlflow.log_metrics({"output_rows": rows, "error_rows": error_rows, "seconds": seconds,
                            "rows_per_s": rate})
        mlflow.log_dict(written.schema.jsonValue(), artifacts.OUTPUT_SCHEMA_FILE)
        artifacts.set_outputs(mlflow.MlflowClient(), run.info.run_id,
                              {artifacts.SCORED_TABLE_OUTPUT: target})
        log.info("%s: %d rows (%d with errors) in %.1f s, %.1f rows/s, with %s -> %s", ENTRY_POINT,
                 rows, error_rows, seconds, rate, model.describe(), target)
        return Result(run_id=run.info.run_id, output=target, model_uri=model.uri,
                      model_version=model.version, model_alias=model.alias, input_rows=source.rows,
                      output_rows=rows, error_rows=error_rows, seconds=round(seconds, 3),
                      rows_per_s=round(rate, 3))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(Args, run, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
