"""The registered version's prompt in MLflow's prompt registry (issue #14).

The prompt a model was trained with travels inside the model as `task.json` (task name and system
prompt; the served model builds its turns from it). Here the same turns also go to MLflow's prompt
registry, as a chat template with one variable, `{{text}}` (the user's text), so a team can read,
diff and alias the prompt in MLflow's UI next to the model:

  * prompt `<registered name>.prompt` (registered model names may hold spaces; prompt names may not, so
    anything other than letters, digits, '-', '_' and '.' becomes '-');
  * a new prompt version only when the template differs from the latest one (re-registering the same
    task keeps one version);
  * linked to the registered version's logged model (`MlflowClient.link_prompt_version_to_model`:
    MLflow's `mlflow.linkedPrompts` tag on the model) and named by the version's tag `prompt_uri`.

Checked on mlflow 3.17 with SQLite and PostgreSQL stores (tests/per_step/test_prompt_registry.py).
A store without a prompt registry (MLflow raises) does not fail the registration: the model already
carries its prompt, so the version gets tag `prompt_registry_error` with MLflow's message and a
warning is logged.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

# Not "prompt": PromptVersion.format(prompt=...) clashes with format_prompt's own first argument in
# mlflow 3.17 (TypeError), so the registered prompt could not be formatted with MLflow's API.
PROMPT_VARIABLE = "text"
PROMPT_URI_TAG = "prompt_uri"
PROMPT_ERROR_TAG = "prompt_registry_error"


def prompt_name(registered_name: str) -> str:
    """The prompt registry name of a registered model's prompt (MLflow's rule: letters, digits, '-',
    '_', '.')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", registered_name) + ".prompt"


def prompt_template(task_spec: dict | None) -> list[dict[str, str]]:
    """The turns the model sees before its answer, as a chat template: the task's system prompt (the one
    in task.json) and the user turn as the task shapes it, with `{{text}}` where the user's text goes.
    Formatting it with a text gives the turns the served model builds for that text."""
    from lora_pipeline.task.tasks import task_from_spec

    task, system_prompt = task_from_spec(task_spec)
    return task.prompt_messages("{{" + PROMPT_VARIABLE + "}}", system_prompt)


def link_prompt(client, registered_name: str, version: str, model_id: str, task_spec: dict | None) -> str:
    """Registers (or reuses) the prompt of `task_spec`, links it to `model_id` and tags the registered
    version with its URI; the URI, or "" when the store has no prompt registry (tagged and warned)."""
    from mlflow.exceptions import MlflowException

    from lora_pipeline.errors import one_line

    name = prompt_name(registered_name)
    template = prompt_template(task_spec)
    try:
        latest = client.load_prompt(f"prompts:/{name}@latest", allow_missing=True)
        if latest is None or latest.template != template:
            task = (task_spec or {}).get("task", "e2e")
            latest = client.register_prompt(
                name=name, template=template,
                commit_message=f"prompt of {registered_name} version {version} (task {task})",
                tags={"task": str(task), "registered_model": registered_name})
        client.link_prompt_version_to_model(name=latest.name, version=str(latest.version), model_id=model_id)
        uri = f"prompts:/{latest.name}/{latest.version}"
        client.set_model_version_tag(registered_name, version, PROMPT_URI_TAG, uri)
    except MlflowException as err:
        why = f"{type(err).__name__}: {one_line(err)}"
        log.warning("the prompt registry did not take the prompt of %s version %s (%s); the model "
                    "still carries it in task.json", registered_name, version, why)
        client.set_model_version_tag(registered_name, version, PROMPT_ERROR_TAG, why[:5000])
        return ""
    log.info("prompt %s linked to %s version %s", uri, registered_name, version)
    return uri

