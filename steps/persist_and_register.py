"""`persist_and_register`: make a reference-only model self-contained, register it, gate its promotion.

Input: `model_uri` = `models:/<model_id>` of an E2E extractor that only refers to its base (what
log_reference logged and evaluate_checkpoint scored). The step
  1. persists: logs a NEW model (`e2e-extractor-persisted`) in this run holding the source model's
     files (adapter, base_reference.json, code, environment) plus `base/` = the pinned base files,
     streamed file by file and verified against the manifest's sha256 (lora_pipeline/registry/:
     copy.py, persist.py). The new model is PENDING while it is written and READY only once every
     file is verified; the source model is never modified. Base + adapter, not merged weights: see
     the README ("Why base + adapter"). Once persisted, the model loads with the Hub unreachable and
     the snapshot run gone; a persist interrupted before is recovered (registry/recovery.py);
  2. registers the READY model (`mlflow.register_model`) with its lineage as version tags;
  3. gates (registry/gate.py): the version gets alias `challenger`, and `champion` only if its
     evaluation metric (`gate_metric`, on the source model, written by evaluate_checkpoint) beats
     the current champion's by at least `gate_margin` and beats the base model's. `dry_run`
     reports the decision and changes nothing in the registry;
  4. puts the model's prompt (its task.json as a chat template) in MLflow's prompt registry, linked to
     the version's model and named by the version tag `prompt_uri` (registry/prompts.py).
Idempotent: a version already registered for the same source model is reused (no second version),
and a persist interrupted before (PENDING or FAILED leftovers) is discarded and redone.
Every input is checked before anything changes: a bad input leaves the registry as it was.
Output tags: `registered` = models:/<name>/<version>, `alias`, `decision`, `persisted_model`.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from lora_pipeline import artifacts
from lora_pipeline.cli import param, run_cli
from lora_pipeline.errors import Problems, StepError, one_line

log = logging.getLogger(__name__)

ENTRY_POINT = "persist_and_register"

# A registered name ends up in `models:/<name>@<alias>` and `models:/<name>/<version>` URIs and, in
# file stores, in paths: MLflow rejects '/', ':' and (file store) '%' and names that are not their
# own normalised path; '@' would make `models:/<name>@champion` ambiguous; quotes and backticks
# would break the registry search filters this step (and others) build from the name.
_BAD_NAME_CHARS = ("/", ":", "%", "@", "\\", "'", '"', "`")
_MODEL_ID_LIKE = re.compile(r"^m-[0-9a-f]{32}$")
_METRIC_NAME = re.compile(r"^[\w./\- ]+$")


@dataclass
class Args:
    model_uri: str = param("", "model to persist and register: models:/<model_id> printed by "
                           "log_reference or evaluate_checkpoint (an E2E extractor that refers to its "
                           "base and was evaluated)")
    registered_name: str = param(artifacts.DEFAULT_REGISTERED_NAME, "registered model name in the MLflow "
                                 "Model Registry")
    gate_metric: str = param("", "evaluation metric the promotion gate compares, as "
                             "evaluate_checkpoint logged it on the model (base_<metric> is the base "
                             "model's); empty: the primary metric of the model's task (e2e: slot_f1, "
                             "json: field_f1, text: rouge_l); higher is better except unparsable_rate, "
                             "eval_loss, perplexity")
    gate_margin: float = param(0.01, "the new version becomes champion only if its gate_metric "
                               "beats the current champion's by at least this much (and beats the "
                               "base model)")
    dry_run: bool = param(False, "report the gate decision only (in the run and the output): "
                          "persist nothing, register nothing, move no alias")


@dataclass
class Result:
    run_id: str
    registered_name: str
    version: str  # "" in dry_run
    registered_uri: str  # models:/<name>/<version>, "" in dry_run
    alias: str  # champion | challenger ("" in dry_run)
    decision: str
    reason: str
    gate_metric: str
    candidate_value: float
    base_value: float
    champion_version: str
    champion_value: float | None
    dry_run: bool
    reused_version: bool
    source_model_uri: str
    persisted_model_uri: str
    persisted_bytes: int
    persist_seconds: float
    lineage: dict[str, str] = field(default_factory=dict)
    # prompts:/<name>/<version> in MLflow's prompt registry, linked to the version ("" without one)
    prompt_uri: str = ""


# --- validation --------------------------------------------------------------------------------
def name_problem(name: str) -> str | None:
    """Why `name` cannot be a registered model name, or None."""
    import posixpath

    if not name or not name.strip():
        return "is empty"
    if name != name.strip():
        return "has leading or trailing whitespace"
    bad = [c for c in _BAD_NAME_CHARS if c in name]
    if bad:
        return f"contains {', '.join(repr(c) for c in bad)}"
    if posixpath.normpath(name) != name or name in (".", ".."):
        return "is not a plain name (it resolves to another path)"
    if _MODEL_ID_LIKE.match(name):
        return "looks like a logged model id (models:/m-... would be ambiguous)"
    if len(name) > 256:
        return "is longer than 256 characters"
    return None


def validate_static(args: Args) -> Problems:
    problems = Problems()
    if not args.model_uri:
        problems.add("model_uri", args.model_uri, "is required",
                     "pass the models:/<model_id> URI that log_reference (or evaluate_checkpoint) printed")
    elif artifacts.parse_model_id_uri(args.model_uri) is None:
        problems.add("model_uri", args.model_uri, "is not a logged model URI models:/<model_id>",
                     "pass the models:/m-... URI that log_reference (or evaluate_checkpoint) printed")
    why = name_problem(args.registered_name)
    if why:
        problems.add("registered_name", args.registered_name, why,
                     "use letters, digits, '-', '_', '.' and spaces, e.g. e2e-extractor")
    problems.require(not args.gate_metric or bool(_METRIC_NAME.match(args.gate_metric)),
                     "gate_metric", args.gate_metric, "is not a metric name",
                     "pass a metric evaluate_checkpoint logs, e.g. slot_f1 or exact_match")
    if not math.isfinite(args.gate_margin) or args.gate_margin < 0:
        problems.add("gate_margin", args.gate_margin, "must be a finite number >= 0",
                     "pass e.g. 0.01 (one F1 point)")
    return problems


# --- the step ---------------------------------------------------------------------------------------
def run(args: Args) -> Result:
    import mlflow
    from mlflow.exceptions import MlflowException

    from lora_pipeline.cli import configure_tracking
    from lora_pipeline.registry import copy, prompts, versions
    from lora_pipeline.registry.candidate import read_candidate, require_gate_metrics
    from lora_pipeline.registry.lineage_tags import lineage_tags, version_tags
    from lora_pipeline.tracking.runs import step_run

    # Everything is checked before the run starts: a bad input leaves no run and no registry change.
    validate_static(args).raise_if_any()
    configure_tracking()
    client = mlflow.MlflowClient()
    versions.check_registry(client)
    candidate = read_candidate(client, args.model_uri)
    gate_metric = args.gate_metric or candidate.primary_metric
    require_gate_metrics(candidate, gate_metric, args.model_uri)
    name = args.registered_name
    existing = versions.registered_version_for(client, name, candidate.model_id)

    def decide(own_version: str | None):
        return versions.decide_now(client, name, gate_metric, args.gate_margin, candidate.metrics,
                                   own_version)

    decision = decide(str(existing.version) if existing else None)
    lineage = lineage_tags(client, candidate)
    log.info("gate: %s (%s)", decision.decision, decision.reason)

    with step_run(ENTRY_POINT, args) as active:
        run_id = active.info.run_id
        mlflow.set_tags(lineage)
        result = Result(run_id=run_id, registered_name=name, version="", registered_uri="", alias="",
                        decision=decision.decision, reason=decision.reason, gate_metric=decision.metric,
                        candidate_value=decision.candidate, base_value=decision.base,
                        champion_version=decision.champion_version, champion_value=decision.champion,
                        dry_run=args.dry_run, reused_version=existing is not None,
                        source_model_uri=candidate.uri, persisted_model_uri="",
                        persisted_bytes=0, persist_seconds=0.0, lineage=lineage)
        if args.dry_run:
            versions.record(decision, dry_run=True)
            artifacts.set_outputs(client, run_id, {"decision": decision.decision})
            log.info("dry run: %s (%s); the registry is unchanged", decision.decision, decision.reason)
            return result

        if existing is not None:
            persisted_id = versions.model_id_of(existing) or ""
            log.info("%s is already registered as %s version %s: reusing it",
                     candidate.uri, name, existing.version)
        else:
            persisted = copy.ensure_persisted(client, candidate, active, lineage)
            persisted_id = persisted.model_id
            result.persisted_bytes, result.persist_seconds = persisted.bytes, persisted.seconds
        persisted_uri = artifacts.model_uri(persisted_id)
        try:
            version = existing or versions.register(persisted_id, name,
                                                    version_tags(candidate, lineage, persisted_id))
            v = str(version.version)
            # Decided again now: the champion may have moved while the base was being copied.
            decision = decide(v)
            versions.record(decision, dry_run=False)
            versions.apply_decision(client, name, v, decision, run_id, new_version=existing is None)
        except MlflowException as err:
            raise StepError(f"registering {persisted_uri} as {name} failed ({type(err).__name__}: "
                            f"{one_line(err)}); the persisted model is kept and verified: rerun "
                            "persist_and_register to finish (it reuses it)") from err
        registered = f"models:/{name}/{v}"
        # The prompt travels in the model (task.json); the registry's copy is for people and tools.
        result.prompt_uri = prompts.link_prompt(client, name, v, persisted_id, candidate.task_spec)
        artifacts.set_outputs(client, run_id, {"decision": decision.decision, "registered": registered,
                                               "alias": decision.alias, "persisted_model": persisted_uri})
        result.version, result.registered_uri, result.alias = v, registered, decision.alias
        result.persisted_model_uri = persisted_uri
        result.decision, result.reason = decision.decision, decision.reason
        result.champion_version, result.champion_value = decision.champion_version, decision.champion
    log.info("registered %s (%s): %s", registered, decision.alias, decision.reason)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(Args, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
