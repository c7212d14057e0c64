r"""Evaluate a checkpoint with valid bounds: elbo_ppl, iwae_ppl, and the paper-style recon_ppl.

    ltm-eval --checkpoint runs/default --split test --iw-samples 32
    ltm-eval --checkpoint runs/ptb --data ../shared/data/wikitext-2

Each batch's local posterior is fitted from scratch with --inference-steps (default: the
training T). --data may be a corpus the model never saw (zero-shot): it is tokenized with the
checkpoint's own tokenizer. Also reports what the latents carry (docs/latent-diagnostics.md):
KL and mutual information per window (MI over all scored windows, capped by log N),
active units, slot correlation and effective rank, and prior_iwae_ppl, the IWAE with
--prior-samples draws from the prior as proposal (0 skips it), and bits_per_byte, the iwae
bound per UTF-8 byte of the scored text, which compares across vocabularies and tokenizers
(zero-shot on another corpus, or word against BPE). Prints two tables; --json
writes the figures with their settings.

An MDLM checkpoint (--model mdlm) has no latents: elbo_ppl and iwae_ppl are both its
continuous-time NELBO bound, exp(NELBO / tokens), over the same predicted tokens as the LTM
and AR (every token of a window but the first, which is given); nll_per_token is the NELBO,
recon_ppl is null, and bound_stderr_per_token / bound_ppl_rel_stderr are its Monte-Carlo
standard errors from --bound-samples draws a window (a warning when above 0.5%).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from ..cli import (
    OneLineParser,
    add_scoring_arguments,
    add_window_arguments,
    non_negative_int,
    positive_int,
    run_main,
)
from ..config import DataConfig
from ..errors import UsageError

MDLM_STDERR_WARNING = 0.005  # above this relative stderr of an MDLM's bound, say so

METRICS = ["tokens", "nll_per_token", "kl_per_token", "elbo_ppl", "iwae_ppl", "recon_ppl",
           "bits_per_byte"]


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder or checkpoint.pt")
    p.add_argument("--data", help="corpus to score (default: the one the model was trained on)")
    p.add_argument("--split", choices=("valid", "test"), default="valid")
    p.add_argument("--inference-steps", type=non_negative_int, help="default: training T")
    add_scoring_arguments(p)
    p.add_argument("--bound-samples", type=positive_int, default=64,
                   help="MDLM only: masked-count draws per window for its bound")
    add_window_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def evaluate(args) -> dict:  # noqa: ANN001 - argparse.Namespace
    # torch and the library load here, not at import: --help answers without them.
    from ..bounds import per_byte
    from ..checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint
    from ..data import describe_selection, load_corpus, select_windows
    from ..modes import resolve_device
    from ..run_folder import corpus_path, read_tokenizer
    from ..tokenizers import UNK_WARNING, known_token_count, unk_rate

    device = resolve_device(args.device)
    payload = load_checkpoint(args.checkpoint, map_location=device)
    ltm, config, _ = model_from_checkpoint(payload, device)
    tokenizer = read_tokenizer(checkpoint_path(args.checkpoint).parent, payload)
    data = replace(config.data, path=corpus_path(config)) if args.data is None else DataConfig(
        path=args.data, tokenizer=tokenizer.kind)
    corpus = load_corpus(data, config.model.context, tokenizer)
    windows = select_windows(corpus.windows[args.split], args.max_windows, args.sample_windows,
                             args.sample_seed)
    if known_token_count(tokenizer, windows) == 0:
        raise UsageError(f"no token of {data.path} is in the checkpoint's vocabulary; "
                         "evaluate on a corpus in the training language and tokenization")
    unknown = unk_rate(tokenizer, windows[:, 1:])  # the predicted tokens
    zero_shot = args.data is not None and corpus.name != payload.get("corpus")
    # In-domain, <unk> is the corpus' own token (PTB ships with it), the same for every model
    # trained on it; only another corpus' words mapped to <unk> make figures incomparable.
    if zero_shot and unknown > UNK_WARNING:
        print(f"warning: {unknown:.1%} of the scored tokens of {corpus.name} are <unk> under the "
              "checkpoint's vocabulary; its perplexities are not comparable with a model that "
              "knows those words", file=sys.stderr)
    summary = score_with_progress(ltm, config, windows, args, device)
    return {
        **summary,
        **per_byte(summary, tokenizer.text_bytes(windows[:, 1:].flatten().tolist())),
        "params": ltm.decoder.num_parameters(),
        "model_kind": config.model_kind,
        "checkpoint": str(args.checkpoint),
        "checkpoint_step": payload["step"],
        "corpus": corpus.name,
        "zero_shot": zero_shot,
        "split": args.split,
        "windows": len(windows),
        "window_selection": describe_selection(args.max_windows, args.sample_windows,
                                               args.sample_seed),
        "unk_rate": unknown,
        "references": corpus.references,
        "seed": args.seed,
    }


def score_with_progress(ltm, config, windows, args, device) -> dict:  # noqa: ANN001
    """The run's family scores ``windows`` as the flags say, behind a progress bar showing
    the running figures; a warning when a stochastic bound is too noisy."""
    from tqdm.auto import tqdm

    from ..bounds import ScoringConfig
    from ..families import family_of

    bar = tqdm(total=len(windows), disable=args.no_progress, desc=f"eval {args.split}")

    def progress(sequences: int, figures: dict[str, float]) -> None:
        bar.update(sequences - bar.n)
        bar.set_postfix({name: f"{value:.3f}" for name, value in figures.items()})

    scoring = ScoringConfig(
        steps=args.inference_steps, batch_size=args.batch_size, elbo_samples=args.elbo_samples,
        iw_samples=args.iw_samples, seed=args.seed, latent_stats=True,
        mi_samples=args.mi_samples, prior_samples=args.prior_samples,
        bound_samples=args.bound_samples)
    summary = family_of(config).score(ltm, windows, config.inference, scoring, device, progress)
    bar.close()
    warn_of_bound_error(summary)
    return summary


def warn_of_bound_error(summary: dict) -> None:
    """A warning when a stochastic bound (an MDLM's NELBO) has a Monte-Carlo standard error
    above MDLM_STDERR_WARNING of the perplexity (more --bound-samples, or windows, lower it)."""
    if "bound_ppl_rel_stderr" not in summary:
        return
    error = summary["bound_ppl_rel_stderr"]
    if error is None or error > MDLM_STDERR_WARNING:
        size = "unknown (one draw a window)" if error is None else f"{error:.2%}"
        print(f"warning: the bound's Monte-Carlo standard error is {size} of the perplexity "
              f"(target: under {MDLM_STDERR_WARNING:.1%}); raise --bound-samples",
              file=sys.stderr)


def main() -> int:
    args = parser().parse_args()  # before torch and the library load: --help needs neither
    from ..families import family_named
    from ..files import write_json
    from ..report import markdown_table

    results = evaluate(args)
    print(markdown_table([results], ["split", "inference_steps", "iw_samples", "unk_rate",
                                      *METRICS]))
    print()
    print(markdown_table([results], list(family_named(results["model_kind"]).score_metrics)))
    if args.json:
        write_json(args.json, results)
    return 0


def entry() -> None:
    """The ``ltm-eval`` console script."""
    run_main(main)
