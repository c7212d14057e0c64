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
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from ltm_pyro.bounds import evaluate_windows  # noqa: E402
from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from ltm_pyro.cli import (  # noqa: E402
    OneLineParser,
    add_run_arguments,
    config_from_args,
    int_list,
    non_negative_int,
    positive_int,
    run_main,
)
from ltm_pyro.comparisons import NO_INFERENCE, comparison_configs, prior_as_posterior  # noqa: E402
from ltm_pyro.config import InferenceConfig, RunConfig  # noqa: E402
from ltm_pyro.data import load_corpus  # noqa: E402
from ltm_pyro.decoder import count_parameters  # noqa: E402
from ltm_pyro.files import read_jsonl  # noqa: E402
from ltm_pyro.flops import (  # noqa: E402
    fit_flops_per_token,
    forward_flops_per_token,
    training_flops_per_token,
)
from ltm_pyro.mdlm import evaluate_bound  # noqa: E402
from ltm_pyro.report import markdown_table, write_results  # noqa: E402
from ltm_pyro.runner import METRICS_NAME, train  # noqa: E402
from ltm_pyro.uncertainty import mean_and_sd, paired_bootstrap  # noqa: E402
from ltm_pyro.viz import save_figure  # noqa: E402

COLUMNS = ["variant", "seed", "params", "tokens_seen", "train_pflops", "train_wall_s", "split",
           "T_eval", "eval_passes", "tokens", "nll_per_token", "kl_per_token", "elbo_ppl",
           "iwae_ppl", "recon_ppl",
           "prior_iwae_ppl", "kl_per_window", "mutual_info_per_window", "active_units",
           "slot_correlation", "bound_ppl_rel_stderr", "ltm_vs_this", "ltm_vs_this_low",
           "ltm_vs_this_high"]
SEED_COLUMNS = ["variant", "split", "T_eval", "seeds", "iwae_ppl_mean", "iwae_ppl_sd",
                "elbo_ppl_mean", "elbo_ppl_sd", "ltm_vs_this_mean", "ltm_vs_this_sd"]


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
    p.add_argument("--iw-samples", type=positive_int, default=16)
    p.add_argument("--elbo-samples", type=positive_int, default=4)
    p.add_argument("--prior-samples", type=non_negative_int, default=64,
                   help="draws from the prior for prior_iwae_ppl (0: skip it)")
    p.add_argument("--mi-samples", type=positive_int, default=4,
                   help="draws from each window's q for the mutual information")
    p.add_argument("--test-windows", type=positive_int,
                   help="score only the first N windows of each split")
    p.add_argument("--splits", type=split_list, default=["test"],
                   help="comma-separated splits to score, e.g. valid,test (choose settings on "
                   "valid, report test)")
    p.add_argument("--seeds", type=int_list,
                   help="train and score every variant at each seed, e.g. 0,1,2 (default: "
                   "--seed); rows per seed and mean and sd over seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def split_list(text: str) -> list[str]:
    splits = [s.strip() for s in text.split(",") if s.strip()]
    if not splits or any(s not in ("train", "valid", "test") for s in splits):
        raise argparse.ArgumentTypeError(f"{text!r} must list splits among train,valid,test")
    return splits


def eval_inference(name: str, steps: int, trained: RunConfig, base: RunConfig
                   ) -> InferenceConfig:
    """How a variant's posterior is fitted at evaluation: as it was trained, except that the
    no-inference ablation is fitted like the LTM (from the LTM's q_0) when ``steps`` > 0, and
    is q = the prior exactly at ``steps`` 0."""
    if name != NO_INFERENCE:
        return trained.inference
    return prior_as_posterior(base.inference) if steps == 0 else base.inference


def validation_curve(run_dir: Path, config: RunConfig, flops_per_token: float) -> list[dict]:
    tokens_per_step = config.train.batch_size * config.model.context
    return [{"tokens": r["step"] * tokens_per_step,
             "flops": r["step"] * tokens_per_step * flops_per_token, "neg_elbo": r["neg_elbo"]}
            for r in read_jsonl(run_dir / METRICS_NAME) if r["split"] == "valid"]


def curves_figure(curves: dict[str, list[dict]], references: dict[str, float],
                  title: str | None = None, borrowed: tuple[str, ...] = ()):  # noqa: ANN201
    """Validation -ELBO (AR: NLL) of each variant against training tokens and training FLOPs
    (log axes with SI-prefixed ticks), with the corpus' valid references. Variants named in
    ``borrowed`` (curves taken from another results file) are drawn dashed with open markers.
    ``python experiments/replot.py LABEL.json`` redraws it from the results file."""
    from ltm_pyro.viz import readable_log_ticks, reference_label

    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    colours = dict(zip(curves, sns.color_palette("tab10" if len(curves) <= 10 else "husl",
                                                  len(curves))))
    for ax, x_key, label in ((axes[0], "tokens", "training tokens (k = 1e3, M = 1e6)"),
                             (axes[1], "flops", "training FLOPs, every inner step counted "
                                                "(G = 1e9, T = 1e12)")):
        for name, points in curves.items():
            ax.plot([p[x_key] for p in points], [p["neg_elbo"] for p in points],
                    "o--" if name in borrowed else "o-", color=colours[name], label=name,
                    mfc="white" if name in borrowed else None)
        for ref, style in (("unigram_entropy_valid", "--"), ("entropy_floor_valid", ":")):
            if ref in references:
                ax.axhline(references[ref], ls=style, lw=1, label=reference_label(ref),
                           color="grey" if style == "--" else "black")
        ax.set_xscale("log")
        readable_log_ticks(ax)
        ax.set_xlabel(label)
        ax.set_ylabel("validation -ELBO (nats/token; AR: NLL)")
        ax.set_title(f"against training {'tokens' if x_key == 'tokens' else 'FLOPs'}")
        ax.legend(fontsize=8)
    fig.suptitle(title or "Validation -ELBO against the training budget")
    return fig


def eval_passes(config: RunConfig, steps: int, iw_samples: int, bound_samples: int) -> float:
    """What the row's iwae figure cost, in decoder forward passes per scored window: the fit
    (T x 2: a forward and an input-gradient backward per inner step; the encoder's proposal,
    if any) and K importance draws. AR: one pass; MDLM: its bound's draws."""
    if config.model_kind == "mdlm":
        return float(bound_samples)
    if not config.model.latents_per_layer:
        return 1.0
    fit = fit_flops_per_token(config.model, steps, config.inference)
    return round(fit / forward_flops_per_token(config.model) + iw_samples, 2)


def add_paired_intervals(rows: list[dict], per_window: dict[tuple, dict], ltm: str,
                         ltm_steps: int) -> None:
    """``ltm_vs_this`` on each row scored window by window: the LTM's iwae_ppl (at its
    training T, same seed) relative to the row's, ppl_LTM / ppl_row - 1 (negative: the LTM is
    better), with a paired bootstrap 95% interval over the same windows (``uncertainty``)."""
    for row in rows:
        seed = row.get("seed")
        mine = per_window.get((row["variant"], seed, row["split"], row["T_eval"]))
        reference = per_window.get((ltm, seed, row["split"], ltm_steps))
        if mine is None or reference is None or row["variant"] == ltm:
            continue
        result = paired_bootstrap(reference["neg_iwae"], mine["neg_iwae"], mine["tokens"],
                                  seed=row["T_eval"])
        row.update(ltm_vs_this=result["difference"], ltm_vs_this_low=result["low"],
                   ltm_vs_this_high=result["high"])


@dataclass
class Bench:
    """What the variants share: the flags, the base run, the scored windows, and what has
    been gathered so far (rows, per-window figures, curves, configs)."""

    args: argparse.Namespace
    base: RunConfig
    corpus: object = None  # a Corpus, once the first run has been loaded
    scored: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    per_window: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    configs: dict = field(default_factory=dict)


def run_variant(bench: Bench, name: str, config: RunConfig, seed: int, run_dir: Path) -> None:
    """Train one variant at one seed, then score it on every split and T_eval."""
    args, base = bench.args, bench.base
    started = time.perf_counter()
    train(config, run_dir, force=True, progress=not args.no_progress)
    wall = time.perf_counter() - started
    ltm, trained, tokenizer = model_from_checkpoint(load_checkpoint(run_dir), config.train.device)
    if bench.corpus is None:
        bench.corpus = load_corpus(trained.data, trained.model.context, tokenizer)
        bench.scored = {split: bench.corpus.windows[split][: args.test_windows]
                        for split in args.splits}
    bench.configs[run_dir.name] = trained.to_dict()
    per_token = training_flops_per_token(trained.model, config.inference.steps,
                                         config.train.decoder_grads)
    bench.curves[run_dir.name] = validation_curve(run_dir, trained, per_token)
    tokens_seen = config.train.max_steps * config.train.batch_size * config.model.context
    trained_steps = base.inference.steps if name == NO_INFERENCE else config.inference.steps
    eval_steps = (args.eval_inference_steps or [trained_steps]) if ltm.has_latents else [0]
    if name == NO_INFERENCE:  # also q = the prior, whatever the LTM's T_eval
        eval_steps = sorted({0, *eval_steps})
    for (split, windows), steps in itertools.product(bench.scored.items(), eval_steps):
        summary = evaluate_bound(
            ltm.decoder, windows, args.bound_samples, config.train.batch_size, seed,
            config.train.device) if trained.model_kind == "mdlm" else evaluate_windows(
            ltm, windows, eval_inference(name, steps, trained, base), steps=steps,
            batch_size=config.train.batch_size, elbo_samples=args.elbo_samples,
            iw_samples=args.iw_samples, seed=seed, device=config.train.device,
            latent_stats=True, mi_samples=args.mi_samples, prior_samples=args.prior_samples,
            per_window=True)
        if "per_window" in summary:
            bench.per_window[(name, seed, split, steps)] = summary.pop("per_window")
        bench.rows.append({
            "variant": name, "seed": seed, "params": count_parameters(trained.model),
            "tokens_seen": tokens_seen, "train_pflops": tokens_seen * per_token / 1e15,
            "train_wall_s": round(wall, 1), "split": split, "T_eval": steps,
            "eval_passes": eval_passes(trained, steps, args.iw_samples, args.bound_samples),
            **summary})
        print(markdown_table(bench.rows[-1:], COLUMNS), flush=True)


def over_seeds(rows: list[dict]) -> list[dict]:
    """Mean and sd over seeds of each (variant, split, T_eval)'s bounds and LTM difference."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["split"], row["T_eval"]), []).append(row)
    summary = []
    for (variant, split, steps), group in groups.items():
        entry = {"variant": variant, "split": split, "T_eval": steps, "seeds": len(group)}
        for key in ("iwae_ppl", "elbo_ppl", "ltm_vs_this"):
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                spread = mean_and_sd(values)
                entry[f"{key}_mean"], entry[f"{key}_sd"] = spread["mean"], spread["sd"]
        summary.append(entry)
    return summary


def main() -> int:
    args = parser().parse_args()
    base = config_from_args(args)
    runs = comparison_configs(base, args.train_inference_steps, with_ar=not args.no_ar,
                              with_no_inference=not (args.no_ar or args.no_ablation),
                              with_mdlm=not (args.no_ar or args.no_mdlm))
    seeds = args.seeds or [base.train.seed]
    bench = Bench(args, base)
    for seed, (name, config) in itertools.product(seeds, runs.items()):
        seeded = replace(config, train=replace(config.train, seed=seed))
        folder = name if len(seeds) == 1 else f"{name}-seed{seed}"
        run_variant(bench, name, seeded, seed, args.runs / args.label / folder)
    add_paired_intervals(bench.rows, bench.per_window, f"ltm-T{base.inference.steps}",
                         base.inference.steps)
    write_report(bench, "mdlm" in runs)
    return 0


def write_report(bench: Bench, with_mdlm: bool) -> None:
    args, corpus = bench.args, bench.corpus
    results_dir = args.results or Path("experiments/results") / corpus.name
    table = markdown_table(bench.rows, COLUMNS)
    seed_rows = over_seeds(bench.rows)
    seed_table = markdown_table(seed_rows, SEED_COLUMNS)
    write_results(results_dir / f"{args.label}.json", args.label, bench.base.train.device, {
        "corpus": corpus.name, "references": corpus.references, "rows": bench.rows,
        "over_seeds": seed_rows, "curves": bench.curves, "configs": bench.configs,
    },
        f"Splits {', '.join(args.splits)} of `{corpus.name}` (first {args.test_windows or 'all'} "
        "windows each); perplexities per predicted token. `elbo_ppl` and "
        "`iwae_ppl` are valid bounds; `recon_ppl` leaves the KL out (paper-style, not a bound). "
        "`ltm_vs_this`: the LTM's iwae_ppl (at its training T, same seed) relative to the row's "
        "on the same windows, ppl_LTM / ppl_row - 1 (negative: the LTM is better), with a "
        "paired bootstrap 95% interval over windows (`_low`, `_high`; 2,000 resamples). "
        "`eval_passes`: decoder forward passes per scored window behind `iwae_ppl` (the fit's "
        "T x 2 plus the K importance draws; fitting q is not free)."
        + (" For `mdlm` both are its continuous-time NELBO bound, over the same tokens (each "
           "window's first is given), `bound_ppl_rel_stderr` its Monte-Carlo standard error "
           "relative to the perplexity." if with_mdlm else "")
        + f"\n\n{table}\n\nOver seeds (mean and sample sd):\n\n{seed_table}\n\n"
        f"References (nats/token): {corpus.references}\n")
    save_figure(curves_figure(bench.curves, corpus.references, f"{args.label} ({corpus.name})"),
                results_dir / f"{args.label}.png")
    print(table)
    print(seed_table)


if __name__ == "__main__":
    run_main(main)
