"""Config files: one entry point's parameters in a YAML file, merged with the command line.

    # configs/finetune_json_messages.yaml
    task: json
    dataset: data/json_messages.jsonl
    max_steps: 60

    mlflow run . -e finetune -P config=configs/finetune_json_messages.yaml -P max_steps=100

Precedence: the step's defaults, then the file, then command-line values that differ from the
default. A value equal to the default cannot win over the file: `mlflow run` passes every parameter
of MLproject on the command line, defaults included, so "given" and "left at its default" look the
same there; to set a parameter back to its default while using a file, edit the file.

Keys are the entry point's parameter names; an unknown key is an error naming the nearest valid
name (difflib), and every problem of the file is reported at once (InputError). Values are checked
against the parameter's type; a list is accepted for a comma-separated text parameter
(`target_modules: [q_proj, v_proj]`).

Every entry point takes `config` without declaring it: lora_pipeline/cli.py adds it to the parser and
to MLproject (`entry_point_fields`) and merges the file in `run_cli` (`args_from_cli`). `main` has it
once; its file names `main`'s parameters, and the merged values reach the steps as ordinary parameters
(never the file itself), so each step sees exactly what `main` resolved. An Args that declares its own
`config` field (CONFIG_PARAM) keeps it, through `args_with_config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import sys
from pathlib import Path
from typing import Any, TypeVar

from lora_pipeline import cli
from lora_pipeline.cli import fields_of, param, parse_bool
from lora_pipeline.errors import InputError, Problem, Problems, one_line
from lora_pipeline.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

A = TypeVar("A")

CONFIG_FIELD = cli.CONFIG_FIELD
# The config file of this process's entry point, set by cli.run_cli: run params record it
# (tracking/runs.py) even where the Args have no `config` field.
active_path = ""
CONFIG_PARAM = param("", cli.CONFIG_HELP)


def _entry_point(args_cls: type) -> str:
    module = args_cls.__module__
    if module == "__main__":  # `python -m steps.finetune`: the entry point's name, not __main__
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else module
    return module.rsplit(".", 1)[-1]


def resolve_path(path: str, *, field: str = CONFIG_FIELD) -> Path:
    """The config file: relative paths are tried against the cwd, then the project root."""
    p = Path(path.strip()).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, PROJECT_ROOT / p]
    for cand in candidates:
        if cand.is_file():
            return cand
    where = " or ".join(str(c) for c in candidates)
    raise InputError(Problem(field, path, f"no such file ({where})",
                             "check the path, e.g. configs/finetune_json_messages.yaml"))


_KIND = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _coerce(value: Any, typ: type) -> Any:
    """`value` as a `typ` parameter, or ValueError. YAML already typed it; text is parsed as the CLI would."""
    if value is None:
        raise ValueError("has no value")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return parse_bool(value)
            except argparse.ArgumentTypeError:
                pass
        raise ValueError("must be true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError("must be a whole number")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError("must be a number")
    if isinstance(value, list):
        if all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            return ",".join(str(v) for v in value)
        raise ValueError("must be text or a list of names")
    if isinstance(value, dict):
        raise ValueError("must be text, not a mapping")
    if isinstance(value, bool):
        return str(value).lower()  # as MLproject writes booleans
    return str(value)


def load_config(path: str, args_cls: type, *, field: str = CONFIG_FIELD) -> dict[str, Any]:
    """The parameters a YAML file sets for `args_cls`'s entry point, typed; InputError with every problem."""
    import yaml

    file = resolve_path(path, field=field)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(Problem(field, path, f"is not valid YAML ({one_line(err, 160)})",
                                 "fix the file: one `parameter: value` per line")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(Problem(field, path, f"holds a {type(data).__name__}, not parameter: value lines",
                                 "write one `parameter: value` per line"))
    types = {f.name: typ for f, typ in fields_of(args_cls)}
    entry = _entry_point(args_cls)
    names = sorted(n for n in types if n != field)
    problems = Problems()
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == field:
            problems.add(str(key), value, f"cannot be set in a config file ({path})",
                         "remove it: a config file does not name another")
            continue
        if not isinstance(key, str) or key not in types:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"use one of: {', '.join(names)}"
            problems.add(str(key), value, f"is not a parameter of {entry} (in {path})", hint)
            continue
        try:
            values[key] = _coerce(value, types[key])
        except ValueError as err:
            problems.add(key, value, f"{err} (in {path})",
                         f"write {_KIND[types[key]]}, or remove the line for the default")
    problems.raise_if_any()
    return values


def merge(args_cls: type[A], config_values: dict[str, Any], cli_values: dict[str, Any]) -> A:
    """Defaults < config file < command-line values other than the default."""
    defaults = {f.name: f.default for f in dataclasses.fields(args_cls)}
    given = {k: v for k, v in cli_values.items() if k in defaults and v != defaults[k]}
    for key in sorted(set(given) & set(config_values)):
        if given[key] != config_values[key]:
            log.info("%s=%r from the command line overrides %r from the config file", key, given[key],
                     config_values[key])
    return args_cls(**{**defaults, **config_values, **given})


def args_with_config(args_cls: type[A], cli_values: dict[str, Any], *, field: str = CONFIG_FIELD) -> A:
    """The step's Args from parsed command-line values and, if `field` names a file, that file.

    For lora_pipeline/cli.py:run_cli: `run(args_with_config(args_cls, vars(ns)))`. Args without a
    `field` parameter, or with it empty, are built from the command line alone, as today.
    """
    path = str(cli_values.get(field) or "").strip()
    if not path or field not in {f.name for f in dataclasses.fields(args_cls)}:
        return args_cls(**cli_values)
    config_values = load_config(path, args_cls, field=field)
    log.info("parameters from %s: %s", path, ", ".join(sorted(config_values)) or "none")
    return merge(args_cls, config_values, cli_values)
