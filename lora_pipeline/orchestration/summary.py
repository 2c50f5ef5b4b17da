"""`main`'s summary: one row per step (run id, ran/cached/resumed, wall time, key metric), shown as a
text table and logged to the main run as a table artifact, a text artifact and a few metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lora_pipeline import artifacts
from lora_pipeline.orchestration.compose import StepSpec


@dataclass
class StepRow:
    step: str
    run_id: str
    status: str  # ran | cached | resumed | failed
    wall_s: float
    key_metric: str
    note: str = ""


def key_metric(spec: StepSpec, run, outputs: dict[str, str]) -> str:
    """The one figure that says how a step went: its first `key_metrics` entry the run logged,
    else what it registered or produced."""
    metrics = run.data.metrics if run is not None else {}
    for name in spec.key_metrics:
        if name in metrics:
            value = metrics[name]
            if name.endswith("_bytes"):
                return f"base {value / 1e6:.1f} MB"
            base = metrics.get("base." + name.split(".", 1)[-1]) if name.startswith("candidate.") else None
            return f"{name.split('.', 1)[-1]}={value:.4g}" + (f" (base {base:.4g})" if base is not None else "")
    if "registered" in outputs:
        alias = outputs.get("alias", "")
        decision = outputs.get("decision", "")
        return (outputs["registered"] + (f" @{alias}" if alias else "")
                + (f" ({decision})" if decision else ""))
    if "decision" in outputs:
        return f"decision={outputs['decision']} (nothing registered)"
    for key in ("model", "checkpoint", "manifest"):
        if key in outputs:
            return f"{key}={outputs[key]}"
    return ""


def format_table(rows: Sequence[StepRow]) -> str:
    head = ("step", "run id", "cached", "wall s", "key metric")
    body = [(r.step, r.run_id, r.status, f"{r.wall_s:.1f}", r.key_metric) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def log_summary(client, main_run_id: str, rows: Sequence[StepRow], total_s: float) -> None:
    import mlflow

    table = {"step": [r.step for r in rows], "run_id": [r.run_id for r in rows],
             "cached": [r.status for r in rows], "wall_s": [round(r.wall_s, 2) for r in rows],
             "key_metric": [r.key_metric for r in rows], "note": [r.note for r in rows]}
    mlflow.log_table(table, artifacts.SUMMARY_TABLE_FILE, run_id=main_run_id)
    client.log_text(main_run_id, format_table(rows) + "\n", artifacts.SUMMARY_TEXT_FILE)
    client.log_metric(main_run_id, "pipeline_wall_s", total_s)
    client.log_metric(main_run_id, "steps_cached", sum(r.status == "cached" for r in rows))
    client.log_metric(main_run_id, "steps_run", sum(r.status in ("ran", "resumed") for r in rows))
