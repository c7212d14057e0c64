"""What experiments/bench_quality.py computes: the LTM against its matched baselines on one
budget and seed, with equal tuning, equal-FLOP baselines, seeds and paired intervals (the
script's docstring says what each flag does; this module holds the logic so notebooks and
tests use it without the command line).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..bounds import ScoringConfig
from ..checkpoint import BEST_NAME, load_checkpoint, model_from_checkpoint
from ..comparisons import (
    NO_INFERENCE,
    equal_flop_steps,
    prior_as_posterior,
    validation_curve,
    with_slow_schedule,
)
from ..config import InferenceConfig, RunConfig
from ..data import describe_selection, load_corpus, select_windows
from ..decoder import count_parameters
from ..errors import UsageError
from ..families import family_of
from ..report import markdown_table, write_results
from ..runner import Diverged, finished_run, train
from ..scaling import spent
from ..uncertainty import mean_and_sd, paired_bootstrap
from ..viz import save_figure
from .figures import curves_figure

COLUMNS = ["variant", "seed", "params", "tokens_seen", "train_pflops", "train_wall_s", "split",
           "T_eval", "eval_passes", "tokens", "nll_per_token", "kl_per_token", "elbo_ppl",
           "iwae_ppl", "recon_ppl",
           "prior_iwae_ppl", "kl_per_window", "mutual_info_per_window", "active_units",
           "slot_correlation", "bound_ppl_rel_stderr", "ltm_vs_this", "ltm_vs_this_low",
           "ltm_vs_this_high"]
TUNED_COLUMNS = COLUMNS[:2] + ["slow_lr", "warmup_steps"] + COLUMNS[2:]
BUDGET_COLUMNS = ["variant", "slow_steps", "scored_step", "tokens_seen", "epochs",
                  "train_pflops", "flops_vs_ltm"]
FLOPS_SUFFIX = "@flops"
SEED_COLUMNS = ["variant", "split", "T_eval", "seeds", "iwae_ppl_mean", "iwae_ppl_sd",
                "elbo_ppl_mean", "elbo_ppl_sd", "ltm_vs_this_mean", "ltm_vs_this_sd"]


def eval_inference(name: str, steps: int, trained: RunConfig, base: RunConfig
                   ) -> InferenceConfig:
    """How a variant's posterior is fitted at evaluation: as it was trained, except that the
    no-inference ablation is fitted like the LTM (from the LTM's q_0) when ``steps`` > 0, and
    is q = the prior exactly at ``steps`` 0."""
    if name != NO_INFERENCE:
        return trained.inference
    return prior_as_posterior(base.inference) if steps == 0 else base.inference


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


@dataclass(frozen=True)
class GridPoint:
    """One point of the tuning grid: the slow loop's peak learning rate and warm-up steps."""

    lr: float
    warmup_steps: int

    @property
    def label(self) -> str:
        return f"lr {self.lr:g}, wu {self.warmup_steps}"

    @property
    def suffix(self) -> str:
        """What the point adds to a run folder's name."""
        return f"@lr{self.lr:g}-wu{self.warmup_steps}"

    def apply(self, config: RunConfig) -> RunConfig:
        return with_slow_schedule(config, self.lr, self.warmup_steps)


def tuning_grid(args: argparse.Namespace, base: RunConfig) -> list[GridPoint]:
    """--tune-lr x --tune-warmup (an axis not given: the run's own value); empty without
    either flag, which leaves every variant as it was."""
    if args.tune_lr is None and args.tune_warmup is None:
        return []
    lrs = dict.fromkeys(args.tune_lr or [base.train.lr])
    warmups = dict.fromkeys(args.tune_warmup or [base.train.warmup_steps])
    return [GridPoint(lr, warmup) for lr, warmup in itertools.product(lrs, warmups)]


def folder_name(name: str, seed: int, seeds: list[int], point: GridPoint | None = None) -> str:
    """A run's folder under --runs/LABEL: the variant, its grid point when tuned, and its
    seed when there are several (a finished run there with the same config is reused)."""
    return name + (point.suffix if point else "") + ("" if len(seeds) == 1 else f"-seed{seed}")


def choose(points: list[dict]) -> dict[str, dict]:
    """Each family's point with the lowest ``valid_iwae_ppl`` (the first of equal ones); a
    diverged or non-finite point is never chosen, and a family with no other point is an
    error."""
    chosen: dict[str, dict] = {}
    for point in points:
        figure, best = point["valid_iwae_ppl"], chosen.get(point["family"])
        if figure is not None and math.isfinite(figure) and (
                best is None or figure < best["valid_iwae_ppl"]):
            chosen[point["family"]] = point
    failed = sorted({p["family"] for p in points} - chosen.keys())
    if failed:
        raise UsageError(f"no point of the tuning grid trained to a finite valid figure for "
                         f"{', '.join(failed)}; try lower --tune-lr values")
    return chosen


def seeded(config: RunConfig, seed: int) -> RunConfig:
    return replace(config, train=replace(config.train, seed=seed))


def trained_steps(name: str, config: RunConfig, base: RunConfig) -> int:
    """The T a variant is scored at by default: its training T (the ablation: the LTM's)."""
    return base.inference.steps if name == NO_INFERENCE else config.inference.steps


@dataclass
class Bench:
    """What the variants share: the flags, the base run, the corpus, and what has been
    gathered so far (rows, per-window figures, curves, configs; the tuning pass's wall times,
    valid summaries, points and choices; each variant's training budget)."""

    args: argparse.Namespace
    base: RunConfig
    corpus: object = None  # a Corpus, once the first run has been loaded
    rows: list = field(default_factory=list)
    per_window: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    configs: dict = field(default_factory=dict)
    walls: dict = field(default_factory=dict)  # run folder -> training seconds (tuning pass)
    cached: dict = field(default_factory=dict)  # (run folder, split, T_eval) -> summary
    tuning: list = field(default_factory=list)  # one record per (family, grid point)
    chosen: dict = field(default_factory=dict)  # family -> its chosen tuning record
    points: dict = field(default_factory=dict)  # variant -> the GridPoint it was trained at
    budgets: dict = field(default_factory=dict)  # variant -> steps, tokens, epochs, FLOPs

    @property
    def columns(self) -> list[str]:
        return TUNED_COLUMNS if self.points else COLUMNS

    def windows(self, split: str):  # noqa: ANN201 - a tensor of windows
        return select_windows(self.corpus.windows[split], self.args.test_windows,
                              self.args.sample_windows, self.args.sample_seed)

    def folder(self, name: str, seed: int, seeds: list[int]) -> Path:
        return self.args.runs / self.args.label / folder_name(name, seed, seeds,
                                                              self.points.get(name))


def trained_run(bench: Bench, config: RunConfig, run_dir: Path) -> tuple:
    """Train ``config`` into ``run_dir`` (not again when the tuning pass did: its wall time
    is kept) and load it, at its best validation with ``keep_best``: (wall seconds, model,
    trained config, step loaded). The first run loaded fixes the corpus."""
    if run_dir in bench.walls:
        wall = bench.walls[run_dir]
    elif finished_run(run_dir, config):  # reused from an earlier invocation: time unknown here
        wall = None
    else:
        started = time.perf_counter()
        train(config, run_dir, force=True, progress=not bench.args.no_progress)
        wall = time.perf_counter() - started
    payload = load_checkpoint(run_dir / BEST_NAME if config.train.keep_best else run_dir)
    ltm, trained, tokenizer = model_from_checkpoint(payload, config.train.device)
    if bench.corpus is None:
        bench.corpus = load_corpus(trained.data, trained.model.context, tokenizer)
    return wall, ltm, trained, payload["step"]


def score(bench: Bench, name: str, ltm, trained: RunConfig, split: str, steps: int,  # noqa: ANN001
          seed: int) -> dict:
    """One split's figures at T_eval ``steps`` (an MDLM: its bound), per window as well."""
    args, device, batch = bench.args, trained.train.device, trained.train.batch_size
    return family_of(trained).score(
        ltm, bench.windows(split), eval_inference(name, steps, trained, bench.base),
        ScoringConfig(steps=steps, batch_size=batch, elbo_samples=args.elbo_samples,
                      iw_samples=args.iw_samples, seed=seed, latent_stats=True,
                      mi_samples=args.mi_samples, prior_samples=args.prior_samples,
                      per_window=True, bound_samples=args.bound_samples), device)


def run_variant(bench: Bench, name: str, config: RunConfig, seed: int, run_dir: Path) -> None:
    """Train one variant at one seed (or take the tuning pass's run), then score it on every
    split and T_eval."""
    args, base = bench.args, bench.base
    wall, ltm, trained, scored_step = trained_run(bench, config, run_dir)
    bench.configs[run_dir.name] = trained.to_dict()
    bench.curves[run_dir.name] = validation_curve(run_dir, trained)
    used = spent(trained, len(bench.corpus.windows["train"]))
    tokens_seen = used["tokens_seen"]
    bench.budgets.setdefault(name, {
        "variant": name, "slow_steps": used["max_steps"], "scored_step": scored_step,
        "tokens_seen": tokens_seen,
        "epochs": used["epochs"], "train_pflops": used["train_flops"] / 1e15})
    trained_t = trained_steps(name, config, base)
    eval_steps = (args.eval_inference_steps or [trained_t]) if ltm.has_latents else [0]
    if name == NO_INFERENCE:  # also q = the prior, whatever the LTM's T_eval
        eval_steps = sorted({0, *eval_steps})
    for split, steps in itertools.product(args.splits, eval_steps):
        summary = bench.cached.pop((run_dir, split, steps), None) or score(
            bench, name, ltm, trained, split, steps, seed)
        if "per_window" in summary:
            bench.per_window[(name, seed, split, steps)] = summary.pop("per_window")
        tuned = {"slow_lr": config.train.lr, "warmup_steps": config.train.warmup_steps
                 } if name in bench.points else {}
        bench.rows.append({
            "variant": name, "seed": seed, **tuned, "params": count_parameters(trained.model),
            "tokens_seen": tokens_seen, "train_pflops": used["train_flops"] / 1e15,
            "train_wall_s": None if wall is None else round(wall, 1), "split": split,
            "T_eval": steps,
            "eval_passes": family_of(trained).score_passes(trained, ScoringConfig(
                steps=steps, iw_samples=args.iw_samples, bound_samples=args.bound_samples)),
            **summary})
        print(markdown_table(bench.rows[-1:], bench.columns), flush=True)


def tune(bench: Bench, runs: dict[str, RunConfig], grid: list[GridPoint], seeds: list[int]
         ) -> dict[str, RunConfig]:
    """Equal tuning: train every family at every grid point (at the first seed), score each
    on valid, and return each family's config at its chosen point (``choose``)."""
    seed = seeds[0]
    for (name, config), point in itertools.product(runs.items(), grid):
        run_dir = bench.args.runs / bench.args.label / folder_name(name, seed, seeds, point)
        bench.tuning.append({"family": name, "lr": point.lr, "warmup_steps": point.warmup_steps,
                             "seed": seed, "folder": run_dir.name, **tuning_figure(
                                 bench, name, seeded(point.apply(config), seed), seed, run_dir)})
    bench.chosen = choose(bench.tuning)
    bench.points = {name: GridPoint(bench.chosen[name]["lr"], bench.chosen[name]["warmup_steps"])
                    for name in runs}
    return {name: bench.points[name].apply(config) for name, config in runs.items()}


def tuning_figure(bench: Bench, name: str, config: RunConfig, seed: int, run_dir: Path
                  ) -> dict:
    """Train one grid point and score it on valid at its training T: ``valid_iwae_ppl``
    (None, with the reason, when training diverged). The summary is kept for the valid rows
    of the run, should it be chosen."""
    try:
        wall, ltm, trained, _ = trained_run(bench, config, run_dir)
    except Diverged as error:
        return {"valid_iwae_ppl": None, "diverged": str(error)}
    bench.walls[run_dir] = wall
    steps = trained_steps(name, config, bench.base)
    summary = score(bench, name, ltm, trained, "valid", steps, seed)
    bench.cached[(run_dir, "valid", steps)] = summary
    print(f"tuning {name} at {GridPoint(config.train.lr, config.train.warmup_steps).label}: "
          f"valid iwae_ppl {summary['iwae_ppl']:.4f}", flush=True)
    return {"valid_iwae_ppl": summary["iwae_ppl"],
            "train_wall_s": None if wall is None else round(wall, 1)}


def equal_flop_runs(bench: Bench, runs: dict[str, RunConfig], reference: str
                    ) -> dict[str, RunConfig]:
    """Each AR baseline and mdlm trained for ``reference``'s training FLOPs: the same config
    with ``equal_flop_steps`` slow steps, named VARIANT@flops (and at its tuned point)."""
    vocab = bench.corpus.tokenizer.vocab_size

    def sized(config: RunConfig) -> RunConfig:
        return replace(config, model=replace(config.model, vocab_size=vocab))

    found = {}
    for name, config in runs.items():
        if not family_of(config).latent:
            steps = equal_flop_steps(sized(runs[reference]), sized(config))
            found[name + FLOPS_SUFFIX] = replace(config, train=replace(
                config.train, max_steps=steps, keep_best=True))
            if name in bench.points:
                bench.points[name + FLOPS_SUFFIX] = bench.points[name]
    return found


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


def tuning_record(bench: Bench, grid: list[GridPoint]) -> dict:
    """The grid, every point's valid figure and each family's choice, for the results."""
    return {
        "grid": [{"lr": p.lr, "warmup_steps": p.warmup_steps} for p in grid],
        "seed": bench.tuning[0]["seed"], "split": "valid",
        "windows": len(bench.windows("valid")),
        "criterion": "lowest iwae_ppl on valid at the training T (ltm-no-inference: fitted "
                     "like the LTM; mdlm: its NELBO bound)",
        "points": bench.tuning,
        "chosen": {family: {k: point[k] for k in ("lr", "warmup_steps", "valid_iwae_ppl",
                                                  "folder")}
                   for family, point in bench.chosen.items()},
    }


def tuning_table(points: list[dict], chosen: dict[str, dict]) -> str:
    """One row a family: its valid figure at each grid point, and the point chosen."""
    rows: dict[str, dict] = {}
    labels: dict[str, None] = {}
    for point in points:
        label = GridPoint(point["lr"], point["warmup_steps"]).label
        labels[label] = None
        figure = point["valid_iwae_ppl"]
        rows.setdefault(point["family"], {"family": point["family"]})[label] = (
            "diverged" if figure is None else figure)
    for family, row in rows.items():
        row["chosen"] = GridPoint(chosen[family]["lr"], chosen[family]["warmup_steps"]).label
    return markdown_table(list(rows.values()), ["family", *labels, "chosen"])


def budget_rows(bench: Bench, reference: str) -> list[dict]:
    """Every variant's training budget (first seed), with its FLOPs relative to the LTM's."""
    ltm_pflops = bench.budgets[reference]["train_pflops"]
    return [{**budget, "flops_vs_ltm": budget["train_pflops"] / ltm_pflops}
            for budget in bench.budgets.values()]


def scored_windows(args: argparse.Namespace) -> str:
    """Which windows of each split the tables score, as the page's intro says it."""
    return describe_selection(args.test_windows, args.sample_windows, args.sample_seed)


def report_extras(bench: Bench, grid: list[GridPoint], ltm_name: str) -> tuple[dict, str, str]:
    """What tuning and --equal-flops add to the results: JSON entries, a sentence for the
    page's introduction and the page's sections."""
    payload, intro, sections = {}, "", ""
    if grid:
        record = payload["tuning"] = tuning_record(bench, grid)
        intro += (
            " Equal tuning: every family was trained at each point of the grid below (seed "
            f"{record['seed']}) and scored on valid ({scored_windows(bench.args)}) by "
            "iwae_ppl at its training T (ltm-no-inference fitted like the LTM; mdlm: its "
            "bound); each row is its family's chosen point (`slow_lr`, `warmup_steps`).")
        sections += ("\n\nTuning (valid iwae_ppl at each grid point; lowest chosen):\n\n"
                     + tuning_table(bench.tuning, bench.chosen))
    if bench.args.equal_flops:
        budgets = payload["budgets"] = budget_rows(bench, ltm_name)
        intro += (
            f" `VARIANT{FLOPS_SUFFIX}`: the same baseline trained for {ltm_name}'s training "
            "FLOPs (every inner step counted, rounded to whole steps), so on more tokens, "
            "and scored at its validation with the lowest -ELBO (early stopping: "
            "`scored_step` below); `flops_vs_ltm` is its budget over the LTM's.")
        sections += ("\n\nTraining budgets (first seed; epochs over the train split's "
                     f"{len(bench.corpus.windows['train']):,} windows):\n\n"
                     + markdown_table(budgets, BUDGET_COLUMNS))
    return payload, intro, sections


def write_report(bench: Bench, with_mdlm: bool, grid: list[GridPoint], ltm_name: str) -> None:
    args, corpus = bench.args, bench.corpus
    results_dir = args.results or Path("experiments/results") / corpus.name
    table = markdown_table(bench.rows, bench.columns)
    seed_rows = over_seeds(bench.rows)
    seed_table = markdown_table(seed_rows, SEED_COLUMNS)
    extras, intro, sections = report_extras(bench, grid, ltm_name)
    write_results(results_dir / f"{args.label}.json", args.label, bench.base.train.device, {
        "corpus": corpus.name, "references": corpus.references, "rows": bench.rows,
        "over_seeds": seed_rows, "curves": bench.curves, "configs": bench.configs, **extras,
    },
        f"Splits {', '.join(args.splits)} of `{corpus.name}` ({scored_windows(args)} "
        "of each split); perplexities per predicted token. `elbo_ppl` and "
        "`iwae_ppl` are valid bounds; `recon_ppl` leaves the KL out (paper-style, not a bound). "
        "`ltm_vs_this`: the LTM's iwae_ppl (at its training T, same seed) relative to the row's "
        "on the same windows, ppl_LTM / ppl_row - 1 (negative: the LTM is better), with a "
        "paired bootstrap 95% interval over windows (`_low`, `_high`; 2,000 resamples). "
        "`eval_passes`: decoder forward passes per scored window behind `iwae_ppl` (the fit's "
        "T x 2 plus the K importance draws; fitting q is not free)."
        + (" For `mdlm` both are its continuous-time NELBO bound, over the same tokens (each "
           "window's first is given), `bound_ppl_rel_stderr` its Monte-Carlo standard error "
           "relative to the perplexity." if with_mdlm else "") + intro
        + f"\n\n{table}\n\nOver seeds (mean and sample sd):\n\n{seed_table}{sections}\n\n"
        f"References (nats/token): {corpus.references}\n")
    save_figure(curves_figure(bench.curves, corpus.references, f"{args.label} ({corpus.name})"),
                results_dir / f"{args.label}.png")
    print(table)
    print(seed_table)
