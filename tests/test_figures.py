"""Figures say what they show: titles, labelled axes, the right split, KL from 0, no overlap.

Each test draws a figure from plain data (as ``ltm_pyro/viz.py`` and the experiment scripts
do) and checks what a reader would check by eye, so that a figure that regresses fails here.
"""

import json
import math

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from ltm_pyro.comparisons import validation_curve  # noqa: E402
from ltm_pyro.errors import UsageError  # noqa: E402
from ltm_pyro.latent_use import slot_correlation_matrices, slot_similarity  # noqa: E402
from ltm_pyro.studies import figures, icl  # noqa: E402
from ltm_pyro.viz import (  # noqa: E402
    bounds_against_steps,
    heatmap,
    slot_correlations,
    training_curves,
)

from .conftest import load_script  # noqa: E402

REFERENCES = {"entropy_floor_valid": 3.58, "entropy_floor_test": 3.55,
              "unigram_entropy_valid": 4.5}


def _labels(ax) -> list[str]:  # noqa: ANN001 - an Axes
    return ax.get_legend_handles_labels()[1]


def _titled_and_labelled(fig) -> None:  # noqa: ANN001 - a Figure
    for ax in fig.axes:
        twin = len(ax.get_shared_x_axes().get_siblings(ax)) > 1 and not ax.get_title()
        if ax.get_label() == "<colorbar>" or twin:  # a twin's title is its sibling's
            assert not twin or ax.get_ylabel(), ax
            continue
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), ax


def _sweep_rows() -> list[dict]:
    return [{"inference_steps": t, "elbo_ppl": 60 - t / 4, "iwae_ppl": 58 - t / 4,
             "recon_ppl": 50 - t / 4} for t in (0, 1, 4, 16)]


@pytest.mark.parametrize("split", ["valid", "test"])
def test_sweep_references_name_the_split_they_come_from(split):
    fig = bounds_against_steps(_sweep_rows(), REFERENCES, split)
    ax = fig.axes[0]
    labels = _labels(ax)
    assert f"exp(entropy floor ({split}))" in labels
    # the corpus has no test unigram entropy: the valid one is drawn and says so
    assert "exp(unigram entropy (valid))" in labels
    floors = [line.get_ydata()[0] for line in ax.get_lines()
              if line.get_label() == f"exp(entropy floor ({split}))"]
    assert floors == [pytest.approx(math.exp(REFERENCES[f"entropy_floor_{split}"]))]
    assert split in ax.get_title()
    _titled_and_labelled(fig)


def test_sweep_with_latent_use_draws_mi_and_kl_beside_the_bounds():
    rows = [dict(r, mutual_info_per_window=1 + r["inference_steps"] / 8,
                 mutual_info_stderr=0.1, mutual_info_cap=5.5, kl_per_window=2.0 + t)
            for t, r in enumerate(_sweep_rows())]
    fig = bounds_against_steps(rows, REFERENCES, "valid")
    assert len(fig.axes) == 2
    info = fig.axes[1]
    assert {"MI I(x; z) (95% interval)", "KL(q || p)", "MI cap log N = 5.50"} <= set(_labels(info))
    assert info.get_ylim()[0] == 0
    _titled_and_labelled(fig)
    assert len(bounds_against_steps(_sweep_rows(), REFERENCES).axes) == 1  # no MI: one panel


def test_sweep_script_figure_passes_its_split():
    from ltm_pyro.commands.sweep import figure

    fig = figure({"rows": _sweep_rows(), "references": REFERENCES, "split": "test",
                  "corpus": "ptb", "windows": 4, "trained_inference_steps": 16})
    labels = _labels(fig.axes[0])
    assert "exp(entropy floor (test))" in labels and "exp(entropy floor (valid))" not in labels
    assert "test" in fig.axes[0].get_title() and "ptb" in fig.axes[0].get_title()


def _records(latent: bool, ar: bool = False) -> list[dict]:
    records = []
    for step in (10, 20, 30):
        records.append({"split": "train", "step": step, "neg_elbo": 5 - step / 100,
                        "nll": 4.9 - step / 100, "kl": 0.0 if ar else 0.04 + step / 1000})
        valid = {"split": "valid", "step": step, "neg_elbo": 5.1 - step / 100,
                 "nll": 5 - step / 100, "kl": 0.0 if ar else 0.05 + step / 1000}
        if latent:
            valid.update(kl_per_window=0.0 if ar else 2 + step / 10,
                         mutual_info_per_window=0.0 if ar else 1 + step / 20,
                         mutual_info_stderr=0.0 if ar else 0.1, mutual_info_cap=math.log(64),
                         active_units=0 if ar else 40 + step // 10,
                         active_units_total=0 if ar else 64,
                         slot_correlation=None if ar else 0.9 + step / 1000,
                         slot_effective_rank=None if ar else 1.5)
        records.append(valid)
    return records


def test_training_curves_draw_the_latent_diagnostics_when_records_carry_them():
    fig = training_curves(_records(latent=True), REFERENCES, "a run")
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 6
    assert any("carries" in t for t in titles) and any("Active units" in t for t in titles)
    assert any("Slot correlation" in t for t in titles)
    _titled_and_labelled(fig)
    by_title = {ax.get_title(): ax for ax in fig.axes}
    # KL axes start at 0 although every KL here is above 0.04
    assert by_title["KL(q || p) per token"].get_ylim()[0] == 0
    kl_mi = by_title["What z costs and carries (valid)"]
    assert kl_mi.get_ylim()[0] == 0
    assert {"KL per window", "MI I(x; z) ± 1 s.e.", "MI cap log N"} <= set(_labels(kl_mi))
    mi_bars = [c for c in kl_mi.containers if c.has_yerr]
    assert len(mi_bars) == 1  # the MI carries its standard error
    slots = by_title["Slot correlation (valid)"]
    assert list(slots.get_lines()[0].get_ydata()) == pytest.approx([0.91, 0.92, 0.93])
    assert "all 64 coordinates" in _labels(by_title["Active units (valid)"])
    assert fig.get_suptitle() == "a run"


def test_training_curves_draw_the_prior_control_when_records_carry_it():
    records = _records(latent=True)
    for record, control in zip([r for r in records if r["split"] == "valid"], (0.0, 0.01, 0.03)):
        record["prior_control"] = control
    fig = training_curves(records, REFERENCES, "a run")
    assert len(fig.axes) == 7
    _titled_and_labelled(fig)
    right = next(ax for ax in fig.axes if ax.get_ylabel().startswith("prior_iwae_ppl"))
    assert list(right.get_lines()[0].get_ydata()) == pytest.approx([0.0, 1.0, 3.0])
    assert len(training_curves(_records(latent=True), REFERENCES).axes) == 6


@pytest.mark.parametrize("records", [_records(latent=False), _records(latent=True, ar=True)],
                         ids=["without latent keys", "AR records (zeros, no slots)"])
def test_training_curves_of_records_without_latents_keep_three_panels(records):
    fig = training_curves(records, REFERENCES)
    assert len(fig.axes) == 3
    _titled_and_labelled(fig)
    kl = fig.axes[2]
    assert kl.get_ylim()[0] == 0
    # the references drawn are the valid ones, and say so
    assert "unigram entropy (valid)" in _labels(fig.axes[0])
    assert not any("test" in label for label in _labels(fig.axes[0]))


def test_a_kl_heatmap_colour_scale_can_start_at_zero():
    matrix = [[0.038, 0.05], [0.2, 0.4]]
    free = heatmap(matrix, "slot", "layer", "KL")
    assert free.axes[0].collections[0].get_clim()[0] == pytest.approx(0.038)  # the old look
    fig = heatmap(matrix, "slot within layer", "layer", "KL per slot", vmin=0,
                  colorbar="KL (nats)")
    assert fig.axes[0].collections[0].get_clim()[0] == 0
    assert fig.axes[1].get_ylabel() == "KL (nats)"


def test_slot_correlation_matrices_agree_with_slot_similarity():
    generator = torch.Generator().manual_seed(3)
    n, layers, slots, dim = 200, 2, 3, 4
    base = torch.randn(n, dim, generator=generator)
    copies = torch.stack([(-1) ** s * base + s for s in range(slots)], dim=1)  # layer 0
    independent = torch.randn(n, slots, dim, generator=generator)  # layer 1
    loc = torch.cat([copies, independent], dim=1)
    matrices = slot_correlation_matrices(loc, layers)
    assert matrices.shape == (layers, slots, slots)
    assert torch.allclose(matrices[0], torch.ones(slots, slots, dtype=torch.float64))
    off = ~torch.eye(slots, dtype=torch.bool)
    assert matrices[1][off].max() < 0.2
    mean_off = sum(float(m[off].mean()) for m in matrices) / layers
    assert mean_off == pytest.approx(slot_similarity(loc, layers)[0])
    still = loc.clone()
    still[:, 1] = 0.0  # a slot whose means never move
    assert torch.isnan(slot_correlation_matrices(still, layers)[0, 1]).all()

    fig = slot_correlations(matrices.numpy())
    heatmaps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(heatmaps) == layers
    assert [ax.get_title() for ax in heatmaps] == ["layer 0", "layer 1"]
    assert heatmaps[0].collections[0].get_clim() == (0, 1)
    assert fig.get_suptitle()


def _overlap(ax, fig) -> bool:  # noqa: ANN001
    fig.canvas.draw()
    low, high = ax.get_xlim()
    boxes = [t.get_window_extent() for t in ax.get_xticklabels(which="both")
             if t.get_text() and low <= t.get_position()[0] <= high]
    boxes.sort(key=lambda b: b.x0)
    return any(a.x1 > b.x0 for a, b in zip(boxes, boxes[1:]))


def test_budget_curves_tick_labels_do_not_overlap():
    """The WikiText-2 figure's FLOPs axis (3e12 to 7e13) labelled its minor ticks on top of
    each other."""
    curves = {"ltm-T16": [{"tokens": 1.0e5, "flops": 3.4e13, "neg_elbo": 7.13},
                          {"tokens": 2.0e5, "flops": 6.8e13, "neg_elbo": 6.94}],
              "ar-window": [{"tokens": 1.0e5, "flops": 2.9e12, "neg_elbo": 7.05},
                            {"tokens": 2.0e5, "flops": 5.8e12, "neg_elbo": 6.87}]}
    fig = figures.curves_figure(curves, {"unigram_entropy_valid": 6.9})
    for ax in fig.axes:
        assert not _overlap(ax, fig)
        assert sum(bool(t.get_text()) for t in ax.get_xticklabels(which="both")) >= 2
    _titled_and_labelled(fig)
    assert "unigram entropy (valid)" in _labels(fig.axes[0])


def test_icl_accuracy_carries_binomial_standard_errors():
    rows = [{"variant": v, "T_eval": 0, "shots": k, "items": 256, "accuracy": acc}
            for v, accs in (("ltm-T16", (0.25, 0.3)), ("ar-window", (0.2, 0.4)))
            for k, acc in zip((0, 4), accs)]
    fig = figures.accuracy_figure(rows, 0.247)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if c.has_yerr]
    assert len(bars) == 2
    half_widths = [float(seg[1][1] - seg[0][1]) / 2 for seg in bars[0].lines[2][0].get_segments()]
    assert half_widths == pytest.approx([math.sqrt(p * (1 - p) / 256) for p in (0.25, 0.3)])
    assert ax.get_ylim()[0] == 0
    _titled_and_labelled(fig)


def test_icl_latents_figure_has_a_curve_per_k_and_the_ars_at_the_largest_k():
    rows = [{"variant": f"ltm-T16-L{n}", "latents_per_layer": n, "T_eval": t, "shots": k,
             "items": 256, "accuracy": 0.25 + 0.01 * n + 0.001 * k + (0.1 if t else 0)}
            for n in (1, 4, 16) for t in (0, 16) for k in (0, 8)]
    rows += [{"variant": v, "latents_per_layer": None, "T_eval": 0, "shots": k, "items": 256,
              "accuracy": acc} for v, acc in (("ar-window", 0.4), ("ar-full", 0.2)) for k in (0, 8)]
    fig = figures.latents_figure(rows, 0.247)
    ax = fig.axes[0]
    curves = [c for c in ax.containers if c.has_yerr]
    assert len(curves) == 2  # k = 0 and k = 8, each at the largest T_eval only
    x, y = curves[1].lines[0].get_data()
    assert list(x) == [1, 4, 16] and list(y) == pytest.approx([0.368, 0.398, 0.518])
    flat = sorted(line.get_ydata()[0] for line in ax.get_lines() if line.get_xdata()[0] == 0
                  and len(set(line.get_ydata())) == 1)
    assert flat == pytest.approx([0.2, 0.247, 0.4])  # ar-full, chance and ar-window at k = 8
    _titled_and_labelled(fig)


def test_icl_latent_grid_trains_one_ltm_per_count_beside_the_base_ars():
    from ltm_pyro.comparisons import comparison_configs
    from ltm_pyro.config import preset

    base = preset("tiny")
    found = icl.variants(base, [1, 8])
    steps = base.inference.steps
    assert list(found) == [f"ltm-T{steps}-L1", f"ltm-T{steps}-L8", "ar-window", "ar-full"]
    assert [found[f"ltm-T{steps}-L{n}"].model.latents_per_layer for n in (1, 8)] == [1, 8]
    plain = comparison_configs(base)
    assert found["ar-window"] == plain["ar-window"] and found["ar-full"] == plain["ar-full"]
    assert icl.variants(base, None) == plain


def _quality_results(latents_per_layer: int, curves: dict) -> dict:
    config = {"data": {"path": "ptb"}, "model": {"latents_per_layer": latents_per_layer},
              "train": {"max_steps": 300, "batch_size": 16, "seed": 0, "eval_every": 50,
                        "eval_windows": 64}}
    return {"command": "python experiments/bench_quality.py --label x", "corpus": "ptb",
            "references": {"unigram_entropy_valid": 6.5}, "curves": curves,
            "configs": {name: config for name in curves}}


def test_replot_redraws_from_json_and_borrows_only_matching_baselines(tmp_path):
    replot = load_script("replot")
    point = [{"tokens": 1e5, "flops": 1e13, "neg_elbo": 6.4},
             {"tokens": 2e5, "flops": 2e13, "neg_elbo": 6.2}]
    lone = tmp_path / "lone.json"
    lone.write_text(json.dumps(_quality_results(8, {"ltm-T16": point})))
    full = tmp_path / "full.json"
    full.write_text(json.dumps(_quality_results(8, {"ltm-T16": point, "ar-window": point})))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_quality_results(16, {"ltm-T16": point, "ar-window": point})))

    assert replot.replot(lone, full) == [tmp_path / "lone.png"]
    assert (tmp_path / "lone.png").stat().st_size > 0
    curves, borrowed = replot.borrow_baselines(json.loads(lone.read_text()),
                                               json.loads(full.read_text()), "full.json")
    assert set(curves) == {"ltm-T16", "ar-window (full.json)"}
    assert borrowed == ("ar-window (full.json)",)
    with pytest.raises(UsageError, match="model differ"):
        replot.replot(lone, other)
    unknown = tmp_path / "speed.json"
    unknown.write_text(json.dumps({"command": "python experiments/bench_speed.py"}))
    with pytest.raises(UsageError, match="no figure"):
        replot.replot(unknown)


def test_hover_scatter_svg_has_one_titled_point_per_document_and_escapes_text():
    import xml.etree.ElementTree as ET

    from ltm_pyro.viz import hover_scatter_svg

    points = np.array([[0.0, 0.0], [1.0, 2.0], [2.0, -1.0]])
    svg = hover_scatter_svg(points, np.array([3, 3, 7]), ["a <b> & c", "doc 1", "doc 2"],
                            "PCA of posterior means")
    root = ET.fromstring(svg)  # well-formed: the text was escaped
    ns = {"s": "http://www.w3.org/2000/svg"}
    circles = root.findall("s:circle", ns)
    assert [c.find("s:title", ns).text for c in circles] == ["a <b> & c", "doc 1", "doc 2"]
    fills = [c.get("fill") for c in circles]
    assert fills[0] == fills[1] != fills[2]  # one colour per class
    xs = [float(c.get("cx")) for c in circles]
    ys = [float(c.get("cy")) for c in circles]
    assert xs == sorted(xs) and ys[1] < ys[0] < ys[2]  # larger y is drawn higher
    assert "PCA of posterior means" in svg and "component 1" in svg


def test_latents_training_curves_read_valid_records_and_draw_mi_for_ltms_only(tmp_path):
    from ltm_pyro.config import preset

    config = preset("tiny").updated(model={"vocab_size": 50})  # as a trained run records it
    run = tmp_path / "ltm"
    run.mkdir()
    records = [{"split": "train", "step": 10, "neg_elbo": 9.0},
               {"split": "valid", "step": 100, "neg_elbo": 4.2, "kl_per_window": 7.0,
                "mutual_info_per_window": 3.5, "mutual_info_stderr": 0.1,
                "mutual_info_cap": math.log(64)},
               {"split": "valid", "step": 200, "neg_elbo": 4.1, "kl_per_window": 9.0,
                "mutual_info_per_window": 4.0, "mutual_info_stderr": 0.05,
                "mutual_info_cap": math.log(64)}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    curve = validation_curve(run, config, figures.CURVE_KEYS)
    tokens = config.train.batch_size * config.model.context
    assert [(p["step"], p["tokens"], p["mutual_info_per_window"]) for p in curve] == [
        (100, 100 * tokens, 3.5), (200, 200 * tokens, 4.0)]
    assert validation_curve(tmp_path / "missing", config, figures.CURVE_KEYS) == []
    ar = [{**p, "kl_per_window": 0.0, "mutual_info_per_window": 0.0} for p in curve]
    fig = figures.training_figure({"ltm": curve, "ar-window": ar})
    _titled_and_labelled(fig)
    bound, carried = fig.axes[:2]
    assert _labels(bound) == ["ltm", "ar-window"]
    assert "ltm: MI" in _labels(carried) and "ltm: KL" in _labels(carried)
    assert not any(label.startswith("ar-window") for label in _labels(carried))
    assert carried.get_ylim()[0] == 0


def _scored(kind: str, ppl: float, prior: float | None = None, windows: int = 4) -> dict:
    result = {"model_kind": kind, "corpus": "ptb", "split": "test", "windows": windows,
              "window_selection": "all", "tokens": 100 * windows,
              "iwae_ppl": ppl}  # evaluate.py writes iwae_ppl for every kind (an AR's is exact)
    if prior is not None:
        result.update(prior_iwae_ppl=prior, kl_per_window=6.0, mutual_info_per_window=3.0)
    return result


def test_window_study_puts_each_gap_in_nats_per_window_and_refuses_other_windows(
        tmp_path, monkeypatch):
    study = load_script("window_study")
    files = {"full": _scored("ar", 100.0), "ar2": _scored("ar", 150.0),
             "ltm2": _scored("ltm", 120.0, prior=130.0), "ar8": _scored("ar", 110.0),
             "ltm8": _scored("ltm", 105.0, prior=105.0), "other": _scored("ar", 150.0, windows=8)}
    for name, result in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(result))

    def run(*pairs: str) -> int:
        argv = ["window_study.py", "--full", str(tmp_path / "full.json"),
                "--out", str(tmp_path / "study"), *pairs]
        monkeypatch.setattr("sys.argv", argv)
        return study.main()

    assert run("--pair", "8", str(tmp_path / "ltm8.json"), str(tmp_path / "ar8.json"),
               "--pair", "2", str(tmp_path / "ltm2.json"), str(tmp_path / "ar2.json")) == 0
    rows = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert [r["window"] for r in rows] == [2, 8]  # sorted by window
    two = rows[0]  # 100 tokens a window
    assert two["hidden_nats"] == pytest.approx(100 * math.log(1.5))
    assert two["ltm_gain_nats"] == pytest.approx(100 * math.log(150 / 120))
    assert two["prior_gap_nats"] == pytest.approx(100 * math.log(130 / 120))
    assert two["ltm_vs_ar"] == pytest.approx(-0.2) and two["prior_control"] == pytest.approx(1 / 12)
    assert rows[1]["prior_gap_nats"] == pytest.approx(0.0)
    assert (tmp_path / "study.png").stat().st_size > 0
    with pytest.raises(UsageError, match="other windows"):
        run("--pair", "2", str(tmp_path / "ltm2.json"), str(tmp_path / "other.json"))
    with pytest.raises(UsageError, match="not an LTM"):
        run("--pair", "2", str(tmp_path / "ar2.json"), str(tmp_path / "ar2.json"))
    with pytest.raises(UsageError, match="whole number"):
        run("--pair", "two", str(tmp_path / "ltm2.json"), str(tmp_path / "ar2.json"))
