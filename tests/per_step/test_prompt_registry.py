"""persist_and_register puts the model's prompt in MLflow's prompt registry and links it to the version
(lora_pipeline/registry/prompts.py): the template renders to the served model's own prompt tokens, one
prompt version per distinct template, and a registry that refuses leaves the registration intact."""

from __future__ import annotations

import json

import pytest
from test_persist import GOOD, make_candidate, snapshot

from lora_pipeline.registry import prompts
from steps import persist_and_register as par

NAME = "prompt registry test"  # a space: registered names may hold one, prompt names may not
JSON_GOOD = {"field_f1": 0.8, "base_field_f1": 0.3}
SENTENCE = "The Punter is a coffee shop near Café Sicilia."


@pytest.fixture
def snap(tracking, tiny_model_dir):
    return snapshot(tiny_model_dir)


def _served_tokens(model_uri: str, sentence: str) -> tuple[list[int], list[int]]:
    """The served model's prompt tokens for `sentence`, and those of the registry's template rendered
    with it through the same tokenizer."""
    import mlflow

    from lora_pipeline.model.serving import encode_prompts

    client = mlflow.MlflowClient()
    name, version = model_uri.removeprefix("models:/").split("/")
    uri = client.get_model_version(name, version).tags[prompts.PROMPT_URI_TAG]
    prompt = mlflow.MlflowClient().load_prompt(uri)
    ext = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    tok = ext.tokenizer
    served = encode_prompts(tok, [sentence], ext.task, ext.system_prompt)[0]
    text = tok.apply_chat_template(prompt.format(text=sentence), tokenize=False,
                                   add_generation_prompt=True)
    return served, tok(text, add_special_tokens=False)["input_ids"]


def test_the_registered_version_links_its_prompt_which_renders_to_the_served_prompt(
        tracking, tiny_model_dir, snap, tmp_path):
    import mlflow

    from lora_pipeline.task.tasks import task_spec

    spec = task_spec("json", "Answer with one JSON object.")
    cand = make_candidate(tmp_path, tiny_model_dir, snap, metrics=JSON_GOOD, task_spec=spec)
    res = par.run(par.Args(model_uri=cand.uri, registered_name=NAME))
    assert res.prompt_uri == "prompts:/prompt-registry-test.prompt/1"
    client = mlflow.MlflowClient()
    mv = client.get_model_version(NAME, res.version)
    assert mv.tags[prompts.PROMPT_URI_TAG] == res.prompt_uri
    prompt = mlflow.MlflowClient().load_prompt(res.prompt_uri)
    assert prompt.template == [{"role": "system", "content": "Answer with one JSON object."},
                               {"role": "user", "content": "{{text}}"}]
    assert prompt.tags["task"] == "json" and prompt.tags["registered_model"] == NAME
    # Linked to the registered version's own logged model (MLflow's tag on the model).
    persisted_id = res.persisted_model_uri.removeprefix("models:/")
    linked = json.loads(client.get_logged_model(persisted_id).tags["mlflow.linkedPrompts"])
    assert linked == [{"name": "prompt-registry-test.prompt", "version": "1"}]
    served, rendered = _served_tokens(res.registered_uri, SENTENCE)
    assert served == rendered and len(served) > 10


def test_one_prompt_version_per_distinct_template_and_the_e2e_prompt_carries_its_instruction(
        tracking, tiny_model_dir, snap, tmp_path):
    import mlflow

    from lora_pipeline.task import e2e
    from lora_pipeline.task.tasks import task_spec

    first = par.run(par.Args(model_uri=make_candidate(tmp_path, tiny_model_dir, snap, seed=1,
                                                      metrics=GOOD).uri, registered_name=NAME))
    better = dict(GOOD, slot_f1=0.9)
    same = par.run(par.Args(model_uri=make_candidate(tmp_path, tiny_model_dir, snap, seed=2,
                                                     metrics=better).uri, registered_name=NAME))
    assert (first.version, same.version) == ("1", "2")
    assert first.prompt_uri == same.prompt_uri == "prompts:/prompt-registry-test.prompt/1"
    template = mlflow.MlflowClient().load_prompt(first.prompt_uri).template
    assert template == [{"role": "system", "content": e2e.SYSTEM_PROMPT},
                        {"role": "user", "content": e2e.INSTRUCTION + "{{text}}"}]
    served, rendered = _served_tokens(first.registered_uri, SENTENCE)
    assert served == rendered
    other = make_candidate(tmp_path, tiny_model_dir, snap, seed=3, metrics=dict(GOOD, slot_f1=0.95),
                           task_spec=task_spec("e2e", "Write the meaning representation."))
    changed = par.run(par.Args(model_uri=other.uri, registered_name=NAME))
    assert changed.prompt_uri == "prompts:/prompt-registry-test.prompt/2"
    # Rerunning on a registered source reuses its version and its prompt: nothing new in the registry.
    again = par.run(par.Args(model_uri=other.uri, registered_name=NAME))
    assert again.reused_version and again.prompt_uri == changed.prompt_uri
    assert mlflow.MlflowClient().load_prompt("prompts:/prompt-registry-test.prompt@latest").version == 2


def test_a_prompt_registry_that_refuses_leaves_the_registration_and_says_why(
        tracking, tiny_model_dir, snap, tmp_path, monkeypatch, caplog):
    import mlflow
    from mlflow.exceptions import MlflowException

    def refuse(self, *a, **kw):
        raise MlflowException("prompt registry is not supported by this store")

    monkeypatch.setattr(mlflow.MlflowClient, "register_prompt", refuse)
    cand = make_candidate(tmp_path, tiny_model_dir, snap, metrics=GOOD)
    res = par.run(par.Args(model_uri=cand.uri, registered_name=NAME))
    assert res.prompt_uri == "" and res.alias == "champion"
    tags = mlflow.MlflowClient().get_model_version(NAME, res.version).tags
    assert prompts.PROMPT_URI_TAG not in tags
    assert tags[prompts.PROMPT_ERROR_TAG] == "MlflowException: prompt registry is not supported by this store"
    assert "the model still carries it in task.json" in caplog.text


def test_prompt_names_follow_mlflow_rule():
    assert prompts.prompt_name("e2e-extractor") == "e2e-extractor.prompt"
    assert prompts.prompt_name("my model/v2 é") == "my-model-v2--.prompt"
