r"""The prior control against the importance draws K: how much of what the decoder reads in z
can the prior find by chance, and from how many draws on?

    ltm-prior-control --checkpoint runs/default --samples 1,4,16,64,256 \
        --out experiments/results/latents/tiny-default-prior-control
    (or: python experiments/prior_control_curve.py with the same flags)

Writes OUT.json (one row per K: iwae_ppl from K draws of the fitted q, prior_iwae_ppl from K
draws of the prior, prior_control = their ratio - 1, gap_nats_per_window; and the fitted q's
KL, MI and slot correlation per window), OUT.md and OUT.png. At one K the control only shows the
information beyond about log K nats per window (ltm_pyro/proposal_curve.py): a small control at
K 64 with an MI of 3 nats says little, a control that is large at K 1 and closes as K grows
says the decoder reads z. `python experiments/replot.py OUT.json` redraws OUT.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..cli import (
    OneLineParser,
    add_checkpoint_output_arguments,
    add_window_arguments,
    int_list,
    non_negative_int,
    positive_int,
    run_main,
)
from ..errors import UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLUMNS = ["samples", "iwae_ppl", "prior_iwae_ppl", "prior_control", "gap_nats_per_window"]
INFORMATION_KEYS = ("kl_per_window", "mutual_info_per_window", "mutual_info_stderr",
                    "mutual_info_cap", "slot_correlation")


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder or checkpoint.pt")
    p.add_argument("--samples", type=int_list, default=[1, 4, 16, 64, 256],
                   help="importance draws K per window (each proposal draws the largest once; "
                   "smaller K use its first draws)")
    p.add_argument("--steps", type=non_negative_int,
                   help="inference steps T_eval of each window's fit (default: the training T)")
    p.add_argument("--split", choices=("train", "valid", "test"), default="valid")
    add_window_arguments(p, first_default=128)
    p.add_argument("--mi-samples", type=positive_int, default=4,
                   help="draws from each window's q for the mutual information")
    add_checkpoint_output_arguments(p)
    return p


def figure(results: dict) -> Figure:
    """The curve's figure from its results (OUT.json)."""
    from ..viz import bounds_against_draws

    return bounds_against_draws(
        results["rows"], results.get("information"),
        f"{results.get('corpus', 'corpus')}: IWAE against K ({results.get('windows', '?')} "
        f"{results.get('split', 'valid')} windows, T_eval {results.get('inference_steps', '?')})")


def main() -> int:
    args = parser().parse_args()  # before torch and the library load: --help needs neither
    from ..checkpoint import load_checkpoint, model_from_checkpoint
    from ..data import describe_selection, load_corpus, select_windows
    from ..modes import resolve_device
    from ..proposal_curve import proposal_curve
    from ..report import markdown_table, write_results
    from ..viz import save_figure

    if 0 in args.samples:
        raise UsageError("--samples: every K must be at least 1 draw, e.g. 1,4,16,64")
    device = resolve_device(args.device)
    payload = load_checkpoint(args.checkpoint, map_location=device)
    ltm, config, tokenizer = model_from_checkpoint(payload, device)
    if not ltm.has_latents:
        raise UsageError("the checkpoint is an AR model: it has no z for the prior to draw")
    corpus = load_corpus(config.data, config.model.context, tokenizer)
    windows = select_windows(corpus.windows[args.split], args.max_windows, args.sample_windows,
                             args.sample_seed)
    steps = config.inference.steps if args.steps is None else args.steps
    curve = proposal_curve(ltm, windows, config.inference, args.samples, steps=steps,
                           batch_size=args.batch_size, seed=args.seed, device=device)
    rows = curve.rows
    table = markdown_table(rows, COLUMNS)
    print(table, flush=True)
    summary = curve.information(config.model.n_layers, args.mi_samples, args.seed)
    information = {key: summary[key] for key in INFORMATION_KEYS}
    selection = describe_selection(len(windows), args.sample_windows, args.sample_seed)
    results = {
        "checkpoint_step": payload["step"], "corpus": corpus.name, "split": args.split,
        "windows": len(windows), "sample_windows": args.sample_windows,
        "sample_seed": args.sample_seed, "window_selection": selection,
        "inference_steps": steps, "trained_inference_steps": config.inference.steps,
        "tokens_per_window": int(windows.shape[1] - 1), "rows": rows,
        "information": information, "config": config.to_dict(),
    }
    info_table = markdown_table([information], list(INFORMATION_KEYS))
    write_results(args.out.with_suffix(".json"), "The prior control against the draws K", device,
                  results,
                  f"IWAE bounds on {selection} of the `{args.split}` split of `{corpus.name}` "
                  f"with K draws from the fitted q and from the prior (checkpoint step "
                  f"{payload['step']}, q fitted in T_eval = {steps} steps, trained with T = "
                  f"{config.inference.steps}; every K uses the first K of {max(args.samples)} "
                  f"draws a window). `gap_nats_per_window`: how far the prior's bound is below "
                  f"the fitted q's, per window of {windows.shape[1] - 1} scored tokens; K prior "
                  f"draws find about log K nats of a posterior, so a gap that closes as K grows "
                  f"is information the decoder reads.\n\n{table}\n\n"
                  f"The fitted q the curve drew from (docs/latent-diagnostics.md):"
                  f"\n\n{info_table}\n")
    save_figure(figure(results), args.out.with_suffix(".png"))
    return 0


def entry() -> None:
    """The ``ltm-prior-control`` console script."""
    run_main(main)
