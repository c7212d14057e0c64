"""Few-shot in-context learning: LTM (posterior fitted to the context) against matched AR models.

    python experiments/bench_icl.py --seq-len 128 --max-steps 1000 --label icl-perm

Writes a hidden-permutation corpus (ltm_pyro/fewshot.py: every episode permutes the positions
of short symbol strings by a rule the model must infer from the examples), trains the LTM and
its size-matched AR baselines on it (same preset, token budget and seed), then scores k-shot
exact-match accuracy on held-out query strings with exemplars from the training items only.
The LTM answers greedily from z fitted to the prompt with each --eval-inference-steps (0 = the
prior mean). Writes LABEL.json, LABEL.md and LABEL.png into --results.

    python experiments/bench_icl.py --seq-len 96 --max-steps 1500 --latents 1,4,16 \
        --label icl-latents

--latents trains one LTM per latent count (vectors per layer; variants ltm-TT-LN) beside the
ARs matched to the run flags' LTM, and adds LABEL-latents.png: accuracy against latent size at
each k, at the largest T_eval, with the ARs' accuracy at the largest k (the scaling axis "few-
shot accuracy against latent size"; scaling.py's grid trains on another corpus).

What it computes lives in ``ltm_pyro/studies/icl.py``; this script is its command line.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltm_pyro.cli import (  # noqa: E402
    OneLineParser,
    add_run_arguments,
    config_from_args,
    int_list,
    positive_int,
    run_main,
)
from ltm_pyro.errors import UsageError  # noqa: E402
from ltm_pyro.fewshot import PermutationTask  # noqa: E402
from ltm_pyro.studies.icl import score_variants, write_report  # noqa: E402


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    add_run_arguments(p)
    p.add_argument("--label", required=True, help="name of this comparison (file names)")
    p.add_argument("--results", type=Path, default=Path("experiments/results/icl"))
    p.add_argument("--runs", type=Path, default=Path("runs/icl"))
    p.add_argument("--alphabet", type=positive_int, default=6)
    p.add_argument("--length", type=positive_int, default=3, help="symbols per string")
    p.add_argument("--train-episodes", type=positive_int, default=20000)
    p.add_argument("--examples-per-episode", type=positive_int, default=8)
    p.add_argument("--shots", type=int_list, default=[0, 1, 2, 4, 8])
    p.add_argument("--items", type=positive_int, default=256, help="evaluation items per k")
    p.add_argument("--eval-inference-steps", type=int_list, default=[0, 16, 64])
    p.add_argument("--latents", type=int_list,
                   help="latent vectors per layer: one LTM each, e.g. 1,4,16 (default: the run "
                   "flags' single value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def main() -> int:
    args = parser().parse_args()
    if args.data is not None:
        raise UsageError("bench_icl writes its own corpus: drop --data")
    task = PermutationTask(args.alphabet, args.length, seed=args.seed or 0)
    base = config_from_args(args)
    corpus_dir = args.runs / args.label / "corpus"
    task.write_corpus(corpus_dir, args.train_episodes, max(200, args.train_episodes // 20),
                      args.examples_per_episode, seed=base.train.seed)
    base = replace(base, data=replace(base.data, path=str(corpus_dir), tokenizer="word"))
    longest = max(args.shots) * (2 * args.length + 2) + args.length + 2
    if longest > base.model.context:
        raise UsageError(f"a {max(args.shots)}-shot prompt has {longest} tokens, more than the "
                         f"context of {base.model.context}; raise --seq-len or lower --shots")
    rows, configs = score_variants(base, task, args)
    table = write_report(args, base, task, rows, configs)
    print(table)
    return 0


if __name__ == "__main__":
    run_main(main)
