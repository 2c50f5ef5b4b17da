"""The snapshot manifest: an immutable, verifiable reference to a base model.

`download_snapshot` writes it; everything that later loads the base (serving, evaluation, persist)
reads it and checks every file's sha256 against it, so a base that changed under a pinned reference
is an error and never a silently different model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_pipeline.errors import StepError, one_line

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# 8 MiB reads: large enough that hashing runs at disk/sha speed (~1 GB/s), small enough that memory
# stays bounded whatever the model size.
CHUNK = 8 * 1024 * 1024

SOURCE_HUB = "hub"
SOURCE_LOCAL = "local"
SOURCE_GGUF = "gguf"
SOURCE_DEFAULT = "default"


@dataclass
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass
class Manifest:
    source: str  # hub | local | gguf | default
    task: str
    architecture: str
    files: list[FileEntry]
    has_chat_template: bool
    repo_id: str = ""  # hub only
    revision: str = ""  # what the user asked for (branch, tag or sha); hub only
    commit: str = ""  # the full commit SHA it resolved to; hub only
    artifact_uri: str = ""  # non-hub: where the pinned copy of the checkpoint lives
    origin: str = ""  # non-hub: the local path or package the checkpoint came from (informational)
    schema: int = SCHEMA_VERSION
    total_bytes: int = field(default=0)

    def __post_init__(self) -> None:
        self.files = [f if isinstance(f, FileEntry) else FileEntry(**f) for f in self.files]
        self.total_bytes = sum(f.size for f in self.files)

    @property
    def is_hub(self) -> bool:
        return self.source == SOURCE_HUB

    def reference(self) -> str:
        """A short human-readable name of the pinned base, for messages and tags."""
        if self.is_hub:
            return f"{self.repo_id}@{self.commit}"
        return self.artifact_uri

    def digest(self) -> str:
        """sha256 of the canonical JSON: identifies the exact base (used in caches and lineage)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("schema") != SCHEMA_VERSION:
            raise StepError(
                f"manifest schema {data.get('schema')!r} is not supported (expected {SCHEMA_VERSION}); "
                "rerun download_snapshot with this version of the pipeline"
            )
        data.pop("total_bytes", None)
        return cls(**data)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe_dir(root: Path, *, skip: tuple[str, ...] = (".git", ".cache")) -> list[FileEntry]:
    """Every regular file under root (sorted), with size and sha256."""
    entries = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] in skip or not p.is_file():
            continue
        entries.append(FileEntry(rel.as_posix(), p.stat().st_size, sha256_file(p)))
    return entries


def verify_dir(root: Path, manifest: Manifest) -> None:
    """Raise StepError naming the first file whose bytes differ from the manifest."""
    for entry in manifest.files:
        p = root / entry.path
        if not p.is_file():
            raise StepError(
                f"base file {entry.path} of {manifest.reference()} is missing from {root}; "
                "the pinned base is incomplete: rerun download_snapshot"
            )
        size = p.stat().st_size
        if size != entry.size:
            raise StepError(
                f"digest mismatch for base file {entry.path} of {manifest.reference()}: size {size} "
                f"!= {entry.size} in the manifest; the stored base was modified or is corrupt: "
                "rerun download_snapshot"
            )
        digest = sha256_file(p)
        if digest != entry.sha256:
            raise StepError(
                f"digest mismatch for base file {entry.path} of {manifest.reference()}: sha256 "
                f"{digest[:12]}… != {entry.sha256[:12]}… in the manifest; the stored base was "
                "modified or is corrupt: rerun download_snapshot"
            )
    log.info("verified %d base files (%.1f MB) against the manifest", len(manifest.files),
             manifest.total_bytes / 1e6)


def load_manifest(uri: str) -> Manifest:
    """Read a manifest from its URI (`runs:/...`, any artifact URI, or a local path)."""
    import mlflow

    try:
        if Path(uri).is_file():
            text = Path(uri).read_text()
        else:
            text = mlflow.artifacts.load_text(uri)
    except Exception as err:  # MLflow raises several types for a missing artifact or run
        raise StepError(f"cannot read the snapshot manifest at {uri} ({type(err).__name__}: "
                        f"{one_line(err, 160)}); pass the manifest URI that "
                        "download_snapshot printed") from err
    return Manifest.from_json(text)
