"""The project's shape, held by AST walks (as torchtune's tests/test_import_recipes.py guards its recipes).

  * `steps/` holds only entry points (one per MLproject entry point) and `__init__.py`;
  * the core package never imports `steps` (the entry points stand on the core, not the reverse);
  * no step imports another step (`main` has each step's `Args` and `validate_static` loaded by module
    name, through importlib in lora_pipeline.orchestration.compose, to compose its parameters and check
    them all before the first step starts);
  * build-time renderers (`build_tools/`) are not imported by the runtime code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from conftest import ROOT

CORE = ROOT / "lora_pipeline"
STEPS = ROOT / "steps"


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in a file, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def _entry_points() -> set[str]:
    return set(yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"])


def test_steps_holds_only_the_entry_points():
    modules = {p.stem for p in STEPS.glob("*.py")} - {"__init__"}
    assert modules == _entry_points()
    assert not [p for p in STEPS.iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_the_core_never_imports_steps_or_build_tools():
    bad = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p in sorted(CORE.rglob("*.py"))
           for line, mod, _ in _imports(p)
           if mod.split(".")[0] in ("steps", "build_tools")]
    assert not bad, "the core package must not import steps/ or build_tools/:\n" + "\n".join(bad)


def test_no_step_imports_another_step_and_main_reads_only_args():
    steps = {p.stem for p in STEPS.glob("*.py")} - {"__init__"}
    bad = []
    for p in sorted(STEPS.glob("*.py")):
        for line, mod, names in _imports(p):
            targets = ([mod.split(".")[1]] if mod.startswith("steps.") else
                       [n for n in names if n in steps] if mod == "steps" else [])
            for target in targets:
                if target == p.stem:
                    continue
                bad.append(f"steps/{p.name}:{line}: imports step {target}")
    assert not bad, "\n".join(bad)


def test_step_modules_stay_thin():
    """Entry points are Args + validation + run() + main(); the work lives in the core."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in STEPS.glob("*.py")}
    fat = {name: n for name, n in sizes.items() if n > 300}
    assert not fat, f"entry points over 300 lines (move the work into lora_pipeline/): {fat}"


def test_readme_layout_lists_every_module():
    """The README's annotated tree gives one line per module of steps/, the core and build_tools/."""
    readme = (ROOT / "README.md").read_text()
    tree = readme.split("## Layout", 1)[1].split("```", 2)[1]
    names = {line.split()[0] for line in tree.splitlines() if line.strip()}
    modules = sorted(p.relative_to(ROOT) for d in ("steps", "lora_pipeline", "build_tools")
                     for p in (ROOT / d).rglob("*.py") if p.name != "__init__.py")
    missing = [str(m) for m in modules if m.name not in names and str(m) not in names]
    assert not missing, f"README layout tree lacks: {missing}"
