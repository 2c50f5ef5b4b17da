"""Which pipeline code a run ran: the lineage commit (`pipeline_git_commit`) and the step cache's
`code_version`. One definition of "the checkout's pipeline code changed" serves both.

The pipeline's code is `PIPELINE_PATHS`: what `mlflow run` executes and installs. Tests, benchmarks,
docs, the README and the build-time renderers (`build_tools/`) cannot change what a step produces, so
a commit touching only those keeps the same `code_version` and `main` reuses every step.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from lora_pipeline.paths import PROJECT_ROOT

PIPELINE_PATHS = ("steps", "lora_pipeline", "MLproject", "conda.yaml", "requirements.txt",
                  "requirements-nodeps.txt")
# `MLFLOW_GIT_COMMIT` pins the code version (CI that builds from an exported tree without .git, tests
# that must not see other people's edits); `pipeline_git_commit` honours it too.
CODE_VERSION_ENV = "MLFLOW_GIT_COMMIT"
_SKIP_PARTS = ("__pycache__", ".git")


def _git(root: Path, *argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, check=True,
                          timeout=30).stdout


def _files_digest(root: Path, names: Iterable[str]) -> str:
    from lora_pipeline.base.manifest import sha256_file

    h = hashlib.sha256()
    for name in sorted(set(names)):
        p = root / name
        if p.is_file():
            h.update(name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def _pipeline_files_on_disk(root: Path) -> list[str]:
    out = []
    for name in PIPELINE_PATHS:
        p = root / name
        found = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
        out += [q.relative_to(root).as_posix() for q in found
                if not any(part in _SKIP_PARTS for part in q.relative_to(root).parts)
                and not q.name.endswith(".pyc")]
    return out


def pipeline_changes(root: Path) -> str:
    """`git status` of the pipeline paths (tracked edits and untracked, not ignored, files): '' = clean."""
    return _git(root, "status", "--porcelain", "--untracked-files=all", "--", *PIPELINE_PATHS).strip()


def code_version(root: Path | None = None) -> str:
    """The pipeline's code version, as the step cache compares it: content, not commit.

    Git checkout: `tree-<digest>` of the blob ids of the pipeline paths at HEAD (`git ls-tree`), so a
    commit that touches only README, docs, tests or benchmarks keeps the version. Uncommitted or
    untracked (not ignored) changes to pipeline files: `<that>-dirty-<digest of those files>`, so
    edited code never reuses a run of the committed code, and the same edits hit again. No git:
    `nogit-<digest of the files>`.
    """
    env = os.environ.get(CODE_VERSION_ENV, "").strip()
    if env:
        return env
    root = Path(root or PROJECT_ROOT)
    try:
        tree = _git(root, "ls-tree", "-r", "HEAD", "--", *PIPELINE_PATHS)
        clean = "tree-" + hashlib.sha256(tree.encode()).hexdigest()[:16]
        if not pipeline_changes(root):
            return clean
        names = _git(root, "ls-files", "--cached", "--others", "--exclude-standard", "--",
                     *PIPELINE_PATHS).split("\n")
        return f"{clean}-dirty-{_files_digest(root, [n for n in names if n])[:16]}"
    except (OSError, subprocess.SubprocessError):
        return f"nogit-{_files_digest(root, _pipeline_files_on_disk(root))[:16]}"


def pipeline_git_commit(root: Path | None = None) -> str:
    """The commit the pipeline ran from (lineage): `mlflow run`'s, else HEAD, `-dirty` when the pipeline
    paths have uncommitted changes (the same rule as `code_version`)."""
    env = os.environ.get(CODE_VERSION_ENV)
    if env:
        return env
    root = Path(root or PROJECT_ROOT)
    try:
        head = _git(root, "rev-parse", "HEAD").strip()
        return head + ("-dirty" if pipeline_changes(root) else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
