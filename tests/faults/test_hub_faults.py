"""The local Hub stopped, or answering 5xx, or cutting a download short, during download_snapshot.

What must hold: bounded retries with exponential backoff, then one clear line (exit code 2: the input
`model` cannot be fetched right now); no FINISHED run and no manifest in the store; a partial file
never described by a manifest; and once the Hub is back, the same call succeeds with the right digests.
The Hub is a real olah server behind a fault-injecting proxy (faults/hubproxy.py): no mocks.
"""

from __future__ import annotations

import time

import pytest

from faults.conftest import REPO
from lora_pipeline import artifacts
from lora_pipeline.base.manifest import load_manifest, sha256_file
from lora_pipeline.errors import InputError
from steps import download_snapshot as ds

from conftest import runs_with_status

pytestmark = pytest.mark.faults

UNREACHABLE = (r"^model='tiny-org/tiny-llama': Hub at http://127\.0\.0\.1:\d+ unreachable: {what} failed "
               r"{n} times \(.*\); fix: check the network and HF_ENDPOINT")


def _manifests(client) -> list[str]:
    """Every manifest artifact in the store, whatever the run's status."""
    found = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            names = [a.path for a in client.list_artifacts(run.info.run_id, artifacts.SNAPSHOT_DIR)]
            found += [n for n in names if n == artifacts.MANIFEST_PATH]
    return found


def _assert_nothing_recorded(client) -> None:
    assert runs_with_status(client, "FINISHED") == []
    assert _manifests(client) == []


def _assert_pins_tiny_model(client, result, proxy, tiny_model_dir) -> None:
    m = load_manifest(result.manifest_uri)
    assert m.commit == proxy.sha
    expected = {p.name: sha256_file(p) for p in tiny_model_dir.iterdir() if p.is_file()}
    assert {f.path: f.sha256 for f in m.files} == expected
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_hub_answering_503_retries_with_backoff_then_fails_clearly(tracking, faulty_hub, tiny_model_dir):
    faulty_hub.fail_matching("/", 503)  # every request
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=UNREACHABLE.format(what=r"model_info\(tiny-org/tiny-llama@main\)",
                                                            n=3)) as err:
        ds.run(ds.Args(model=REPO, revision="main", hub_retries=2, hub_backoff_s=0.2))
    elapsed = time.perf_counter() - t0
    assert "HTTP" in str(err.value) or "503" in str(err.value)
    # Backoff 0.2 s then 0.4 s: >= 0.6 s waited; bounded (no unbounded inner retry loop).
    assert 0.6 <= elapsed < 60, elapsed
    assert 3 <= faulty_hub.count("fail") <= 3 * 6, faulty_hub.requests
    _assert_nothing_recorded(tracking)

    faulty_hub.heal()
    _assert_pins_tiny_model(tracking, ds.run(ds.Args(model=REPO, revision="main")), faulty_hub, tiny_model_dir)


def test_transient_503_is_retried_and_succeeds(tracking, faulty_hub, tiny_model_dir):
    faulty_hub.fail_first(2, 503)
    res = ds.run(ds.Args(model=REPO, revision="main", hub_retries=4, hub_backoff_s=0.1))
    assert faulty_hub.count("fail") == 2
    _assert_pins_tiny_model(tracking, res, faulty_hub, tiny_model_dir)


def test_file_download_5xx_is_retried_then_fails_clearly(tracking, faulty_hub, tiny_model_dir):
    # Metadata (HEAD) answers; every file body (GET) fails, as a broken CDN / LFS backend would.
    faulty_hub.fail_matching("/resolve/", 502, methods=("GET",))
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=UNREACHABLE.format(what=r"download config\.json", n=3)):
        ds.run(ds.Args(model=REPO, revision="main", hub_retries=2, hub_backoff_s=0.2))
    assert 0.6 <= time.perf_counter() - t0 < 60
    assert faulty_hub.count("fail") == 3  # one GET per attempt: no hidden retry loop underneath
    _assert_nothing_recorded(tracking)
    faulty_hub.heal()
    _assert_pins_tiny_model(tracking, ds.run(ds.Args(model=REPO, revision="main")), faulty_hub, tiny_model_dir)


@pytest.mark.slow  # huggingface_hub retries a failed HEAD 5 times itself (1+2+4+8+8 = 23 s) per attempt
def test_file_metadata_5xx_fails_clearly(tracking, faulty_hub, tiny_model_dir):
    faulty_hub.fail_matching("/resolve/", 503, methods=("HEAD",))
    with pytest.raises(InputError, match=UNREACHABLE.format(what=r"download config\.json", n=1)):
        ds.run(ds.Args(model=REPO, revision="main", hub_retries=0, hub_backoff_s=0.1))
    _assert_nothing_recorded(tracking)
    faulty_hub.heal()
    _assert_pins_tiny_model(tracking, ds.run(ds.Args(model=REPO, revision="main")), faulty_hub, tiny_model_dir)


def test_download_that_never_completes_leaves_no_manifest(tracking, faulty_hub, tiny_model_dir):
    # Every GET of model.safetensors: headers promise N bytes, N/2 arrive, then EOF. huggingface_hub
    # tries to resume 5 times (olah ignores Range and the proxy cuts again), then gives up.
    faulty_hub.truncate_matching("model.safetensors")
    with pytest.raises(InputError, match=UNREACHABLE.format(what=r"snapshot_download\(tiny-org/tiny-llama@\w{12}\)",
                                                            n=2)):
        ds.run(ds.Args(model=REPO, revision="main", hub_retries=1, hub_backoff_s=0.1))
    assert faulty_hub.count("truncate") >= 2
    _assert_nothing_recorded(tracking)
    # The half file left in the HF cache (*.incomplete) must not end up described by the rerun's manifest.
    faulty_hub.heal()
    _assert_pins_tiny_model(tracking, ds.run(ds.Args(model=REPO, revision="main")), faulty_hub, tiny_model_dir)


def test_hub_stopped_mid_download_then_restarted(tracking, faulty_hub, tiny_model_dir):
    hub = faulty_hub.hub
    stopped = []

    def stop_at_first_file(method: str, path: str) -> None:
        if "/resolve/" in path and not stopped:
            stopped.append(path)
            hub.stop()  # olah is gone, and so is the port: connections are refused from now on
            faulty_hub.stop_listening()

    faulty_hub.on_request(stop_at_first_file)
    with pytest.raises(InputError, match=UNREACHABLE.format(what=r"download config\.json", n=1)):
        ds.run(ds.Args(model=REPO, revision="main", hub_retries=0, hub_backoff_s=0.1))
    assert stopped
    _assert_nothing_recorded(tracking)

    faulty_hub.heal()
    hub.start()  # same port
    faulty_hub.start_listening()
    _assert_pins_tiny_model(tracking, ds.run(ds.Args(model=REPO, revision="main")), faulty_hub, tiny_model_dir)
