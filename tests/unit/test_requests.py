"""`lora_pipeline.model.requests`: what the served model refuses, and the messages it refuses with."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from lora_pipeline.errors import StepError
from lora_pipeline.model import requests
from lora_pipeline.model.requests import BadRequest, Generation, ServingConfig, check_params

CONFIG = ServingConfig()


def test_defaults_and_good_params_pass():
    assert check_params(None, CONFIG) == Generation()
    assert check_params({"max_new_tokens": 256, "temperature": 0.7, "do_sample": True, "batch_size": 1,
                         "precision": "fp32"}, CONFIG) == Generation(256, 0.7, True, 1, "fp32")
    # MLflow's ParamSpec has already turned JSON numbers into int / float: 12.0 is 12.
    assert check_params({"max_new_tokens": 12.0}, CONFIG).max_new_tokens == 12


@pytest.mark.parametrize("params, message", [
    ({"max_new_tokens": 257}, r"param max_new_tokens=257 is out of range; use an integer from 1 to 256 "
                              r"\(the model's max_new_tokens_cap\)"),
    ({"max_new_tokens": 0}, r"param max_new_tokens=0 is out of range; use an integer from 1 to 256"),
    ({"temperature": -0.5}, r"param temperature=-0.5 is out of range; use a number >= 0"),
    ({"temperature": float("nan")}, r"param temperature=nan is out of range; use a number >= 0"),
    ({"do_sample": True}, r"param temperature=0.0 with do_sample=true is out of range; use a temperature "
                          r"> 0 to sample, or do_sample=false for greedy decoding"),
    ({"batch_size": 0}, r"param batch_size=0 is out of range; use an integer from 1 to 256"),
    ({"precision": "fp16"}, r"param precision='fp16' is not supported; use one of: auto, bf16, fp32"),
    ({"max_tokens": 5}, r"param 'max_tokens' is not supported; the params are: temperature \(a number "
                        r">= 0; > 0 with do_sample\), max_new_tokens \(1 to 256\), do_sample \(true or "
                        r"false\), batch_size \(1 to 256\), precision \(auto, bf16, fp32\)"),
])
def test_each_bad_param_is_refused_naming_it_and_its_range(params, message):
    with pytest.raises(BadRequest, match=message) as info:
        check_params(params, CONFIG)
    # An MlflowException with INVALID_PARAMETER_VALUE: the scoring server answers 400 with it.
    assert isinstance(info.value, MlflowException) and info.value.get_http_status_code() == 400
    assert isinstance(info.value, StepError)  # and the pipeline's callers report it as their own


def test_every_bad_param_is_reported_at_once_with_the_configured_cap():
    with pytest.raises(BadRequest) as info:
        check_params({"max_new_tokens": 40, "temperature": -1, "top_k": 3, "stream": True},
                     ServingConfig(max_new_tokens_cap=32))
    lines = str(info.value).splitlines()
    assert lines[0].startswith("params 'stream', 'top_k' are not supported; the params are:")
    assert "max_new_tokens (1 to 32)" in lines[0]
    assert lines[1] == ("param max_new_tokens=40 is out of range; use an integer from 1 to 32 "
                        "(the model's max_new_tokens_cap)")
    assert lines[2].startswith("param temperature=-1 is out of range")
    assert len(lines) == 3


@pytest.mark.parametrize("value, message", [
    (None, "prompt is null; fix: send one sentence as text"),
    (float("nan"), "prompt is null; fix: send one sentence as text"),
    ("None", "prompt is null; fix: send one sentence as text"),  # a null after MLflow's `inputs` format
    ("", "prompt is empty; fix: send one sentence as text"),
    (" \n\t", "prompt is empty; fix: send one sentence as text"),
    (5, "prompt is int, not text; fix: send one sentence as text"),
    (["a sentence"], "prompt is list, not text; fix: send one sentence as text"),
    ("Aromi is a pub.", None),
])
def test_prompt_problems(value, message):
    assert requests.prompt_problem(value) == message


def test_prompt_limit_comes_from_the_context_length_unless_configured():
    assert requests.prompt_limit(CONFIG, 512, 64) == (
        448, "the model's context length 512 minus max_new_tokens 64")
    assert requests.prompt_limit(ServingConfig(max_prompt_tokens=100), 512, 64) == (
        100, "the model's max_prompt_tokens")
    assert requests.prompt_limit(CONFIG, None, 64) == (None, "")
    assert requests.length_problem(449, 448, "the model's context length 512 minus max_new_tokens 64") == (
        "prompt is 449 tokens long with the chat template, over the limit of 448 (the model's context "
        "length 512 minus max_new_tokens 64); fix: send a shorter sentence")
    assert requests.length_problem(448, 448, "") is None


def test_model_config_is_checked_at_load_every_problem_at_once():
    assert ServingConfig.from_model_config(None) == CONFIG
    assert ServingConfig.from_model_config({"batch_max_rows": 8, "batching": False}) == ServingConfig(
        batch_max_rows=8, batching=False)
    with pytest.raises(StepError) as info:
        ServingConfig.from_model_config({"batch_max_rows": 0, "batching": "yes", "max_prompt_tokens": -3,
                                         "batch_max_wait_ms": -1, "bogus": 1})
    message = str(info.value)
    for part in ("model config key 'bogus' is not supported; use: batch_max_rows, batch_max_wait_ms, "
                 "batching, max_new_tokens_cap, max_prompt_tokens",
                 "model config max_prompt_tokens=-3 is out of range; use an integer >= 1 (or null: the "
                 "model's context length)",
                 "model config batch_max_rows=0 is out of range; use an integer >= 1",
                 "model config batching='yes' is not a boolean; use true or false",
                 "model config batch_max_wait_ms=-1 is out of range; use 0 to 10000"):
        assert part in message
    # Round trip through the MLmodel: what log_e2e_model records is what loads back.
    assert ServingConfig.from_model_config(CONFIG.as_model_config()) == CONFIG
