"""tests/mutants/score.py: the per-module mutation score, with the unkilled mutants read by hand."""

from __future__ import annotations

import importlib.util
import json
import sys

from .conftest import REPO


def _score_module():  # noqa: ANN202 - the script loaded as a module
    """tests/mutants/score.py is a script, not a package module: load it from its path."""
    spec = importlib.util.spec_from_file_location("mutation_score",
                                                  REPO / "tests" / "mutants" / "score.py")
    score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score)
    return score


def test_score_counts_mutants_killed_later_and_leaves_the_rest_unexplained(tmp_path, monkeypatch):
    score = _score_module()
    (tmp_path / "m" / "pkg").mkdir(parents=True)
    codes = {"pkg.a__mutmut_1": 1, "pkg.a__mutmut_2": 0, "pkg.a__mutmut_3": 0,
             "pkg.a__mutmut_4": 33, "pkg.a__mutmut_5": None}
    (tmp_path / "m" / "pkg" / "a.py.meta").write_text(json.dumps({"exit_code_by_key": codes}))
    (tmp_path / "v.json").write_text(json.dumps({
        "equivalent": {"pkg.a__mutmut_2": "wording"},
        "killed_by_tests_added_after": {"pkg.a__mutmut_4": "tests/test_x.py"}}))
    monkeypatch.setattr(sys, "argv", ["score.py", "--mutants", str(tmp_path / "m"), "--verdicts",
                                      str(tmp_path / "v.json"), "--json", str(tmp_path / "s.json")])
    assert score.main() == 0
    row = json.loads((tmp_path / "s.json").read_text())["rows"][0]
    assert (row["killed"], row["survived"], row["no_tests"], row["not_checked"]) == (1, 2, 1, 1)
    assert (row["equivalent"], row["killed_later"], row["unexplained"]) == (1, 1, 1)
    assert row["score"] == 0.25 and row["score_now"] == 0.5 and not row["meets_goal"]


def test_a_later_run_replaces_the_verdicts_it_reached_and_readings_merge(tmp_path, monkeypatch):
    score = _score_module()
    first = {"pkg.a__mutmut_1": 0, "pkg.a__mutmut_2": 1, "pkg.a__mutmut_3": None}
    rest = {"pkg.a__mutmut_1": None, "pkg.a__mutmut_2": None, "pkg.a__mutmut_3": 0}
    for name, codes in (("m1", first), ("m2", rest)):
        (tmp_path / name / "pkg").mkdir(parents=True)
        (tmp_path / name / "pkg" / "a.py.meta").write_text(
            json.dumps({"exit_code_by_key": codes}))
    (tmp_path / "v1.json").write_text(json.dumps(
        {"equivalent": {"pkg.a__mutmut_1": "wording"}}))
    (tmp_path / "v2.json").write_text(json.dumps(
        {"equivalent": {"pkg.a__mutmut_3": "device"}}))
    monkeypatch.setattr(sys, "argv", [
        "score.py", "--mutants", str(tmp_path / "m1"), "--mutants", str(tmp_path / "m2"),
        "--verdicts", str(tmp_path / "v1.json"), "--verdicts", str(tmp_path / "v2.json"),
        "--json", str(tmp_path / "s.json")])
    assert score.main() == 0
    row = json.loads((tmp_path / "s.json").read_text())["rows"][0]
    assert (row["killed"], row["survived"], row.get("not_checked", 0)) == (1, 2, 0)
    assert (row["equivalent"], row["unexplained"]) == (2, 0)
