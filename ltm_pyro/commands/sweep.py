r"""Test-time inference scaling: one checkpoint scored at several numbers of inference steps.

    ltm-sweep --checkpoint runs/default --steps 0,1,2,4,8,16,32,64 \
        --out experiments/results/topic-style/inference_steps
    (or: python experiments/sweep_inference_steps.py with the same flags)

Writes OUT.json (one row per T_eval: elbo_ppl, iwae_ppl, recon_ppl, per-token terms and
what z carries: KL and mutual information per window, slot correlation, and on the first
row the prior control prior_iwae_ppl (the prior as proposal; it does not depend on T); see
docs/latent-diagnostics.md) and OUT.png (the three perplexities against T_eval, log-scaled,
with the corpus' references of the split, and the MI and KL against T_eval). The MI estimate
is capped at log N for N windows: `--split train` with a larger `--max-windows` raises the
cap (those windows were trained on); `--sample-windows N` scores a seeded random subset
instead of the first windows, which are the split's first few documents.
`python experiments/replot.py OUT.json` redraws OUT.png from OUT.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..cli import (
    OneLineParser,
    add_checkpoint_output_arguments,
    add_scoring_arguments,
    add_window_arguments,
    int_list,
    run_main,
)
from ..errors import UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLUMNS = ["inference_steps", "tokens", "nll_per_token", "kl_per_token", "elbo_ppl", "iwae_ppl",
           "prior_iwae_ppl", "recon_ppl", "kl_per_window", "mutual_info_per_window",
           "mutual_info_stderr", "mutual_info_cap", "slot_correlation", "slot_linear_r2"]

FIT_TEXT = {"elbo": "the ELBO",
            "free-bits": "the training fits' objective, free bits included"}


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder or checkpoint.pt")
    p.add_argument("--steps", type=int_list, default=[0, 1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--split", choices=("train", "valid", "test"), default="valid")
    add_window_arguments(p, first_default=128)
    add_scoring_arguments(p)
    p.add_argument("--fit", choices=("elbo", "free-bits"), default="elbo",
                   help="what each window's fit maximises: the ELBO, or the training fits' "
                   "free-bits objective (the bounds stay valid: any q gives one)")
    add_checkpoint_output_arguments(p)
    return p


def figure(results: dict) -> Figure:
    """The sweep's figure from its results (OUT.json): references of the swept split."""
    from ..viz import bounds_against_steps

    corpus = results.get("corpus", "corpus")
    return bounds_against_steps(
        results["rows"], results.get("references"), results.get("split", "valid"),
        f"{corpus}: bounds against T_eval ({results.get('windows', '?')} "
        f"{results.get('split', 'valid')} windows, trained with T = "
        f"{results.get('trained_inference_steps', '?')})")


def main() -> int:
    args = parser().parse_args()  # before torch and the library load: --help needs neither
    from ..bounds import ScoringConfig, evaluate_windows
    from ..checkpoint import load_checkpoint, model_from_checkpoint
    from ..data import describe_selection, load_corpus, select_windows
    from ..modes import resolve_device
    from ..report import markdown_table, write_results
    from ..viz import save_figure

    device = resolve_device(args.device)
    payload = load_checkpoint(args.checkpoint, map_location=device)
    ltm, config, tokenizer = model_from_checkpoint(payload, device)
    if not ltm.has_latents:
        raise UsageError("the checkpoint is an AR model: it has no inference steps to sweep")
    if args.fit == "free-bits" and not config.inference.free_bits:
        raise UsageError("--fit free-bits: the checkpoint was trained without free bits, so its "
                         "fits maximise the ELBO; drop --fit")
    corpus = load_corpus(config.data, config.model.context, tokenizer)
    windows = select_windows(corpus.windows[args.split], args.max_windows, args.sample_windows,
                             args.sample_seed)
    rows = []
    for steps in args.steps:
        scoring = ScoringConfig(
            steps=steps, batch_size=args.batch_size, elbo_samples=args.elbo_samples,
            iw_samples=args.iw_samples, seed=args.seed, latent_stats=True,
            mi_samples=args.mi_samples, fit_free_bits=args.fit == "free-bits",
            prior_samples=args.prior_samples if not rows else 0)
        rows.append(evaluate_windows(ltm, windows, config.inference, scoring, device=device))
        print(markdown_table(rows[-1:], COLUMNS), flush=True)
    table = markdown_table(rows, COLUMNS)
    selection = describe_selection(len(windows), args.sample_windows, args.sample_seed)
    results = {
        "checkpoint_step": payload["step"], "corpus": corpus.name, "split": args.split,
        "windows": len(windows), "sample_windows": args.sample_windows,
        "sample_seed": args.sample_seed, "window_selection": selection, "fit": args.fit,
        "trained_inference_steps": config.inference.steps, "references": corpus.references,
        "rows": rows, "config": config.to_dict(),
    }
    write_results(args.out.with_suffix(".json"), "Test-time inference steps", device, results,
                  f"Bounds on {selection} of the `{args.split}` split of `{corpus.name}` "
                  f"against the inference steps T fitted per sequence (trained with T = "
                  f"{config.inference.steps}; checkpoint step {payload['step']}; each fit "
                  f"maximises {FIT_TEXT[args.fit]}).\n\n{table}\n\n"
                  f"References (nats/token): {corpus.references}\n")
    save_figure(figure(results), args.out.with_suffix(".png"))
    print(table)
    return 0


def entry() -> None:
    """The ``ltm-sweep`` console script."""
    run_main(main)
