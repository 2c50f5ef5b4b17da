"""Results files of the benchmarks: bench/results/<name>.json with the figures and what they came from
(the command, the pipeline commit, the machine), so a figure in the README can be traced and rerun."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def command(argv: list[str] | None = None) -> str:
    """The command line, with this checkout's paths relative to it and other absolute paths cut to
    their last part (result files name no path of the machine they were made on)."""

    def shorten(path: str) -> str:
        p = Path(path)
        try:
            return str(p.resolve().relative_to(ROOT))
        except ValueError:
            return f"<{p.name}>"

    out = []
    for arg in [Path(sys.executable).name, *(sys.argv if argv is None else argv)]:
        if arg.startswith("/"):
            arg = shorten(arg)
        elif arg.startswith("--") and "=/" in arg:
            name, _, value = arg.partition("=")
            arg = f"{name}={shorten(value)}"
        out.append(arg)
    return shlex.join(out)


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+uncommitted changes" if dirty else "")


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        info["cpu"] = model.group(1).strip() if model else platform.processor()
        info["bf16_matmul"] = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo)))
    except OSError:
        info["cpu"] = platform.processor()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def write(name: str, figures: dict, out: Path | None = None) -> Path:
    """Write bench/results/<name>.json (or `out`): the figures plus command, commit, machine, date."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": command(), "commit": commit(), "machine": machine(),
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
