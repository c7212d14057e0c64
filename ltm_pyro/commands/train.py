r"""Train a latent-thought model (or the AR baseline) with dual-rate SVI.

    ltm-train --out runs/default          # or: python experiments/run_svi.py --out runs/default
    ltm-train --out runs/ptb --data ../shared/data/ptb --preset small
    torchrun --nproc_per_node=4 experiments/run_svi.py --out runs/ltm-s --preset ltm-s \
        --device cuda          # data parallel: --batch-size windows per rank

Writes config.json, metrics.jsonl, checkpoint.pt and training_curves.png into --out; running
the same command again on the same --out resumes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..cli import OneLineParser, add_run_arguments, config_from_args, run_main


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/default"), help="run folder")
    add_run_arguments(p)
    p.add_argument("--force", action="store_true", help="start over in an --out of another run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def main() -> int:
    args = parser().parse_args()
    from ..distributed import shard_from_environment  # torch: loaded after --help has answered
    from ..runner import Interrupted, train

    config = config_from_args(args)
    try:
        final = train(config, args.out, force=args.force, progress=not args.no_progress)
    except Interrupted as stopped:
        print(f"{stopped}", file=sys.stderr)
        return stopped.exit_status
    if shard_from_environment().is_main:
        print(json.dumps({"out": str(args.out), **final}))
    return 0


def entry() -> None:
    """The ``ltm-train`` console script."""
    run_main(main)
