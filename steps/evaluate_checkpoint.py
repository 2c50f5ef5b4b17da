"""`evaluate_checkpoint`: not implemented yet (a later issue builds it)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from steps.cli import param, run_cli
from steps.errors import StepError

ENTRY_POINT = "evaluate_checkpoint"


@dataclass
class Args:
    placeholder: str = param("", "unused until this step is implemented")


def run(args: Args) -> None:
    raise StepError("evaluate_checkpoint is not implemented yet; run download_snapshot for now")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(Args, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
