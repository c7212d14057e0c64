r"""Does the decoder read z in proportion to what lies beyond its self-attention window? (issue 13)

    python experiments/window_study.py --out experiments/results/latents/ptb-s128-window-study \
        --full experiments/results/latents/ptb-s128-ar-full-long-test.json \
        --pair 2 experiments/results/latents/ptb-s128-w2-T4-long-test.json \
                 experiments/results/latents/ptb-s128-w2-ar-window-long-test.json \
        --pair 8 experiments/results/latents/ptb-s128-w8-T4-long-test.json \
                 experiments/results/latents/ptb-s128-w8-ar-window-long-test.json

Gathers ``evaluate.py`` JSONs (the same split and windows for every model) of an LTM and its
matched windowed AR at each decoder window W, and of one full-context AR, into OUT.{json,md,png}.
Everything is also put in nats per window (tokens scored per window times the log of a
perplexity ratio), so the three quantities compare directly: what the window hides from a
decoder of this size (windowed AR against full-context AR), what the LTM gains over the
windowed AR, and what of it the decoder reads from z at test time (the prior as importance
proposal against the fitted q, ``prior_control``; docs/latent-diagnostics.md). The prior's K
draws find about log K nats of a posterior, so the last is a lower bound on what is read.
Only files are read: nothing is trained or scored here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib.pyplot as plt  # noqa: E402

from ltm_pyro.cli import OneLineParser, run_main  # noqa: E402
from ltm_pyro.errors import UsageError  # noqa: E402
from ltm_pyro.families import FAMILIES  # noqa: E402
from ltm_pyro.report import markdown_table, write_results  # noqa: E402
from ltm_pyro.viz import save_figure  # noqa: E402

COLUMNS = ["window", "ar_window_ppl", "ltm_iwae_ppl", "prior_iwae_ppl", "ltm_vs_ar",
           "prior_control", "hidden_nats", "ltm_gain_nats", "prior_gap_nats",
           "kl_per_window", "mutual_info_per_window"]
SAME = ("split", "windows", "window_selection", "tokens", "corpus")


def read(path: Path) -> dict:
    """One evaluate.py result, refused in one line if it is not one."""
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: cannot read an evaluate.py JSON ({error}); "
                         "pass the file evaluate.py --json wrote") from None
    if "iwae_ppl" not in result:
        raise UsageError(f"{path} has no iwae_ppl; pass a file written by evaluate.py --json")
    return result


def nats(worse: float, better: float, tokens_per_window: float) -> float:
    """A perplexity ratio as nats per window."""
    return tokens_per_window * math.log(worse / better)


def row(window: int, ltm: dict, ar: dict, full: dict) -> dict:
    """What the window hides, what the LTM gains and what of it is read from z, at one W."""
    per_window = ltm["tokens"] / ltm["windows"]
    fitted, prior, windowed = ltm["iwae_ppl"], ltm["prior_iwae_ppl"], ar["iwae_ppl"]
    return {
        "window": window, "ar_window_ppl": windowed, "ltm_iwae_ppl": fitted,
        "prior_iwae_ppl": prior, "full_ar_ppl": full["iwae_ppl"],
        "ltm_vs_ar": fitted / windowed - 1,
        "prior_control": prior / fitted - 1,
        "hidden_nats": nats(windowed, full["iwae_ppl"], per_window),
        "ltm_gain_nats": nats(windowed, fitted, per_window),
        "prior_gap_nats": nats(prior, fitted, per_window),
        "kl_per_window": ltm.get("kl_per_window"),
        "mutual_info_per_window": ltm.get("mutual_info_per_window"),
        "mutual_info_cap": ltm.get("mutual_info_cap"),
    }


def figure(rows: list[dict], title: str) -> plt.Figure:
    """Perplexities (left) and nats per window (right) against the decoder window."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    windows = [r["window"] for r in rows]
    for key, label in (("ar_window_ppl", "AR, windowed"), ("ltm_iwae_ppl", "LTM, fitted q"),
                       ("prior_iwae_ppl", "LTM, prior as proposal")):
        left.plot(windows, [r[key] for r in rows], marker="o", label=label)
    left.axhline(rows[0]["full_ar_ppl"], color="gray", linestyle="--", label="AR, full context")
    left.set(xscale="log", xlabel="decoder window (tokens)", ylabel="test perplexity")
    for key, label in (("hidden_nats", "hidden by the window (windowed - full AR)"),
                       ("ltm_gain_nats", "LTM's gain over the windowed AR"),
                       ("prior_gap_nats", "read from z (prior's bound behind q's)"),
                       ("mutual_info_per_window", "MI of q")):
        right.plot(windows, [r[key] for r in rows], marker="o", label=label)
    right.axhline(0, color="black", linewidth=0.5)
    right.set(xscale="log", xlabel="decoder window (tokens)", ylabel="nats per window")
    for ax in (left, right):
        ax.set_xticks(windows, [str(w) for w in windows])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--full", type=Path, required=True, help="the full-context AR's JSON")
    p.add_argument("--pair", nargs=3, action="append", required=True,
                   metavar=("WINDOW", "LTM_JSON", "AR_JSON"),
                   help="a decoder window, its LTM's JSON and its matched windowed AR's JSON")
    p.add_argument("--out", type=Path, required=True, help="OUT.json, OUT.md and OUT.png")
    return p


def main() -> int:
    args = parser().parse_args()
    full = read(args.full)
    rows, sources = [], {}
    for window, *_ in args.pair:
        if not window.isdigit():
            raise UsageError(f"--pair {window}: the window must be a whole number of tokens")
    for window, ltm_path, ar_path in sorted(args.pair, key=lambda p: int(p[0])):
        ltm, ar = read(Path(ltm_path)), read(Path(ar_path))
        if not FAMILIES.get(ltm.get("model_kind"), FAMILIES["ar"]).latent or (
                "prior_iwae_ppl" not in ltm):
            raise UsageError(f"{ltm_path} is not an LTM's result with a prior control")
        for other, path in ((ar, ar_path), (full, args.full)):
            differ = [k for k in SAME if other.get(k) != ltm.get(k)]
            if differ:
                raise UsageError(f"{path} was scored on other windows than {ltm_path} "
                                 f"({', '.join(differ)} differ); evaluate both alike")
        rows.append(row(int(window), ltm, ar, full))
        sources[window] = {"ltm": ltm_path, "ar": ar_path}
    table = markdown_table(rows, COLUMNS)
    print(table)
    title = (f"{full['corpus']} {full['split']}, {full['window_selection']}: the decoder window "
             f"against what z carries (full-context AR {full['iwae_ppl']:.2f})")
    write_results(args.out.with_suffix(".json"), "The decoder window against what z carries",
                  "cpu", {"rows": rows, "full_ar": str(args.full), "sources": sources},
                  f"{title}. `hidden_nats`: how many nats per window the windowed AR is behind "
                  f"the full-context one; `ltm_gain_nats`: the LTM's lead over the windowed AR; "
                  f"`prior_gap_nats`: how far the prior's bound (K draws) is behind the fitted "
                  f"q's, what the decoder reads from z beyond about log K nats.\n\n{table}\n")
    save_figure(figure(rows, title), args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    run_main(main)
