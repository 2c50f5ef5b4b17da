"""Fixtures of the fault suite (`make test-faults`, `pytest -m faults`)."""

from __future__ import annotations

import pytest


def pytest_configure(config) -> None:
    # Registered here too so the suite runs under --strict-markers before pyproject.toml lists it.
    config.addinivalue_line("markers", "faults: fault-injection tests (make test-faults)")


REPO = "tiny-org/tiny-llama"


@pytest.fixture
def faulty_hub(tmp_path, monkeypatch, tiny_model_dir):
    """The tiny model published on a local olah Hub, reached through a fault-injecting proxy.

    Yields the proxy (`.hub` is the olah server, `.sha` the published commit); huggingface_hub in this
    process and its subprocesses points at the proxy.
    """
    from faults.hubproxy import FaultyProxy

    from hubserver import LocalHub, point_hf_hub_at, publish_git_repo

    mirror = tmp_path / "mirror"
    sha = publish_git_repo(mirror, REPO, tiny_model_dir, message="v1")
    with LocalHub(mirror) as hub, FaultyProxy(hub.endpoint) as proxy:
        point_hf_hub_at(monkeypatch, proxy.endpoint, tmp_path / "hf_home")
        proxy.hub, proxy.sha = hub, sha
        yield proxy
