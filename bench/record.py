"""One way for every benchmark to keep its result: `bench/results/<name>.json`.

Each file holds the figures the script measured, the rows it contributes to the README's benchmark table
(text formatted from those figures by the script, never typed by hand), the command that produced it, the
pipeline commit and the machine. `python -m build_tools.bench_table` renders the README table from these
files, and tests/unit/test_bench_table.py holds the two equal.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Taken at import: benchmarks chdir into (and later delete) their work folders.
_SCRIPT = Path(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else None


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _auto_bf16_flags() -> frozenset:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from lora_pipeline.model.device import CPU_BF16_FLAGS

    return CPU_BF16_FLAGS


def machine() -> dict:
    """What the figures were measured on: CPU model and flags that change speed, cores, memory, GPU."""
    info: dict = {"platform": platform.platform(), "python": platform.python_version(),
                  "cores": os.cpu_count(),
                  # Other work on the machine when the result was written (1-minute load average): a
                  # load above the core count means the figures were measured while others ran.
                  "load_avg_1m": round(os.getloadavg()[0], 2)}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "")
        flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
        info["cpu"] = model
        # The model name alone does not tell (a hypervisor may hide AMX): the bf16 flags the CPU shows,
        # and whether `precision=auto` picks bf16 on it (device.CPU_BF16_FLAGS).
        info["cpu_bf16_flags"] = sorted({"avx512_bf16", "amx_bf16"} & set(flags))
        info["bf16_cpu"] = bool(_auto_bf16_flags() & set(flags))
        mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal"))
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def spread(values: Sequence[float]) -> dict:
    """Median and range of repeats: what the README quotes (never a single best run)."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "values": vals}


def fmt_spread(s: dict, digits: int = 3, unit: str = "") -> str:
    return (f"{s['median']:.{digits}f}{unit} (range {s['min']:.{digits}f}-{s['max']:.{digits}f}{unit}, "
            f"n={s['n']})")


def within_noise(ratio: dict, target: float = 1.0) -> bool:
    """A ratio whose range straddles the target is inside the noise and is reported as such."""
    return ratio["min"] <= target <= ratio["max"]


def write(name: str, *, figures: dict, rows: list[dict], argv: Sequence[str] | None = None,
          out: Path | None = None) -> Path:
    """Write bench/results/<name>.json (or `out`, for tests). `rows`: dicts with figure, goal, measured (text
    built from figures)."""
    for row in rows:
        missing = {"figure", "goal", "measured"} - set(row)
        if missing:
            raise ValueError(f"row {row} lacks {sorted(missing)}")
    argv = list(sys.argv if argv is None else argv)
    script = _SCRIPT if _SCRIPT is not None and Path(argv[0]).name == _SCRIPT.name else Path(argv[0])
    try:
        argv[0] = script.relative_to(ROOT).as_posix()
    except ValueError:
        argv[0] = "bench/" + script.name
    # Paths of this machine are named by their last part only (result files name no path of the machine).
    argv = [argv[0]] + [f"<{Path(a).name}>" if a.startswith("/") else
                        a.split("=", 1)[0] + f"=<{Path(a.split('=', 1)[1]).name}>" if a.startswith("--") and "=/" in a
                        else a for a in argv[1:]]
    payload = {"name": name, "command": ".venv/bin/python " + shlex.join(argv), "commit": git_commit(),
               "measured_at": time.strftime("%Y-%m-%d", time.gmtime()), "machine": machine(),
               "figures": figures, "rows": rows}
    out = Path(out) if out is not None else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out.name}")
    return out
