"""`main`'s parameters, composed from the steps' own `Args`, and the steps' static checks.

`PIPELINE` lists the steps in the order `main` runs them and how each is wired: which parameters come
from an upstream step's `pipeline.output.<key>` tags, which ones main hides, what the summary shows.
Every other step parameter is declared once, in the step's `Args`; `compose_bindings` exposes each of
them as a `main` parameter (a name two steps share is one parameter passed to both), and
`make_args_class` adds main's own (`use_cache`, `force_steps`, `env_manager`).

How the core reaches the steps: by module name (`StepSpec.module`, loaded by `step_module` through
importlib), never by an import statement. The dependency stays one way (steps stand on the core; the
core has no import of `steps`, tests/unit/test_layout.py), and nothing is loaded until `main` composes
its parameters. Handing the step modules in from steps/main.py instead would not remove the lookup by
name: a step may not import another step either, so the entry point would need the same importlib
call, plus a modules argument threaded through composition, validation and the runner. A spec naming
its module is plain data, like the entry-point name the runner already launches each step by, and
tests swap in light stand-in steps by pointing `module_name` elsewhere.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from lora_pipeline.cli import fields_of, param
from lora_pipeline.errors import InputError, Problem, Problems, StepError

log = logging.getLogger(__name__)

ENV_MANAGERS = ("local", "virtualenv", "uv", "conda")


@dataclass(frozen=True)
class StepSpec:
    """How `main` runs one step: where its URI inputs come from and what to show for it."""

    name: str
    # parameter -> (step, output key) alternatives, first present wins; never user-facing.
    wiring: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # user-facing parameters filled from an upstream output when the user leaves them empty.
    fill_if_empty: dict[str, tuple[str, str]] = field(default_factory=dict)
    # parameters main neither exposes nor passes (alternative inputs that make no sense in a chain).
    hidden: frozenset[str] = frozenset()
    key_metrics: tuple[str, ...] = ()
    resumable: bool = False
    module_name: str = ""  # default steps.<name>; tests point it at stand-in steps

    @property
    def module(self) -> str:
        return self.module_name or f"steps.{self.name}"


PIPELINE: tuple[StepSpec, ...] = (
    StepSpec("download_snapshot", key_metrics=("snapshot_total_bytes",)),
    StepSpec("finetune",
             wiring={"manifest_uri": (("download_snapshot", "manifest"),)},
             key_metrics=("best_eval_loss", "eval_loss", "train_loss"), resumable=True),
    StepSpec("log_reference",
             wiring={"manifest_uri": (("download_snapshot", "manifest"),),
                     "checkpoint_uri": (("finetune", "checkpoint"),)},
             hidden=frozenset({"full_model_dir"})),
    StepSpec("evaluate_checkpoint",
             wiring={"model_uri": (("log_reference", "model"),)},
             # the held-out split finetune did not train on, unless the user names an eval set
             fill_if_empty={"eval_data": ("finetune", "validation_data")},
             # each task's primary metric (e2e, json, text): the one a run has is shown
             key_metrics=("candidate.slot_f1", "candidate.field_f1", "candidate.rouge_l", "slot_f1")),
    StepSpec("persist_and_register",
             wiring={"model_uri": (("evaluate_checkpoint", "model"), ("log_reference", "model"))}),
)
STEP_NAMES = tuple(s.name for s in PIPELINE)
# Step parameters that are not user settings and change nothing in the result: never exposed, never
# part of the cache key.
CONTROL_PARAMS = frozenset({"resume_from"})


@dataclass(frozen=True)
class Binding:
    """One `main` parameter and the step parameters it is passed to."""

    name: str
    typ: type
    default: Any
    help: str
    targets: tuple[tuple[str, str], ...]  # (step, step parameter)


def step_module(spec: StepSpec) -> ModuleType:
    """The step's entry-point module (its `Args`, and `validate_static` if it has one), by name."""
    return importlib.import_module(spec.module)


def compose_bindings(specs: Sequence[StepSpec] = PIPELINE) -> list[Binding]:
    """Every user-facing parameter of every step, once.

    A name that several steps declare with the same type and default is one parameter passed to all
    of them; if they disagree (a different type or default), the later step's one is exposed as
    `<step>_<name>` so that each step keeps its own default.
    """
    out: dict[str, Binding] = {}
    for spec in specs:
        try:
            step_args = step_module(spec).Args
        except (ImportError, AttributeError) as err:  # a step under construction must not break main
            log.warning("step %s has no Args yet (%s); main exposes none of its parameters", spec.name, err)
            continue
        for f, typ in fields_of(step_args):
            if f.name in spec.wiring or f.name in spec.hidden or f.name in CONTROL_PARAMS:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f.metadata.get("help", "")
            prev = out.get(f.name)
            if prev is None:
                out[f.name] = Binding(f.name, typ, default, f"{spec.name}: {help_text}",
                                      ((spec.name, f.name),))
            elif prev.typ is typ and prev.default == default:
                out[f.name] = dataclasses.replace(prev, help=f"{prev.help} [also {spec.name}]",
                                                  targets=prev.targets + ((spec.name, f.name),))
            else:
                name = f"{spec.name}_{f.name}"
                out[name] = Binding(name, typ, default, f"{spec.name}: {help_text}",
                                    ((spec.name, f.name),))
    return list(out.values())


MAIN_FIELDS = (
    ("use_cache", bool, True, "reuse a FINISHED step run with the same parameters, code and inputs "
     "(false: rerun every step)"),
    ("force_steps", str, "", "comma-separated steps to rerun even if cached (e.g. finetune), or 'all'"),
    ("env_manager", str, "", "env manager of the child steps: local, virtualenv, uv or conda; empty: "
     "the one main was started with (mlflow run --env-manager), else local"),
)


def make_args_class(bindings: Sequence[Binding], module: str | None = None) -> type:
    """main's `Args`: one field per binding, then main's own (`MAIN_FIELDS`); `module` is the
    `__module__` it claims (the entry point that defines it)."""
    spec = [(b.name, b.typ, param(b.default, b.help)) for b in bindings]
    taken = {b.name for b in bindings}
    for name, typ, default, help_text in MAIN_FIELDS:
        if name in taken:  # a step declared it: the step's meaning would silently change
            raise TypeError(f"step parameter {name!r} clashes with main's own parameter; rename it")
        spec.append((name, typ, param(default, help_text)))
    cls = dataclasses.make_dataclass("Args", spec)
    cls.__module__ = module or __name__  # Python 3.11's make_dataclass has no `module=`
    cls.__doc__ = "Parameters of main: the steps' user-facing parameters plus main's own."
    return cls


def step_values(args: Any, spec: StepSpec, bindings: Sequence[Binding]) -> dict[str, Any]:
    """The step's own parameter values taken from main's Args (wiring ones left out)."""
    out = {}
    for b in bindings:
        for step, pname in b.targets:
            if step == spec.name:
                out[pname] = getattr(args, b.name)
    return out


def _problem_field(bindings: Sequence[Binding], step: str, pname: str) -> str:
    return next((b.name for b in bindings if (step, pname) in b.targets), pname)


def step_problems(args: Any, specs: Sequence[StepSpec], bindings: Sequence[Binding]) -> list[Problem]:
    """Each step's static checks (`validate_static`) on the values main would pass it, named by
    main's parameter; problems with a parameter main fills from an upstream step are left out."""
    out: list[Problem] = []
    for spec in specs:
        module = step_module(spec)
        check = getattr(module, "validate_static", None)
        if check is None:
            continue
        values = step_values(args, spec, bindings)
        try:
            step_args = module.Args(**values)
            found = check(step_args)
        except InputError as err:
            found = err.problems
        except TypeError as err:  # the step's Args changed under us: a bug, but say where
            raise StepError(f"main cannot build {spec.name}'s parameters ({err}); regenerate MLproject "
                            "and check steps/main.py's wiring") from err
        items = found.items if isinstance(found, Problems) else list(found or [])
        for p in items:
            if p.field in spec.wiring or p.field in spec.hidden or (
                    p.field in spec.fill_if_empty and not values.get(p.field)):
                continue  # filled by main from an upstream step
            out.append(Problem(_problem_field(bindings, spec.name, p.field), p.value,
                               f"{p.message} ({spec.name})", p.fix))
    return out
