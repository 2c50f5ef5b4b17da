"""Environment skips (tests/conftest.py:skip_or_fail_in_ci): a skip locally, a failure under CI=true."""

from __future__ import annotations

import pytest

from conftest import e2e_corpus_file, in_ci, skip_or_fail_in_ci

pytest_plugins = ["pytester"]

REASON = "PostgreSQL is not installed and cannot be installed as non-root"


@pytest.mark.parametrize("value, expected", [("true", True), ("TRUE", True), ("1", True), ("yes", True),
                                             ("", False), ("false", False), ("0", False), (None, False)])
def test_ci_is_read_from_the_ci_variable(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_outside_ci_a_missing_environment_skips_with_its_reason(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"^{REASON}$"):
        skip_or_fail_in_ci(REASON)


def test_under_ci_a_missing_environment_fails_naming_the_reason(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=rf"CI=true turns this skip into a failure\): {REASON}$"):
        skip_or_fail_in_ci(REASON)


def test_under_ci_the_test_is_reported_failed_not_skipped(pytester, monkeypatch):
    """Through a real pytest session: the outcome counts, not only the exception type."""
    pytester.makepyfile(test_env="""
        from conftest import skip_or_fail_in_ci

        def test_needs_root():
            skip_or_fail_in_ci("needs root")
    """)
    monkeypatch.setenv("CI", "true")
    ci = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    ci.assert_outcomes(failed=1)
    ci.stdout.fnmatch_lines(["*CI=true turns this skip into a failure): needs root*"])
    monkeypatch.delenv("CI")
    local = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-rs")
    local.assert_outcomes(skipped=1)
    local.stdout.fnmatch_lines(["*needs root*"])


def test_an_absent_corpus_stays_a_skip_under_ci(monkeypatch, tmp_path):
    """A fresh clone has no external corpus by design: not an environment fault, so no CI failure."""
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("E2E_CORPUS_DIR", str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match=r"the external E2E corpus is absent \(devset\.csv not in"):
        e2e_corpus_file("devset.csv")
    (tmp_path / "devset.csv").write_text("mr,ref\n")
    assert e2e_corpus_file("devset.csv") == tmp_path / "devset.csv"
