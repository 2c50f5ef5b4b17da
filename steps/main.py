"""`main`: run the five steps in order as child runs of one `main` run, reusing unchanged steps.

download_snapshot -> finetune -> log_reference -> evaluate_checkpoint -> persist_and_register, each
started with `mlflow.projects.run` under the same env manager `main` was started with, and wired by the
URIs each step records as `pipeline.output.<key>` tags. Parameters are those of the steps (declared
once, in each step's `Args`; a name two steps share is one parameter passed to both) plus `use_cache`,
`force_steps` and `env_manager`.

Step cache (`lora_pipeline.orchestration.stepcache`): a step whose entry point, parameters (as strings), pipeline code version
and input digests match a FINISHED run with intact outputs is not rerun; its outputs are reused. A
`finetune` that failed after saving a checkpoint is resumed from it (`resume_from`).
Output: the registered model version and alias, and a summary table (printed and logged to this run).

The work lives in `lora_pipeline.orchestration`: `compose` (the steps, their wiring, these parameters),
`pipeline` (the runner and the cache lookups), `summary` (the table).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from lora_pipeline.cli import build_parser, run_cli
from lora_pipeline.errors import Problems
from lora_pipeline.orchestration import compose
from lora_pipeline.orchestration.pipeline import Result, run_pipeline
from lora_pipeline.orchestration.summary import format_table

# --- Args: composed from the steps' Args -------------------------------------------------------

BINDINGS = compose.compose_bindings()
Args = compose.make_args_class(BINDINGS, module=__name__)


# --- validation --------------------------------------------------------------------------------

def parse_force_steps(text: str, problems: Problems, names: Sequence[str] = compose.STEP_NAMES) -> set[str]:
    wanted = {s.strip() for s in (text or "").split(",") if s.strip()}
    if "all" in wanted:
        return set(names)
    unknown = sorted(wanted - set(names))
    problems.require(not unknown, "force_steps", text, f"unknown step(s) {', '.join(unknown)}",
                     f"use 'all' or a comma-separated list of: {', '.join(names)}")
    return wanted & set(names)


def validate(args: Any, specs: Sequence[compose.StepSpec] = compose.PIPELINE,
             bindings: Sequence[compose.Binding] = BINDINGS) -> set[str]:
    """All input problems at once: main's own, and each step's static checks (`validate_static`).
    Returns the steps to rerun even if cached."""
    problems = Problems()
    forced = parse_force_steps(args.force_steps, problems, [s.name for s in specs])
    problems.require(args.env_manager in ("", *compose.ENV_MANAGERS), "env_manager", args.env_manager,
                     "is not an env manager",
                     f"use one of {', '.join(compose.ENV_MANAGERS)} or leave empty")
    problems.items += compose.step_problems(args, specs, bindings)
    problems.raise_if_any()
    return forced


# --- the story ---------------------------------------------------------------------------------

def run(args: Any) -> Result:
    forced = validate(args)
    return run_pipeline(args, forced=forced, bindings=BINDINGS)


def _run_and_print(args: Any) -> Result:
    result = run(args)
    print(format_table(result.steps))
    if result.registered:
        print(f"registered: {result.registered}" + (f"  alias: {result.alias}" if result.alias else
                                                   "  (no alias: the gate did not pass)"))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # An unknown parameter (`mlflow run -e main -P typo=1` appends `--typo 1`) is one line, not
    # argparse's usage dump.
    _, unknown = build_parser(Args, "").parse_known_args(argv)
    flags = [a.split("=", 1)[0] for a in unknown if a.startswith("--")]
    if unknown:
        known = ", ".join(f.name for f in dataclasses.fields(Args))
        print(f"error: unknown parameter(s) {' '.join(flags or unknown)} for entry point main; "
              f"known: {known}", file=sys.stderr)
        return 2
    return run_cli(Args, _run_and_print, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
