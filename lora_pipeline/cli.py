"""Thin CLIs over typed step functions.

Every parameter is declared once, as a field of a step's `Args` dataclass (type, default, help).
The argparse parser, the `MLproject` entry point (see `build_tools.mlproject`) and `main`'s pass-through are
all generated from those fields, so they cannot drift apart. Every entry point also takes `config`, a YAML
file of its parameters (lora_pipeline/config.py), merged in `run_cli` before `run` sees the Args.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, get_type_hints

from lora_pipeline.errors import InputError, StepError, one_line

log = logging.getLogger(__name__)

A = TypeVar("A")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def param(default: Any, help: str, **extra: Any) -> Any:
    """A step parameter: `field` with its help text kept in metadata."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def fields_of(args_cls: type) -> list[tuple[dataclasses.Field, type]]:
    hints = get_type_hints(args_cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(args_cls)]


CONFIG_FIELD = "config"
CONFIG_HELP = ("YAML file of this entry point's parameters (e.g. configs/finetune_json_messages.yaml); "
               "command-line values that differ from the defaults win")


@dataclasses.dataclass(frozen=True)
class _ConfigParam:
    # Every entry point takes `config`, added here rather than in each step's Args, so that `main`
    # (whose Args are composed from the steps' ones) has it once and never hands it down to a step.
    config: str = param("", CONFIG_HELP)


def entry_point_fields(args_cls: type) -> list[tuple[dataclasses.Field, type]]:
    """The parameters of the entry point over `args_cls`: its fields, plus `config` (MLproject, argparse)."""
    fields = fields_of(args_cls)
    if CONFIG_FIELD not in {f.name for f, _ in fields}:
        fields += fields_of(_ConfigParam)
    return fields


def args_from_cli(args_cls: type[A], cli_values: dict[str, Any]) -> A:
    """The Args from parsed command-line values merged with the `config` file they name, if any.

    InputError (every problem at once) for an unreadable file, unknown keys or values of the wrong type.
    """
    from lora_pipeline import config  # config imports this module

    values = dict(cli_values)
    own = {f.name for f in dataclasses.fields(args_cls)}
    path = str(values.get(CONFIG_FIELD) or "").strip()
    if CONFIG_FIELD not in own:
        values.pop(CONFIG_FIELD, None)
    config.active_path = path
    if not path:
        return args_cls(**values)
    if CONFIG_FIELD in own:
        return config.args_with_config(args_cls, values)
    config_values = config.load_config(path, args_cls)
    log.info("parameters from %s: %s", path, ", ".join(sorted(config_values)) or "none")
    return config.merge(args_cls, config_values, values)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad value is one line (argparse prints the whole usage text first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; fix: see `--help` for the accepted values\n")


def build_parser(args_cls: type, description: str) -> argparse.ArgumentParser:
    parser = _OneLineParser(description=description, allow_abbrev=False)
    for f, typ in entry_point_fields(args_cls):
        conv = parse_bool if typ is bool else typ
        parser.add_argument(
            f"--{f.name}",
            type=conv,
            default=f.default,
            metavar=typ.__name__.upper(),
            help=f"{f.metadata.get('help', '')} (default: {f.default!r})",
        )
    return parser


def setup_logging() -> None:
    level = os.environ.get("E2E_LORA_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Third-party chatter that buries the step's own messages.
    for noisy in ("urllib3", "filelock", "httpx", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def configure_tracking() -> str:
    """MLflow's embedded SQLite store by default; `MLFLOW_TRACKING_URI` overrides it."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    return uri


def result_to_json(result: Any) -> str:
    payload = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result
    return json.dumps(payload, indent=2, sort_keys=True, default=str)


def run_cli(
    args_cls: type[A],
    run: Callable[[A], Any],
    argv: Sequence[str] | None,
    description: str,
) -> int:
    """Parse, run, and turn user-facing errors into one line each and an exit code."""
    parser = build_parser(args_cls, description)
    ns, unknown = parser.parse_known_args(list(argv) if argv is not None else None)
    if unknown:
        # `mlflow run -P typo=1` appends `--typo 1`: name it and list what the step takes, on one line.
        flags = [a.split("=", 1)[0] for a in unknown if a.startswith("--")] or unknown
        known = ", ".join(f.name for f, _ in entry_point_fields(args_cls))
        print(f"error: unknown parameter(s) {' '.join(flags)}; fix: use one of: {known}", file=sys.stderr)
        return 2
    setup_logging()
    try:
        result = run(args_from_cli(args_cls, vars(ns)))
    except (InputError, StepError) as err:
        for line in err.lines():
            print(f"error: {line}", file=sys.stderr)
        return err.exit_code
    except Exception as err:
        line = tracking_down_line(err)
        if line is None:
            raise  # a bug: keep the traceback
        print(f"error: {line}", file=sys.stderr)
        return 1
    print(result_to_json(result))
    return 0


def tracking_down_line(err: BaseException) -> str | None:
    """One actionable line if `err` means the tracking server stopped answering, else None."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if not uri.startswith(("http://", "https://")):
        return None
    chain, e = [], err
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(f"{type(x).__name__}: {x}" for x in chain)
    markers = ("ConnectionError", "Max retries exceeded", "Connection refused", "API request to",
               "ConnectTimeout", "ReadTimeout", "RemoteDisconnected")
    if not any(m in text for m in markers):
        return None
    short = one_line(err, 160)
    return (f"tracking server {uri} stopped answering ({type(err).__name__}: {short}); what the step "
            "logged before is kept; fix: start the server again and rerun (main reuses finished steps "
            "and resumes finetune from its last checkpoint)")
