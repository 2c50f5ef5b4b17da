"""`serving.verify_artifacts`: every way a logged adapter can differ from what was recorded."""

import json

import pytest

from lora_pipeline import artifacts
from lora_pipeline.errors import StepError
from lora_pipeline.model.serving import describe_artifacts, verify_artifacts


@pytest.fixture
def logged(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (adapter / "adapter_config.json").write_text("{}")
    digests = tmp_path / artifacts.ARTIFACT_DIGESTS
    recorded = describe_artifacts({artifacts.ADAPTER_ARTIFACT: adapter, "trainer_state": tmp_path})
    assert list(recorded) == [artifacts.ADAPTER_ARTIFACT]  # only weight artifacts are recorded
    assert len(recorded[artifacts.ADAPTER_ARTIFACT]) == 2
    digests.write_text(json.dumps(recorded))
    return {artifacts.ADAPTER_ARTIFACT: adapter, artifacts.ARTIFACT_DIGESTS: digests}


def test_intact_model_passes(logged):
    verify_artifacts(logged)


def test_changed_byte(logged):
    (logged["adapter"] / "adapter_model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    with pytest.raises(StepError, match=r"digest mismatch for adapter file adapter_model\.safetensors "
                                        r"of m: sha256 .* recorded at logging"):
        verify_artifacts(logged, "m")


def test_changed_size(logged):
    (logged["adapter"] / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(StepError, match=r"digest mismatch for adapter file adapter_model\.safetensors "
                                        r"of m: size 10 != 64"):
        verify_artifacts(logged, "m")


def test_missing_file(logged):
    (logged["adapter"] / "adapter_config.json").unlink()
    with pytest.raises(StepError, match=r"adapter file adapter_config\.json of m is missing"):
        verify_artifacts(logged, "m")


def test_missing_artifact(logged):
    del logged["adapter"]
    with pytest.raises(StepError, match=r"m lists artifact 'adapter' in artifact_digests\.json, but it "
                                        r"is missing"):
        verify_artifacts(logged, "m")


def test_model_without_digests_is_loaded_with_a_warning(logged, caplog):
    del logged[artifacts.ARTIFACT_DIGESTS]
    verify_artifacts(logged, "m")
    assert "records no artifact_digests.json" in caplog.text


def test_a_base_alone_has_nothing_to_check_and_no_warning(logged, caplog):
    """evaluate_checkpoint loads the candidate's base alone (no adapter, no digests file): nothing here
    to check (the manifest checks the base's files), so no warning that the model is from an older version."""
    base_only = {k: v for k, v in logged.items() if k not in (artifacts.ARTIFACT_DIGESTS, "adapter")}
    verify_artifacts(base_only, "the base")
    assert "records no" not in caplog.text
