"""The registered model as persist_and_register sees it: its versions, its aliases, the champion's
numbers, and the gate's decision taken against the registry as it is now."""

from __future__ import annotations

import logging

from lora_pipeline import artifacts
from lora_pipeline.errors import InputError, Problem, StepError, one_line
from lora_pipeline.registry.candidate import latest_metrics
from lora_pipeline.registry.gate import DECISION_PROMOTE, Decision, decide

log = logging.getLogger(__name__)


def check_registry(client) -> None:
    """One cheap call, before anything changes: an unreachable registry is a clear error, not a
    half-done persist."""
    import mlflow

    try:
        client.search_registered_models(max_results=1)
    except Exception as err:  # MLflow wraps connection/HTTP/DB errors in several types
        raise StepError(f"model registry at {mlflow.get_registry_uri()} is unreachable "
                        f"({type(err).__name__}: {one_line(err)}); check MLFLOW_TRACKING_URI / "
                        "MLFLOW_REGISTRY_URI and that the server is up; nothing was changed") from err


def current_champion(client, name: str):
    """The version holding `champion`, or None (no such registered model yet, or no champion)."""
    from mlflow.exceptions import MlflowException

    alias = artifacts.CHAMPION_ALIAS
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise StepError(f"cannot read alias {alias} of {name} ({type(err).__name__}: "
                        f"{one_line(err)})") from err


def model_id_of(mv) -> str | None:
    """The logged model a registered version was made from."""
    return getattr(mv, "model_id", None) or artifacts.parse_model_id_uri(mv.source or "")


def version_metric(client, mv, metric: str) -> float | None:
    """`metric` of a registered version: its `eval.<metric>` tag, else the newest value logged on its
    model; None if neither exists."""
    tag = (mv.tags or {}).get(artifacts.EVAL_PREFIX + metric)
    if tag not in (None, ""):
        return float(tag)
    model_id = model_id_of(mv)
    if model_id:
        try:
            metrics, _ = latest_metrics(client.get_logged_model(model_id))
        except Exception:  # the champion's model is gone: fall through to "unknown"
            return None
        return metrics.get(metric)
    return None


def decide_now(client, name: str, metric: str, margin: float, metrics: dict[str, float],
               own_version: str | None) -> Decision:
    """The gate's decision for a candidate with evaluation `metrics` against the current champion of
    `name`. `own_version`: the candidate's registered version, if it has one already."""
    champion = current_champion(client, name)
    value = None
    if champion is not None and str(champion.version) != str(own_version):
        value = version_metric(client, champion, metric)
        if value is None:
            raise InputError(Problem(
                "gate_metric", metric,
                f"the current {artifacts.CHAMPION_ALIAS} of {name} (version {champion.version}) has "
                f"no {metric} metric to compare with",
                f"evaluate that version, or pick a gate_metric it has (version tags "
                f"{artifacts.EVAL_PREFIX}*)"))
    return decide(metric, margin, metrics[metric], metrics[f"base_{metric}"],
                  champion_version=None if champion is None else str(champion.version),
                  champion=value, own_version=own_version)


def record(decision: Decision, dry_run: bool) -> None:
    """The decision in the active run: its numbers as metrics, all of it as `gate.*` tags."""
    import mlflow

    numbers = {"gate.candidate": decision.candidate, "gate.base": decision.base}
    if decision.champion is not None:
        numbers["gate.champion"] = decision.champion
    mlflow.log_metrics(numbers)
    mlflow.set_tags({**decision.tags(), "gate.dry_run": str(dry_run).lower()})


def registered_version_for(client, name: str, source_id: str):
    """The (oldest) READY version of `name` made from logged model `source_id`, or None."""
    versions = client.search_model_versions(
        f"name = '{name}' and tags.`{artifacts.SOURCE_MODEL_ID_TAG}` = '{source_id}'")
    versions = [v for v in versions if v.status == "READY"]
    return min(versions, key=lambda v: int(v.version)) if versions else None


def register(model_id: str, name: str, tags: dict[str, str]):
    import mlflow

    return mlflow.register_model(artifacts.model_uri(model_id), name, tags=tags)


def apply_decision(client, name: str, version: str, decision: Decision, run_id: str, *,
                   new_version: bool) -> None:
    """The decision on the version (`gate.*` tags) and in the aliases: `challenger` for a version
    that has no alias yet, `champion` when promoted."""
    for key, value in {**decision.tags(), artifacts.GATE_PREFIX + "run_id": run_id}.items():
        client.set_model_version_tag(name, version, key, value)
    # A rerun for an older version must not pull `challenger` back from a newer one; only a
    # version without any alias yet (new, or registered by a run killed before this) gets it.
    # (search_model_versions leaves `aliases` empty: ask for the version itself.)
    if new_version or not client.get_model_version(name, version).aliases:
        client.set_registered_model_alias(name, artifacts.CHALLENGER_ALIAS, version)
    if decision.decision == DECISION_PROMOTE:
        client.set_registered_model_alias(name, artifacts.CHAMPION_ALIAS, version)
        log.info("%s version %s is the new %s", name, version, artifacts.CHAMPION_ALIAS)
