"""What experiments/scaling.py computes: the scaling grid's runs at fixed token or FLOP budgets,
their scores, Pareto frontiers, equal-FLOP sets and figures (the grid points and budgets
themselves are ltm_pyro/scaling.py; the script's docstring says what each flag does).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from ..amortised import count_encoder_parameters
from ..bounds import ScoringConfig, evaluate_windows
from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..comparisons import step_flops, tokens_per_step, validation_curve
from ..config import RunConfig
from ..decoder import count_parameters
from ..errors import UsageError
from ..families import family_of
from ..files import write_json
from ..report import markdown_table, write_results
from ..runner import train
from ..scaling import (
    BUDGETS,
    equal_flop_groups,
    grid_points,
    pareto_frontier,
    point_config,
    spent,
    with_budget,
)
from ..viz import readable_log_ticks, save_figure

RESULT_NAME = "scaling.json"
FAMILY_NAMES = {"ltm": "LTM", "sa": "semi-amortised LTM", "ar": "AR"}
#: Each family's frontier line in the figures: (line style, colour).
FRONTIER_STYLES = {"ar": ("--", "grey"), "ltm": ("-", "black"), "sa": (":", "darkred")}
COLUMNS = ["budget", "run", "params", "encoder_params", "T", "max_steps", "tokens_seen",
           "epochs", "train_flops", "train_wall_s", "eval_passes", "iwae_ppl", "elbo_ppl",
           "recon_ppl", "kl_per_window", "mutual_info_per_window", "active_units"]
#: Run flags that an axis of the grid replaces: giving both is ambiguous.
AXIS_FLAGS = {"widths": "d_model", "depths": "n_layers", "latents": "latents_per_layer",
              "latent_dims": "latent_dim", "steps": "inference_steps"}


def grid_axes(args: argparse.Namespace, base: RunConfig) -> dict:
    """Each axis's values: the flag's, or the run flags' single value."""
    if not family_of(base).latent:
        raise UsageError("scaling trains both families itself: drop --model and choose them "
                         "with --families")
    for axis, flag in AXIS_FLAGS.items():
        if getattr(args, axis) is not None and getattr(args, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} and --{axis.replace('_', '-')} both "
                             f"set the grid's {axis.replace('_', ' ')}: give only --"
                             f"{axis.replace('_', '-')}")
    if args.latents is not None and 0 in args.latents:
        raise UsageError("--latents must be positive (the AR family is the model without "
                         "latents: --families ltm,ar)")
    m = base.model
    return {"families": args.families, "widths": args.widths or [m.d_model],
            "depths": args.depths or [m.n_layers],
            "latents": args.latents or [m.latents_per_layer],
            "latent_dims": args.latent_dims or [m.latent_dim],
            "steps": args.steps if args.steps is not None else [base.inference.steps]}


def budgets(args: argparse.Namespace, base: RunConfig) -> list[tuple[str, float]]:
    """(kind, amount) of every budget asked for; defaults from the run flags' LTM."""
    for kind in BUDGETS:
        if getattr(args, kind) is not None and kind not in args.budget:
            raise UsageError(f"--{kind} applies to --budget {kind}: add it to --budget")
    amounts = {"tokens": args.tokens or [base.train.max_steps * tokens_per_step(base)],
               "flops": args.flops or [base.train.max_steps * step_flops(base)]}
    return [(kind, float(a)) for kind in args.budget for a in amounts[kind]]


def si(amount: float) -> str:
    """``409.6k``, ``1.04T``: an amount with an SI prefix."""
    power, prefix = next((p, x) for p, x in ((12, "T"), (9, "G"), (6, "M"), (3, "k"), (0, ""))
                         if amount >= 10 ** p or p == 0)
    return f"{amount / 10 ** power:.4g}{prefix}"


def budget_label(kind: str, amount: float) -> str:
    """``tokens 409.6k``, ``FLOPs 1.04T``."""
    return f"{'FLOPs' if kind == 'flops' else kind} {si(amount)}"


def plan(args: argparse.Namespace, base: RunConfig, axes: dict,
         amounts: list[tuple[str, float]]) -> list[dict]:
    """Every run of the grid: its budget, point, config and folder."""
    points = grid_points(**axes)
    runs = []
    for kind, amount in amounts:
        for point in points:
            try:
                config = with_budget(point_config(base, point), kind, amount)
            except UsageError as error:
                raise UsageError(f"{point.name}: {error}") from None
            runs.append({"budget": budget_label(kind, amount), "budget_kind": kind,
                         "budget_amount": amount, "point": point, "config": config,
                         "dir": args.runs / args.label / f"{point.name}-s{config.train.max_steps}"})
    return runs


def plain(config: RunConfig) -> dict:
    """The config as its JSON round trip (tuples become lists), for comparisons."""
    return json.loads(json.dumps(config.to_dict()))


def score_settings(args: argparse.Namespace) -> dict:
    return {"split": "valid", "windows": args.score_windows, "iw_samples": args.iw_samples,
            "elbo_samples": args.elbo_samples, "mi_samples": args.mi_samples}


def stored_result(run: dict) -> dict | None:
    """The run's stored result when it was trained with this config, else None. The stored
    config is read back through ``RunConfig.from_dict``, so a field added to the library
    since (at its default) does not make a finished run look different."""
    path = run["dir"] / RESULT_NAME
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    same = plain(RunConfig.from_dict(stored["config"])) == plain(run["config"])
    return stored if same else None


def finished(run: dict, settings: dict) -> dict | None:
    """The run's stored result when it was trained with this config and scored with these
    settings, else None."""
    stored = stored_result(run)
    return stored if stored is not None and stored.get("settings") == settings else None


def train_and_score(args: argparse.Namespace, run: dict, windows, settings: dict) -> dict:  # noqa: ANN001
    """Train (or resume, or find finished) the run, score it on valid at its training T and
    store the result in its folder."""
    config = run["config"]
    previous = stored_result(run)  # scored before with other settings: already trained
    started = time.perf_counter()
    train(config, run["dir"], force=True, progress=not args.no_progress)
    wall = previous["train_wall_s"] if previous else round(time.perf_counter() - started, 1)
    ltm, trained, _ = model_from_checkpoint(load_checkpoint(run["dir"]), config.train.device)
    summary = evaluate_windows(ltm, windows, trained.inference,
                               ScoringConfig(steps=trained.inference.steps,
                                             batch_size=config.train.batch_size,
                                             elbo_samples=args.elbo_samples,
                                             iw_samples=args.iw_samples, seed=config.train.seed,
                                             latent_stats=True, mi_samples=args.mi_samples),
                               device=config.train.device)
    stored = {"point": asdict(run["point"]), "config": plain(config), "settings": settings,
              "train_wall_s": wall, "summary": summary,
              "curve": validation_curve(run["dir"], config)}
    write_json(run["dir"] / RESULT_NAME, stored)
    return stored


def row(run: dict, stored: dict, train_windows: int, iw_samples: int) -> dict:
    config, point = run["config"], run["point"]
    return {"budget": run["budget"], "run": run["dir"].name, **asdict(point),
            "T": point.steps, "params": count_parameters(config.model),
            "encoder_params": count_encoder_parameters(config.model, config.inference),
            **spent(config, train_windows), "train_wall_s": stored["train_wall_s"],
            "eval_passes": family_of(config).score_passes(
                config, ScoringConfig(iw_samples=iw_samples)), **stored["summary"]}


def series_label(r: dict, by_budget: bool) -> str:
    """A row's line in the figures: the family, and for an LTM its latents and T."""
    label = "AR" if r["family"] == "ar" else (
        f"{FAMILY_NAMES[r['family']]} k{r['latents_per_layer']} z{r['latent_dim'] or 'd'} "
        f"T{r['T']}")
    return f"{label}, {r['budget']}" if by_budget else label


def size_label(r: dict) -> str:
    return f"d{r['d_model']} L{r['n_layers']}"


def _styles(rows: list[dict]) -> tuple[dict, dict, bool]:
    by_budget = len({r["budget"] for r in rows}) > 1
    series = list(dict.fromkeys(series_label(r, by_budget) for r in rows))
    colours = dict(zip(series, sns.color_palette("tab10" if len(series) <= 10 else "husl",
                                                 len(series))))
    sizes = list(dict.fromkeys(size_label(r) for r in sorted(
        rows, key=lambda r: (r["d_model"], r["n_layers"]))))
    markers = dict(zip(sizes, "osD^v<>ph*" * (1 + len(sizes) // 10)))
    return colours, markers, by_budget


def perplexity_axis(ax) -> None:  # noqa: ANN001 - an Axes
    """A log y axis labelled with plain round numbers that never overlap: within a decade,
    the multiples of the finest 1, 2 or 5 x 10^k step giving at most eight ticks; over more,
    1, 1.5, 2, 3, 5 and 7 times powers of ten, thinned to at most eight."""
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    top = math.ceil(math.log10(high))
    if math.log10(high / low) <= 1:
        for step in (m * 10.0 ** e for e in range(top - 4, top + 1) for m in (1, 2, 5)):
            ticks = [k * step for k in range(math.ceil(low / step), math.floor(high / step) + 1)]
            if len(ticks) <= 8:
                break
    else:
        ticks = [v for v in (m * 10.0 ** e for e in range(math.floor(math.log10(low)), top + 1)
                             for m in (1, 1.5, 2, 3, 5, 7)) if low <= v <= high]
        while len(ticks) > 8:
            ticks = ticks[::2]
    ax.set_yticks(ticks, [f"{v:g}" for v in ticks])
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(low, high)


def frontier_figure(rows: list[dict], curves: dict[str, list[dict]],
                    references: dict[str, float], title: str | None = None):  # noqa: ANN201
    """Valid iwae_ppl of every run against its training tokens and training FLOPs (log
    axes), each family's Pareto frontier drawn through its best runs, the runs' validation
    elbo_ppl during training as thin lines, and the corpus' valid references."""
    sns.set_theme(style="whitegrid")
    colours, markers, by_budget = _styles(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    for ax, key, curve_key, xlabel in (
            (axes[0], "tokens_seen", "tokens", "training tokens (k = 1e3, M = 1e6)"),
            (axes[1], "train_flops", "flops",
             "training FLOPs, every inner step counted (G = 1e9, T = 1e12)")):
        ax.set_title("valid iwae_ppl against training "
                     + ("tokens" if key == "tokens_seen" else "FLOPs"))
        for r in rows:
            colour = colours[series_label(r, by_budget)]
            points = curves.get(r["run"], [])
            ax.plot([p[curve_key] for p in points], [math.exp(p["neg_elbo"]) for p in points],
                    "-", lw=0.8, alpha=0.45, color=colour)
            ax.plot(r[key], r["iwae_ppl"], markers[size_label(r)], color=colour, ms=8,
                    mec="black", mew=0.6)
        for family, style in FRONTIER_STYLES.items():
            mine = [r for r in rows if r["family"] == family]
            best = [mine[i] for i in pareto_frontier([r[key] for r in mine],
                                                     [r["iwae_ppl"] for r in mine])]
            if best:  # a staircase: the best bound reached at or below each cost
                ax.plot([r[key] for r in best], [r["iwae_ppl"] for r in best], style[0],
                        color=style[1], lw=1.8, zorder=1, drawstyle="steps-post")
        for ref, style in (("unigram_entropy_valid", "--"), ("entropy_floor_valid", ":")):
            if ref in references:
                ax.axhline(math.exp(references[ref]), ls=style, lw=1, color="darkgrey")
        ax.set_xscale("log")
        readable_log_ticks(ax)
        perplexity_axis(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("valid perplexity bound per token (log scale)")
    families = {r["family"] for r in rows}
    axes[1].legend(handles=_legend(colours, markers, references, families), fontsize=7,
                   loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title or "Valid bound against the training budget, with each family's "
                          "Pareto frontier")
    return fig


def _legend(colours: dict, markers: dict, references: dict, families: set[str]) -> list:
    handles = [Line2D([], [], color=c, marker="o", ls="", label=s) for s, c in colours.items()]
    handles += [Line2D([], [], color="grey", marker=m, ls="", label=s)
                for s, m in markers.items()]
    handles += [Line2D([], [], color=colour, ls=ls, lw=1.8,
                       label=f"{FAMILY_NAMES[family]} Pareto frontier")
                for family, (ls, colour) in FRONTIER_STYLES.items() if family in families]
    handles += [Line2D([], [], color="grey", lw=0.8, alpha=0.6,
                       label="valid elbo_ppl while training")]
    names = {"unigram_entropy_valid": ("--", "exp(unigram entropy (valid))"),
             "entropy_floor_valid": (":", "exp(entropy floor (valid))")}
    handles += [Line2D([], [], color="darkgrey", ls=names[k][0], label=names[k][1])
                for k in names if k in references]
    return handles


def trade_figure(rows: list[dict], tolerance: float = 0.15, title: str | None = None):  # noqa: ANN201
    """Trading model size for inference steps: valid iwae_ppl against parameters (left) and
    against the training T (right; an AR at T = 0), runs whose training FLOPs agree within
    ``tolerance`` ringed and numbered alike, so a bigger AR and a smaller LTM with more T can
    be read at equal FLOPs."""
    sns.set_theme(style="whitegrid")
    # A model's size: its decoder and, if semi-amortised, its encoder.
    rows = [{**r, "size": r["params"] + (r.get("encoder_params") or 0)} for r in rows]
    colours, markers, by_budget = _styles(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    groups = equal_flop_groups([r["train_flops"] for r in rows], tolerance)
    ring = dict(zip(range(len(groups)), sns.color_palette("dark", len(groups))))
    for ax, key in ((axes[0], "size"), (axes[1], "T")):
        lines: dict[tuple, list[dict]] = {}
        for r in rows:
            # Against T, an AR (T 0) continues its size's LTM line; the semi-amortised
            # family draws its own.
            line = series_label(r, by_budget) if key == "size" else (
                size_label(r), r["budget"], r["family"] == "sa")
            lines.setdefault(line, []).append(r)
        for line, members in lines.items():
            members.sort(key=lambda r: r[key])
            ax.plot([r[key] for r in members], [r["iwae_ppl"] for r in members], "-", lw=1,
                    color=colours[line] if key == "size" else "grey", alpha=0.7)
        for r in rows:
            ax.plot(r[key], r["iwae_ppl"], markers[size_label(r)],
                    color=colours[series_label(r, by_budget)], ms=8, mec="black", mew=0.6)
        for g, members in enumerate(groups):
            ax.plot([rows[i][key] for i in members], [rows[i]["iwae_ppl"] for i in members],
                    "o", ms=17, mfc="none", mec=ring[g], mew=1.6)
        perplexity_axis(ax)
        ax.set_ylabel("valid iwae_ppl (perplexity bound per token, log scale)")
    axes[0].set_xscale("log")
    readable_log_ticks(axes[0])
    axes[0].set(xlabel="parameters, decoder + encoder if any (k = 1e3, M = 1e6)",
                title="against model size")
    steps = sorted({r["T"] for r in rows})
    axes[1].set_xscale("symlog", linthresh=1, base=2)
    axes[1].set_xticks(steps, [str(t) for t in steps])
    axes[1].set_xlim(-0.3, max(steps) * 1.5 + 0.5)
    axes[1].set(xlabel="inference steps T in training and scoring (AR: 0)",
                title="against inference steps (grey lines join one width and depth)")
    handles = _legend(colours, markers, {}, set())[: len(colours) + len(markers)]
    handles += [Line2D([], [], marker="o", ms=12, mfc="none", mec=ring[g], ls="",
                       label=f"equal FLOPs #{g + 1} (±{tolerance:.0%}): "
                             f"{si(rows[members[0]]['train_flops'])}")
                for g, members in enumerate(groups)]
    axes[1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title or "Trading model size for inference steps (rings: runs of equal "
                 "training FLOPs" + ("" if groups else "; none in this grid") + ")")
    return fig


def by_run(rows: list[dict]) -> list[dict]:
    """Each run once: a run that serves several budgets (the same steps) names them all."""
    merged: dict[str, dict] = {}
    for r in rows:
        if r["run"] in merged:
            merged[r["run"]]["budget"] += f"; {r['budget']}"
        else:
            merged[r["run"]] = dict(r)
    return list(merged.values())


def equal_flop_tables(rows: list[dict], tolerance: float = 0.15) -> str:
    """One table per set of runs whose training FLOPs agree within ``tolerance``, best first."""
    rows, parts = by_run(rows), []
    for g, members in enumerate(equal_flop_groups([r["train_flops"] for r in rows], tolerance)):
        group = sorted((rows[i] for i in members), key=lambda r: r["iwae_ppl"])
        parts.append(f"Equal FLOPs #{g + 1} (within {tolerance:.0%}):\n\n" + markdown_table(
            group, ["run", "budget", "params", "encoder_params", "T", "train_flops",
                    "tokens_seen", "epochs", "iwae_ppl"]))
    return "\n\n".join(parts) or "No two runs of this grid have equal training FLOPs."


def report(args: argparse.Namespace, grid: dict, runs: list[dict], results: dict,
           corpus) -> None:  # noqa: ANN001 - a Corpus
    """LABEL.json, .md, .png and -trade.png from the finished runs (``results`` by folder;
    ``grid``: the axes and budgets)."""
    train_windows = len(corpus.windows["train"])
    done = [r for r in runs if r["dir"].name in results]
    rows = [row(r, results[r["dir"].name], train_windows, args.iw_samples) for r in done]
    missing = [f"{r['dir'].name} ({r['budget']})" for r in runs if r["dir"].name not in results]
    if not rows:
        raise UsageError(f"no finished run of this grid in {args.runs / args.label}; run it "
                         "without --report first")
    curves = {name: stored["curve"] for name, stored in results.items()}
    notes_path = args.results / f"{args.label}-notes.md"
    notes = notes_path.read_text() if notes_path.exists() else ""
    settings = score_settings(args)
    write_results(args.results / f"{args.label}.json", f"Scaling grid: {args.label}",
                  done[0]["config"].train.device, {
                      "corpus": corpus.name, "references": corpus.references,
                      "grid": grid, "scoring": settings, "rows": rows,
                      "missing": missing, "curves": curves,
                      "configs": {r["dir"].name: plain(r["config"]) for r in done}},
                  f"Grid: {json.dumps(grid)}. Corpus `{corpus.name}`, valid split "
                  f"({args.score_windows or 'all'} windows), each model at its training T; "
                  "`iwae_ppl` and `elbo_ppl` are valid bounds (an AR's are its exact "
                  "perplexity), `recon_ppl` is not a bound. `train_flops` counts every inner "
                  "step (ltm_pyro/flops.py); `epochs`: passes over the train split's "
                  f"{train_windows} windows; `eval_passes`: decoder forward passes per scored "
                  "window behind `iwae_ppl` (the fit's T x 2 and the importance draws)."
                  f"\n\n{markdown_table(rows, COLUMNS)}\n\n"
                  + (f"Not finished: {', '.join(missing)}\n\n" if missing else "")
                  + f"{equal_flop_tables(rows)}\n\nReferences (nats/token): "
                  f"{corpus.references}\n\n{notes}")
    title = f"{args.label} ({corpus.name})"
    save_figure(frontier_figure(rows, curves, corpus.references,
                                f"{title}: valid bound against the training budget, Pareto "
                                "frontier of each family"),
                args.results / f"{args.label}.png")
    save_figure(trade_figure(rows), args.results / f"{args.label}-trade.png")
    print(markdown_table(rows, COLUMNS))
