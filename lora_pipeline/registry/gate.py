"""The promotion gate: a pure decision from numbers (no registry, no MLflow).

A candidate becomes `champion` only if its metric beats the base model's and beats the current
champion's by at least `margin`; otherwise it stays `challenger`. Reading those numbers from the
registry is lora_pipeline/registry/versions.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_pipeline import artifacts
from lora_pipeline.task.base import LOWER_IS_BETTER  # the tasks say which metrics fall (and every `*loss`)

DECISION_PROMOTE = "promote"
DECISION_KEEP = "keep"
DECISION_ALREADY = "already_champion"

HIGHER = "higher"  # higher is better
LOWER = "lower"  # lower is better
# A gain of exactly the margin passes despite float rounding (0.81 - 0.80 = 0.0100000000000000089).
_EPS = 1e-12


@dataclass
class Decision:
    decision: str  # promote | keep | already_champion
    reason: str
    metric: str
    margin: float
    candidate: float
    base: float
    champion_version: str = ""
    champion: float | None = None

    @property
    def alias(self) -> str:
        promoted = self.decision in (DECISION_PROMOTE, DECISION_ALREADY)
        return artifacts.CHAMPION_ALIAS if promoted else artifacts.CHALLENGER_ALIAS

    def tags(self) -> dict[str, str]:
        out = {"decision": self.decision, "reason": self.reason, "metric": self.metric,
               "margin": repr(self.margin), "candidate": repr(self.candidate),
               "base": repr(self.base), "champion_version": self.champion_version,
               "champion": "" if self.champion is None else repr(self.champion)}
        return {artifacts.GATE_PREFIX + k: v for k, v in out.items()}


def direction_of(metric: str) -> str:
    return LOWER if metric in LOWER_IS_BETTER or metric.endswith("loss") else HIGHER


def better(a: float, b: float, direction: str) -> float:
    """How much better a is than b (positive = better) in `direction`."""
    if direction not in (HIGHER, LOWER):
        raise ValueError(f"direction must be {HIGHER!r} or {LOWER!r}, not {direction!r}")
    return (b - a) if direction == LOWER else (a - b)


def decide(metric: str, margin: float, candidate: float, base: float, *,
           champion_version: str | None = None, champion: float | None = None,
           own_version: str | None = None, direction: str | None = None) -> Decision:
    """The gate's decision for a candidate scoring `candidate` (its base: `base`) against the current
    champion (`champion_version` scoring `champion`; None: no champion yet). `own_version`: the
    candidate's registered version, if any. `direction`: HIGHER or LOWER, by default from the metric."""
    direction = direction or direction_of(metric)
    champ = artifacts.CHAMPION_ALIAS
    d = Decision(DECISION_KEEP, "", metric, margin, candidate, base)
    if champion_version is not None:
        d.champion_version, d.champion = str(champion_version), champion
    if champion_version is not None and own_version is not None \
            and str(champion_version) == str(own_version):
        d.decision, d.reason = DECISION_ALREADY, f"version {own_version} already is {champ}"
        return d
    if better(candidate, base, direction) <= 0:
        d.reason = f"{metric} {candidate:.4f} does not beat the base model's {base:.4f}"
        return d
    if champion_version is None:
        d.decision = DECISION_PROMOTE
        d.reason = f"no {champ} yet; {metric} {candidate:.4f} beats the base model's {base:.4f}"
        return d
    if champion is None:
        raise ValueError(f"champion version {champion_version} needs its {metric} value")
    gain = better(candidate, champion, direction)
    if gain + _EPS >= margin:
        d.decision = DECISION_PROMOTE
        d.reason = (f"{metric} {candidate:.4f} beats {champ} v{champion_version} ({champion:.4f}) "
                    f"by {gain:+.4f} >= margin {margin} and the base model ({base:.4f})")
    else:
        d.reason = (f"{metric} {candidate:.4f} vs {champ} v{champion_version} ({champion:.4f}): "
                    f"{gain:+.4f} < margin {margin}")
    return d
