r"""LTM against matched AR baselines on the same data, token budget and seed, scored honestly.

    python experiments/bench_quality.py --data ../shared/data/ptb --preset small \
        --max-steps 600 --label ptb-released

Trains (into --runs/LABEL/VARIANT) the LTM given by the run flags and, unless --no-ar, two AR
baselines with the LTM's parameter count (wider MLP): one with the LTM's sliding window and
one with full causal context (the released comparison gave its GPT the full context, which
confounds what the latents add), and the ablation ltm-no-inference (unless --no-ablation):
the LTM recipe trained with T = 0 and q = the prior exactly, which separates what training
with inference does from what z does at test time; it costs about what an AR does. Unless
--no-mdlm (or --no-ar), also the masked-diffusion baseline mdlm (MDLM, ltm_pyro/mdlm.py) with
the LTM's parameter count, trained with the ARs' slow loop, budget and seed and scored by its
continuous-time NELBO bound (elbo_ppl = iwae_ppl, with its standard error from
--bound-samples draws a window; recon_ppl null).
--train-inference-steps 4,16,64 trains one LTM per T instead of one.
Each model is scored on the test split (elbo_ppl, iwae_ppl, recon_ppl; an LTM at each
--eval-inference-steps; the ablation also at T_eval 0 with q = the prior), with what the
latents carry (kl_per_window, mutual_info_per_window, active_units, slot_correlation; see
docs/latent-diagnostics.md) and prior_iwae_ppl, the same model with --prior-samples draws
from the prior as proposal, the decoder passes each figure cost (eval_passes) and, on each
baseline row, ltm_vs_this: the LTM's relative perplexity against it on the same windows with a
paired bootstrap 95% interval. --seeds 0,1,2 trains and scores every variant at each seed and
adds mean and sd over seeds. Writes LABEL.json, LABEL.md and LABEL.png (validation -ELBO
against tokens and against training FLOPs, every inner step counted) into --results.

Equal tuning: --tune-lr 1e-3,3e-3 --tune-warmup 30,100 gives every family trained (each LTM,
ltm-no-inference, ar-window, ar-full, mdlm) the same grid of slow learning rate (decaying to
a tenth, as --slow-lr) x warm-up steps (one flag alone: the run's value on the other axis). Each
family is trained at every point (at the first seed, into --runs/LABEL/VARIANT@lrLR-wuW),
scored on the valid split (the first --test-windows windows) by iwae_ppl at its training T
(the ablation: fitted like the LTM; mdlm: its bound), and the point with the best figure is the
family's choice: its run is scored on --splits as without tuning (other seeds are trained at
the chosen point). The results record the grid, every point's valid figure and each choice.
Equal FLOPs: --equal-flops also trains ar-window, ar-full and mdlm for the training FLOPs of the
LTM at the run's T (every inner step counted, rounded to whole steps; same warm-up, lr and
cosine over the longer run) as rows VARIANT@flops, with ltm_vs_this like the other baselines,
and a table of every variant's steps, tokens, epochs over the train split and FLOPs. Many epochs
overfit, so each @flops run is stopped on valid: it keeps the weights of its validation with the
lowest -ELBO (--eval-every, the first --eval-windows valid windows; ``best.pt``) and is scored
there (``scored_step``).
Finished runs in --runs/LABEL with the same config are reused, not trained again.

What it computes lives in ``ltm_pyro/studies/quality.py``; this script is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltm_pyro.cli import (  # noqa: E402
    OneLineParser,
    add_run_arguments,
    add_scoring_arguments,
    add_window_arguments,
    config_from_args,
    int_list,
    positive_float_list,
    positive_int,
    run_main,
)
from ltm_pyro.comparisons import NO_INFERENCE, comparison_configs  # noqa: E402
from ltm_pyro.config import RunConfig  # noqa: E402
from ltm_pyro.errors import UsageError  # noqa: E402
from ltm_pyro.studies.quality import (  # noqa: E402
    FLOPS_SUFFIX,
    Bench,
    add_paired_intervals,
    equal_flop_runs,
    run_variant,
    seeded,
    tune,
    tuning_grid,
    write_report,
)


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    add_run_arguments(p)
    p.add_argument("--label", required=True, help="name of this comparison (file names)")
    p.add_argument("--results", type=Path, help="default: experiments/results/<corpus>")
    p.add_argument("--runs", type=Path, default=Path("runs/bench"), help="run folders")
    p.add_argument("--no-ar", action="store_true",
                   help="train only the LTM variant(s): no AR baselines and no ablation")
    p.add_argument("--no-ablation", action="store_true",
                   help=f"do not train {NO_INFERENCE} (T = 0, q = the prior)")
    p.add_argument("--no-mdlm", action="store_true",
                   help="do not train the masked-diffusion baseline mdlm")
    p.add_argument("--bound-samples", type=positive_int, default=64,
                   help="mdlm: masked-count draws per window for its bound")
    p.add_argument("--train-inference-steps", type=int_list, help="e.g. 4,16,64")
    p.add_argument("--eval-inference-steps", type=int_list, help="default: the training T")
    add_scoring_arguments(p)
    add_window_arguments(p, "--test-windows")
    p.add_argument("--splits", type=split_list, default=["test"],
                   help="comma-separated splits to score, e.g. valid,test (choose settings on "
                   "valid, report test)")
    p.add_argument("--seeds", type=int_list,
                   help="train and score every variant at each seed, e.g. 0,1,2 (default: "
                   "--seed); rows per seed and mean and sd over seeds")
    p.add_argument("--tune-lr", type=positive_float_list,
                   help="equal tuning: slow learning rates of the grid every family is trained "
                   "at, e.g. 1e-3,3e-3; each family's point is chosen on valid (default: the "
                   "run's --slow-lr alone)")
    p.add_argument("--tune-warmup", type=int_list,
                   help="equal tuning: warm-up steps of the grid, e.g. 30,100 (default: the "
                   "run's --warmup-steps alone)")
    p.add_argument("--equal-flops", action="store_true",
                   help="also train ar-window, ar-full and mdlm for the LTM's training FLOPs "
                   f"(more steps; rows VARIANT{FLOPS_SUFFIX})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def split_list(text: str) -> list[str]:
    splits = [s.strip() for s in text.split(",") if s.strip()]
    if not splits or any(s not in ("train", "valid", "test") for s in splits):
        raise argparse.ArgumentTypeError(f"{text!r} must list splits among train,valid,test")
    return splits


def main() -> int:
    args = parser().parse_args()
    base = config_from_args(args)
    runs = comparison_configs(base, args.train_inference_steps, with_ar=not args.no_ar,
                              with_no_inference=not (args.no_ar or args.no_ablation),
                              with_mdlm=not (args.no_ar or args.no_mdlm))
    ltm_name = f"ltm-T{base.inference.steps}"
    if args.equal_flops and (args.no_ar or ltm_name not in runs):
        raise UsageError(f"--equal-flops trains the baselines for {ltm_name}'s FLOPs: it needs "
                         "the baselines (no --no-ar) and the LTM at --inference-steps among "
                         "--train-inference-steps")
    seeds = args.seeds or [base.train.seed]
    bench = Bench(args, base)
    grid = tuning_grid(args, base)
    if grid:
        runs = tune(bench, runs, grid, seeds)
    flop_runs: dict[str, RunConfig] = {}
    for seed in seeds:
        for name, config in runs.items():
            run_variant(bench, name, seeded(config, seed), seed, bench.folder(name, seed, seeds))
        if args.equal_flops:
            flop_runs = flop_runs or equal_flop_runs(bench, runs, ltm_name)
            for name, config in flop_runs.items():
                run_variant(bench, name, seeded(config, seed), seed,
                            bench.folder(name, seed, seeds))
    add_paired_intervals(bench.rows, bench.per_window, ltm_name, base.inference.steps)
    write_report(bench, "mdlm" in runs, grid, ltm_name)
    return 0


if __name__ == "__main__":
    run_main(main)
