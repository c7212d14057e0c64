"""Result files carry what is needed to re-run them."""

from __future__ import annotations

import json
import sys

import pytest

from ltm_pyro import files
from ltm_pyro.cli import run_main
from ltm_pyro.report import markdown_table, write_results


def test_results_start_with_the_command_date_and_device(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/somewhere/experiments/bench_x.py", "--label", "a b"])
    rows = [{"name": "x", "value": 1.5, "missing": None}]
    table = markdown_table(rows, ["name", "value", "missing"])
    meta = write_results(tmp_path / "deep" / "run.json", "Title", "cpu", {"rows": rows}, table)

    saved = json.loads((tmp_path / "deep" / "run.json").read_text())
    assert saved["command"] == "python experiments/bench_x.py --label 'a b'"
    assert saved["device"].startswith("cpu, threads: ")
    assert saved["rows"] == rows and saved["date"] == meta["date"]
    page = (tmp_path / "deep" / "run.md").read_text()
    assert page.startswith(f"# Title\n\nCommand (run {meta['date']}, {meta['device']}, torch ")
    assert "```\npython experiments/bench_x.py --label 'a b'\n```" in page
    assert page.endswith("| x | 1.5000 | - |\n")


def test_every_script_ends_by_saying_where_it_wrote(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(files, "_WRITTEN", {})
    deep = tmp_path / "deep"
    deep.mkdir()

    def main() -> int:
        files.write_json(tmp_path / "a.json", {})
        files.append_jsonl(deep / "log.jsonl", {"step": 1})
        files.write_text(tmp_path / "a.md", "x")
        files.write_json(tmp_path / "a.json", {"again": True})
        return 0

    with pytest.raises(SystemExit) as finished:
        run_main(main)
    assert finished.value.code == 0
    assert capsys.readouterr().err.splitlines() == [f"wrote {tmp_path}/: a.json, a.md",
                                                    f"wrote {deep}/: log.jsonl"]


def test_results_carry_no_path_of_this_machine(tmp_path):
    """Catches: a result that embeds a trained run's config (its corpus path recorded
    absolute, so the folder loads from anywhere) writing this machine's folders into a
    committed file."""
    from ltm_pyro.report import REPO, portable

    raw = {"config": {"data": {"path": f"{REPO.parent}/shared/data/ptb"}},
           "runs": [f"{REPO}/runs/x", "runs/y", None, 3.0], "url": "https://example.org/a/b",
           "elsewhere": f"{REPO.parent}/other/run"}
    assert portable(raw) == {"config": {"data": {"path": "../shared/data/ptb"}},
                             "runs": ["runs/x", "runs/y", None, 3.0],
                             "url": "https://example.org/a/b",
                             "elsewhere": f"{REPO.parent}/other/run"}
