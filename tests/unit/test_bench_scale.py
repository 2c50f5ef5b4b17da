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
    assert "5.0 GB and a 1.0 GB" in got[0]["figure"] and "medians of 3" in got[0]["figure"]
    assert got[0]["measured"].startswith("0.40 (400 vs 1000 MB/s); peak RSS ")
    assert got[1]["measured"].startswith("0.80 (800 vs 1000 MB/s)")


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
