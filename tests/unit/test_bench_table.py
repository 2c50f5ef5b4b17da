"""The README's benchmark table is rendered from bench/results/*.json, and each result says how it was made."""

from __future__ import annotations

import json

import pytest

from build_tools import bench_table

from conftest import ROOT


def test_readme_table_equals_the_rendered_results():
    readme = (ROOT / "README.md").read_text()
    assert bench_table.readme_table(readme) == bench_table.render(), (
        "README's benchmark table differs from bench/results/*.json: run "
        "`.venv/bin/python -m build_tools.bench_table --write`")


@pytest.mark.parametrize("path", sorted((ROOT / "bench" / "results").glob("*.json")), ids=lambda p: p.stem)
def test_every_result_names_its_command_commit_and_machine(path):
    data = json.loads(path.read_text())
    assert data["command"].startswith(".venv/bin/python bench/")
    assert data["commit"] and data["machine"].get("cores")
    assert data["rows"] and all(r["measured"] for r in data["rows"])
    assert (ROOT / data["command"].split()[1]).is_file(), "the command's script must exist"


def test_render_and_splice_round_trip(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "x.json").write_text(json.dumps({
        "command": ".venv/bin/python bench/x.py --n 2", "commit": "abc1234567890", "measured_at": "2026-11-30",
        "machine": {"cores": 2, "gpu": None}, "figures": {"r": 1.5},
        "rows": [{"figure": "a | b", "goal": ">= 1", "measured": "1.5"}]}))
    table = bench_table.render(res)
    assert "| a \\| b | >= 1 | 1.5 | `.venv/bin/python bench/x.py --n 2` | `abc1234567`, 2026-11-30, 2 cores, no GPU |" in table
    readme = f"intro\n{bench_table.BEGIN}\nold\n{bench_table.END}\nafter\n"
    spliced = bench_table.splice(readme, table)
    assert bench_table.readme_table(spliced) == table and spliced.endswith("after\n")


def test_results_name_no_path_of_the_machine_they_were_made_on():
    # Result files travel with the repository; a path of the benchmark machine means nothing elsewhere
    # (record.write cuts them to their last part).
    files = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert files, "no benchmark results committed"
    for f in files:
        text = f.read_text()
        for prefix in ("/tmp/", "/work/", "/root/", "/home/"):
            assert prefix not in text, f"{f.name} names a machine path ({prefix}...)"
