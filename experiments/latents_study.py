r"""Levers against posterior collapse on the built-in corpus, at a fixed budget (issue 13).

    python experiments/latents_study.py --label window4 --window 4 \
        --variants ar-window,ar-full,ltm,ltm-fb --eval-steps 4,16,64
    python experiments/latents_study.py --label window4 --window 4 --report

The variants are built on ``--preset tiny-v1`` unless told otherwise: the tiny preset as it
was when the study began (a 16-token window, shared slot projections, the fit from log-variance
-2), so that the committed commands reproduce their rows whatever ``tiny`` becomes.

Each variant is the run flags given here plus its own flags (``VARIANTS``), trained into
--runs/LABEL/NAME with the same tokens and seed (a finished run with the same config is
reused). Each is scored on valid and test (all windows: 256 each by default, so the MI cap
log N = 5.5 nats is not binding below it) at every --eval-steps, with what the latents carry
(KL, mutual information, active units, slot correlation; docs/latent-diagnostics.md) and,
at the variant's training T, the prior-proposal control. Two extra views at the training T:

- ``eval_start="prior"``: the same model fitted from q_0 = the prior's log-variance 0 instead
  of the training start (a fit that never starts with a KL above the prior's);
- a linear probe (sklearn LogisticRegression) of the true topic and style from the posterior
  means: fitted on the first half of the split, scored on the other half, as in
  notebooks/02_latent_structure.ipynb; and fitted on --probe-train-windows windows of the
  train split, scored on the whole split.

Per-variant figures are kept in the run folder (study.json, so variants may be trained by
separate invocations); --report gathers them into experiments/results/latents/LABEL.{json,md}
and LABEL.png (iwae_ppl and MI against T_eval), LABEL-slots.png (slot-correlation
heatmaps of each layer's posterior means) and LABEL-training.png (validation -ELBO, and the
MI and KL per window, against training tokens, from each run's metrics.jsonl).

What it computes lives in ``ltm_pyro/studies/latents.py``; this script is its command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltm_pyro.cli import (  # noqa: E402
    OneLineParser,
    add_run_arguments,
    add_scoring_arguments,
    config_from_args,
    int_list,
    non_negative_int,
    run_main,
)
from ltm_pyro.studies.latents import report, study_variant  # noqa: E402

# Each variant: flags added to the study's own run flags (same tokens, seed and data).
VARIANTS: dict[str, list[str]] = {
    "ar-window": ["--model", "ar", "--match-params"],
    "ar-full": ["--model", "ar", "--match-params", "--window", "0"],
    "ltm": [],
    "ltm-no-inference": ["--inference-steps", "0", "--init-log-var", "0"],
    "ltm-klwarm": ["--kl-warmup-steps", "200"],
    "ltm-fb": ["--free-bits", "1"],
    "ltm-fb2": ["--free-bits", "2"],
    "ltm-fb-sym": ["--free-bits", "1", "--init-loc-scale", "0.5"],
    "ltm-sym": ["--init-loc-scale", "0.5"],
    "ltm-fb-layer": ["--free-bits", "2", "--free-bits-group", "layer"],
    "ltm-fb-klwarm": ["--free-bits", "1", "--kl-warmup-steps", "200"],
    "ltm-fb-fixed": ["--free-bits", "1", "--noise", "fixed"],
    # The fit starts at the prior (KL 0), so the free-bits floor binds from the first step.
    "ltm-prior-fb": ["--init-log-var", "0", "--free-bits", "1"],
    "ltm-prior-fb-sym": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale", "0.5"],
    # The same three levers with a KL warm-up over half of the 400 steps, or offsets of scale 1.
    "ltm-prior-fb-sym-klwarm": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                                "0.5", "--kl-warmup-steps", "200"],
    "ltm-prior-fb-sym1": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale", "1.0"],
    # Semi-amortised inference (ltm_pyro/amortised.py): the three levers, an encoder of 2
    # blocks proposing the fit's start, refined with T inner steps (16, 4 or 2); "-fit": the
    # encoder trained to match the fitted q instead of on the ELBO at its proposal.
    # "-T4": the three levers at T = 4 without an encoder (the control at equal T).
    "ltm-prior-fb-sym-T4": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                            "0.5", "--inference-steps", "4"],
    "ltm-prior-fb-sym-enc": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                             "0.5", "--encoder-layers", "2"],
    "ltm-prior-fb-sym-enc-T4": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                                "0.5", "--encoder-layers", "2", "--inference-steps", "4"],
    "ltm-prior-fb-sym-enc-T2": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                                "0.5", "--encoder-layers", "2", "--inference-steps", "2"],
    "ltm-prior-fb-sym-encfit-T4": ["--init-log-var", "0", "--free-bits", "1",
                                   "--init-loc-scale", "0.5", "--encoder-layers", "2",
                                   "--encoder-loss", "fit", "--inference-steps", "4"],
    # Per-slot roles in the decoder's cross-attention (ModelConfig.slot_roles), with and
    # without the three levers' offsets.
    "ltm-prior-fb-sym-value": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                               "0.5", "--slot-roles", "value"],
    "ltm-prior-fb-sym-kv": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                            "0.5", "--slot-roles", "key-value"],
    "ltm-prior-fb-sym-embed": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                               "0.5", "--slot-roles", "embedding"],
    "ltm-prior-fb-sym-kv-klwarm": ["--init-log-var", "0", "--free-bits", "1",
                                   "--init-loc-scale", "0.5", "--slot-roles", "key-value",
                                   "--kl-warmup-steps", "200"],
    # Cyclical KL annealing (Fu et al. 2019): 4 cycles of 100 steps, each ramping over half.
    "ltm-prior-fb-sym-kv-cyc4": ["--init-log-var", "0", "--free-bits", "1",
                                 "--init-loc-scale", "0.5", "--slot-roles", "key-value",
                                 "--kl-warmup-steps", "50", "--kl-cycles", "4"],
    # Word dropout (Bowman et al. 2016): a quarter of the input words hidden in training, so
    # the decoder has to take them from z; the matched AR trains with the same rate.
    "ltm-prior-fb-sym-kv-wd25": ["--init-log-var", "0", "--free-bits", "1",
                                 "--init-loc-scale", "0.5", "--slot-roles", "key-value",
                                 "--word-dropout", "0.25"],
    "ar-window-kv-wd25": ["--model", "ar", "--match-params", "--slot-roles", "key-value",
                          "--word-dropout", "0.25"],
    # The windowed AR matched to a slot-role LTM's parameter count (a wider MLP).
    "ar-window-value": ["--model", "ar", "--match-params", "--slot-roles", "value"],
    "ar-window-kv": ["--model", "ar", "--match-params", "--slot-roles", "key-value"],
    "ltm-prior-fb-value": ["--init-log-var", "0", "--free-bits", "1", "--slot-roles", "value"],
    "ltm-prior-fb-kv": ["--init-log-var", "0", "--free-bits", "1", "--slot-roles", "key-value"],
    "ltm-prior-fb-embed": ["--init-log-var", "0", "--free-bits", "1", "--slot-roles",
                           "embedding"],
}

def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    add_run_arguments(p)
    p.add_argument("--label", required=True, help="name of this study (file names)")
    p.add_argument("--variants", default="", help=f"comma-separated, among {', '.join(VARIANTS)}")
    p.add_argument("--runs", type=Path, default=Path("runs/latents"))
    p.add_argument("--results", type=Path, default=Path("experiments/results/latents"))
    p.add_argument("--eval-steps", type=int_list, help="T_eval values (default: training T)")
    add_scoring_arguments(p)
    p.add_argument("--probe-train-windows", type=non_negative_int, default=1024)
    p.add_argument("--report", action="store_true", help="gather the variants into results")
    p.set_defaults(preset="tiny-v1")
    return p


def variant_config(argv_base: list[str], name: str):  # noqa: ANN201 - a RunConfig
    """The study's run flags plus the variant's (the variant's win)."""
    args = parser().parse_args([*argv_base, *VARIANTS[name], "--label", "x"])
    return config_from_args(args)


def main() -> int:
    argv = sys.argv[1:]
    args = parser().parse_args(argv)
    # The run flags alone (without the study's own options), for each variant's config.
    study_only = {"--label": 1, "--variants": 1, "--runs": 1, "--results": 1,
                  "--eval-steps": 1, "--iw-samples": 1, "--elbo-samples": 1,
                  "--prior-samples": 1, "--mi-samples": 1, "--probe-train-windows": 1,
                  "--report": 0}
    argv_base, skip = [], 0
    for item in argv:
        if skip:
            skip -= 1
            continue
        key = item.split("=")[0]
        if key in study_only:
            skip = 0 if "=" in item else study_only[key]
            continue
        argv_base.append(item)
    if args.report:
        report(args, list(VARIANTS))
        return 0
    base_inference = config_from_args(parser().parse_args([*argv_base, "--label", "x"])).inference
    for name in [v for v in args.variants.split(",") if v]:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose among {', '.join(VARIANTS)}")
        study_variant(variant_config(argv_base, name), base_inference, name, VARIANTS[name],
                      args)
    return 0


if __name__ == "__main__":
    run_main(main)
