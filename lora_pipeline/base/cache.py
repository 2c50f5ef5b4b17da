"""The pipeline's local cache (converted GGUF checkpoints, downloaded pinned bases).

`$E2E_LORA_CACHE`, else `$XDG_CACHE_HOME/e2e-lora`, else `~/.cache/e2e-lora`. Entries are keyed by
content digests and written atomically (temp dir + rename), so a crash never leaves a half entry.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("E2E_LORA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "e2e-lora"


def cache_dir(kind: str, key: str) -> Path:
    return cache_root() / kind / key


def publish_dir(tmp: Path, final: Path) -> Path:
    """Atomically move a fully written temp dir into place (another writer may have won: keep theirs)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def temp_dir_beside(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
