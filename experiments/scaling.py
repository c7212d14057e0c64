r"""Scaling grid: model width and depth, latent count and width, and T, at fixed budgets.

    python experiments/scaling.py --label tiny-grid --preset tiny-v1 --widths 32,64 \
        --latents 4 --steps 4,16 --families ltm,ar --budget tokens,flops
    python experiments/scaling.py --label ltm-s-grid --preset ltm-s --device cuda --compile \
        --widths 256,512 --steps 4,16 --budget flops --flops 2e17
    python experiments/scaling.py --label tiny-grid --preset tiny-v1 --widths 32,64 \
        --latents 4 --steps 4,16 --budget tokens,flops --report

Every LTM of --widths x --depths x --latents x --latent-dims x --steps (for --families sa
also the same grid with semi-amortised inference: an encoder proposes q's start, T steps refine
it; the plain ltm family never has an encoder) and, for the AR family, one model per width x
depth (no latents, no inference steps), each with the run flags'
everything else (preset, recipe, overrides, seed, data). An unset axis takes the run flags'
single value. Each model trains once per budget: --budget tokens gives every model --tokens
training tokens; --budget flops gives every model --flops training FLOPs, counted with every
inner step (ltm_pyro/flops.py), so each model's --max-steps is the whole number of its steps
nearest the budget (within half a step; the rows state the steps, tokens, epochs and FLOPs
each got; a warm-up longer than a run is cut to a tenth of it). Runs go to
--runs/LABEL/MODEL-sSTEPS; a finished run with the same config and scoring settings is reused
(neither retrained nor rescored), so a grid can be extended or resumed by rerunning it with
more values. Each model is scored on the valid split at its training T: iwae_ppl and elbo_ppl
(valid bounds), recon_ppl (not a bound) and what the latents carry.

Writes LABEL.json (the grid, every run's full config, the rows), LABEL.md (the command, the
table, the equal-FLOP sets, and LABEL-notes.md from --results if present), LABEL.png (valid
iwae_ppl against training tokens and against training FLOPs, each family's Pareto frontier
drawn) and LABEL-trade.png (iwae_ppl against parameters and against T, runs of equal training
FLOPs ringed: a bigger AR against a smaller LTM with more T). --report gathers the finished
runs of the grid given without training anything.

What it computes lives in ``ltm_pyro/studies/scaling_study.py``; this script is its command line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltm_pyro.cli import (  # noqa: E402
    OneLineParser,
    add_run_arguments,
    add_scoring_arguments,
    config_from_args,
    int_list,
    positive_float_list,
    positive_int,
    run_main,
)
from ltm_pyro.data import load_corpus  # noqa: E402
from ltm_pyro.report import markdown_table  # noqa: E402
from ltm_pyro.scaling import BUDGETS, FAMILIES  # noqa: E402
from ltm_pyro.studies.scaling_study import (  # noqa: E402
    COLUMNS,
    budgets,
    finished,
    grid_axes,
    plan,
    report,
    row,
    score_settings,
    train_and_score,
)


def latent_dim_list(text: str) -> list[int | None]:
    """Latent widths, e.g. "8,16"; "d" is the model width (as released)."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items or any(v != "d" and not (v.isdigit() and int(v) > 0) for v in items):
        raise argparse.ArgumentTypeError(f"{text!r} must list positive integers or d (the "
                                         "model width)")
    return [None if v == "d" else int(v) for v in items]


def choice_list(choices: tuple[str, ...]):  # noqa: ANN201 - an argparse type
    def parse(text: str) -> list[str]:
        items = [v.strip() for v in text.split(",") if v.strip()]
        if not items or any(v not in choices for v in items):
            raise argparse.ArgumentTypeError(f"{text!r} must list among {','.join(choices)}")
        return list(dict.fromkeys(items))
    return parse


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    add_run_arguments(p)
    g = p.add_argument_group("the grid (unset axis: the run flags' single value)")
    g.add_argument("--families", type=choice_list(FAMILIES), default="ltm,ar",
                   help="model families: ltm; sa, the LTM with semi-amortised inference (an "
                   "encoder of --encoder-layers blocks, default 2, proposes q's start; T steps "
                   "refine it); and ar (no latents, same widths and depths)")
    g.add_argument("--widths", type=int_list, help="model widths d_model, e.g. 32,64")
    g.add_argument("--depths", type=int_list, help="decoder blocks n_layers, e.g. 2,4")
    g.add_argument("--latents", type=int_list, help="LTM: latent vectors per layer, e.g. 2,4")
    g.add_argument("--latent-dims", type=latent_dim_list,
                   help="LTM: latent widths, e.g. 8,16 (d: the model width)")
    g.add_argument("--steps", type=int_list, help="LTM: inference steps T, e.g. 4,16")
    g = p.add_argument_group("budgets")
    g.add_argument("--budget", type=choice_list(BUDGETS), default="tokens",
                   help="train every model for the same tokens, the same FLOPs, or both "
                   "(tokens,flops)")
    g.add_argument("--tokens", type=positive_float_list,
                   help="training tokens per model, one or more (default: --max-steps x "
                   "--batch-size x --seq-len of the run flags)")
    g.add_argument("--flops", type=positive_float_list,
                   help="training FLOPs per model, every inner step counted, one or more "
                   "(default: what the run flags' LTM spends in --max-steps)")
    g = p.add_argument_group("scoring and output")
    g.add_argument("--label", required=True, help="name of this grid (file and folder names)")
    g.add_argument("--runs", type=Path, default=Path("runs/scaling"),
                   help="run folders go to RUNS/LABEL/MODEL-sSTEPS")
    g.add_argument("--results", type=Path, default=Path("experiments/results/scaling"),
                   help="folder for LABEL.json, .md, .png, -trade.png")
    g.add_argument("--score-windows", type=positive_int,
                   help="score the first N valid windows (default: all)")
    add_scoring_arguments(g, prior=False)
    g.add_argument("--report", action="store_true",
                   help="gather the grid's finished runs into the results; train nothing")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def main() -> int:
    args = parser().parse_args()
    base = config_from_args(args)
    axes = grid_axes(args, base)  # bad grid flags fail before the corpus is read
    corpus = load_corpus(base.data, base.model.context)
    # FLOPs count the LM head.
    base = replace(base, model=replace(base.model, vocab_size=corpus.tokenizer.vocab_size))
    amounts = budgets(args, base)
    runs = plan(args, base, axes, amounts)
    settings = score_settings(args)
    windows = corpus.windows["valid"][: args.score_windows]
    results: dict[str, dict] = {}
    for run in runs:
        name = run["dir"].name
        stored = results.get(name) or finished(run, settings)
        if stored is None and not args.report:
            stored = train_and_score(args, run, windows, settings)
        if stored is not None:
            results[name] = stored
            print(markdown_table([row(run, stored, len(corpus.windows["train"]),
                                      args.iw_samples)], COLUMNS), flush=True)
    grid = {**axes, "budgets": [{"kind": k, "amount": a} for k, a in amounts]}
    report(args, grid, runs, results, corpus)
    return 0


if __name__ == "__main__":
    run_main(main)
