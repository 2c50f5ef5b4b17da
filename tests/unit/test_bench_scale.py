"""bench/bench_scale.py's CPU-side pieces: arguments, the disk check, the per-byte arithmetic, measuring a
child. (The benchmark itself runs by hand: `--size_gb 0.05` as a smoke run, 5 GB for the figures.)"""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_scale as bs  # noqa: E402

MB = 10**6


def test_defaults_and_bad_arguments(capsys):
    a = bs.parse_args([])
    assert (a.size_gb, a.small_gb, a.repeats, a.out) == (5.0, 1.0, 3, bs.DEFAULT_OUT)
    assert bs.parse_args(["--size_gb", "0.05"]).small_gb == pytest.approx(0.01)
    with pytest.raises(SystemExit) as exit_:
        bs.parse_args(["--size_gb", "1", "--small_gb", "2", "--repeats", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--small_gb (2.0) must be below --size_gb (1.0)" in err and "--repeats must be >= 1" in err


def test_the_disk_check_refuses_politely_with_exit_2(tmp_path, monkeypatch, capsys):
    assert bs.disk_needed(5, 1) == 24 * 10**9
    monkeypatch.setattr(bs.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 * 10**9})())
    with pytest.raises(SystemExit) as exit_:
        bs.check_disk(tmp_path / "not" / "yet", bs.disk_needed(5, 1))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bench_scale: not starting: it needs about 24.0 GB free under {tmp_path} ")
    assert "10.0 GB are free" in err and "\n" not in err
    assert bs.check_disk(tmp_path, 5 * 10**9) == 10 * 10**9


def test_main_refuses_before_writing_anything(tmp_path, capsys):
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as exit_:
        bs.main(["--size_gb", "1e7", "--workdir", str(work)])  # 40 PB: no machine has that free
    assert exit_.value.code == 2 and not work.exists()
    assert "bench_scale: not starting" in capsys.readouterr().err


def _rows(op, fixed_s, mb_s, sizes, rss_per_byte=0.0, sync_s=0.0):
    return [{"op": op, "size": label, "repeat": r, "wall_s": fixed_s + b / (mb_s * MB) + r * 0.001,
             "wall_sync_s": fixed_s + b / (mb_s * MB) + sync_s, "peak_rss_bytes": 300 * MB + rss_per_byte * b}
            for label, b in sizes.items() for r in range(3)]


def test_per_byte_rates_come_from_the_difference_so_fixed_costs_cancel():
    sizes = {"big": 5000 * MB, "small": 1000 * MB}
    rows = (_rows("download_snapshot", 9.0, 400, sizes, rss_per_byte=0.01)
            + _rows("persist_and_register", 12.0, 800, sizes) + _rows("cp", 0.01, 1000, sizes))
    got = bs.summarize(rows, sizes)
    pb = got["per_byte"]
    assert pb["download_snapshot"]["rate_mb_s"] == pytest.approx(400, rel=1e-3)
    assert pb["download_snapshot"]["rate_with_sync_vs_cp"] == pytest.approx(0.4, rel=1e-3)
    assert pb["download_snapshot"]["peak_rss_growth_per_byte"] == pytest.approx(0.01)
    assert pb["persist_and_register"]["rate_with_sync_vs_cp"] == pytest.approx(0.8, rel=1e-3)
    assert pb["cp"]["rate_with_sync_vs_cp"] == pytest.approx(1.0)
    assert "log_reference" not in pb  # not measured: left out, not guessed
    assert got["medians"]["cp"]["big"]["wall_s"] == pytest.approx(0.01 + 5.0 + 0.001)


def test_readme_rows_state_each_steps_ratio_and_memory_against_the_goal():
    sizes = {"big": 5000 * MB, "small": 1000 * MB}
    rows = (_rows("download_snapshot", 9.0, 400, sizes, rss_per_byte=0.01)
            + _rows("persist_and_register", 12.0, 800, sizes) + _rows("cp", 0.01, 1000, sizes))
    got = bs.readme_rows(bs.summarize(rows, sizes), sizes, 3)
    assert [r["goal"] for r in got] == [">= 0.8; peak RSS <= 1.1x"] * 2  # log_reference: not measured
    assert got[0]["figure"].startswith("P7 `download_snapshot` per-byte rate with sync")
    assert "5.0 GB and a 1.0 GB" in got[0]["figure"] and "3 repeats, alternated" in got[0]["figure"]
    assert "ratio of medians 0.40 (400 vs 1000 MB/s); peak RSS " in got[0]["measured"]
    assert "ratio of medians 0.80 (800 vs 1000 MB/s)" in got[1]["measured"]


def test_marginal_and_rate_edge_cases():
    assert bs.marginal(2.0, 1.0, 10, 10) is None
    assert bs.rate_mb_s(None) is None and bs.rate_mb_s(-1.0) is None
    assert bs.rate_mb_s(1e-8) == 100.0


def test_last_json_reads_the_result_after_other_output():
    out = 'progress...\n{\n  "a": 1,\n  "b": {\n    "c": 2\n  }\n}\n'
    assert bs.last_json(out) == {"a": 1, "b": {"c": 2}}
    with pytest.raises(ValueError, match="no JSON result"):
        bs.last_json("nothing here")


def test_run_measured_reports_the_childs_own_peak_rss_and_its_failures(tmp_path):
    ballast = bytearray(400 * MB)  # this process is large: a plain fork would count it for the child
    small = bs.run_measured([sys.executable, "-c", "print('{'); print('}')"], {}, tmp_path, 60,
                            tmp_path / "small.log")
    big = bs.run_measured([sys.executable, "-c", "x = bytearray(200_000_000); print('{'); print('}')"],
                          {}, tmp_path, 60, tmp_path / "big.log")
    del ballast
    assert small["peak_rss_bytes"] < 100 * MB < 200 * MB < big["peak_rss_bytes"] < 350 * MB
    assert big["wall_s"] > 0 and bs.last_json(big["stdout"]) == {}
    with pytest.raises(RuntimeError, match=r"(?s)exited 3 after .*boom"):
        bs.run_measured([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"], {},
                        tmp_path, 60, tmp_path / "fail.log")
    with pytest.raises(RuntimeError, match=r"ran past 1s: killed"):
        bs.run_measured([sys.executable, "-c", "import time; time.sleep(30)"], {}, tmp_path, 1,
                        tmp_path / "slow.log")


def test_each_repeat_gives_its_own_ratio_and_a_range_across_the_goal_is_called_noise():
    """A disk that is slow in one repeat slows the step and its cp of that repeat together: the repeat's
    own ratio stays, where the ratio of medians mixes repeats."""
    sizes = {"big": 5000 * MB, "small": 1000 * MB}
    rows = []
    # download_snapshot at half cp's per-byte rate in every repeat; cp's rate 1000, 250, 1000 MB/s.
    for rep, cp_mb_s in enumerate((1000, 250, 1000)):
        for label, b in sizes.items():
            rows.append({"op": "cp", "size": label, "repeat": rep, "wall_sync_s": 0.5 + b / (cp_mb_s * MB)})
            rows.append({"op": "download_snapshot", "size": label, "repeat": rep,
                         "wall_sync_s": 9.0 + b / (cp_mb_s / 2 * MB)})
    got = bs.paired_ratios(rows, sizes)
    assert got["download_snapshot"]["values"] == [0.5, 0.5, 0.5]
    assert (got["download_snapshot"]["median"], got["download_snapshot"]["min"]) == (0.5, 0.5)
    assert set(got) == {"download_snapshot"}  # steps without rows are left out, cp is the baseline
    assert bs.verdict(0.81, 1.4) == "met" and bs.verdict(0.3, 0.79) == "missed"
    assert bs.verdict(0.36, 1.42) == "inside the noise"


def test_readme_rows_quote_the_per_repeat_median_range_and_verdict():
    sizes = {"big": 5000 * MB, "small": 1000 * MB}
    rows = (_rows("download_snapshot", 9.0, 400, sizes) + _rows("log_reference", 9.0, 900, sizes)
            + _rows("cp", 0.01, 1000, sizes))
    got = bs.readme_rows(bs.summarize(rows, sizes), sizes, 3)
    assert got[0]["measured"].startswith("0.40 (range 0.40-0.40 over 3 repeats: missed); ratio of medians 0.40")
    assert got[1]["measured"].startswith("0.90 (range 0.90-0.90 over 3 repeats: met)")
    assert "sources and libraries in the page cache" in got[0]["figure"]
    assert "page cache as left" in bs.readme_rows(bs.summarize(rows, sizes), sizes, 3, "as_is")[0]["figure"]


def test_warm_files_reads_every_file_once(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 3)
    assert bs.warm_files(tmp_path, chunk=4) == 13
    assert bs.source_of("persist_and_register", tmp_path / "ckpt", {"pinned_dir": tmp_path}) == tmp_path
    assert bs.source_of("cp", tmp_path / "ckpt", {"pinned_dir": tmp_path}) == tmp_path / "ckpt"


def test_warm_imports_runs_the_steps_imports_in_a_throwaway_interpreter(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bs.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)))
    bs.warm_imports({"A": "1"}, tmp_path)
    (cmd, kw), = calls
    assert cmd == [sys.executable, "-c", bs.STEP_IMPORTS] and kw["env"] == {"A": "1"} and kw["check"]
    assert "torch" in bs.STEP_IMPORTS and "mlflow" in bs.STEP_IMPORTS
