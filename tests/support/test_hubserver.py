"""The local Hub (olah over git mirrors) behaves like huggingface.co for the huggingface_hub client."""

from __future__ import annotations

import filecmp
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hubserver import (
    LocalHub,
    LocalHubError,
    create_git_branch,
    hf_env,
    make_tiny_llama,
    point_hf_hub_at,
    publish_git_repo,
    repo_path,
    run_local_hub,
    tag_git_repo,
)

REPO = "tiny/llama"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return make_tiny_llama(root / "seed0", seed=0), make_tiny_llama(root / "seed1", seed=1)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mirror")


@pytest.fixture(scope="module")
def hub(mirror, tmp_path_factory):
    with LocalHub(mirror, work_dir=tmp_path_factory.mktemp("olah")) as hub:
        yield hub


@pytest.fixture
def hf_home(tmp_path, monkeypatch, hub) -> Path:
    home = tmp_path / "hf_home"
    point_hf_hub_at(monkeypatch, hub.endpoint, home)
    return home


def _publish(mirror: Path, repo_id: str, src: Path, **kw) -> str:
    return publish_git_repo(mirror, repo_id, src, **kw)


# ----------------------------------------------------------------------------------------------------------------


def test_tiny_llama_is_small_fast_loadable_and_deterministic(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seed0, seed1 = model_dirs
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        _tree(seed0)
    )
    assert sum(len(b) for b in _tree(seed0).values()) < 1_000_000

    start = time.perf_counter()
    again = make_tiny_llama(tmp_path / "again", seed=0)
    assert time.perf_counter() - start < 2.0
    assert _tree(again) == _tree(seed0)  # same seed: byte-identical
    assert _tree(seed1)["model.safetensors"] != _tree(seed0)["model.safetensors"]

    tok = AutoTokenizer.from_pretrained(seed0)
    assert tok.bos_token and tok.eos_token and tok.pad_token and tok.pad_token != tok.eos_token
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi there, café?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHi there, café?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: no unknown tokens, lossless
    model = AutoModelForCausalLM.from_pretrained(seed0)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2


def test_publish_writes_bare_repo_with_exact_tree(mirror, tmp_path):
    files = tmp_path / "files"
    (files / "sub").mkdir(parents=True)
    (files / "a.txt").write_text("a")
    (files / "sub" / "b.txt").write_text("b")
    first = _publish(mirror, "pub/exact", files)
    (files / "a.txt").unlink()
    second = _publish(mirror, "pub/exact", files, message="drop a")
    git_dir = repo_path(mirror, "pub/exact")
    assert (git_dir / "HEAD").is_file() and not (git_dir / ".git").exists()  # bare
    ls = subprocess.run(
        ["git", f"--git-dir={git_dir}", "ls-tree", "-r", "--name-only", second],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert ls == ["sub/b.txt"]
    parent = subprocess.run(
        ["git", f"--git-dir={git_dir}", "rev-parse", f"{second}^"], capture_output=True, text=True
    ).stdout.strip()
    assert parent == first


def test_model_info_sha_is_the_git_commit(hub, mirror, model_dirs, hf_home):
    import huggingface_hub

    sha = _publish(mirror, REPO, model_dirs[0])
    api = HfApi(endpoint=hub.endpoint)
    info = api.model_info(REPO, revision="main")
    assert info.sha == sha
    assert sorted(s.rfilename for s in info.siblings) == sorted(_tree(model_dirs[0]))
    assert api.model_info(REPO, revision=sha).sha == sha
    # After point_hf_hub_at, the module-level helpers (bound to an HfApi made at import) reach the local Hub too.
    assert huggingface_hub.model_info(REPO, revision="main").sha == sha
    assert HfApi().model_info(REPO, revision="main").sha == sha
    # strict_errors: no revision means HEAD (main), as on huggingface.co.
    assert api.model_info(REPO).sha == sha


def test_snapshot_download_by_branch_and_by_sha_match_published_files(hub, mirror, model_dirs, hf_home):
    sha = _publish(mirror, "snap/model", model_dirs[0])
    by_branch = Path(snapshot_download("snap/model", revision="main", endpoint=hub.endpoint))
    assert by_branch.is_relative_to(hf_home)  # the per-test HF_HOME is used
    assert by_branch.name == sha
    assert _tree(by_branch) == _tree(model_dirs[0])

    fresh_cache = hf_home / "other-cache"
    by_sha = Path(snapshot_download("snap/model", revision=sha, endpoint=hub.endpoint, cache_dir=fresh_cache))
    assert by_sha.is_relative_to(fresh_cache)
    assert _tree(by_sha) == _tree(model_dirs[0])
    for name in _tree(model_dirs[0]):
        assert filecmp.cmp(by_sha / name, model_dirs[0] / name, shallow=False)

    # No endpoint argument: the patched constants route it to the local Hub.
    single = hf_hub_download("snap/model", "config.json", revision=sha)
    assert Path(single).read_bytes() == (model_dirs[0] / "config.json").read_bytes()


def test_new_commit_moves_branch_old_sha_still_served(hub, mirror, model_dirs, hf_home, tmp_path):
    api = HfApi(endpoint=hub.endpoint)
    old = _publish(mirror, "move/model", model_dirs[0], message="v1")
    assert api.model_info("move/model", revision="main").sha == old
    new = _publish(mirror, "move/model", model_dirs[1], message="v2")
    assert new != old
    assert api.model_info("move/model", revision="main").sha == new  # no stale cache in olah
    assert _tree(Path(snapshot_download("move/model", revision="main", endpoint=hub.endpoint))) == _tree(
        model_dirs[1]
    )
    old_dir = Path(
        snapshot_download("move/model", revision=old, endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    )
    assert _tree(old_dir) == _tree(model_dirs[0])

    # Tags and other branches.
    assert tag_git_repo(mirror, "move/model", "v1.0", old) == old
    assert api.model_info("move/model", revision="v1.0").sha == old
    assert create_git_branch(mirror, "move/model", "stable", old) == old
    dev = _publish(mirror, "move/model", model_dirs[0], branch="dev", message="on dev")
    refs = api.list_repo_refs("move/model")
    branches = {b.name: b.target_commit for b in refs.branches}
    assert branches == {"main": new, "stable": old, "dev": dev}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0": old}
    assert api.model_info("move/model", revision="dev").sha == dev
    dev_dir = Path(snapshot_download("move/model", revision="dev", endpoint=hub.endpoint))
    assert _tree(dev_dir) == _tree(model_dirs[0])


def test_not_found_errors(hub, mirror, model_dirs, hf_home):
    api = HfApi(endpoint=hub.endpoint)
    sha = _publish(mirror, "err/model", model_dirs[0])
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("err/missing", revision="main")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("err/missing", revision="main", endpoint=hub.endpoint)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("err/model", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("err/model", revision="no-such-branch", endpoint=hub.endpoint)
    with pytest.raises(RevisionNotFoundError):  # well-formed but absent SHA
        snapshot_download("err/model", revision="0" * 40, endpoint=hub.endpoint)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("err/model", "config.json", revision="no-such-branch", endpoint=hub.endpoint)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("err/model", "no-such-file.json", revision=sha, endpoint=hub.endpoint)
    assert api.model_info("err/model", revision=sha).sha == sha  # the server is still fine


def test_small_binary_files_are_served(hub, mirror, tmp_path, hf_home):
    """olah 0.5.4 answers 500 for a non-UTF-8 blob of 121-149 bytes (git-lfs pointer sniffing); strict mode fixes it."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "small.bin").write_bytes(bytes([0xFF, 0x00]) * 65)  # 130 bytes, not UTF-8
    (files / "pointer-sized.txt").write_text("x" * 130)
    sha = _publish(mirror, "bin/model", files)
    got = Path(snapshot_download("bin/model", revision=sha, endpoint=hub.endpoint))
    assert _tree(got) == _tree(files)


def test_plain_olah_error_classes(mirror, model_dirs, tmp_path, monkeypatch):
    """Documents unmodified olah 0.5.4 (strict_errors=False): revision errors look like a missing repo."""
    sha = _publish(mirror, "plain/model", model_dirs[0])
    with LocalHub(mirror, strict_errors=False) as plain:
        point_hf_hub_at(monkeypatch, plain.endpoint, tmp_path / "hf_home")
        api = HfApi(endpoint=plain.endpoint)
        assert api.model_info("plain/model", revision="main").sha == sha
        assert _tree(Path(snapshot_download("plain/model", revision=sha))) == _tree(model_dirs[0])
        with pytest.raises(RepositoryNotFoundError) as missing_rev:
            api.model_info("plain/model", revision="no-such-branch")
        assert not isinstance(missing_rev.value, RevisionNotFoundError)
        with pytest.raises(RepositoryNotFoundError):  # no revision: olah offline cannot answer for a mirror
            api.model_info("plain/model")
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("plain/missing", revision="main")


def test_stopped_hub_raises_connection_errors_then_recovers(mirror, model_dirs, tmp_path, monkeypatch):
    sha = _publish(mirror, "stop/model", model_dirs[0])
    hub = LocalHub(mirror)
    try:
        endpoint = hub.start()
        point_hf_hub_at(monkeypatch, endpoint, tmp_path / "hf_home")
        api = HfApi(endpoint=endpoint)
        cached = Path(snapshot_download("stop/model", revision="main"))

        hub.stop()
        assert not hub.running
        with pytest.raises(httpx2.ConnectError):
            api.model_info("stop/model", revision="main")
        # snapshot_download turns the connection error into LocalEntryNotFoundError when nothing is cached ...
        with pytest.raises(LocalEntryNotFoundError) as excinfo:
            snapshot_download("stop/model", revision="main", cache_dir=tmp_path / "empty-cache")
        assert isinstance(excinfo.value.__context__ or excinfo.value.__cause__, httpx2.ConnectError) or (
            "ConnectError" in str(excinfo.value)
        )
        # ... and serves the cache when the snapshot is there (by branch via refs/main, and by SHA).
        assert Path(snapshot_download("stop/model", revision="main")) == cached
        assert Path(snapshot_download("stop/model", revision=sha)) == cached

        assert hub.start() == endpoint  # same port: the endpoint stays valid
        assert api.model_info("stop/model", revision="main").sha == sha
    finally:
        hub.close()
    assert not hub.running


def test_transformers_from_pretrained_through_hub(hub, mirror, model_dirs, hf_home):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha = _publish(mirror, "tf/model", model_dirs[0])
    tok = AutoTokenizer.from_pretrained("tf/model", revision=sha)
    model = AutoModelForCausalLM.from_pretrained("tf/model", revision="main")
    local = AutoModelForCausalLM.from_pretrained(model_dirs[0])
    ours, theirs = model.state_dict(), local.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    assert tok.chat_template and len(tok) == model.config.vocab_size
    assert (hf_home / "hub" / "models--tf--model" / "snapshots" / sha).is_dir()


def test_hf_endpoint_env_reaches_subprocesses_only(hub, mirror, model_dirs, tmp_path, monkeypatch):
    sha = _publish(mirror, "env/model", model_dirs[0])
    before = constants.ENDPOINT
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    assert constants.ENDPOINT == before  # read once, at import

    env = {**os.environ, **hf_env(hub.endpoint, tmp_path / "hf_home")}
    code = (
        "import json, huggingface_hub as h; from huggingface_hub import constants as c;"
        "print(json.dumps([c.ENDPOINT, h.model_info('env/model', revision='main').sha,"
        " h.snapshot_download('env/model', revision='main')]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    endpoint, got_sha, path = json.loads(out.stdout.strip().splitlines()[-1])
    assert (endpoint, got_sha) == (hub.endpoint, sha)
    assert Path(path).is_relative_to(tmp_path / "hf_home")


def test_run_local_hub_context_manager_and_startup_failure(mirror, tmp_path):
    with run_local_hub(mirror) as endpoint:
        assert endpoint.startswith("http://127.0.0.1:")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        hub = LocalHub(mirror, port=port, startup_timeout=30)
        start = time.monotonic()
        with pytest.raises(LocalHubError, match=r"(?i)address already in use|errno 98"):
            hub.start()
        assert time.monotonic() - start < 30
        hub.close()
