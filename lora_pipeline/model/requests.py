"""What the served model accepts: request params and prompts, checked before any generation.

Two kinds of bad input, two answers:
  * a bad param (unknown name, `max_new_tokens` over the cap, negative `temperature`, ...) spoils the
    whole request: `BadRequest`, an `MlflowException(INVALID_PARAMETER_VALUE)` that `mlflow models
    serve` answers with HTTP 400, naming every bad param, its value and the allowed range at once;
  * a bad prompt (null, empty, not text, too long for the model) spoils only its row: that row comes
    back with `valid=false` and an `error` text, and is never sent to the model (no invented
    answer); the other rows of the request are answered as usual.
The limits are model config (`ServingConfig`): logged into the MLmodel with their defaults, and
overridable at load time (`mlflow.pyfunc.load_model(model_config=...)`, or the environment variable
`MLFLOW_PYFUNC_INFERENCE_CONFIG` for `mlflow models serve`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from lora_pipeline.errors import StepError
from lora_pipeline.model.precision import PRECISIONS

DEFAULT_MAX_NEW_TOKENS = 64
# 32: on the default base, 32 sentences take 6.4 s at batch 32 against 7.4 s at batch 16 (bf16);
# the KV cache of a batch of 32 x 140 tokens is at most 32 x 140 x 30 layers x 2 (K, V) x 192 x 4 B
# = 206 MB (fp32; half in bf16).
DEFAULT_BATCH_SIZE = 32
DEFAULT_PRECISION = "auto"
# A request's rows per generate call, at most: bounds the KV cache one request can ask for
# (256 x 140 tokens: 1.6 GB in fp32 on the default base).
MAX_BATCH_SIZE = 256
# The predict params of the logged signature, in its order, with their defaults.
PARAM_DEFAULTS: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
                                  "do_sample": False, "batch_size": DEFAULT_BATCH_SIZE,
                                  "precision": DEFAULT_PRECISION}


class BadRequest(MlflowException, StepError):
    """A request the model refuses as a whole. An MlflowException with INVALID_PARAMETER_VALUE, so the
    scoring server answers 400 with this message (any other exception becomes a 400 with a generic
    message); a StepError, so the pipeline's own callers report it as one of theirs."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class ServingConfig:
    """Model config of the served model (the pyfunc `model_config`); every key has a default."""

    # Longest answer a request may ask for (`max_new_tokens`); the task's answers are < 100 tokens.
    max_new_tokens_cap: int = 256
    # Longest prompt, in tokens with the chat template; None: the model's context length minus
    # the request's max_new_tokens (prompt and answer must fit in the context together).
    max_prompt_tokens: int | None = None
    # Cross-request batching (lora_pipeline/model/batching.py): concurrent requests with the same
    # generation settings share generate calls of up to `batch_max_rows` rows; a batch waits for more
    # requests 10% of the previous batch's generation time, at most `batch_max_wait_ms` (500 ms: the
    # cap bites on batches over 5 s; a lone request waits 10% longer than its generation, at most).
    batching: bool = True
    batch_max_rows: int = DEFAULT_BATCH_SIZE
    batch_max_wait_ms: float = 500.0

    @classmethod
    def from_model_config(cls, config: dict[str, Any] | None) -> ServingConfig:
        """The config of a loaded model; every bad key is reported at once (StepError, at load)."""
        config = dict(config or {})
        known = {f.name for f in fields(cls)}
        problems = [f"model config key {k!r} is not supported; use: {', '.join(sorted(known))}"
                    for k in sorted(set(config) - known)]
        kwargs = {k: v for k, v in config.items() if k in known}

        def integer(name: str, low: int, optional: bool = False) -> None:
            v = kwargs.get(name)
            if name not in kwargs or (optional and v is None):
                return
            if not _is_int(v) or int(v) < low:
                problems.append(f"model config {name}={v!r} is out of range; use an integer >= {low}"
                                + (" (or null: the model's context length)" if optional else ""))
            else:
                kwargs[name] = int(v)

        integer("max_new_tokens_cap", 1)
        integer("max_prompt_tokens", 1, optional=True)
        integer("batch_max_rows", 1)
        if "batching" in kwargs and not isinstance(kwargs["batching"], bool):
            problems.append(f"model config batching={kwargs['batching']!r} is not a boolean; use true or false")
        wait = kwargs.get("batch_max_wait_ms", 0.0)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 10_000:
            problems.append(f"model config batch_max_wait_ms={wait!r} is out of range; use 0 to 10000")
        if problems:
            raise StepError("; ".join(problems))
        return cls(**kwargs)

    def as_model_config(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    """A request's checked generation settings."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    do_sample: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    precision: str = DEFAULT_PRECISION


def allowed_params(cap: int | str = "the model's max_new_tokens_cap") -> str:
    return (f"temperature (a number >= 0; > 0 with do_sample), max_new_tokens (1 to {cap}), "
            f"do_sample (true or false), batch_size (1 to {MAX_BATCH_SIZE}), "
            f"precision ({', '.join(PRECISIONS)})")


def unknown_params(params: dict[str, Any] | None) -> list[str]:
    return sorted(str(k) for k in (params or {}) if str(k) not in PARAM_DEFAULTS)


def unknown_params_message(unknown: list[str], cap: int | str = "the model's max_new_tokens_cap") -> str:
    names = ", ".join(repr(u) for u in unknown)
    return (f"param{'s' if len(unknown) > 1 else ''} {names} {'are' if len(unknown) > 1 else 'is'} "
            f"not supported; the params are: {allowed_params(cap)}")


def precision_problem(value: Any) -> str | None:
    if str(value) not in PRECISIONS:
        return f"param precision={str(value)!r} is not supported; use one of: {', '.join(PRECISIONS)}"
    return None


def check_params(params: dict[str, Any] | None, config: ServingConfig) -> Generation:
    """The request's generation settings; BadRequest naming every bad param at once."""
    params = dict(params or {})
    problems = []
    if unknown := unknown_params(params):
        problems.append(unknown_params_message(unknown, config.max_new_tokens_cap))
    got = {**PARAM_DEFAULTS, **{k: v for k, v in params.items() if k in PARAM_DEFAULTS}}
    cap = config.max_new_tokens_cap

    mnt = got["max_new_tokens"]
    if not _is_int(mnt) or not 1 <= int(mnt) <= cap:
        problems.append(f"param max_new_tokens={mnt!r} is out of range; use an integer from 1 to {cap} "
                        "(the model's max_new_tokens_cap)")
    bs = got["batch_size"]
    if not _is_int(bs) or not 1 <= int(bs) <= MAX_BATCH_SIZE:
        problems.append(f"param batch_size={bs!r} is out of range; use an integer from 1 to {MAX_BATCH_SIZE}")
    do_sample = got["do_sample"]
    if not isinstance(do_sample, bool):
        problems.append(f"param do_sample={do_sample!r} is not a boolean; use true or false")
    temp = got["temperature"]
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not math.isfinite(temp) or temp < 0:
        problems.append(f"param temperature={temp!r} is out of range; use a number >= 0 "
                        "(it only matters with do_sample=true)")
    elif do_sample is True and temp == 0:
        problems.append("param temperature=0.0 with do_sample=true is out of range; use a temperature "
                        "> 0 to sample, or do_sample=false for greedy decoding")
    if problem := precision_problem(got["precision"]):
        problems.append(problem)
    if problems:
        raise BadRequest("\n".join(problems))
    return Generation(max_new_tokens=int(mnt), temperature=float(temp), do_sample=do_sample,
                      batch_size=int(bs), precision=str(got["precision"]))


def prompt_limit(config: ServingConfig, context_length: int | None, max_new_tokens: int) -> tuple[int | None, str]:
    """(longest prompt in tokens, or None for no limit; where the limit comes from)."""
    if config.max_prompt_tokens is not None:
        return config.max_prompt_tokens, "the model's max_prompt_tokens"
    if context_length is None:
        return None, ""
    return (max(0, context_length - max_new_tokens),
            f"the model's context length {context_length} minus max_new_tokens {max_new_tokens}")


def prompt_problem(value: Any) -> str | None:
    """Why a prompt cell cannot be answered at all (before tokenizing), or None."""
    fix = "fix: send one sentence as text"
    # The text 'None' too: MLflow's `inputs` and `instances` request formats turn a JSON null into
    # that text before the model sees it (`dataframe_split` / `dataframe_records` keep the null).
    if value is None or (isinstance(value, float) and math.isnan(value)) or (
            isinstance(value, str) and value.strip() == "None"):
        return f"prompt is null; {fix}"
    if not isinstance(value, str):
        return f"prompt is {type(value).__name__}, not text; {fix}"
    if not value.strip():
        return f"prompt is empty; {fix}"
    return None


def length_problem(n_tokens: int, limit: int | None, source: str) -> str | None:
    if limit is None or n_tokens <= limit:
        return None
    return (f"prompt is {n_tokens} tokens long with the chat template, over the limit of {limit} "
            f"({source}); fix: send a shorter sentence")


def _is_int(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, float) and math.isfinite(v) and v == int(v)
