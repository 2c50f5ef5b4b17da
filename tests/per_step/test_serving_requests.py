"""Bad requests to the logged model, in process: a bad prompt costs only its row, a bad param the request.

The same over HTTP (400s, and the server keeps serving): test_serve_http.py.
"""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from test_serving import SENTENCES, adapter_dir, log_checkpoint, snapshot  # noqa: F401 (fixture)

from lora_pipeline.model import param_guard, serving
from lora_pipeline.model.requests import BadRequest

LONG = "The Eagle is a pub near the river. " * 60  # ~600 tokens: over the tiny model's 512 context


@pytest.fixture
def model_uri(tracking, tiny_model_dir, adapter_dir) -> str:  # noqa: F811
    return log_checkpoint(snapshot(str(tiny_model_dir)), adapter_dir)


def _spy_generate(monkeypatch) -> list[list[str]]:
    """Record the sentences each generate call receives (the real generate still runs)."""
    calls: list[list[str]] = []
    real = serving.generate

    def spy(model, tokenizer, sentences, **kwargs):
        calls.append(list(sentences))
        return real(model, tokenizer, sentences, **kwargs)

    monkeypatch.setattr(serving, "generate", spy)
    return calls


def test_bad_prompts_get_an_error_row_and_are_never_generated(model_uri, monkeypatch):
    model = mlflow.pyfunc.load_model(model_uri)
    params = {"max_new_tokens": 6, "precision": "fp32"}
    good = model.predict(pd.DataFrame({"prompt": SENTENCES[:2]}), params=params)
    calls = _spy_generate(monkeypatch)
    prompts = [SENTENCES[0], None, "", "   ", 5, LONG, SENTENCES[1]]
    out = model.predict(pd.DataFrame({"prompt": prompts}), params=params)

    assert calls == [[SENTENCES[0], SENTENCES[1]]]  # only the good prompts reach the model
    assert out["valid"].tolist() == [*good["valid"][:1], False, False, False, False, False, *good["valid"][1:]]
    assert out["error"].tolist()[1:6] == [
        "prompt is null; fix: send one sentence as text",
        "prompt is empty; fix: send one sentence as text",
        "prompt is empty; fix: send one sentence as text",
        "prompt is int, not text; fix: send one sentence as text",
        out["error"].iloc[5],
    ]
    assert out["error"].iloc[5].startswith("prompt is ")
    assert out["error"].iloc[5].endswith(
        " tokens long with the chat template, over the limit of 506 (the model's context length 512 "
        "minus max_new_tokens 6); fix: send a shorter sentence")
    # No invented answer for a refused row; the good rows are what they are alone.
    assert out["mr"].tolist()[1:6] == [""] * 5 and out["attributes"].tolist()[1:6] == ["{}"] * 5
    pd.testing.assert_frame_equal(out.iloc[[0, 6]].reset_index(drop=True), good)
    # A request with no good prompt generates nothing.
    calls.clear()
    assert model.predict(pd.DataFrame({"prompt": [None, ""]}), params=params)["valid"].tolist() == [False] * 2
    assert calls == []


def test_prompt_limit_and_max_new_tokens_cap_are_model_config(model_uri):
    model = mlflow.pyfunc.load_model(model_uri, model_config={"max_prompt_tokens": 20,
                                                              "max_new_tokens_cap": 8})
    out = model.predict(pd.DataFrame({"prompt": [SENTENCES[0]]}), params={"max_new_tokens": 4})
    assert out["error"].iloc[0].endswith(
        "tokens long with the chat template, over the limit of 20 (the model's max_prompt_tokens); "
        "fix: send a shorter sentence")
    with pytest.raises(BadRequest, match=r"param max_new_tokens=9 is out of range; use an integer from "
                                         r"1 to 8 \(the model's max_new_tokens_cap\)"):
        model.predict(pd.DataFrame({"prompt": [SENTENCES[0]]}), params={"max_new_tokens": 9})
    with pytest.raises(Exception, match=r"model config max_new_tokens_cap=0 is out of range"):
        mlflow.pyfunc.load_model(model_uri, model_config={"max_new_tokens_cap": 0})


@pytest.mark.parametrize("params, message", [
    ({"max_new_tokens": 1000}, r"param max_new_tokens=1000 is out of range; use an integer from 1 to 256"),
    ({"temperature": -1.0}, r"param temperature=-1.0 is out of range; use a number >= 0"),
    ({"max_tokens": 5}, r"param 'max_tokens' is not supported; the params are: temperature"),
    ({"precision": "fp16"}, r"param precision='fp16' is not supported; use one of: auto, bf16, fp32"),
])
def test_bad_params_refuse_the_request(model_uri, monkeypatch, params, message):
    model = mlflow.pyfunc.load_model(model_uri)
    calls = _spy_generate(monkeypatch)
    with pytest.raises(MlflowException, match=message) as info:
        model.predict(pd.DataFrame({"prompt": SENTENCES[:1]}), params=params)
    assert info.value.get_http_status_code() == 400 and calls == []


def test_unknown_param_guard_holds_on_this_mlflow(model_uri):
    """The one private MLflow hook (param_guard): fails here, loudly, if MLflow renames the function
    that drops unknown params or stops calling it on predict."""
    assert callable(getattr(mlflow.pyfunc, "_enforce_params_schema", None)), \
        "mlflow.pyfunc._enforce_params_schema is gone: update lora_pipeline/model/param_guard.py"
    model = mlflow.pyfunc.load_model(model_uri)
    assert param_guard.install() is True
    with pytest.raises(BadRequest, match=r"param 'top_k' is not supported"):
        model.predict(pd.DataFrame({"prompt": SENTENCES[:1]}), params={"top_k": 3})

    # Any other model keeps MLflow's own behaviour (unknown params dropped with a warning).
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return [sorted(params)]

    sig = ModelSignature(inputs=Schema([ColSpec("string", "x")]),
                         params=ParamSchema([ParamSpec("temperature", "double", 0.0)]))
    with mlflow.start_run():
        uri = mlflow.pyfunc.log_model(name="echo", python_model=Echo(), signature=sig).model_uri
    assert mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"x": ["a"]}),
                                                 params={"top_k": 3}) == [["temperature"]]
