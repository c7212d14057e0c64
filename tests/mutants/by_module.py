"""mutmut over the modules outside the core that compute a reported number, one module at a
time with its own tests (issue 43.1):

    .venv/bin/python tests/mutants/by_module.py run flops      # run, or resume, one module
    .venv/bin/python tests/mutants/by_module.py rerun flops    # its survivors, with today's tests
    .venv/bin/python tests/mutants/by_module.py list           # the modules, their tests, state
    .venv/bin/python tests/mutants/by_module.py score          # -> results/mutation/modules.*

Each module runs in its own git worktree of the commit it started from (``../mutation/MODULE``,
beside this checkout, never inside it), so its verdicts survive between sessions, resume with
the same command, and never mix with another module's test selection (mutmut discards every
verdict when its selection changes). One child process and one thread: it can run beside one
experiment on a 2-core machine. ``score`` reads every module's worktree and the hand readings
in ``experiments/results/mutation/modules-verdicts.json``, and records the commit each
module's verdicts come from. ``rerun`` copies this checkout's tests into the module's worktree
and lets mutmut re-run the survivors against them (the source stays at the worktree's commit,
and the commit of the tests is recorded), so a test written for a survivor is checked by
mutmut itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from score import merged_codes, module_row, survivors  # noqa: E402

from ltm_pyro.report import markdown_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORK = REPO.parent / "mutation"
RESULTS = REPO / "experiments" / "results" / "mutation"
GOAL = 0.9

# Each module and the fast tests that exercise it (tests that import it, or drive it through
# the runner); mutmut then runs, for each mutant, only those that reach the mutated function.
MODULE_TESTS = {
    "latent_use": ["test_latent_use", "test_latent_use_definitions", "test_latent_levers",
                   "test_figures"],
    "mdlm": ["test_mdlm", "test_estimator_definitions", "test_word_dropout"],
    "amortised": ["test_amortised", "test_svi_contracts"],
    "uncertainty": ["test_uncertainty", "test_estimator_definitions"],
    "flops": ["test_estimator_definitions", "test_scaling", "test_tuning", "test_amortised",
              "test_mdlm"],
    "data": ["test_data", "test_pipeline_definitions", "test_explore", "test_fewshot"],
    "tokenizers": ["test_data", "test_pipeline_definitions", "test_explore", "test_fewshot",
                   "test_run_folder", "test_slot_roles"],
    "synthetic": ["test_data", "test_pipeline_definitions"],
    "generate": ["test_generate", "test_pipeline_definitions", "test_families", "test_amortised",
                 "test_mdlm"],
    "checkpoint": ["test_checkpoint_safety", "test_run_folder", "test_pipeline_definitions",
                   "test_reliability", "test_bad_input", "test_slot_roles"],
    "proposal_curve": ["test_prior_control_curve"],
    "diagnostics": ["test_diagnostics"],
    "scaling": ["test_scaling"],
    "comparisons": ["test_tuning", "test_latent_use", "test_figures", "test_mdlm",
                    "test_word_dropout"],
    "sample_quality": ["test_sample_quality"],
    "fewshot": ["test_fewshot"],
}


def mutmut_section(module: str) -> str:
    """This module's ``[tool.mutmut]``: it alone mutated, its tests selected, fast tests only."""
    tests = ", ".join(f'"tests/{name}.py"' for name in MODULE_TESTS[module])
    return (f'[tool.mutmut]\nsource_paths = ["ltm_pyro/"]\nalso_copy = ["experiments/"]\n'
            f'only_mutate = ["ltm_pyro/{module}.py"]\n'
            f"pytest_add_cli_args_test_selection = [{tests}]\n"
            f'pytest_add_cli_args = ["-m", "not slow", "-p", "no:cacheprovider"]\n')


def worktree(module: str) -> Path:
    """The module's worktree, made at this checkout's HEAD the first time, its pyproject's
    mutmut section replaced by the module's."""
    folder = WORK / module
    if not folder.exists():
        WORK.mkdir(exist_ok=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder),
                        "HEAD"], check=True, capture_output=True)
        pyproject = folder / "pyproject.toml"
        text = re.sub(r"\[tool\.mutmut\].*?(?=\n\[|\Z)", mutmut_section(module),
                      pyproject.read_text(), flags=re.S)
        pyproject.write_text(text)
    return folder


def commit_of(folder: Path) -> str:
    return subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
                          check=True, capture_output=True, text=True).stdout.strip()


def mutmut_run(folder: Path, names: list[str]) -> int:
    """``mutmut run`` in the module's worktree, one child and one thread (``names``: only
    those mutants, their verdicts replaced; none: every mutant not yet checked)."""
    return subprocess.run([str(Path(sys.executable).with_name("mutmut")), "run",
                           "--max-children", "1", *names], cwd=folder,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def run(module: str) -> int:
    return mutmut_run(worktree(module), [])


def rerun(module: str) -> int:
    folder = worktree(module)
    changed = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", commit_of(folder),
                              "HEAD", "--", f"ltm_pyro/{module}.py"])
    if changed.returncode:
        raise SystemExit(f"ltm_pyro/{module}.py changed since {commit_of(folder)}: remove "
                         f"{folder} (git worktree remove) and run the module again")
    names = survivors(next(iter(merged_codes([folder / "mutants"]).values())))
    shutil.rmtree(folder / "tests")
    shutil.copytree(REPO / "tests", folder / "tests",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = mutmut_run(folder, names)
    (folder / "tests-from").write_text(commit_of(REPO) + "\n")
    return code


def tests_commit(folder: Path) -> str:
    """The commit whose tests gave the verdicts: the worktree's, or that of a ``rerun``."""
    marker = folder / "tests-from"
    return marker.read_text().strip() if marker.exists() else commit_of(folder)


def module_rows(read: dict) -> list[dict]:
    """One row per module run so far: its commits, mutmut's counts, the hand readings and the
    score now; the goal is met only once every mutant has been checked."""
    rows = []
    for module in MODULE_TESTS:
        folder = WORK / module
        if not (folder / "mutants").is_dir():
            continue
        for path, codes in merged_codes([folder / "mutants"]).items():
            row = {"commit": commit_of(folder),
                   "survivors_rerun_with_tests_of": tests_commit(folder),
                   **module_row(path, codes, read or {"equivalent": {}})}
            score = row["score_now"]
            row["meets_goal"] = (score is not None and not row["not_checked"]
                                 and score >= GOAL)
            rows.append(row)
    return rows


def score() -> int:
    verdicts_path = RESULTS / "modules-verdicts.json"
    read = json.loads(verdicts_path.read_text()) if verdicts_path.exists() else {}
    rows = module_rows(read)
    columns = ["module", "commit", "survivors_rerun_with_tests_of", "mutants", "killed",
               "survived", "no_tests", "not_checked", "equivalent", "killed_later",
               "unexplained", "score_now", "meets_goal"]
    table = markdown_table(rows, columns)
    print(table)
    missing = [m for m in MODULE_TESTS if not any(r["module"] == f"ltm_pyro/{m}.py"
                                                  for r in rows)]
    write_results(RESULTS / "modules.json", "Mutation score beyond the core (issue 43)", "cpu",
                  {"goal": GOAL, "tests": MODULE_TESTS, "not_run": missing, "rows": rows},
                  f"mutmut over each module with its own tests (`tests/mutants/by_module.py`), "
                  f"each at the commit named in its row (its survivors re-run by mutmut with "
                  f"the tests of the next column's commit).\n\n{table}\n\nScore now = (killed + "
                  f"killed by tests added after the run) / (killed + survived + no tests); goal "
                  f"{GOAL:.0%} per module, every mutant checked. Not run yet: "
                  f"{', '.join(missing) or 'none'}.")
    return 0


def listing() -> int:
    for module, tests in MODULE_TESTS.items():
        folder = WORK / module
        state = f"worktree at {commit_of(folder)}" if folder.exists() else "not started"
        print(f"{module:15} {state:22} {' '.join(tests)}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("run", "rerun", "list", "score"))
    p.add_argument("module", nargs="?", choices=tuple(MODULE_TESTS))
    args = p.parse_args()
    if args.action in ("run", "rerun"):
        if not args.module:
            p.error(f"{args.action} needs a module, e.g. `{args.action} flops`")
        return run(args.module) if args.action == "run" else rerun(args.module)
    return listing() if args.action == "list" else score()


if __name__ == "__main__":
    sys.exit(main())
