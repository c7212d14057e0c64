"""The study figures that ``experiments/replot.py`` redraws from a results file alone:
validation curves against the training budget (``bench_quality``), few-shot accuracy
(``bench_icl``) and the latent levers (``latents_study``). They take the results JSON's
plain data, never a model, so a figure can be redrawn on any machine from what was committed.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from ..viz import readable_log_ticks, reference_label


def curves_figure(curves: dict[str, list[dict]], references: dict[str, float],
                  title: str | None = None, borrowed: tuple[str, ...] = ()):  # noqa: ANN201
    """Validation -ELBO (AR: NLL) of each variant against training tokens and training FLOPs
    (log axes with SI-prefixed ticks), with the corpus' valid references. Variants named in
    ``borrowed`` (curves taken from another results file) are drawn dashed with open markers.
    ``python experiments/replot.py LABEL.json`` redraws it from the results file."""


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


def accuracy_figure(rows: list[dict], chance: float, title: str | None = None):  # noqa: ANN201
    """Accuracy against shots per variant (and T_eval) with +-1 binomial standard error,
    sqrt(p (1 - p) / items); curves are nudged apart along x so their bars stay readable.
    ``python experiments/replot.py LABEL.json`` redraws it from the results file."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 4.8), constrained_layout=True)
    curves = list(dict.fromkeys((r["variant"], r["T_eval"]) for r in rows))
    for i, (variant, steps) in enumerate(curves):
        points = sorted((r for r in rows if r["variant"] == variant and r["T_eval"] == steps),
                        key=lambda r: r["shots"])
        offset = 0.04 * (i - (len(curves) - 1) / 2)  # k * (1 + offset); at k = 0 (linear): offset
        label = variant if variant.startswith("ar") else f"{variant}, T_eval {steps}"
        ax.errorbar([r["shots"] * (1 + offset) or offset for r in points],
                    [r["accuracy"] for r in points],
                    yerr=[binomial_se(r) for r in points], fmt="o-", capsize=3, label=label)
    ax.axhline(chance, ls="--", color="grey", lw=1, label="chance (one fixed rule)")
    ax.set_xscale("symlog", linthresh=1)
    shots = sorted({r["shots"] for r in rows})
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlim(-0.5, max(shots) * 1.25 + 0.5)
    items = sorted({r["items"] for r in rows})
    label_accuracy_axes(ax, "shots k (examples in the prompt)", title or (
        f"Few-shot accuracy, ±1 binomial s.e. ({'/'.join(map(str, items))} items per point)"))
    return fig


def label_accuracy_axes(ax, xlabel: str, title: str) -> None:  # noqa: ANN001 - an Axes
    """What both accuracy figures share: accuracy from 0 on y, labels, title and legend."""
    ax.set_ylim(0, None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("exact-match accuracy (fraction of held-out strings)")
    ax.set_title(title)
    ax.legend(fontsize=8)


def binomial_se(row: dict) -> float:
    """One standard error of an accuracy over ``items`` independent items."""
    return math.sqrt(row["accuracy"] * (1 - row["accuracy"]) / row["items"])


def latents_figure(rows: list[dict], chance: float, title: str | None = None):  # noqa: ANN201
    """Accuracy against latent vectors per layer, one curve per k at the largest T_eval, with
    the ARs' accuracy at the largest k as flat lines: does more latent capacity buy few-shot
    skill?"""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 4.8), constrained_layout=True)
    ltm = [r for r in rows if r["latents_per_layer"]]
    steps = max(r["T_eval"] for r in ltm)
    top = max(r["shots"] for r in rows)
    for shots in sorted({r["shots"] for r in ltm}):
        points = sorted((r for r in ltm if r["shots"] == shots and r["T_eval"] == steps),
                        key=lambda r: r["latents_per_layer"])
        ax.errorbar([r["latents_per_layer"] for r in points], [r["accuracy"] for r in points],
                    yerr=[binomial_se(r) for r in points], fmt="o-", capsize=3,
                    label=f"LTM, {shots}-shot")
    for r in rows:
        if not r["latents_per_layer"] and r["shots"] == top:
            ax.axhline(r["accuracy"], ls="-.", lw=1.2, color="black" if r["variant"] ==
                       "ar-window" else "tab:brown", label=f"{r['variant']}, {top}-shot")
    ax.axhline(chance, ls="--", color="grey", lw=1, label="chance (one fixed rule)")
    counts = sorted({r["latents_per_layer"] for r in ltm})
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    label_accuracy_axes(ax, "latent thought vectors per layer", title or (
        f"Few-shot accuracy against latent size (T_eval {steps}, ±1 binomial s.e.)"))
    return fig


def bounds_mi_figure(results: list[dict], title: str | None = None):  # noqa: ANN201 - a Figure
    """iwae_ppl and MI (from 0, with its standard error, cap and goal) against T_eval, per
    variant; the ARs' exact perplexities as horizontal lines."""
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for result in results:
        rows = [r for r in result["rows"] if r["split"] == "valid" and r["eval_start"] == "trained"]
        rows.sort(key=lambda r: r["T_eval"])
        if not rows:
            continue
        t = [max(r["T_eval"], 0.5) for r in rows]
        if result["variant"].startswith("ar"):  # exact perplexity: no inference steps
            axes[0].axhline(rows[0]["iwae_ppl"], ls="--", lw=1, label=result["variant"],
                            color="grey" if result["variant"] == "ar-full" else "black")
        else:
            axes[0].plot(t, [r["iwae_ppl"] for r in rows], "o-", label=result["variant"])
            axes[1].errorbar(t, [r["mutual_info_per_window"] for r in rows],
                             yerr=[r["mutual_info_stderr"] for r in rows], fmt="o-", capsize=3,
                             label=result["variant"])
    cap = next((r["mutual_info_cap"] for res in results for r in res["rows"]), math.log(256))
    axes[1].axhline(cap, ls="--", color="grey", lw=1, label="cap log N")
    axes[1].axhline(3.0, ls=":", color="black", lw=1, label="goal 3 nats")
    axes[1].set_ylim(0, None)
    for ax, label, heading in (
            (axes[0], "valid iwae_ppl (perplexity per token)", "IWAE perplexity (lower is better)"),
            (axes[1], "valid MI I(x; z) per window (nats, ±1 s.e.)",
             "Mutual information between x and z")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T_eval (inference steps at evaluation; 0 drawn at 0.5)")
        ax.set_ylabel(label)
        ax.set_title(heading)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Latent levers against test-time inference steps (valid split)")
    return fig


def slots_figure(results: list[dict], title: str | None = None):  # noqa: ANN201 - a Figure
    with_slots = [r for r in results if r["slot_matrices"].get("test")]
    layers = len(with_slots[0]["slot_matrices"]["test"]) if with_slots else 1
    fig, axes = plt.subplots(layers, max(1, len(with_slots)), squeeze=False,
                             figsize=(3.2 * max(2, len(with_slots)), 3 * layers),
                             constrained_layout=True)
    for column, result in enumerate(with_slots):
        for layer, matrix in enumerate(result["slot_matrices"]["test"]):
            ax = axes[layer][column]
            sns.heatmap(np.array(matrix, dtype=float), vmin=0, vmax=1, annot=True, fmt=".2f",
                        cmap="mako", cbar=column == len(with_slots) - 1,
                        cbar_kws={"label": "|correlation|"}, ax=ax)
            ax.set_title(f"{result['variant']}, layer {layer}", fontsize=9)
            ax.set(xlabel="slot", ylabel="slot")
    fig.suptitle(title or "|correlation| of slots' posterior means (test split, training T; "
                          "1 = copies)", fontsize=10)
    return fig


CURVE_KEYS = ("neg_elbo", "kl_per_window", "mutual_info_per_window", "mutual_info_stderr",
              "mutual_info_cap")


def training_figure(curves: dict[str, list[dict]], title: str | None = None):  # noqa: ANN201
    """Validation -ELBO (AR: NLL) and the LTMs' MI and KL per window against training tokens:
    when z starts to carry information, and whether it keeps it."""
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    colours = dict(zip(curves, sns.color_palette("tab10", max(10, len(curves)))))
    caps = []
    for name, points in curves.items():
        tokens = [p["tokens"] for p in points]
        axes[0].plot(tokens, [p["neg_elbo"] for p in points], "o-", color=colours[name],
                     label=name)
        latent = [p for p in points if p.get("kl_per_window")]  # an AR has no KL
        if not latent:
            continue
        x = [p["tokens"] for p in latent]
        axes[1].errorbar(x, [p["mutual_info_per_window"] for p in latent],
                         yerr=[p["mutual_info_stderr"] or 0.0 for p in latent], fmt="o-",
                         capsize=3, color=colours[name], label=f"{name}: MI")
        axes[1].plot(x, [p["kl_per_window"] for p in latent], ":", color=colours[name],
                     label=f"{name}: KL")
        caps.append(latent[-1]["mutual_info_cap"])
    if caps:
        axes[1].axhline(max(caps), ls="--", color="grey", lw=1,
                        label=f"MI cap log N = {max(caps):.2f} (N: validation windows)")
    axes[0].set(xlabel="training tokens", ylabel="validation -ELBO (nats/token; AR: NLL)",
                title="Bound during training")
    axes[1].set(xlabel="training tokens", ylabel="nats per window (valid)", ylim=(0, None),
                title="What z carries (MI, ±1 s.e.) and costs (KL, dotted) during training")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(title or "Latent levers during training (validation records)")
    return fig


def results_from_report(report_json: dict) -> list[dict]:
    """The per-variant results of a LABEL.json written by ``report``, as the figures take
    them (``python experiments/replot.py LABEL.json`` redraws both figures from it)."""
    return [{"variant": name, "rows": [r for r in report_json["rows"] if r["variant"] == name],
             "slot_matrices": report_json["slot_matrices"].get(name, {})}
            for name in report_json["variants"]]
