"""Figures: each function takes plain data and returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.figure import Figure

from .files import atomic_write


def training_curves(records: list[dict], references: dict[str, float] | None = None) -> Figure:
    """Per-token -ELBO, NLL and KL against step, training and validation side by side."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
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
    return fig


def save_figure(fig: Figure, path) -> None:  # noqa: ANN001 - str or Path
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
