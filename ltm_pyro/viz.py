"""Figures: each function takes plain data and returns a matplotlib Figure."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.figure import Figure

from .files import atomic_write


def training_curves(records: list[dict], references: dict[str, float] | None = None) -> Figure:
    """Per-token -ELBO, NLL and KL against step, training and validation side by side; when
    the validation records carry them, a fourth panel: KL and mutual information per window
    (with its standard error and its cap log N; docs/latent-diagnostics.md)."""
    sns.set_theme(style="whitegrid", context="notebook")
    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    latent = [r for r in valid if r.get("mutual_info_per_window") is not None]
    fig, axes = plt.subplots(1, 4 if latent else 3, figsize=(20 if latent else 15, 4),
                             constrained_layout=True)
    panels = (("neg_elbo", "-ELBO (nats/token)"), ("nll", "NLL (nats/token)"),
              ("kl", "KL (nats/token)"))
    for ax, (key, label) in zip(axes, panels):
        if train:
            ax.plot([r["step"] for r in train], [r[key] for r in train], label="train", lw=1)
        if valid:
            ax.plot([r["step"] for r in valid], [r[key] for r in valid], "o-", label="valid")
        if key != "kl":
            for name, value in (references or {}).items():
                if name.endswith("valid"):
                    ax.axhline(value, ls="--", lw=1, color="grey")
                    ax.annotate(name, (0, value), fontsize=8, color="grey",
                                xycoords=("axes fraction", "data"), va="bottom")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend()
    if latent:
        ax, steps = axes[3], [r["step"] for r in latent]
        ax.plot(steps, [r["kl_per_window"] for r in latent], "o-", label="KL per window")
        ax.errorbar(steps, [r["mutual_info_per_window"] for r in latent],
                    yerr=[r["mutual_info_stderr"] for r in latent], fmt="s-", capsize=3,
                    label="mutual information I(x; z)")
        ax.axhline(latent[-1]["mutual_info_cap"], ls="--", lw=1, color="grey",
                   label="MI cap log N")
        ax.set_xlabel("step")
        ax.set_ylabel("valid, nats per window")
        ax.legend(fontsize=8)
    return fig


def save_figure(fig: Figure, path) -> None:  # noqa: ANN001 - str or Path
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def bounds_against_steps(rows: list[dict], references: dict[str, float] | None = None) -> Figure:
    """elbo_ppl, iwae_ppl and recon_ppl against test-time inference steps (log axes)."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    steps = [r["inference_steps"] for r in rows]
    for key in ("elbo_ppl", "iwae_ppl", "recon_ppl"):
        ax.plot(steps, [r[key] for r in rows], "o-", label=key)
    for name, style in (("entropy_floor_valid", ":"), ("unigram_entropy_valid", "--")):
        if name in (references or {}):
            ax.axhline(math.exp(references[name]), ls=style, color="grey", label=f"exp({name})")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, max(steps) * 1.3 + 0.5)
    ax.set_yscale("log")
    ax.set_xlabel("inference steps at evaluation (T_eval)")
    ax.set_ylabel("perplexity per token")
    ax.legend(fontsize=8)
    return fig


def distributions_by_group(values: dict, xlabel: str, ylabel: str,
                           threshold: float | None = None) -> Figure:
    """Box + strip plot of a per-sequence quantity for each group (e.g. k-hat against T).

    Non-finite values (k-hat of exactly equal weights is -inf) are left out of the plot.
    """
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    pairs = [(str(g), float(v)) for g in values for v in values[g] if math.isfinite(float(v))]
    groups = [g for g, _ in pairs]
    data = [v for _, v in pairs]
    sns.boxplot(x=groups, y=data, ax=ax, color="lightsteelblue", showfliers=False)
    sns.stripplot(x=groups, y=data, ax=ax, size=3, color="black", alpha=0.5)
    if threshold is not None:
        ax.axhline(threshold, ls="--", color="firebrick", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig


def guide_against_reference(guide_draws, reference_draws, names: list[str]) -> Figure:
    """Pair plot of two coordinates: fitted-guide draws over reference (NUTS) draws."""
    import pandas as pd

    frames = [pd.DataFrame(d, columns=names).assign(source=s)
              for d, s in ((reference_draws, "NUTS"), (guide_draws, "guide"))]
    grid = sns.pairplot(pd.concat(frames), hue="source", corner=True, kind="kde",
                        plot_kws={"levels": 5}, height=2.6)
    return grid.figure


def latent_projection(points, labels, title: str, label_name: str = "class",
                      axis_name: str = "component") -> Figure:
    """2-D projection of posterior means, coloured by a known factor: one distinct colour per
    class (evenly spaced hues beyond 10 classes, where qualitative palettes repeat), and a
    legend beside the axes."""
    sns.set_theme(style="white")
    classes = sorted(set(labels.tolist() if hasattr(labels, "tolist") else labels))
    palette = (sns.color_palette("tab10", len(classes)) if len(classes) <= 10
               else sns.color_palette("husl", len(classes)))
    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    sns.scatterplot(x=points[:, 0], y=points[:, 1], hue=labels, hue_order=classes,
                    palette=palette, s=14, ax=ax)
    ax.legend(title=label_name, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=6,
              title_fontsize=7, ncol=1 if len(classes) <= 16 else 2, markerscale=0.8)
    ax.set(title=title, xlabel=f"{axis_name} 1", ylabel=f"{axis_name} 2")
    return fig


def heatmap(matrix, xlabel: str, ylabel: str, title: str) -> Figure:
    """An annotated heatmap (e.g. KL per layer and slot)."""
    sns.set_theme(style="white")
    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    sns.heatmap(matrix, annot=True, fmt=".2f", cmap="mako", ax=ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig
