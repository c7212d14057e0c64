"""Figures: each function takes plain data and returns a matplotlib Figure."""

from __future__ import annotations

import html
import math

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

from .files import atomic_write


def reference_label(name: str) -> str:
    """``unigram_entropy_valid`` -> ``unigram entropy (valid)``."""
    stem, _, split = name.rpartition("_")
    return f"{stem.replace('_', ' ')} ({split})" if split in ("valid", "test") else name


def has_latent_panels(records: list[dict]) -> bool:
    """Whether validation records carry latent diagnostics of a model with latents (an AR
    model logs them as zeros, an MDLM not at all)."""
    return any(r.get("split") == "valid" and r.get("kl_per_window") for r in records)


def _bound_panels(axes, records: list[dict], references: dict[str, float] | None) -> None:  # noqa: ANN001
    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    panels = (("neg_elbo", "-ELBO"), ("nll", "NLL"), ("kl", "KL(q || p)"))
    for ax, (key, name) in zip(axes, panels):
        if train:
            ax.plot([r["step"] for r in train], [r[key] for r in train], label="train", lw=1)
        if valid:
            ax.plot([r["step"] for r in valid], [r[key] for r in valid], "o-", label="valid")
        if key == "kl":
            ax.set_ylim(bottom=0)
        else:
            for ref, value in sorted((references or {}).items()):
                if ref.endswith("valid"):
                    ax.axhline(value, ls="--" if "unigram" in ref else ":", lw=1, color="grey",
                               label=reference_label(ref))
        ax.set(title=f"{name} per token", xlabel="training step", ylabel=f"{name} (nats/token)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


def _prior_control_axis(ax, records: list[dict]) -> None:  # noqa: ANN001
    """The prior control (--eval-prior-control) on a right-hand axis: how much worse the
    prior is than q as the importance proposal; at or below 0 the decoder does not use z."""
    right = ax.twinx()
    right.plot([r["step"] for r in records], [100 * r["prior_control"] for r in records],
               "D--", color="C4", label="prior as proposal, % worse than q (right)")
    right.axhline(0, ls=":", lw=1, color="C4")
    right.set_ylabel("prior_iwae_ppl / iwae_ppl - 1 (%)")
    right.grid(False)
    right.legend(fontsize=8, loc="lower right")


def information_panel(ax, xs: list, records: list[dict], xlabel: str) -> None:  # noqa: ANN001
    """KL and mutual information per window (± its standard error, under its cap log N) of
    validation records, against ``xs`` (training steps or tokens)."""
    ax.plot(xs, [r["kl_per_window"] for r in records], "o-", label="KL per window")
    ax.errorbar(xs, [r["mutual_info_per_window"] for r in records],
                yerr=[r.get("mutual_info_stderr", 0.0) for r in records], fmt="s-", capsize=3,
                label="MI I(x; z) ± 1 s.e.")
    ax.axhline(records[-1]["mutual_info_cap"], ls="--", lw=1, color="grey",
               label="MI cap log N")
    ax.set(title="What z costs and carries (valid)", xlabel=xlabel, ylabel="nats per window",
           ylim=(0, None))


def _latent_panels(axes, records: list[dict]) -> None:  # noqa: ANN001
    """KL and MI per window, active units, slot correlation: the validation diagnostics of
    ``latent_use`` (docs/latent-diagnostics.md)."""
    latent = [r for r in records if r.get("split") == "valid" and r.get("kl_per_window")]
    steps = [r["step"] for r in latent]
    information_panel(axes[0], steps, latent, "training step")
    total = latent[-1].get("active_units_total")
    ax = axes[1]
    ax.plot(steps, [r["active_units"] for r in latent], "o-", color="C2", label="active units")
    if total:
        ax.axhline(total, ls="--", lw=1, color="grey", label=f"all {total} coordinates")
    ax.set(title="Active units (valid)", xlabel="training step", ylim=(0, None),
           ylabel="coordinates with Var(E[z]) > 0.01")
    controlled = [r for r in latent if "prior_control" in r]
    if controlled:
        _prior_control_axis(ax, controlled)
    ax = axes[2]
    correlation = [math.nan if r.get("slot_correlation") is None else r["slot_correlation"]
                   for r in latent]
    ax.plot(steps, correlation, "o-", color="C3",
            label="mean |corr| of a layer's slots")
    ax.set(title="Slot correlation (valid)", xlabel="training step", ylim=(0, 1.02),
           ylabel="|correlation| (1: slots are copies)")
    for ax in axes:
        ax.legend(fontsize=8)


def training_curves(records: list[dict], references: dict[str, float] | None = None,
                    title: str = "Training curves") -> Figure:
    """Per-token -ELBO, NLL and KL against step, training and validation side by side; when
    the validation records carry latent diagnostics of a model with latents, a second row:
    KL and mutual information per window (with its standard error and its cap log N), active
    units, and slot correlation (docs/latent-diagnostics.md). KL axes start at 0."""
    sns.set_theme(style="whitegrid", context="notebook")
    rows = 2 if has_latent_panels(records) else 1
    fig, axes = plt.subplots(rows, 3, figsize=(16, 4.2 * rows), squeeze=False,
                             constrained_layout=True)
    _bound_panels(axes[0], records, references)
    if rows == 2:
        _latent_panels(axes[1], records)
    fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path) -> None:  # noqa: ANN001 - str or Path
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def bounds_against_steps(rows: list[dict], references: dict[str, float] | None = None,
                         split: str = "valid", title: str | None = None) -> Figure:
    """elbo_ppl, iwae_ppl and recon_ppl against test-time inference steps (log axes), with
    exp of the corpus' references. Each reference is the one of ``split`` when the corpus has
    it (the entropy floor has both), else the valid one, and its label says which split."""
    sns.set_theme(style="whitegrid")
    with_mi = all(r.get("mutual_info_per_window") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if with_mi else 1, figsize=(12 if with_mi else 7, 4.5),
                             constrained_layout=True, squeeze=False)
    ax = axes[0, 0]
    steps = [r["inference_steps"] for r in rows]
    if with_mi:
        _information_against_steps(axes[0, 1], rows, steps)
    for key, name in (("elbo_ppl", "exp(-ELBO) (bound)"), ("iwae_ppl", "exp(-IWAE) (bound)"),
                      ("recon_ppl", "recon_ppl (no KL, not a bound)")):
        ax.plot(steps, [r[key] for r in rows], "o-", label=name)
    references = references or {}
    for stem, style in (("entropy_floor", ":"), ("unigram_entropy", "--")):
        name = next((f"{stem}_{s}" for s in (split, "valid") if f"{stem}_{s}" in references), None)
        if name is not None:
            ax.axhline(math.exp(references[name]), ls=style, color="grey",
                       label=f"exp({reference_label(name)})")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, max(steps) * 1.3 + 0.5)
    ax.set_yscale("log")
    ax.set_xlabel("inference steps at evaluation T_eval (0: the start q_0)")
    ax.set_ylabel("perplexity per token (log scale)")
    ax.set_title(title or f"Bounds against test-time inference steps ({split} split)")
    ax.legend(fontsize=8)
    return fig


def _information_against_steps(ax, rows: list[dict], steps: list[int]) -> None:  # noqa: ANN001
    """MI (with its standard error and its cap log N) and KL per window against T_eval: does a
    longer fit make z carry more about its window, or only fit the bound better?"""
    mi = [r["mutual_info_per_window"] for r in rows]
    err = [1.96 * (r.get("mutual_info_stderr") or 0.0) for r in rows]
    ax.errorbar(steps, mi, yerr=err, fmt="o-", capsize=3, label="MI I(x; z) (95% interval)")
    ax.plot(steps, [r["kl_per_window"] for r in rows], "s--", label="KL(q || p)")
    cap = rows[0].get("mutual_info_cap")
    if cap is not None:
        ax.axhline(cap, ls=":", color="grey", label=f"MI cap log N = {cap:.2f}")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, max(steps) * 1.3 + 0.5)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("inference steps at evaluation T_eval (0: the start q_0)")
    ax.set_ylabel("nats per window")
    ax.set_title("What z carries against T_eval")
    ax.legend(fontsize=8)


def bounds_against_draws(rows: list[dict], information: dict | None = None,
                         title: str | None = None) -> Figure:
    """The fitted q's and the prior's IWAE bounds against the importance draws K, and how many
    nats per window the prior is behind, beside log K (about what K prior draws can find) and,
    when given, the MI and KL per window of the fitted q (``information``)."""
    sns.set_theme(style="whitegrid")
    fig, (bounds_ax, gap_ax) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    draws = [r["samples"] for r in rows]
    bounds_ax.plot(draws, [r["iwae_ppl"] for r in rows], "o-", label="fitted q as proposal")
    bounds_ax.plot(draws, [r["prior_iwae_ppl"] for r in rows], "s--", label="prior as proposal")
    bounds_ax.set_ylabel("exp(-IWAE) per token (a bound)")
    bounds_ax.set_title(title or "IWAE bounds against the draws K")
    gap_ax.plot(draws, [r["gap_nats_per_window"] for r in rows], "o-",
                label="prior behind the fitted q")
    gap_ax.plot(draws, [math.log(k) for k in draws], ":", color="grey", label="log K")
    for key, style, color, name in (
            ("mutual_info_per_window", "-.", "tab:green", "MI of the fitted q"),
            ("kl_per_window", "--", "tab:red", "KL of the fitted q")):
        if information and information.get(key) is not None:
            gap_ax.axhline(information[key], ls=style, color=color,
                           label=f"{name} ({information[key]:.2f})")
    gap_ax.axhline(0.0, color="black", lw=0.8)
    gap_ax.set_ylabel("nats per window")
    gap_ax.set_title("What the prior's draws miss")
    for ax in (bounds_ax, gap_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("importance draws K per window")
        ax.legend(fontsize=8)
    return fig


def readable_log_ticks(ax, axis: str = "x") -> None:  # noqa: ANN001 - an Axes
    """Major ticks at 1, 2 and 5 per decade, labelled with SI prefixes (``200k``, ``5T``), and
    unlabelled minor ticks: labels that never overlap, whatever the span of a log axis."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(EngFormatter(sep=""))
    target.set_minor_formatter(NullFormatter())


def distributions_by_group(values: dict, xlabel: str, ylabel: str,
                           threshold: float | None = None, title: str | None = None,
                           threshold_label: str | None = None) -> Figure:
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
        ax.axhline(threshold, ls="--", color="firebrick", lw=1,
                   label=threshold_label or f"threshold {threshold:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} by {xlabel}")
    return fig


def guide_against_reference(guide_draws, reference_draws, names: list[str],
                            title: str = "Fitted guide against the NUTS reference") -> Figure:
    """Pair plot of two coordinates: fitted-guide draws over reference (NUTS) draws."""
    import pandas as pd

    frames = [pd.DataFrame(d, columns=names).assign(source=s)
              for d, s in ((reference_draws, "NUTS"), (guide_draws, "guide"))]
    grid = sns.pairplot(pd.concat(frames), hue="source", corner=True, kind="kde",
                        plot_kws={"levels": 5}, height=2.6)
    grid.figure.suptitle(title, y=1.02)
    return grid.figure


def _class_palette(labels) -> tuple[list, list]:  # noqa: ANN001 - a sequence or array
    """The sorted classes and one distinct colour each (evenly spaced hues beyond 10 classes,
    where qualitative palettes repeat)."""
    classes = sorted(set(labels.tolist() if hasattr(labels, "tolist") else labels))
    palette = (sns.color_palette("tab10", len(classes)) if len(classes) <= 10
               else sns.color_palette("husl", len(classes)))
    return classes, palette


def latent_projection(points, labels, title: str, label_name: str = "class",
                      axis_name: str = "component") -> Figure:
    """2-D projection of posterior means, coloured by a known factor: one distinct colour per
    class, and a legend beside the axes."""
    sns.set_theme(style="white")
    classes, palette = _class_palette(labels)
    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    sns.scatterplot(x=points[:, 0], y=points[:, 1], hue=labels, hue_order=classes,
                    palette=palette, s=14, ax=ax)
    ax.legend(title=label_name, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=6,
              title_fontsize=7, ncol=1 if len(classes) <= 16 else 2, markerscale=0.8)
    ax.set(title=title, xlabel=f"{axis_name} 1", ylabel=f"{axis_name} 2")
    return fig


def hover_scatter_svg(points, labels, hover_texts: list[str], title: str,
                      axis_name: str = "component", size: tuple[int, int] = (640, 460)) -> str:
    """The ``latent_projection`` scatter as inline SVG whose points show ``hover_texts`` when
    the mouse rests on them (an SVG ``<title>`` per point): hover text in any browser, in a
    live notebook or a static render, with no interactive backend or extra package."""
    width, height = size
    margin = 40
    classes, palette = _class_palette(labels)
    colour = {c: "#" + "".join(f"{int(255 * v):02x}" for v in rgb)
              for c, rgb in zip(classes, palette)}
    low, high = points.min(0), points.max(0)
    span = [(h - lo) or 1.0 for lo, h in zip(low, high)]

    def place(point) -> tuple[float, float]:  # noqa: ANN001
        x = margin + (point[0] - low[0]) / span[0] * (width - 2 * margin)
        y = height - margin - (point[1] - low[1]) / span[1] * (height - 2 * margin)
        return x, y

    label_list = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    circles = []
    for point, label, text in zip(points, label_list, hover_texts):
        x, y = place(point)
        circles.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour[label]}" '
                       f'fill-opacity="0.85"><title>{html.escape(text)}</title></circle>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif" font-size="12">'
            f'<rect width="{width}" height="{height}" fill="white" stroke="#ccc"/>'
            f'<text x="{width / 2}" y="20" text-anchor="middle">{html.escape(title)}</text>'
            f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">{axis_name} 1</text>'
            f'<text x="14" y="{height / 2}" text-anchor="middle" '
            f'transform="rotate(-90 14 {height / 2})">{axis_name} 2</text>'
            + "".join(circles) + "</svg>")


def heatmap(matrix, xlabel: str, ylabel: str, title: str, vmin: float | None = None,
            vmax: float | None = None, colorbar: str = "") -> Figure:
    """An annotated heatmap (e.g. KL per layer and slot: pass ``vmin=0`` so that the colour
    scale of a KL starts at 0, and ``colorbar="KL (nats)"``)."""
    sns.set_theme(style="white")
    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    sns.heatmap(matrix, annot=True, fmt=".2f", cmap="mako", ax=ax, vmin=vmin, vmax=vmax,
                cbar_kws={"label": colorbar})
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def slot_correlations(matrices, title: str = "|correlation| between the slots of each layer"
                      ) -> Figure:  # noqa: ANN001 - [L, S, S] array-like
    """One annotated heatmap per layer of |correlation| between its slots' posterior means
    (``latent_use.slot_correlation_matrices``), on one 0..1 scale: off-diagonal cells near 1
    say the slots of the layer are copies of one another."""
    sns.set_theme(style="white")
    layers = len(matrices)
    fig, axes = plt.subplots(1, layers, figsize=(3.6 * layers + 1, 3.4), squeeze=False,
                             constrained_layout=True)
    for layer, ax in enumerate(axes[0]):
        sns.heatmap(matrices[layer], vmin=0, vmax=1, annot=True, fmt=".2f", cmap="mako",
                    ax=ax, cbar=layer == layers - 1, square=True,
                    cbar_kws={"label": "|correlation|"})
        ax.set(title=f"layer {layer}", xlabel="slot", ylabel="slot")
    fig.suptitle(title)
    return fig
