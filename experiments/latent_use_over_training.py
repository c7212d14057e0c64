r"""Does the decoder come to use z as it trains? (issue 13, latent use against training tokens)

    python experiments/latent_use_over_training.py --label ptb-tiny-T4-long \
        --data ../shared/data/ptb --inference-steps 4 --slow-lr 3e-3 --max-steps 2000 \
        --eval-every 200 --eval-windows 128

Trains one run into --runs/LABEL (the runner's own resume: the same command continues a
stopped run, and a finished run is reported without training again) with the prior control
at every validation (``--eval-prior-control``, 32 draws unless told), then writes
--results/LABEL.{json,md,png}: each validation's iwae_ppl and prior_iwae_ppl (the same K
draws from the fitted q and from the prior), their ratio ``prior_control``, and the KL and
mutual information per window, against training tokens. A prior control that stays at or
below 0 as tokens grow says the decoder does not learn to use z at this size and budget; one
that rises says it does, and from when. ``--baseline RUN`` (a finished run validated on the
same windows at the same steps, e.g. the matched AR: ``run_svi.py --model ar --match-params``
with the same data and schedule) adds its valid perplexity at each step and the LTM's
``iwae_ppl`` relative to it. ``--report-only`` reports the run folder as it stands, with its
own config and no training: a run stopped part-way (Ctrl-C or SIGTERM write a checkpoint)
is reported up to its last validation, and the page says where it stopped.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from ltm_pyro.cli import OneLineParser, add_run_arguments, config_from_args, run_main  # noqa: E402
from ltm_pyro.config import RunConfig  # noqa: E402
from ltm_pyro.errors import UsageError  # noqa: E402
from ltm_pyro.files import read_jsonl  # noqa: E402
from ltm_pyro.report import markdown_table, write_results  # noqa: E402
from ltm_pyro.runner import (  # noqa: E402
    CONFIG_NAME,
    METRICS_NAME,
    Interrupted,
    finished_run,
    train,
)
from ltm_pyro.viz import information_panel, save_figure  # noqa: E402

DEFAULT_DRAWS = 32
COLUMNS = ["step", "tokens_seen", "neg_elbo", "nll", "kl", "iwae_ppl", "prior_iwae_ppl",
           "prior_control", "kl_per_window", "mutual_info_per_window", "mutual_info_stderr",
           "active_units", "slot_correlation"]
BASELINE_COLUMNS = ["baseline_elbo_ppl", "iwae_vs_baseline"]
SAME_VALIDATION = (("data", "path"), ("data", "tokenizer"), ("model", "context"),
                   ("train", "eval_windows"))


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--label", required=True, help="name of the run and of its results")
    p.add_argument("--runs", type=Path, default=Path("runs/latents"), help="run folders")
    p.add_argument("--results", type=Path, default=Path("experiments/results/latents"))
    p.add_argument("--baseline", type=Path,
                   help="a finished run folder validated on the same windows at the same steps "
                   "(e.g. the matched AR), drawn and tabled beside the LTM")
    p.add_argument("--report-only", action="store_true",
                   help="report --runs/LABEL as it stands (its own config), without training")
    p.add_argument("--force", action="store_true",
                   help="start over in a run folder that holds another config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    add_run_arguments(p)
    return p


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


def main() -> int:
    args = parser().parse_args()
    run_dir = args.runs / args.label
    config = stored_config(run_dir) if args.report_only else controlled(
        config_from_args(args))
    figures = None if args.baseline is None else baseline_figures(args.baseline, config)
    if not (args.report_only or finished_run(run_dir, config)):
        try:
            train(config, run_dir, force=args.force, progress=not args.no_progress)
        except Interrupted as stopped:  # a checkpoint was written: --report-only reports it
            print(f"{stopped}; --report-only reports it as it stands", file=sys.stderr)
            return stopped.exit_status
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
    print(markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    run_main(main)
