"""Per-module mutation score from a finished ``mutmut run`` (``make mutation`` runs both).

    .venv/bin/python tests/mutants/score.py --mutants mutants \
        --json experiments/results/mutation/core.json [--notes NOTES.md] [--verdicts V.json]

``--mutants`` and ``--verdicts`` may be repeated: the runs' verdicts are merged (a later run
replaces an earlier one's verdict), and so are the readings.

Reads mutmut's verdicts (``mutants/**/*.py.meta``) and counts, per core module: killed (a test
failed, or the mutant hung or crashed the run), survived (every test passed), no tests (no
selected test runs the mutated function: as bad as surviving) and not checked. The score is
killed / (killed + survived + no tests); the goal (issue 20) is 80% per module.

``--verdicts`` adds what was learnt by reading the unkilled mutants after the run: those judged
equivalent (with the reason) and those killed by tests written since (each checked by applying
the mutant by hand; a changed test selection makes mutmut discard every verdict). ``score_now``
counts the latter as killed; ``unexplained`` is what is neither.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ltm_pyro.report import markdown_table, write_results  # noqa: E402

KILLED = {1, 3, 36, 37, -24, 24, 152, 255, -11, -9}  # failed, timed out, crashed
SURVIVED = {0}
NO_TESTS = {5, 33}
GOAL = 0.8


def merged_codes(folders: list[Path]) -> dict[str, dict[str, int | None]]:
    """Each module's exit code per mutant over one or more runs' folders: a later run's
    verdict replaces an earlier one's (a run that stopped part-way, then one over the rest)."""
    modules: dict[str, dict[str, int | None]] = {}
    for folder in folders:
        for meta in sorted(folder.glob("**/*.py.meta")):
            codes = modules.setdefault(str(meta.relative_to(folder))[: -len(".meta")], {})
            for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
                if code is not None or name not in codes:
                    codes[name] = code
    return dict(sorted(modules.items()))


def verdicts(codes: dict[str, int | None]) -> Counter:
    counts: Counter = Counter()
    for code in codes.values():
        if code in KILLED:
            counts["killed"] += 1
        elif code in SURVIVED:
            counts["survived"] += 1
        elif code in NO_TESTS:
            counts["no_tests"] += 1
        else:
            counts["not_checked"] += 1
    return counts


def survivors(codes: dict[str, int | None]) -> list[str]:
    return sorted(name for name, code in codes.items() if code in SURVIVED | NO_TESTS)


def module_row(module: str, codes: dict[str, int | None], read: dict) -> dict:
    """A module's mutmut counts and score; with hand readings (``read``: 'equivalent' and
    'killed_by_tests_added_after', by mutant name) the unkilled mutants each explains, those
    neither explains, and the score counting the later kills."""
    counts, unkilled = verdicts(codes), survivors(codes)
    judged = counts["killed"] + counts["survived"] + counts["no_tests"]
    row = {"module": module, "mutants": sum(counts.values()),
           **{k: counts[k] for k in ("killed", "survived", "no_tests", "not_checked")},
           "score": counts["killed"] / judged if judged else None, "unkilled": unkilled}
    if read:
        equivalent = read.get("equivalent", {})
        killed_later = read.get("killed_by_tests_added_after", {})
        row["equivalent"] = sum(name in equivalent for name in unkilled)
        row["killed_later"] = sum(name in killed_later for name in unkilled)
        row["unexplained"] = sum(name not in equivalent and name not in killed_later
                                 for name in unkilled)
        row["score_now"] = (counts["killed"] + row["killed_later"]) / judged if judged else None
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", type=Path, action="append",
                   help="mutmut's folder (default: mutants); repeat to merge runs, later ones "
                   "replacing earlier verdicts")
    p.add_argument("--json", type=Path, help="write the scores (and a .md beside) here")
    p.add_argument("--notes", type=Path, help="Markdown file added to the page: what was run")
    p.add_argument("--verdicts", type=Path, action="append",
                   help="JSON with 'equivalent' {name: reason} and 'killed_by_tests_added_after' "
                   "{name: test file}: the unkilled mutants read by hand")
    args = p.parse_args()
    notes = args.notes.read_text() if args.notes else ""
    read: dict = {}
    for path in args.verdicts or []:
        for key, value in json.loads(path.read_text()).items():
            read[key] = {**read[key], **value} if isinstance(value, dict) and key in read \
                else value
    rows = []
    for module, codes in merged_codes(args.mutants or [Path("mutants")]).items():
        row = module_row(module, codes, read)
        score = row.get("score_now", row["score"])
        row["meets_goal"] = score is not None and score >= GOAL
        rows.append(row)
    columns = ["module", "mutants", "killed", "survived", "no_tests", "not_checked", "score",
               *(["equivalent", "killed_later", "unexplained", "score_now"] if read else []),
               "meets_goal"]
    table = markdown_table(rows, columns)
    print(table)
    if args.json:
        write_results(args.json, "Mutation score of the core modules", "cpu",
                      {"goal": GOAL, "notes": notes, "rows": rows, **read},
                      f"mutmut over the core modules with their fast tests (`make mutation`).\n\n"
                      f"{table}\n\nScore = killed / (killed + survived + no tests); goal "
                      f"{GOAL:.0%} per module. The JSON lists every unkilled mutant by name "
                      "(`mutmut show NAME` prints its change).\n\n" + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
