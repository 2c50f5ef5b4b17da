"""A local, offline Hugging Face Hub for tests.

Not a test module: plain functions and context managers that tests (and, later, ``tests/conftest.py``)
import. Nothing here touches the network except 127.0.0.1.

* :func:`make_tiny_llama` writes a tiny random Llama causal LM (safetensors) plus a byte-level BPE tokenizer
  with a chat template, built offline.
* :func:`publish_git_repo` commits a directory to a bare git repository laid out the way olah's
  ``mirrors-path`` expects (``<mirror_root>/models/<org>/<repo>``); :func:`tag_git_repo` and
  :func:`create_git_branch` add refs.
* :class:`LocalHub` / :func:`run_local_hub` run olah (``olah-cli``) on 127.0.0.1 with ``offline = true``, serving
  those repositories through the real Hub HTTP API, so ``huggingface_hub`` / ``transformers`` can be pointed at it.
* :func:`point_hf_hub_at` points an already-imported ``huggingface_hub`` at an endpoint and an HF_HOME (env vars
  for subprocesses, module constants for this process).

olah serves a mirror repository only for explicit revisions: ``/api/models/<repo>/revision/<rev>`` and
``/<repo>/resolve/<rev>/<file>`` read the git repository directly (branch, tag or full SHA, resolved by git on each
request, so a new commit is visible at once; olah caches nothing for mirror repositories). Unmodified olah
answers ``/api/models/<repo>`` without a revision from its offline cache only (401 RepoNotFound for a mirror), and
an unknown revision with 401 RepoNotFound too; :class:`LocalHub` therefore runs olah by default with a thin
"strict errors" layer that answers like huggingface.co (see :class:`LocalHub`). Always pass a revision anyway.

Requires the ``git`` executable (olah reads repositories through GitPython, this module writes them with git).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

# -----------------------------------------------------------------------------------------------------------------
# Tiny model
# -----------------------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BOS_TOKEN = "<s>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, "<|im_start|>"]

_TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to French: hello world. Bonjour le monde.",
    "You are a helpful assistant. Answer the question briefly.",
    "user: how are you? assistant: I am fine, thank you.",
    "Summarize the following text in one sentence.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
]


def _build_tokenizer():
    """A byte-level BPE tokenizer (no unknown tokens) trained on a fixed corpus; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(dir: Path, seed: int = 0) -> Path:
    """Save a tiny random Llama causal LM and its tokenizer into ``dir`` (created); return ``dir``.

    The same ``seed`` gives byte-identical weights; a different seed gives different weights with the same
    architecture and tokenizer. About 0.2 MB in all; float32; tied embeddings.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(torch.float32).eval()
    model.save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    return dir


# -----------------------------------------------------------------------------------------------------------------
# Git repositories in olah's mirror layout
# -----------------------------------------------------------------------------------------------------------------

_GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
    "GIT_TERMINAL_PROMPT": "0",
}


def _git(git_dir: Path, *args: str, env: Mapping[str, str] | None = None, input: str | None = None) -> str:
    full_env = {**os.environ, **_GIT_ENV, **(env or {})}
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY"):
        if env is None or var not in env:
            full_env.pop(var, None)
    proc = subprocess.run(
        ["git", f"--git-dir={git_dir}", *args],
        env=full_env,
        input=input,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


def repo_path(mirror_root: Path, repo_id: str, repo_type: str = "models") -> Path:
    """Where olah looks for ``repo_id``'s git repository under ``mirror_root``."""
    org, sep, name = repo_id.partition("/")
    if not sep or not org or not name or "/" in name:
        raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")
    return Path(mirror_root) / repo_type / org / name


def _ensure_repo(git_dir: Path) -> None:
    if (git_dir / "HEAD").exists():
        return
    git_dir.mkdir(parents=True, exist_ok=True)
    _git(git_dir, "init", "--quiet", "--bare", "--initial-branch=main")


def _resolve(git_dir: Path, rev: str) -> str | None:
    try:
        return _git(git_dir, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except RuntimeError:
        return None


def publish_git_repo(
    mirror_root: Path,
    repo_id: str,
    files_dir: Path,
    branch: str = "main",
    message: str = "publish",
    *,
    parent: str | None = None,
    repo_type: str = "models",
) -> str:
    """Commit the exact contents of ``files_dir`` to ``branch`` of ``repo_id``'s mirror repository; return the SHA.

    The repository is a bare git repository at ``<mirror_root>/<repo_type>/<org>/<name>`` (created on first use).
    The new commit's tree is exactly ``files_dir`` (files absent from it are absent from the commit). Its parent
    is the current tip of ``branch``; for a new branch, ``parent`` (any revision) or else the tip of ``main``,
    if any. Files are stored as plain git blobs, not LFS.
    """
    files_dir = Path(files_dir)
    if not files_dir.is_dir():
        raise NotADirectoryError(files_dir)
    git_dir = repo_path(mirror_root, repo_id, repo_type)
    _ensure_repo(git_dir)
    with tempfile.TemporaryDirectory(prefix="hubindex-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index"), "GIT_WORK_TREE": str(files_dir)}
        _git(git_dir, f"--work-tree={files_dir}", "add", "--all", "--force", ".", env=env)
        tree = _git(git_dir, "write-tree", env=env)
    tip = _resolve(git_dir, f"refs/heads/{branch}")
    if tip is None:
        tip = _resolve(git_dir, parent) if parent is not None else _resolve(git_dir, "refs/heads/main")
        if parent is not None and tip is None:
            raise ValueError(f"unknown parent revision {parent!r} in {repo_id}")
    parents = ["-p", tip] if tip else []
    sha = _git(git_dir, "commit-tree", tree, *parents, "-m", message)
    _git(git_dir, "update-ref", f"refs/heads/{branch}", sha)
    return sha


def tag_git_repo(
    mirror_root: Path, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "models"
) -> str:
    """Point (lightweight) tag ``tag`` at ``revision``; return the commit SHA."""
    git_dir = repo_path(mirror_root, repo_id, repo_type)
    sha = _resolve(git_dir, revision)
    if sha is None:
        raise ValueError(f"unknown revision {revision!r} in {repo_id}")
    _git(git_dir, "update-ref", f"refs/tags/{tag}", sha)
    return sha


def create_git_branch(
    mirror_root: Path, repo_id: str, branch: str, revision: str = "main", *, repo_type: str = "models"
) -> str:
    """Point branch ``branch`` at ``revision`` (creating or moving it); return the commit SHA."""
    git_dir = repo_path(mirror_root, repo_id, repo_type)
    sha = _resolve(git_dir, revision)
    if sha is None:
        raise ValueError(f"unknown revision {revision!r} in {repo_id}")
    _git(git_dir, "update-ref", f"refs/heads/{branch}", sha)
    return sha


def delete_git_ref(mirror_root: Path, repo_id: str, ref: str, *, repo_type: str = "models") -> None:
    """Delete a full ref such as ``refs/heads/dev`` or ``refs/tags/v1``."""
    _git(repo_path(mirror_root, repo_id, repo_type), "update-ref", "-d", ref)


# -----------------------------------------------------------------------------------------------------------------
# The olah server
# -----------------------------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _olah_command() -> list[str]:
    exe = Path(sys.executable).with_name("olah-cli")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("olah-cli")
    if found:
        return [found]
    return [sys.executable, "-c", "from olah.server import cli; cli()"]


_PROBE_PATH = "/api/models/olah-readiness-probe/none/revision/main"
_STRICT_FLAG = "--strict-hub-errors"


class LocalHubError(RuntimeError):
    pass


class LocalHub:
    """olah serving the git repositories under ``mirror_root`` on ``http://127.0.0.1:<port>``, offline.

    ``start()`` blocks until the server answers (at most ``startup_timeout`` seconds, else raises
    :class:`LocalHubError` with olah's output). ``stop()`` terminates it (then kills it); ``start()`` again
    reuses the same port, so ``endpoint`` stays valid across a stop/start. Also a context manager.

    ``strict_errors`` (default) runs olah with a small ASGI middleware (see :class:`_StrictMirrorErrors`, and
    :func:`_patch_olah_binary_blobs` for an olah bug with small binary files) so that
    mirror repositories fail the way huggingface.co does: an unknown branch/tag/SHA answers 404 ``RevisionNotFound``
    (``RevisionNotFoundError``), a missing file at a valid revision 404 ``EntryNotFound``
    (``RemoteEntryNotFoundError``), and ``/api/models/<repo>`` without a revision describes ``HEAD`` (``main``).
    Plain olah 0.5.4 offline answers 401 ``RepoNotFound`` (``RepositoryNotFoundError``) for the first two, 500 for
    an unknown full SHA, and 401 for the third (and 500 for any non-UTF-8 file of 121-149 bytes);
    ``strict_errors=False`` runs it unmodified.
    Scratch files (config, olah's cache ``repos-path``, logs, output) live in ``work_dir`` (a fresh temporary
    directory unless given), removed on ``close()`` when it was created here.
    """

    def __init__(
        self,
        mirror_root: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        work_dir: Path | None = None,
        startup_timeout: float = 30.0,
        strict_errors: bool = True,
    ) -> None:
        self.strict_errors = strict_errors
        self.mirror_root = Path(mirror_root).resolve()
        self.mirror_root.mkdir(parents=True, exist_ok=True)
        self.host = host
        self._fixed_port = port
        self.port: int = port or free_port(host)
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="olah-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._started_once = False

    # -- paths ---------------------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.work_dir / "olah.toml"

    @property
    def output_path(self) -> Path:
        return self.work_dir / "olah.out"

    def output(self) -> str:
        """olah's stdout and stderr so far (uvicorn's access log included)."""
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def write_config(self) -> Path:
        repos = self.work_dir / "cache"
        repos.mkdir(exist_ok=True)
        text = (
            "[basic]\n"
            f'host = "{self.host}"\n'
            f"port = {self.port}\n"
            f'repos-path = "{repos.as_posix()}"\n'
            f'mirrors-path = ["{self.mirror_root.as_posix()}"]\n'
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "{self.host}:{self.port}"\n'
            f'mirror-lfs-netloc = "{self.host}:{self.port}"\n'
            "metadata-cache-ttl = 0\n"
            "\n"
            "[accessibility]\n"
            "offline = true\n"
        )
        self.config_path.write_text(text)
        return self.config_path

    # -- lifecycle -----------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> str:
        """Start olah (no-op when running); return the endpoint URL.

        The first start may move to another free port if it lost a race for the chosen one; a restart after
        ``stop()`` (or a ``port`` given to the constructor) always uses the same port.
        """
        if self.running:
            return self.endpoint
        can_move = self._fixed_port is None and not self._started_once
        attempts = 3 if can_move else 1
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
            except LocalHubError:
                self._kill()
                if attempt == attempts - 1 or not self._port_in_use():
                    raise
                self.port = free_port(self.host)
            else:
                self._started_once = True
                return self.endpoint
        raise AssertionError("unreachable")

    def _port_in_use(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((self.host, self.port))
            except OSError:
                return True
        return False

    def _spawn_and_wait(self) -> None:
        self.write_config()
        logs = self.work_dir / "logs"
        logs.mkdir(exist_ok=True)
        self._log_file = open(self.output_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env["PYTHONUNBUFFERED"] = "1"
        env["GIT_CONFIG_NOSYSTEM"] = "1"
        env["GIT_CONFIG_GLOBAL"] = os.devnull
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        if self.strict_errors:
            command = [sys.executable, str(Path(__file__).resolve()), _STRICT_FLAG]
        else:
            command = _olah_command()
        self.proc = subprocess.Popen(
            [*command, "--config", str(self.config_path), "--log-path", str(logs)],
            cwd=self.work_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            if self.proc.poll() is not None:
                raise LocalHubError(
                    f"olah exited with code {self.proc.returncode} before answering on {self.endpoint}:\n"
                    f"{self.output()[-4000:]}"
                )
            if self._answers(opener):
                return
            if time.monotonic() > deadline:
                raise LocalHubError(
                    f"olah did not answer on {self.endpoint} within {self.startup_timeout:.0f}s:\n"
                    f"{self.output()[-4000:]}"
                )
            time.sleep(0.1)

    def _answers(self, opener) -> bool:
        # olah's "/" page is broken with current starlette (500 + traceback); probe a cheap API route instead:
        # any HTTP answer (here 401 RepoNotFound for a repository that does not exist) means olah is serving.
        request = urllib.request.Request(self.endpoint + _PROBE_PATH, method="HEAD")
        try:
            with opener.open(request, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def _kill(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        """Stop olah (no-op when stopped); the endpoint then refuses connections."""
        self._kill()

    def close(self) -> None:
        self.stop()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> LocalHub:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # last resort: never leak a server process
        try:
            self._kill(timeout=2)
        except Exception:
            pass


@contextlib.contextmanager
def run_local_hub(mirror_root: Path, **kwargs) -> Iterator[str]:
    """Run a :class:`LocalHub` over ``mirror_root`` for the ``with`` block; yield its endpoint URL."""
    with LocalHub(mirror_root, **kwargs) as hub:
        yield hub.endpoint


# -----------------------------------------------------------------------------------------------------------------
# Pointing huggingface_hub at the local Hub
# -----------------------------------------------------------------------------------------------------------------


def hf_env(endpoint: str, hf_home: Path) -> dict[str, str]:
    """Environment variables that point a *new* process's huggingface_hub/transformers at ``endpoint``."""
    hf_home = Path(hf_home)
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def point_hf_hub_at(monkeypatch, endpoint: str, hf_home: Path) -> None:
    """Point huggingface_hub at ``endpoint`` with cache under ``hf_home``, in this process and in subprocesses.

    huggingface_hub reads ``HF_ENDPOINT``/``HF_HOME`` once, at import, into ``huggingface_hub.constants``; setting
    the environment afterwards only reaches subprocesses. So this sets the environment (via ``monkeypatch``) and
    patches the constants that are read at call time (``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``,
    ``HF_HOME``, ``HF_HUB_CACHE``, ...), plus the endpoint of the module-level ``HfApi`` behind
    ``huggingface_hub.model_info`` & co. (bound at import). An ``HfApi`` created earlier keeps its endpoint.
    Passing ``endpoint=`` explicitly to ``HfApi``/``snapshot_download``/``hf_hub_download`` needs none of this.
    """
    from huggingface_hub import constants, hf_api

    for key, value in hf_env(endpoint, hf_home).items():
        monkeypatch.setenv(key, value)
    hf_home = Path(hf_home)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(hf_home / "assets"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    if hasattr(constants, "HF_HUB_DISABLE_XET"):
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    if hasattr(constants, "HF_TOKEN_PATH"):
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    if hasattr(constants, "HF_STORED_TOKENS_PATH"):
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    if hasattr(constants, "HF_XET_CACHE"):
        monkeypatch.setattr(constants, "HF_XET_CACHE", str(hf_home / "xet"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)


# -----------------------------------------------------------------------------------------------------------------
# Strict errors: runs inside the olah process (``python tests/hubserver.py --strict-hub-errors <olah args>``)
# -----------------------------------------------------------------------------------------------------------------

_REPO_TYPES = ("models", "datasets", "spaces")
_REVISION_ROUTES = ("revision", "tree", "paths-info", "commits")


class _StrictMirrorErrors:
    """ASGI middleware in front of olah: Hub-like errors for repositories that have a local git mirror.

    Only requests for a repository present under olah's ``mirrors-path`` are looked at; everything else (and
    every request whose revision and file exist) goes to olah untouched.
    """

    def __init__(self, app, get_mirror_paths) -> None:
        self.app = app
        self.get_mirror_paths = get_mirror_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD", "POST"):
            try:
                action = self._check(scope)
            except Exception:  # never break olah because of this layer
                action = None
            if isinstance(action, dict):
                scope = action
            elif action is not None:
                status, code, message = action
                await _send_error(send, status, code, message, head=scope["method"] == "HEAD")
                return
        await self.app(scope, receive, send)

    def _mirror(self, repo_type: str, org: str, repo: str):
        import git

        for root in self.get_mirror_paths():
            path = os.path.join(root, repo_type, org, repo)
            if os.path.exists(path):
                try:
                    return git.Repo(path)
                except Exception:
                    continue
        return None

    @staticmethod
    def _commit(repo, revision: str):
        try:
            commit = repo.commit(revision)
            _ = commit.tree  # forces the lookup: an unknown full SHA only fails here
            return commit
        except Exception:
            return None

    def _check(self, scope):
        from urllib.parse import unquote

        raw = scope.get("raw_path") or scope["path"].encode()
        raw = raw.split(b"?", 1)[0].decode("latin-1")
        parts = [unquote(p) for p in raw.strip("/").split("/")]
        # /api/{type}/{org}/{repo}[/{route}/{rev}/...]
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in _REPO_TYPES:
            repo_type, org, name = parts[1], parts[2], parts[3]
            if len(parts) == 4 and scope["method"] in ("GET", "HEAD"):
                if self._mirror(repo_type, org, name) is None:
                    return None
                new_path = f"/api/{repo_type}/{org}/{name}/revision/HEAD"
                return {**scope, "path": new_path, "raw_path": new_path.encode()}
            if len(parts) >= 6 and parts[4] in _REVISION_ROUTES:
                repo = self._mirror(repo_type, org, name)
                if repo is not None and self._commit(repo, parts[5]) is None:
                    return 404, "RevisionNotFound", f"Invalid rev id: {parts[5]}"
            return None
        # /[{type}/]{org}/{repo}/resolve/{rev}/{path...}
        if parts and parts[0] in _REPO_TYPES:
            repo_type, parts = parts[0], parts[1:]
        else:
            repo_type = "models"
        if len(parts) >= 5 and parts[2] == "resolve" and scope["method"] in ("GET", "HEAD"):
            org, name, revision, file_path = parts[0], parts[1], parts[3], "/".join(parts[4:])
            repo = self._mirror(repo_type, org, name)
            if repo is None:
                return None
            commit = self._commit(repo, revision)
            if commit is None:
                return 404, "RevisionNotFound", f"Invalid rev id: {revision}"
            try:
                entry = commit.tree / file_path
            except KeyError:
                entry = None
            if entry is None or entry.type != "blob":
                return 404, "EntryNotFound", f'{file_path} does not exist on "{revision}"'
        return None


async def _send_error(send, status: int, code: str, message: str, head: bool = False) -> None:
    import json

    body = b"" if head else json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-error-code", code.encode()),
        (b"x-error-message", message.encode("latin-1", "replace")),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _LenientBytes(bytes):
    """Blob bytes whose ``decode()`` never raises (invalid UTF-8 is replaced)."""

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes.decode(self, encoding, "replace")


class _LenientStream:
    def __init__(self, stream) -> None:
        self._stream = stream

    def read(self, *args):
        return _LenientBytes(self._stream.read(*args))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _patch_olah_binary_blobs() -> None:
    """olah 0.5.4 sniffs every blob of 121-149 bytes for a git-lfs pointer with ``.decode("utf-8")``, so such a
    blob that is not UTF-8 answers 500 (resolve, tree listing, paths-info). Make that sniff lenient: the pointer
    regex then simply does not match and the blob is served as the plain file it is."""
    from git.objects.base import Object

    original = Object.data_stream

    @property
    def data_stream(self):
        return _LenientStream(original.fget(self))

    Object.data_stream = data_stream


def _serve_strict(olah_args: list[str]) -> None:
    from olah import server

    _patch_olah_binary_blobs()
    app = server.app
    app.add_middleware(
        _StrictMirrorErrors, get_mirror_paths=lambda: app.state.app_settings.config.mirrors_path
    )
    sys.argv = ["olah-cli", *olah_args]
    server.cli()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == _STRICT_FLAG:
        _serve_strict(sys.argv[2:])
    else:
        sys.exit(f"usage: python {sys.argv[0]} {_STRICT_FLAG} --config OLAH_TOML [olah-cli options]")
