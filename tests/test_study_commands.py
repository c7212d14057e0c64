"""The study commands whose results the README and RESULTS.md cite still run end to end with
their sizes cut down (issue 41: the logic moved into ``ltm_pyro/studies``; the scripts are
its command lines), and ``replot.py`` redraws each one's figures from its results file alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from .conftest import REPO

TINY = ["--max-steps", "2", "--eval-every", "2", "--eval-windows", "8", "--d-model", "32"]


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "experiments" / script), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("script, flags, figures", [
    ("bench_icl.py", ["--train-episodes", "200", "--items", "8", "--shots", "0,1",
                      "--eval-inference-steps", "0,2", "--seq-len", "32", "--no-progress"],
     ["smoke.png"]),
    ("latents_study.py", ["--variants", "ltm", "--seq-len", "16", "--eval-steps", "1",
                          "--probe-train-windows", "16", "--iw-samples", "2"],
     ["smoke.png", "smoke-slots.png", "smoke-training.png"]),
])
def test_a_study_runs_reports_and_replots(tmp_path, script, flags, figures):
    out = ["--label", "smoke", "--runs", str(tmp_path / "runs"), "--results",
           str(tmp_path / "results")]
    _run(script, *out, *TINY, *flags)
    if script == "latents_study.py":  # trains the variants, then gathers them
        _run(script, *out, "--report")
    results = tmp_path / "results"
    payload = json.loads((results / "smoke.json").read_text())
    assert payload["rows"] and script in payload["command"]
    for name in figures:
        (results / name).unlink()
    _run("replot.py", str(results / "smoke.json"))
    assert all((results / name).stat().st_size for name in figures)


def test_the_main_comparison_report_rebuilds_from_the_committed_files_alone(tmp_path):
    """Catches: a report that needs the run folders (gone once a session ends) rather than the
    committed tuning and score files, or that no longer reproduces the committed tables."""
    committed = REPO / "experiments" / "results" / "main"
    copy = tmp_path / "experiments" / "results" / "main"
    shutil.copytree(committed, copy, ignore=shutil.ignore_patterns("*.png"))
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "main_comparison.py"),
                           "report"], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    tables = (committed / "main.md").read_text().split("## Equal tuning")[1]
    assert (copy / "main.md").read_text().split("## Equal tuning")[1] == tables
    assert (copy / "main-curves.png").stat().st_size
