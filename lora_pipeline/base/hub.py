"""Pinning a Hub base: revision -> commit, checks before the download, bounded retries, sha256 checks.

`HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` are honoured (read at call time). Only
transient failures (connection errors, HTTP 5xx) are retried; a missing repo, revision or file is final.

`args` below is the download_snapshot step's `Args` (model, revision, hub_retries, hub_backoff_s, ...).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lora_pipeline.base.manifest import describe_dir
from lora_pipeline.base.sources import check_architecture, check_files, selected
from lora_pipeline.errors import InputError, Problem, Problems, StepError, one_line

log = logging.getLogger(__name__)
T = TypeVar("T")

FULL_SHA = re.compile(r"^[0-9a-f]{40}$")


def retrying(fn: Callable[[], T], args: Any, endpoint: str, what: str) -> T:
    """Bounded retries with exponential backoff for transient Hub failures only."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    final = (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, EntryNotFoundError)
    attempts = args.hub_retries + 1
    for attempt in range(attempts):
        try:
            return fn()
        except LocalEntryNotFoundError as err:
            # Offline, the file is simply not cached: final. Online, hf_hub_download raises it when
            # the file's metadata request failed (a 5xx or a dropped connection after its own
            # retries) and no cached copy exists: the Hub is the problem, so retry like any 5xx.
            # (Caught before `final`: it subclasses EntryNotFoundError.)
            if offline():
                raise
            last = err
        except final:
            raise
        except HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status is not None and status < 500:
                raise
            last: Exception = err
        except (OSError, *transport_errors()) as err:
            last = err
        if attempt + 1 < attempts:
            delay = args.hub_backoff_s * 2**attempt
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, type(last).__name__,
                        attempt + 1, args.hub_retries, delay)
            time.sleep(delay)
    short = one_line(last, 160)
    raise InputError(Problem("model", args.model,
                             f"Hub at {endpoint} unreachable: {what} failed {attempts} times "
                             f"({type(last).__name__}: {short})",
                             "check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use a "
                             "snapshot already in the HF cache"))


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection/timeout errors of the HTTP clients huggingface_hub may use (httpx2 in 2.x, httpx in 1.x)."""
    import importlib

    found = []
    for mod in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(mod).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def hub_endpoint() -> str:
    # Read at call time: huggingface_hub captures HF_ENDPOINT at import, which tests and users change.
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub(args: Any, problems: Problems) -> tuple[str, Path]:
    """Resolve the revision to a commit, check the repo, download it. Returns (commit, snapshot dir)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = hub_endpoint()
    revision = args.revision or "main"
    if offline():
        try:
            path = Path(snapshot_download(args.model, revision=revision, local_files_only=True))
        except LocalEntryNotFoundError:
            problems.add("revision", revision, f"HF_HUB_OFFLINE is set and {args.model}@{revision} "
                         "is not in the HF cache", "unset HF_HUB_OFFLINE once, or pin a cached revision")
            problems.raise_if_any()
        names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        check_files(names, args, problems, f"{args.model}@{revision} (HF cache)")
        problems.raise_if_any()
        return path.name, path

    api = HfApi(endpoint=endpoint)
    try:
        info = retrying(lambda: api.model_info(args.model, revision=revision, files_metadata=True),
                        args, endpoint, f"model_info({args.model}@{revision})")
    except RevisionNotFoundError:
        problems.add("revision", revision, f"{args.model} has no branch, tag or commit {revision!r} "
                     f"on {endpoint}", "pass an existing branch, tag or full commit SHA")
        problems.raise_if_any()
    except (RepositoryNotFoundError, GatedRepoError) as err:
        problems.add("model", args.model, f"no accessible model repository {args.model!r} on "
                     f"{endpoint} ({type(err).__name__})",
                     "check the repo id (org/name); for a private or gated repo set HF_TOKEN")
        problems.raise_if_any()
    commit = info.sha
    names = [s.rfilename for s in info.siblings or []]
    check_files(names, args, problems, f"{args.model}@{commit[:12]}")
    problems.raise_if_any()

    from huggingface_hub import hf_hub_download

    cfg_path = retrying(lambda: hf_hub_download(args.model, "config.json", revision=commit,
                                                endpoint=endpoint),
                        args, endpoint, "download config.json")
    check_architecture(json.loads(Path(cfg_path).read_text()), args, problems)
    problems.raise_if_any()

    patterns = selected(names, args.allow_pickle)
    path = Path(retrying(lambda: snapshot_download(args.model, revision=commit, allow_patterns=patterns,
                                                   endpoint=endpoint),
                         args, endpoint, f"snapshot_download({args.model}@{commit[:12]})"))
    # The Hub knows the sha256 of every LFS file: a partial or tampered download fails here.
    lfs = {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if getattr(s, "lfs", None)}
    for entry in describe_dir(path):
        if entry.path in lfs and lfs[entry.path] != entry.sha256:
            raise StepError(f"downloaded {entry.path} of {args.model}@{commit} does not match the "
                            "Hub's sha256; delete it from the HF cache and rerun")
    return commit, path
