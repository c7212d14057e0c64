"""What experiments/latent_use_over_training.py computes: one LTM trained with the prior
control at every validation, and its latent use (prior control, KL, MI) against training
tokens, optionally beside an AR baseline's figures at the same steps (the script's docstring
says what each flag does).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

from ..config import RunConfig
from ..errors import UsageError
from ..files import read_jsonl
from ..report import markdown_table, write_results
from ..runner import CONFIG_NAME, METRICS_NAME
from ..viz import information_panel, save_figure

DEFAULT_DRAWS = 32


COLUMNS = ["step", "tokens_seen", "neg_elbo", "nll", "kl", "iwae_ppl", "prior_iwae_ppl",
           "prior_control", "kl_per_window", "mutual_info_per_window", "mutual_info_stderr",
           "active_units", "slot_correlation"]


BASELINE_COLUMNS = ["baseline_elbo_ppl", "iwae_vs_baseline"]


SAME_VALIDATION = (("data", "path"), ("data", "tokenizer"), ("model", "context"),
                   ("train", "eval_windows"))


def controlled(config: RunConfig) -> RunConfig:
    """The run with the prior control at every validation (32 draws unless told)."""
    if not config.model.latents_per_layer:
        raise UsageError("latent use over training needs an LTM with latents; drop --model "
                         "and --latents-per-layer 0")
    draws = config.train.eval_prior_control or DEFAULT_DRAWS
    return replace(config, train=replace(config.train, eval_prior_control=draws))


def validation_rows(records: list[dict], config: RunConfig) -> list[dict]:
    """Each validation record, with the training tokens seen before it."""
    per_step = config.train.batch_size * config.model.context
    return [{**r, "tokens_seen": r["step"] * per_step} for r in records
            if r.get("split") == "valid"]


def baseline_figures(baseline: Path, config: RunConfig) -> dict[int, float]:
    """The baseline run's valid ``elbo_ppl`` (an AR's exact perplexity) at each validation
    step, read before any training so that a wrong --baseline fails at once."""
    try:
        other = json.loads((baseline / CONFIG_NAME).read_text())
        records = read_jsonl(baseline / METRICS_NAME)
    except (OSError, ValueError) as error:
        raise UsageError(f"--baseline {baseline}: not a finished run folder ({error}); train "
                         "it first with experiments/run_svi.py --out") from None
    mine = config.to_dict()
    for section, key in SAME_VALIDATION:
        if other[section][key] != mine[section][key]:
            raise UsageError(f"--baseline {baseline} was validated differently ({section}."
                             f"{key} {other[section][key]!r}, here {mine[section][key]!r}); "
                             "train it with the same data, windows and --eval-windows")
    return {r["step"]: r["elbo_ppl"] for r in records if r.get("split") == "valid"}


def with_baseline(rows: list[dict], figures: dict[int, float], baseline: Path) -> list[dict]:
    """Each row with the baseline's figure at the same step and ``iwae_vs_baseline`` =
    iwae_ppl / it - 1 (negative: the LTM is better)."""
    missing = [r["step"] for r in rows if r["step"] not in figures]
    if missing:
        raise UsageError(f"--baseline {baseline} has no validation at steps {missing}; train "
                         "it with the same --max-steps and --eval-every")
    return [{**r, "baseline_elbo_ppl": figures[r["step"]],
             "iwae_vs_baseline": r["iwae_ppl"] / figures[r["step"]] - 1} for r in rows]


def figure(rows: list[dict], title: str, baseline: str | None):  # noqa: ANN201 - a Figure
    """Bounds, the prior control and what z carries, against training tokens."""
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), constrained_layout=True)
    tokens = [r["tokens_seen"] for r in rows]
    ax = axes[0]
    ax.plot(tokens, [r["iwae_ppl"] for r in rows], "o-", label="iwae_ppl (q as proposal)")
    ax.plot(tokens, [r["prior_iwae_ppl"] for r in rows], "s--",
            label="prior_iwae_ppl (prior as proposal)")
    if baseline:
        ax.plot(tokens, [r["baseline_elbo_ppl"] for r in rows], "^-", color="C2",
                label=f"baseline {baseline} (elbo_ppl)")
    ax.set(title="Valid bounds", xlabel="training tokens", ylabel="perplexity (log)",
           yscale="log")
    ax = axes[1]
    ax.plot(tokens, [100 * r["prior_control"] for r in rows], "D-", color="C4")
    ax.axhline(0, ls=":", color="grey", label="0: z unused at evaluation")
    ax.set(title="Prior control (valid)", xlabel="training tokens",
           ylabel="prior_iwae_ppl / iwae_ppl - 1 (%)")
    information_panel(axes[2], tokens, rows, "training tokens")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def stored_config(run_dir: Path) -> RunConfig:
    """The config a run folder was trained with (``--report-only``)."""
    try:
        return RunConfig.from_dict(json.loads((run_dir / CONFIG_NAME).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"--report-only: no run to report in {run_dir} ({error}); drop "
                         "--report-only to train it") from None


def write_report(args: argparse.Namespace, run_dir: Path, config: RunConfig,
                 figures: dict[int, float] | None) -> str:
    """LABEL.json, LABEL.md and LABEL.png in --results from the run's validation records
    (with --baseline, each row beside the baseline's figure at the same step); returns the
    table."""
    records = read_jsonl(run_dir / METRICS_NAME)
    last_step = max((r["step"] for r in records), default=0)
    stopped = ("" if last_step >= config.train.max_steps else
               f" Stopped after step {last_step} of {config.train.max_steps} (the same command "
               "without --report-only resumes it).")
    rows = validation_rows(records, config)
    if not rows:
        raise UsageError(f"{run_dir} has no validation yet; train it past --eval-every steps")
    if any("prior_control" not in r for r in rows):
        raise UsageError(f"{run_dir} was validated without the prior control; train it with "
                         "this script (or run_svi.py --eval-prior-control K)")
    columns = COLUMNS
    if args.baseline:
        rows = with_baseline(rows, figures, args.baseline)
        columns = COLUMNS + BASELINE_COLUMNS
    draws = config.train.eval_prior_control
    write_results(args.results / f"{args.label}.json", args.label, config.train.device, {
        "run": str(run_dir), "config": config.to_dict(), "rows": rows, "last_step": last_step,
        "baseline": None if args.baseline is None else str(args.baseline)},
        f"Run `{run_dir}`: {config.summary()}. Each row is a validation on the first "
        f"{config.train.eval_windows} valid windows at T_eval {config.inference.steps}: "
        f"`iwae_ppl` and `prior_iwae_ppl` from {draws} importance draws of the fitted q and "
        "of the prior, `prior_control` their ratio - 1 (above 0: fitting q to the window "
        "helps, so the decoder uses z), KL and mutual information in nats per window "
        f"(docs/latent-diagnostics.md).{stopped}"
        + ("" if args.baseline is None else
           f" `baseline_elbo_ppl`: the valid elbo_ppl of `{args.baseline}` at the same step "
           "(an AR's exact perplexity), `iwae_vs_baseline` the LTM's iwae_ppl over it - 1.")
        + "\n\n" + markdown_table(rows, columns))
    save_figure(figure(rows, f"{args.label}: latent use against training tokens",
                       args.baseline and args.baseline.name),
                args.results / f"{args.label}.png")
    return markdown_table(rows, columns)
