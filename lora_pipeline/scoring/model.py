"""The model `batch_score` scores with: resolved once, pinned to a version, run through `spark_udf`.

An alias (`models:/<name>@champion`) is resolved to its version when the job starts, and the job loads
`models:/<name>/<version>`: a promotion while the job runs does not mix two models in one table, and
the run records which version scored.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from lora_pipeline.errors import InputError, Problem, one_line

log = logging.getLogger(__name__)

_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_MODEL_URI_PREFIXES = ("models:/", "runs:/")
# What the UDF's Python workers need from the driver's environment to load the model: the pipeline's
# cache and device (E2E_LORA_*), the Hub settings a base reference may need (HF_*), and the
# credentials of the tracking server the base may be downloaded from (MLFLOW_TRACKING_*). On a
# cluster the executors do not inherit the driver's environment; in local mode they inherit it as it
# was when the JVM started, which may be earlier than this job.
_WORKER_ENV_PREFIXES = ("E2E_LORA_", "HF_", "MLFLOW_TRACKING_")
_FIX = ("pass a model URI that MLflow lists: models:/<name>@<alias>, models:/<name>/<version>, "
        "models:/<model_id> or runs:/<run_id>/<name> (persist_and_register registers the champion)")


def looks_like_model_uri(uri: str) -> bool:
    return uri.startswith(_MODEL_URI_PREFIXES) and len(uri.split(":/", 1)[1].strip("/")) > 0


@dataclass
class ScoringModel:
    requested_uri: str
    uri: str  # what the job loads: models:/<name>/<version> when an alias was asked for
    name: str = ""  # registered name, when the URI names one
    version: str = ""
    alias: str = ""
    model_id: str = ""
    input_name: str = "prompt"  # the model's one input column
    output_names: list[str] = field(default_factory=list)
    param_names: set[str] = field(default_factory=set)
    output_schema: Any = None  # mlflow.types.Schema of the outputs

    def result_type(self):
        """The UDF's Spark type: a struct of the model's output columns (from its signature)."""
        return self.output_schema.as_spark_schema()

    def describe(self) -> str:
        if self.alias:
            return f"{self.requested_uri} = version {self.version}"
        return self.uri


def _problem(uri: str, message: str, fix: str = _FIX) -> InputError:
    return InputError(Problem("model_uri", uri, message, fix))


def resolve(uri: str) -> ScoringModel:
    """The model behind `uri` with its signature checked; any failure is an InputError on model_uri."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    model = ScoringModel(requested_uri=uri, uri=uri)
    try:
        if m := _ALIAS_URI.match(uri):
            mv = client.get_model_version_by_alias(m["name"], m["alias"])
            model.name, model.alias, model.version = m["name"], m["alias"], str(mv.version)
            model.uri = f"models:/{model.name}/{model.version}"
        elif m := _VERSION_URI.match(uri):
            mv = client.get_model_version(m["name"], m["version"])
            model.name, model.version = m["name"], str(mv.version)
        info = mlflow.models.get_model_info(model.uri)
    except (MlflowException, OSError) as err:
        raise _problem(uri, f"no such model ({one_line(err, 160)})") from None
    model.model_id = info.model_id or ""
    sig = info.signature
    if sig is None or sig.outputs is None or not sig.outputs.has_input_names():
        raise _problem(uri, "has no output signature with named columns (the table's columns come "
                       "from it)", "log the model with a signature (the pipeline's models have one)")
    inputs = sig.inputs.input_names() if sig.inputs is not None and sig.inputs.has_input_names() else []
    if len(inputs) != 1:
        # A json/text task model takes `prompt` or `messages` (both optional). mlflow 3.17's spark_udf
        # fills the missing optional `messages` column with NaN, which its own schema check then refuses
        # ("Expected data to be list or numpy array, got float"), so such models are refused here, up front.
        raise _problem(uri, f"takes input columns {inputs}; batch_score feeds it one text column",
                       "pass a model with one input column, `prompt` (an e2e task model; json and text "
                       "task models are not batch-scored yet)")
    model.input_name = str(inputs[0])
    model.output_names = [str(n) for n in sig.outputs.input_names()]
    model.output_schema = sig.outputs
    model.param_names = {p.name for p in sig.params.params} if sig.params is not None else set()
    log.info("scoring with %s (model id %s)", model.describe(), model.model_id or "-")
    return model


def worker_env(device: str, tasks_per_machine: int | None = None) -> dict[str, str]:
    """The workers' environment: the driver's pipeline, Hub and tracking settings, the device, and how
    many workers share a machine's memory (each packs its Linear weights within its share:
    lora_pipeline/model/packed_linear.py), unless the driver's environment already says."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_WORKER_ENV_PREFIXES)}
    from lora_pipeline.model.device import DEVICE_ENV
    from lora_pipeline.model.packed_linear import ENV_PROCESSES

    env[DEVICE_ENV] = device
    if tasks_per_machine and ENV_PROCESSES not in env:
        env[ENV_PROCESSES] = str(tasks_per_machine)
    return env


def spark_udf(spark, model: ScoringModel, *, device: str, params: dict[str, Any]):
    """`mlflow.pyfunc.spark_udf` of the pinned model, in this Python environment (`env_manager=local`),
    returning a struct of the signature's output columns; params the model does not declare are left
    out (MLflow would drop them with a warning per batch)."""
    import mlflow

    from lora_pipeline.scoring.spark import tasks_per_machine

    kept = {k: v for k, v in params.items() if k in model.param_names}
    return mlflow.pyfunc.spark_udf(spark, model.uri, result_type=model.result_type(),
                                   env_manager="local", params=kept or None,
                                   extra_env=worker_env(device, tasks_per_machine(spark)))
