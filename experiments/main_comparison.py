r"""The main comparison (issue 42; ``ltm_pyro/studies/main_comparison.py`` says what each
phase does). Run from the repository root; every phase resumes where it stopped:

    python experiments/main_comparison.py tune            # the grid, one epoch each
    python experiments/main_comparison.py train           # chosen lr, seeds, to convergence
    python experiments/main_comparison.py score           # each finished run, from best.pt
    python experiments/main_comparison.py report          # experiments/results/main/main.*

``--families`` and ``--seeds`` restrict a phase (e.g. the ARs of seed 1 only); ``--workers``
jobs run at once, each a subprocess with one thread.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltm_pyro.files import write_json  # noqa: E402
from ltm_pyro.report import portable, provenance, write_results  # noqa: E402
from ltm_pyro.runner import finished_run  # noqa: E402
from ltm_pyro.studies import main_report as report  # noqa: E402
from ltm_pyro.studies.main_comparison import (  # noqa: E402
    FAMILY_FLAGS,
    Study,
    chosen_learning_rates,
    read_json,
    run_curve,
    score_run,
    tuning_points,
)
from ltm_pyro.viz import save_figure  # noqa: E402


def run_jobs(jobs: list[list[list[str]]], workers: int) -> None:
    """Each job is a list of commands run one after another; ``workers`` jobs at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(commands: list[list[str]]) -> None:
        for command in commands:
            print("$", " ".join(command), flush=True)
            subprocess.run(command, env=env, check=True)

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(one, job) for job in jobs]:
            future.result()


def tune(study: Study, args: argparse.Namespace) -> None:
    jobs = []
    for family in args.families:
        for lr in study.learning_rates:
            commands, done = study.tuning_job(family, lr, sys.executable)
            if not done.exists():
                jobs.append(commands)
    run_jobs(jobs, args.workers)


def train(study: Study, args: argparse.Namespace) -> None:
    chosen = chosen_learning_rates(tuning_points(study))
    missing = [f for f in args.families if f not in chosen]
    if missing:
        sys.exit(f"main_comparison: the grid is not finished for {', '.join(missing)}; "
                 "run the tune phase first")
    run_jobs([[study.training_job(f, chosen[f], seed, sys.executable)]
              for seed in args.seeds for f in args.families], args.workers)


def score(study: Study, args: argparse.Namespace) -> None:
    jobs = []
    for family in args.families:
        for seed in args.seeds:
            run = study.long_run(family, seed)
            if (run / "best.pt").exists() and not study.score_file(family, seed).exists():
                jobs.append([[sys.executable, __file__, "score-one", family, str(seed)]])
    run_jobs(jobs, args.workers)


def score_one(study: Study, args: argparse.Namespace) -> None:
    family, seed = args.run
    run = study.long_run(family, int(seed))
    if not finished_run(run, _run_config(run)):
        sys.exit(f"main_comparison: {run} has not finished training; run the train phase")
    out = study.score_file(family, int(seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    trained = read_json(run / "config.json")  # the run's full config, beside its figures
    write_json(out, portable({**provenance("cpu"), "training_command": " ".join(
        study.training_job(family, chosen_learning_rates(tuning_points(study))[family],
                           int(seed), "python")[1:]),
                     "config": trained, **score_run(study, family, run, int(seed)),
                     "curve": run_curve(run)}))


def _run_config(run: Path):  # noqa: ANN202 - a RunConfig
    from ltm_pyro.config import RunConfig

    return RunConfig.from_dict(read_json(run / "config.json"))


def write_report(study: Study, args: argparse.Namespace) -> None:
    scores = [read_json(p) for p in sorted((study.results / "scores").glob("*.json"))]
    points = tuning_points(study)
    chosen = chosen_learning_rates(points)
    rows, parts = report.comparison_rows(scores), report.decomposition_rows(scores)
    sources = [report.gain_source(part) for part in parts]
    curves = {}  # each scored run's validations, from its score file (so from this checkout)
    for family in FAMILY_FLAGS:
        runs = [s["curve"] for s in scores if s["family"] == family]
        if runs:
            curves[family] = runs
    if curves:
        save_figure(report.curves_figure(curves), study.results / "main-curves.png")
    page = "\n\n".join([
        "## Equal tuning\n", report.tuning_table(points, chosen),
        "## Test split (whole)\n", report.comparison_table(rows),
        "## Where the gain comes from (test split; last column: valid subset)\n",
        report.decomposition_table(parts),
        "Each latent run in one sentence (intervals over test windows):\n",
        "\n".join(f"- {source}" for source in sources)])
    write_results(study.results / "main.json", "The main comparison: PTB, LTM against "
                  "size-matched ARs and its no-inference ablation", "cpu",
                  {"study": {k: str(v) for k, v in vars(study).items()}, "tuning": points,
                   "chosen_lr": chosen, "comparison": rows, "decomposition": parts,
                   "gain_sources": sources,
                   "curves": curves}, page)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("tune", "train", "score", "score-one", "report"))
    p.add_argument("run", nargs="*", help="score-one: FAMILY SEED")
    p.add_argument("--families", type=lambda s: s.split(","), default=list(FAMILY_FLAGS))
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    study = Study()
    {"tune": tune, "train": train, "score": score, "score-one": score_one,
     "report": write_report}[args.phase](study, args)


if __name__ == "__main__":
    main()
