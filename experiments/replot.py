"""Redraw a results figure from its results JSON, without training or scoring anything.

    python experiments/replot.py experiments/results/wikitext-2/wikitext2-d128.json
    python experiments/replot.py experiments/results/ptb/ptb-grid-klwarmup.json \
        --baselines-from experiments/results/ptb/ptb-d128.json

The script that wrote the JSON (its ``command``) picks the figure: bench_quality.py (validation
-ELBO against tokens and FLOPs, from ``curves``), bench_icl.py (accuracy against shots with
binomial error bars, from ``rows``), latents_study.py (LABEL.png, LABEL-slots.png and
LABEL-training.png, from ``rows``, ``slot_matrices`` and ``curves``) and ltm-sweep /
sweep_inference_steps.py (bounds against T_eval, from ``rows``, with the references of the
swept split) and ltm-prior-control / prior_control_curve.py (bounds and the prior's gap
against the draws K, from ``rows``). Each PNG is written beside its JSON, under the same name.

--baselines-from adds to a bench_quality figure the curves of variants it lacks (a run with
--no-ar has no AR curves) from another bench_quality JSON, drawn dashed and labelled with that
file's name, only when the two runs share the data, the LTM's model, the token budget, the seed
and the validation windows (so the baselines are the ones the run would have trained).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltm_pyro.cli import OneLineParser, run_main  # noqa: E402
from ltm_pyro.errors import UsageError  # noqa: E402
from ltm_pyro.viz import save_figure  # noqa: E402

#: What must agree between two bench_quality runs for one to lend the other its baselines.
SHARED = (("data",), ("model",), ("train", "max_steps"), ("train", "batch_size"),
          ("train", "seed"), ("train", "eval_every"), ("train", "eval_windows"))


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("results", type=Path, nargs="+", help="results JSON files to redraw")
    p.add_argument("--baselines-from", type=Path,
                   help="a bench_quality JSON whose curves fill in the variants a run lacks")
    return p


def _setting(config: dict, path: tuple[str, ...]):  # noqa: ANN202
    for key in path:
        config = config.get(key, {}) if isinstance(config, dict) else {}
    return config


def borrow_baselines(results: dict, other: dict, name: str) -> tuple[dict, tuple[str, ...]]:
    """The run's curves plus ``other``'s curves of the variants it lacks, named ``VARIANT
    (NAME)``; a UsageError unless both runs' LTMs share every ``SHARED`` setting."""
    common = [v for v in results["configs"] if v in other.get("configs", {})
              and not v.startswith(("ar", "mdlm"))]
    if not common:
        raise UsageError(f"{name} has no LTM variant in common with this run")
    mine, theirs = results["configs"][common[0]], other["configs"][common[0]]
    differing = [".".join(p) for p in SHARED if _setting(mine, p) != _setting(theirs, p)]
    if differing:
        raise UsageError(f"{name} cannot lend its baselines: {', '.join(differing)} differ")
    curves = dict(results["curves"])
    borrowed = tuple(f"{v} ({name})" for v in other["curves"] if v not in curves)
    curves.update({f"{v} ({name})": points for v, points in other["curves"].items()
                   if v not in results["curves"]})
    return curves, borrowed


def replot(path: Path, baselines_from: Path | None = None) -> list[Path]:
    """Redraw the figure(s) of the results JSON at ``path``; returns the PNGs written."""
    results = json.loads(path.read_text())
    command, label = results.get("command", ""), path.stem
    if "bench_quality.py" in command:
        from ltm_pyro.studies.figures import curves_figure

        curves, borrowed = results["curves"], ()
        title = f"{label} ({results['corpus']}): validation -ELBO against the training budget"
        if baselines_from is not None:
            curves, borrowed = borrow_baselines(results, json.loads(baselines_from.read_text()),
                                                baselines_from.name)
            title += (f"\ndashed: baselines trained by {baselines_from.stem} (same data, LTM "
                      "model, tokens, seed and validation windows), not by this run")
        figures = {path.with_suffix(".png"): curves_figure(
            curves, results["references"], title, borrowed)}
    elif "bench_icl.py" in command:
        from ltm_pyro.studies.figures import accuracy_figure, latents_figure

        rows, chance = results["rows"], results["blind_guess_accuracy"]
        figures = {path.with_suffix(".png"): accuracy_figure(rows, chance)}
        if "--latents" in command:
            figures[path.with_name(f"{label}-latents.png")] = latents_figure(rows, chance)
    elif "latents_study.py" in command:
        from ltm_pyro.studies.figures import (
            bounds_mi_figure,
            results_from_report,
            slots_figure,
            training_figure,
        )

        variants = results_from_report(results)
        figures = {path.with_suffix(".png"): bounds_mi_figure(
                       variants, f"{label}: latent levers against T_eval (valid split)"),
                   path.with_name(f"{label}-slots.png"): slots_figure(variants)}
        if results.get("curves"):
            figures[path.with_name(f"{label}-training.png")] = training_figure(results["curves"])
    elif "prior_control" in command or "prior-control" in command:
        from ltm_pyro.commands.prior_control import figure

        figures = {path.with_suffix(".png"): figure(results)}
    elif "sweep" in command:
        from ltm_pyro.commands.sweep import figure

        figures = {path.with_suffix(".png"): figure(results)}
    else:
        raise UsageError(f"{path}: no figure is drawn from the results of {command!r}")
    for out, fig in figures.items():
        save_figure(fig, out)
    return list(figures)


def main() -> int:
    args = parser().parse_args()
    for path in args.results:
        replot(path, args.baselines_from)
    return 0


if __name__ == "__main__":
    run_main(main)
