"""The main comparison's report: what the scored runs say, with every interval named for what
it is over.

- Over test windows (one trained model a seed): the paired bootstrap of the LTM's iwae_ppl
  against each baseline's on the same windows (``uncertainty.paired_bootstrap``).
- Over training seeds: the mean margin with its 95% Student-t interval (n - 1 degrees of
  freedom), which is what says whether a lead holds beyond one trained model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from ..uncertainty import paired_bootstrap

BASELINES = ("ltm-no-inference", "ar-window", "ar-full")


def seed_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean over seeds and its Student-t interval (None with one seed)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None, "seeds": len(values)}
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(
        len(values))
    return {"mean": mean, "low": mean - float(half), "high": mean + float(half),
            "seeds": len(values)}


def windows_margin(ltm: dict, baseline: dict, ltm_key: str = "neg_iwae",
                   baseline_key: str = "neg_iwae", seed: int = 0) -> dict:
    """ppl_LTM / ppl_baseline - 1 on the same test windows (negative: the LTM is better),
    with its paired bootstrap 95% interval over windows."""
    if ltm["tokens"] != baseline["tokens"]:
        raise ValueError("the two runs were scored on different windows")
    return paired_bootstrap(ltm[ltm_key], baseline[baseline_key], ltm["tokens"], seed=seed)


def by_family(scores: list[dict]) -> dict[str, dict[int, dict]]:
    found: dict[str, dict[int, dict]] = {}
    for score in scores:
        found.setdefault(score["family"], {})[score["seed"]] = score
    return found


def comparison_rows(scores: list[dict]) -> list[dict]:
    """One row per family: test iwae_ppl over seeds, and per baseline the LTM's margin at
    each seed (interval over windows) and over seeds (t-interval)."""
    families = by_family(scores)
    ltm = families.get("ltm", {})
    rows = []
    for family, runs in families.items():
        ppl = seed_interval([r["test"]["iwae_ppl"] for r in runs.values()])
        row = {"family": family, "seeds": sorted(runs), "iwae_ppl": ppl,
               "T_eval": sorted({r["T_eval"] for r in runs.values()}),
               "epochs_at_best": [round(r["epochs"], 2) for r in runs.values()]}
        if family != "ltm":
            paired = {seed: windows_margin(ltm[seed]["test_windows"], run["test_windows"],
                                           seed=seed)
                      for seed, run in runs.items() if seed in ltm}
            row["ltm_vs_this_per_seed"] = paired
            if paired:
                row["ltm_vs_this_over_seeds"] = seed_interval(
                    [p["difference"] for p in paired.values()])
        rows.append(row)
    return rows


def decomposition_rows(scores: list[dict]) -> list[dict]:
    """Where a latent run's figure comes from, per seed: q and the prior as proposals at the
    same K (test; and valid at the big K), z held at the prior mean (exact), KL and MI, and
    each against the windowed AR of the same seed (paired intervals over test windows)."""
    ar = by_family(scores).get("ar-window", {})
    rows = []
    for score in scores:
        if "prior_mean_ppl" not in score["test"]:
            continue
        test, windows = score["test"], score["test_windows"]
        row = {"family": score["family"], "seed": score["seed"], "T_eval": score["T_eval"],
               "iwae_ppl": test["iwae_ppl"], "prior_iwae_ppl": test["prior_iwae_ppl"],
               "prior_mean_ppl": test["prior_mean_ppl"],
               "kl_per_window": test["kl_per_window"],
               "mutual_info_per_window": test["mutual_info_per_window"],
               "q_vs_prior": windows_margin(windows, windows, "neg_iwae", "neg_prior_iwae"),
               "valid_big_k": score["valid_big_k"]}
        if score["seed"] in ar:
            reference = ar[score["seed"]]["test_windows"]
            row["vs_ar_window"] = windows_margin(windows, reference, seed=score["seed"])
            row["prior_mean_vs_ar_window"] = windows_margin(windows, reference,
                                                            "prior_mean_nll", "neg_iwae")
        rows.append(row)
    return rows


def gain_source(row: dict) -> str:
    """One sentence per latent run (issue 42.5): does it lead the windowed AR of its seed, and
    is a lead z read at test time (q beats the prior as proposal at the same K), a training
    effect that survives with z fixed (the decoder alone, z at the prior mean, beats the AR),
    or neither. Each call is made on a 95% interval over test windows excluding zero."""
    name = f"{row['family']} seed {row['seed']}"
    lead = row.get("vs_ar_window")
    if lead is None:
        return f"{name}: no windowed AR of this seed is scored yet."
    read, fixed = row["q_vs_prior"], row["prior_mean_vs_ar_window"]
    facts = (f"{name} against the windowed AR: {percent(lead)}; q against the prior as proposal: "
             f"{percent(read)}; z held at the prior mean against the AR: {percent(fixed)}")
    if lead["high"] >= 0:
        position = "trails" if lead["low"] > 0 else "is level with"
        return f"{facts}. It {position} the AR, so there is no lead to explain."
    read_helps, fixed_leads = read["high"] < 0, fixed["high"] < 0
    if fixed_leads:
        source = "a training effect that survives with z fixed" + (
            ", and z read at test time adds to it" if read_helps else
            "; z read at test time adds nothing measurable")
    elif read_helps:
        source = "z read at test time: with z fixed the decoder alone does not beat the AR"
    else:
        source = ("neither z read at test time nor the decoder with z fixed is separately "
                  "established")
    return f"{facts}. The lead is {source}."


def percent(interval: dict | None, key: str = "difference") -> str:
    """A margin as '+1.23% [-0.40, +2.90]' (its interval in percentage points)."""
    if not interval:
        return "-"
    centre = interval.get(key, interval.get("mean"))
    if interval.get("low") is None:
        return f"{centre:+.2%}"
    return f"{centre:+.2%} [{interval['low'] * 100:+.2f}, {interval['high'] * 100:+.2f}]"


def curves_figure(curves: dict[str, list[list[dict]]]):  # noqa: ANN201 - a Figure
    """Valid -ELBO (AR: exact NLL) against training tokens and training FLOPs (every inner
    step counted): each family's mean over seeds, with the band from its lowest to its
    highest seed, drawn while every seed still has a validation there."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from ..viz import readable_log_ticks

    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    colours = dict(zip(curves, sns.color_palette("tab10", len(curves))))
    for ax, x_key, label in ((axes[0], "tokens", "training tokens"),
                             (axes[1], "flops", "training FLOPs (every inner step counted)")):
        for family, runs in curves.items():
            length = min(len(run) for run in runs)
            xs = [runs[0][i][x_key] for i in range(length)]
            values = np.array([[run[i]["neg_elbo"] for i in range(length)] for run in runs])
            ax.plot(xs, values.mean(0), "o-", ms=3, color=colours[family],
                    label=f"{family} ({len(runs)} seed{'s' * (len(runs) != 1)})")
            ax.fill_between(xs, values.min(0), values.max(0), color=colours[family], alpha=0.2)
        ax.set_xscale("log")
        readable_log_ticks(ax)
        ax.set_xlabel(label)
        ax.set_ylabel("valid -ELBO, nats/token (AR: exact NLL)")
        ax.legend(fontsize=8)
    fig.suptitle("PTB, whole valid split: mean over seeds, band = lowest to highest seed")
    return fig


def tuning_table(points: list[dict], chosen: dict[str, str]) -> str:
    lines = ["| family | slow lr | valid iwae_ppl (one epoch, seed 0) | chosen |",
             "|---|---|---|---|"]
    for p in points:
        figure = "-" if p["valid_iwae_ppl"] is None else f"{p['valid_iwae_ppl']:.2f}"
        mark = "yes" if chosen.get(p["family"]) == p["lr"] else ""
        lines.append(f"| {p['family']} | {p['lr']} | {figure} | {mark} |")
    return "\n".join(lines)


def comparison_table(rows: list[dict]) -> str:
    lines = ["| family | seeds | T_eval | test iwae_ppl, mean [95% t-interval over seeds] | "
             "LTM against it per seed [95% interval over test windows] | LTM against it over "
             "seeds [95% t-interval] | epochs at best valid |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        ppl = row["iwae_ppl"]
        ppl_text = f"{ppl['mean']:.2f}" + (f" [{ppl['low']:.2f}, {ppl['high']:.2f}]"
                                           if ppl["low"] is not None else "")
        per_seed = "; ".join(f"s{seed}: {percent(p)}" for seed, p in
                             row.get("ltm_vs_this_per_seed", {}).items()) or "-"
        lines.append(f"| {row['family']} | {len(row['seeds'])} | "
                     f"{', '.join(map(str, row['T_eval']))} | {ppl_text} | {per_seed} | "
                     f"{percent(row.get('ltm_vs_this_over_seeds'), 'mean')} | "
                     f"{', '.join(map(str, row['epochs_at_best']))} |")
    return "\n".join(lines)


def decomposition_table(rows: list[dict]) -> str:
    lines = ["| family | seed | T_eval | iwae_ppl (q, K 64) | prior_iwae_ppl (K 64) | q against "
             "the prior [windows] | z at the prior mean (exact ppl) | z fixed against "
             "ar-window [windows] | KL / window | MI / window | valid subset: q / prior at "
             "big K |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        big = r["valid_big_k"]
        lines.append(
            f"| {r['family']} | {r['seed']} | {r['T_eval']} | {r['iwae_ppl']:.2f} | "
            f"{r['prior_iwae_ppl']:.2f} | {percent(r['q_vs_prior'])} | "
            f"{r['prior_mean_ppl']:.2f} | {percent(r.get('prior_mean_vs_ar_window'))} | "
            f"{r['kl_per_window']:.3f} | {r['mutual_info_per_window']:.3f} | "
            f"{big['iwae_ppl']:.2f} / {big['prior_iwae_ppl']:.2f} (K {big['iw_samples']}, "
            f"{big['sequences']} windows) |")
    return "\n".join(lines)
