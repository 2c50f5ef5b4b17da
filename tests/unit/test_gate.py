"""The promotion gate as a pure function: numbers in, decision out (no registry)."""

from __future__ import annotations

import pytest

from lora_pipeline.registry.gate import (
    DECISION_ALREADY,
    DECISION_KEEP,
    DECISION_PROMOTE,
    HIGHER,
    LOWER,
    decide,
    direction_of,
)


def test_first_model_that_beats_its_base_is_promoted():
    d = decide("slot_f1", 0.01, 0.80, 0.30)
    assert (d.decision, d.alias) == (DECISION_PROMOTE, "champion")
    assert d.reason == "no champion yet; slot_f1 0.8000 beats the base model's 0.3000"
    assert (d.champion_version, d.champion) == ("", None)


def test_better_than_the_champion_by_the_margin_is_promoted():
    d = decide("slot_f1", 0.01, 0.85, 0.30, champion_version="3", champion=0.80)
    assert (d.decision, d.alias) == (DECISION_PROMOTE, "champion")
    assert (d.champion_version, d.champion) == ("3", 0.80)
    assert "beats champion v3 (0.8000) by +0.0500 >= margin 0.01" in d.reason


def test_worse_than_the_champion_is_refused():
    d = decide("slot_f1", 0.01, 0.70, 0.30, champion_version="1", champion=0.80)
    assert (d.decision, d.alias) == (DECISION_KEEP, "challenger")
    assert d.reason == "slot_f1 0.7000 vs champion v1 (0.8000): -0.1000 < margin 0.01"


@pytest.mark.parametrize("candidate, decision", [
    (0.805, DECISION_KEEP),  # better by less than the margin
    (0.81, DECISION_PROMOTE),  # better by exactly the margin (0.81 - 0.80 is 0.0100000000000000089)
    (0.8099999, DECISION_KEEP),
])
def test_margin(candidate, decision):
    assert decide("slot_f1", 0.01, candidate, 0.30, champion_version="1", champion=0.80).decision == decision


def test_zero_margin_promotes_a_tie_but_never_a_loss():
    assert decide("slot_f1", 0.0, 0.80, 0.30, champion_version="1", champion=0.80).decision == DECISION_PROMOTE
    assert decide("slot_f1", 0.0, 0.79, 0.30, champion_version="1", champion=0.80).decision == DECISION_KEEP


@pytest.mark.parametrize("candidate, base", [(0.40, 0.45), (0.45, 0.45)])
def test_a_model_that_does_not_beat_its_base_is_never_promoted(candidate, base):
    d = decide("slot_f1", 0.01, candidate, base)  # not even without a champion
    assert d.decision == DECISION_KEEP
    assert d.reason == f"slot_f1 {candidate:.4f} does not beat the base model's {base:.4f}"
    d = decide("slot_f1", 0.01, candidate, base, champion_version="1", champion=0.10)
    assert d.decision == DECISION_KEEP and "does not beat the base model" in d.reason


def test_lower_is_better_metrics():
    assert direction_of("unparsable_rate") == LOWER and direction_of("eval_loss") == LOWER
    assert direction_of("slot_f1") == HIGHER
    d = decide("unparsable_rate", 0.05, 0.10, 0.50, champion_version="1", champion=0.20)
    assert d.decision == DECISION_PROMOTE and "by +0.1000" in d.reason
    d = decide("unparsable_rate", 0.05, 0.20, 0.10)
    assert d.decision == DECISION_KEEP and "does not beat the base model" in d.reason


def test_direction_given_explicitly_overrides_the_metric_name():
    assert decide("slot_f1", 0.0, 0.2, 0.5, direction=LOWER).decision == DECISION_PROMOTE
    assert decide("slot_f1", 0.0, 0.2, 0.5, direction=HIGHER).decision == DECISION_KEEP
    with pytest.raises(ValueError, match="direction must be 'higher' or 'lower', not 'up'"):
        decide("slot_f1", 0.0, 0.2, 0.5, direction="up")


def test_the_champion_itself_stays_champion():
    d = decide("slot_f1", 0.01, 0.50, 0.60, champion_version="2", own_version="2")
    assert (d.decision, d.alias, d.reason) == (DECISION_ALREADY, "champion", "version 2 already is champion")


def test_a_champion_without_its_value_is_a_programming_error():
    with pytest.raises(ValueError, match="champion version 1 needs its slot_f1 value"):
        decide("slot_f1", 0.01, 0.8, 0.3, champion_version="1")


def test_tags_carry_every_number():
    d = decide("slot_f1", 0.01, 0.70, 0.30, champion_version="1", champion=0.80)
    assert d.tags() == {"gate.decision": "keep", "gate.reason": d.reason, "gate.metric": "slot_f1",
                        "gate.margin": "0.01", "gate.candidate": "0.7", "gate.base": "0.3",
                        "gate.champion_version": "1", "gate.champion": "0.8"}
