"""Test-time inference scaling: one checkpoint scored at several numbers of inference steps.

    python experiments/sweep_inference_steps.py --checkpoint runs/default \
        --steps 0,1,2,4,8,16,32,64 --out experiments/results/topic-style/inference_steps

Writes OUT.json (one row per T_eval: elbo_ppl, iwae_ppl, recon_ppl and per-token terms) and
OUT.png (the three perplexities against T_eval, log-scaled, with the corpus' references).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltm_pyro.bounds import evaluate_windows  # noqa: E402
from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from ltm_pyro.cli import OneLineParser, int_list, non_negative_int, positive_int, run_main  # noqa: E402
from ltm_pyro.data import load_corpus  # noqa: E402
from ltm_pyro.errors import UsageError  # noqa: E402
from ltm_pyro.modes import resolve_device  # noqa: E402
from ltm_pyro.report import markdown_table, write_results  # noqa: E402
from ltm_pyro.viz import bounds_against_steps, save_figure  # noqa: E402

COLUMNS = ["inference_steps", "tokens", "nll_per_token", "kl_per_token", "elbo_ppl", "iwae_ppl",
           "recon_ppl"]


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder or checkpoint.pt")
    p.add_argument("--steps", type=int_list, default=[0, 1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--split", choices=("valid", "test"), default="valid")
    p.add_argument("--max-windows", type=positive_int, default=128)
    p.add_argument("--iw-samples", type=positive_int, default=16)
    p.add_argument("--elbo-samples", type=positive_int, default=4)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True, help="path stem for .json and .png")
    return p


def main() -> int:
    args = parser().parse_args()
    device = resolve_device(args.device)
    payload = load_checkpoint(args.checkpoint, map_location=device)
    ltm, config, tokenizer = model_from_checkpoint(payload, device)
    if not ltm.has_latents:
        raise UsageError("the checkpoint is an AR model: it has no inference steps to sweep")
    corpus = load_corpus(config.data, config.model.context, tokenizer)
    windows = corpus.windows[args.split][: args.max_windows]
    rows = []
    for steps in args.steps:
        rows.append(evaluate_windows(
            ltm, windows, config.inference, steps=steps, batch_size=args.batch_size,
            elbo_samples=args.elbo_samples, iw_samples=args.iw_samples, seed=args.seed,
            device=device))
        print(markdown_table(rows[-1:], COLUMNS), flush=True)
    table = markdown_table(rows, COLUMNS)
    write_results(args.out.with_suffix(".json"), "Test-time inference steps", device, {
        "checkpoint_step": payload["step"], "split": args.split, "windows": len(windows),
        "trained_inference_steps": config.inference.steps, "references": corpus.references,
        "rows": rows, "config": config.to_dict(),
    }, f"Bounds on the first {len(windows)} `{args.split}` windows of `{corpus.name}` against "
       f"the inference steps T fitted per sequence (trained with T = {config.inference.steps}; "
       f"checkpoint step {payload['step']}).\n\n{table}\n\n"
       f"References (nats/token): {corpus.references}\n")
    save_figure(bounds_against_steps(rows, corpus.references), args.out.with_suffix(".png"))
    print(table)
    return 0


if __name__ == "__main__":
    run_main(main)
