r"""Does the decoder come to use z as it trains? (issue 13, latent use against training tokens)

    python experiments/latent_use_over_training.py --label ptb-tiny-T4-long \
        --data ../shared/data/ptb --inference-steps 4 --slow-lr 3e-3 --max-steps 2000 \
        --eval-every 200 --eval-windows 128

Trains one run into --runs/LABEL (the runner's own resume: the same command continues a
stopped run, and a finished run is reported without training again) with the prior control
at every validation (``--eval-prior-control``, 32 draws unless told), then writes
--results/LABEL.{json,md,png}: each validation's iwae_ppl and prior_iwae_ppl (the same K
draws from the fitted q and from the prior), their ratio ``prior_control``, and the KL and
mutual information per window, against training tokens. A prior control that stays at or
below 0 as tokens grow says the decoder does not learn to use z at this size and budget; one
that rises says it does, and from when. ``--baseline RUN`` (a finished run validated on the
same windows at the same steps, e.g. the matched AR: ``run_svi.py --model ar --match-params``
with the same data and schedule) adds its valid perplexity at each step and the LTM's
``iwae_ppl`` relative to it. ``--report-only`` reports the run folder as it stands, with its
own config and no training: a run stopped part-way (Ctrl-C or SIGTERM write a checkpoint)
is reported up to its last validation, and the page says where it stopped.

What it computes lives in ``ltm_pyro/studies/latent_use_curve.py``; this script is its command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")

from ltm_pyro.cli import OneLineParser, add_run_arguments, config_from_args, run_main  # noqa: E402
from ltm_pyro.runner import Interrupted, finished_run, train  # noqa: E402
from ltm_pyro.studies.latent_use_curve import (  # noqa: E402
    baseline_figures,
    controlled,
    stored_config,
    write_report,
)


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--label", required=True, help="name of the run and of its results")
    p.add_argument("--runs", type=Path, default=Path("runs/latents"), help="run folders")
    p.add_argument("--results", type=Path, default=Path("experiments/results/latents"))
    p.add_argument("--baseline", type=Path,
                   help="a finished run folder validated on the same windows at the same steps "
                   "(e.g. the matched AR), drawn and tabled beside the LTM")
    p.add_argument("--report-only", action="store_true",
                   help="report --runs/LABEL as it stands (its own config), without training")
    p.add_argument("--force", action="store_true",
                   help="start over in a run folder that holds another config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    add_run_arguments(p)
    return p


def main() -> int:
    args = parser().parse_args()
    run_dir = args.runs / args.label
    config = stored_config(run_dir) if args.report_only else controlled(
        config_from_args(args))
    figures = None if args.baseline is None else baseline_figures(args.baseline, config)
    if not (args.report_only or finished_run(run_dir, config)):
        try:
            train(config, run_dir, force=args.force, progress=not args.no_progress)
        except Interrupted as stopped:  # a checkpoint was written: --report-only reports it
            print(f"{stopped}; --report-only reports it as it stands", file=sys.stderr)
            return stopped.exit_status
    print(write_report(args, run_dir, config, figures))
    return 0


if __name__ == "__main__":
    run_main(main)
