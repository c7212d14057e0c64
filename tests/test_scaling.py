"""The scaling grid: budgets become steps, frontiers and equal-FLOP sets, and the driver."""

from __future__ import annotations

import json
import sys

import matplotlib
import pytest

matplotlib.use("Agg")

from ltm_pyro.config import RunConfig  # noqa: E402
from ltm_pyro.errors import UsageError  # noqa: E402
from ltm_pyro.flops import training_flops_per_token  # noqa: E402
from ltm_pyro.scaling import (  # noqa: E402
    GridPoint,
    equal_flop_groups,
    grid_points,
    pareto_frontier,
    point_config,
    with_budget,
)
from ltm_pyro.studies import scaling_study  # noqa: E402

from .conftest import REPO, load_script, micro_config  # noqa: E402
from .test_figures import _overlap  # noqa: E402

SCRIPT = str(REPO / "experiments" / "scaling.py")
# Micro runs on the built-in corpus: the preset as it was pinned (``tiny`` may change),
# 16-token windows, batches of 4, 3 steps.
MICRO = ["--preset", "tiny-v1", "--seq-len", "16", "--batch-size", "4", "--max-steps", "3",
         "--eval-every", "3", "--eval-windows", "4", "--n-heads", "2", "--latents", "2",
         "--latent-dims", "4", "--steps", "1", "--score-windows", "4", "--iw-samples", "2",
         "--elbo-samples", "1", "--mi-samples", "2", "--no-progress"]
MICRO_GRID = [*MICRO, "--widths", "16"]


def _base() -> RunConfig:
    return RunConfig(model=micro_config(vocab_size=50, context=16)).updated(
        train={"batch_size": 4})


def _points() -> list[GridPoint]:
    return grid_points(["ltm", "ar"], [16, 32], [1, 2], [2], [4], [0, 2, 8])


def test_grid_has_every_ltm_and_one_ar_per_width_and_depth():
    points = _points()
    assert len(points) == 2 * 2 * 3 + 2 * 2
    ars = [p for p in points if p.family == "ar"]
    assert {(p.d_model, p.n_layers) for p in ars} == {(16, 1), (16, 2), (32, 1), (32, 2)}
    assert all(p.latents_per_layer == 0 and p.steps == 0 for p in ars)
    assert len({p.name for p in points}) == len(points)
    ar = point_config(_base(), ars[0])
    assert ar.model_kind == "ar" and ar.model.latents_per_layer == 0
    ltm = point_config(_base(), GridPoint("ltm", 32, 1, 2, None, 8))
    assert (ltm.model.d_model, ltm.model.n_layers, ltm.model.z_dim, ltm.inference.steps) == (
        32, 1, 32, 8)
    with pytest.raises(UsageError, match="unknown family"):
        grid_points(["gpt"], [16], [1], [2], [4], [1])
    with pytest.raises(UsageError, match="heads"):
        point_config(_base(), GridPoint("ar", 18, 1))  # 18 / 2 heads = 9, odd


def test_semi_amortised_family_is_the_ltm_grid_with_an_encoder_and_the_ltm_has_none():
    points = grid_points(["ltm", "sa", "ar"], [16], [1], [2], [4], [2, 8])
    assert [p.name for p in points] == ["ltm-d16-L1-k2-z4-T2", "ltm-d16-L1-k2-z4-T8",
                                        "sa-d16-L1-k2-z4-T2", "sa-d16-L1-k2-z4-T8", "ar-d16-L1"]
    base = _base()
    sa = point_config(base, points[2])
    assert (sa.model_kind, sa.inference.encoder_layers, sa.inference.steps) == ("ltm", 2, 2)
    base = base.updated(inference={"encoder_layers": 3})  # sa keeps the flags' encoder, ltm not
    assert point_config(base, points[3]).inference.encoder_layers == 3
    assert point_config(base, points[0]).inference.encoder_layers == 0
    assert point_config(base, points[4]).model_kind == "ar"


def test_flop_budget_gives_each_run_steps_within_a_step_of_the_budget():
    base, budget = _base(), 3.0e9
    steps = {}
    for point in _points():
        config = with_budget(point_config(base, point), "flops", budget)
        # FLOPs of one step counted here from flops.py, not through the module under test.
        per_step = training_flops_per_token(
            config.model, config.inference.steps, config.train.decoder_grads,
            config.inference) * config.train.batch_size * config.model.context
        assert abs(config.train.max_steps * per_step - budget) <= per_step / 2, point.name
        steps[point.name] = config.train.max_steps
    # An iteration with more inner steps costs more, so it gets fewer steps; an AR the most.
    assert steps["ltm-d32-L2-k2-z4-T8"] < steps["ltm-d32-L2-k2-z4-T2"] < steps[
        "ltm-d32-L2-k2-z4-T0"] < steps["ar-d32-L2"]
    tokens = with_budget(point_config(base, _points()[0]), "tokens", 10 * 4 * 16)
    assert tokens.train.max_steps == 10
    with pytest.raises(UsageError, match="under half a training step"):
        with_budget(point_config(base, _points()[0]), "flops", 1.0)


def test_a_warmup_longer_than_the_run_is_cut():
    base = _base().updated(train={"warmup_steps": 30})
    short = with_budget(point_config(base, GridPoint("ar", 16, 1)), "tokens", 20 * 64)
    assert (short.train.max_steps, short.train.warmup_steps) == (20, 2)
    long = with_budget(point_config(base, GridPoint("ar", 16, 1)), "tokens", 200 * 64)
    assert long.train.warmup_steps == 30


def test_pareto_frontier_keeps_only_undominated_points_by_cost():
    #            0    1    2    3    4    5    6    7
    costs = [5.0, 1.0, 2.0, 2.0, 3.0, 8.0, 4.0, 1.0]
    values = [3.0, 9.0, 6.0, 5.0, 5.0, 1.0, 7.0, 9.0]
    # 1 (cheapest; 7 ties it and is the same point again), 3 beats 2 at the same cost, 4 ties
    # 3's value at a higher cost, 6 is worse than 3, then 0 and 5 improve.
    assert pareto_frontier(costs, values) == [1, 3, 0, 5]
    assert pareto_frontier([], []) == []


def test_equal_flop_groups_join_runs_within_the_tolerance():
    flops = [1.0e9, 5.0e9, 1.1e9, 5.4e9, 9.0e9, 1.3e9]
    assert equal_flop_groups(flops, 0.15) == [[0, 2], [1, 3]]
    assert equal_flop_groups(flops, 0.35) == [[0, 2, 5], [1, 3]]


def _run_script(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    return load_script("scaling").main()


def test_grid_writes_results_with_configs_and_reuses_finished_runs(tmp_path, monkeypatch):
    out = ["--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
           "--label", "micro"]
    flops = "2e7"
    assert _run_script(monkeypatch, *MICRO_GRID, *out, "--budget", "tokens,flops", "--flops",
                       flops) == 0
    results = tmp_path / "results"
    report = json.loads((results / "micro.json").read_text())
    assert report["grid"]["widths"] == [16] and report["grid"]["steps"] == [1]
    rows = report["rows"]
    assert sorted((r["family"], r["budget"]) for r in rows) == [
        ("ar", "FLOPs 20M"), ("ar", "tokens 192"), ("ltm", "FLOPs 20M"), ("ltm", "tokens 192")]
    assert set(report["configs"]) == {r["run"] for r in rows}
    for r in rows:
        config = report["configs"][r["run"]]
        assert config["train"]["max_steps"] == r["max_steps"]
        assert config["model"]["d_model"] == 16 and config["model"]["n_heads"] == 2
        per_step = r["train_flops"] / r["max_steps"]
        if r["budget"].startswith("FLOPs"):
            assert abs(r["train_flops"] - float(flops)) <= per_step / 2
        else:
            assert r["tokens_seen"] == 3 * 4 * 16
        if r["family"] == "ar":  # exact perplexity: both bounds are it
            assert r["iwae_ppl"] == pytest.approx(r["elbo_ppl"]) and r["T"] == 0
        else:
            assert r["mutual_info_per_window"] is not None and r["eval_passes"] == 2 * 1 + 2
    assert [r["latents_per_layer"] for r in rows if r["family"] == "ltm"] == [2, 2]
    page = (results / "micro.md").read_text()
    assert "python experiments/scaling.py --preset tiny-v1 --seq-len 16" in page.splitlines()[5]
    assert "| budget | run |" in page
    assert (results / "micro.png").stat().st_size and (results / "micro-trade.png").stat().st_size

    # Again, and as --report: finished runs are neither retrained nor rescored.
    scaling = load_script("scaling")

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("a finished run was trained or scored again")

    monkeypatch.setattr(scaling_study, "train", refuse)
    monkeypatch.setattr(scaling_study, "evaluate_windows", refuse)
    for extra in ([], ["--report"]):
        monkeypatch.setattr(sys, "argv", [SCRIPT, *MICRO_GRID, *out, "--budget",
                                          "tokens,flops", "--flops", flops, *extra])
        assert scaling.main() == 0
        again = json.loads((results / "micro.json").read_text())
        assert again["rows"] == rows
    # A result stored before the library added a config field (here word_dropout, at its
    # default) is still the same run: reused, not retrained.
    stored_files = sorted((tmp_path / "runs" / "micro").glob(f"*/{scaling_study.RESULT_NAME}"))
    assert len(stored_files) == len({r["run"] for r in rows})  # budgets can share a run
    for path in stored_files:
        stored = json.loads(path.read_text())
        del stored["config"]["train"]["word_dropout"]
        path.write_text(json.dumps(stored))
    monkeypatch.setattr(sys, "argv", [SCRIPT, *MICRO_GRID, *out, "--budget", "tokens,flops",
                                      "--flops", flops])
    assert scaling.main() == 0
    # Scored again with other settings, a finished run keeps its training's wall time (its
    # resume, which finds it done, is not a training time).
    monkeypatch.undo()
    walls = {r["run"]: r["train_wall_s"] for r in rows}
    for path in stored_files:
        stored = json.loads(path.read_text())
        stored["train_wall_s"] = walls[path.parent.name] + 1000.0
        path.write_text(json.dumps(stored))
    assert _run_script(monkeypatch, *MICRO_GRID, *out, "--budget", "tokens,flops", "--flops",
                       flops, "--iw-samples", "3") == 0
    rescored = json.loads((results / "micro.json").read_text())["rows"]
    assert {r["run"]: r["train_wall_s"] for r in rescored} == {
        name: wall + 1000.0 for name, wall in walls.items()}
    scaling = load_script("scaling")
    monkeypatch.setattr(scaling_study, "train", refuse)
    monkeypatch.setattr(scaling_study, "evaluate_windows", refuse)
    # A changed setting (another seed) is a different run: trained, not reused.
    monkeypatch.setattr(sys, "argv", [SCRIPT, *MICRO_GRID, *out, "--seed", "1"])
    with pytest.raises(AssertionError, match="trained or scored again"):
        scaling.main()


@pytest.mark.parametrize("flags, message", [
    (["--widths", "16", "--d-model", "32"], "give only --widths"),
    (["--flops", "1e9"], "--flops applies to --budget flops"),
    (["--latents", "0"], "--latents must be positive"),
    (["--model", "ar"], "drop --model"),
    (["--widths", "18"], "heads"),
    (["--report"], "no finished run"),
])
def test_bad_grids_are_one_line_usage_errors(tmp_path, monkeypatch, flags, message):
    with pytest.raises(UsageError, match=message):
        _run_script(monkeypatch, *MICRO, "--label", "bad", "--runs", str(tmp_path),
                    "--results", str(tmp_path), *flags)


@pytest.mark.parametrize("flags", [["--budget", "time"], ["--families", "ltm,gpt"],
                                   ["--tokens", "-5"], ["--latent-dims", "8,x"]])
def test_bad_lists_are_refused_by_the_parser(monkeypatch, capsys, flags):
    with pytest.raises(SystemExit) as stopped:
        _run_script(monkeypatch, "--label", "x", "--budget", "tokens,flops", *flags)
    assert stopped.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def _rows() -> list[dict]:
    rows = []
    for family, d, steps, flops, ppl in (("ar", 32, 0, 1.0e9, 90.0), ("ar", 64, 0, 3.7e9, 80.0),
                                         ("ltm", 32, 4, 4.2e9, 85.0), ("ltm", 32, 16, 13e9, 75.0),
                                         ("ltm", 64, 16, 48e9, 78.0)):
        rows.append({"family": family, "d_model": d, "n_layers": 2, "T": steps,
                     "latents_per_layer": 4 if family == "ltm" else 0, "latent_dim": 8,
                     "budget": "tokens 409.6k", "run": f"{family}-d{d}-T{steps}",
                     "params": d * 1000, "tokens_seen": 409600, "train_flops": flops,
                     "iwae_ppl": ppl})
    return rows


def _labelled(fig) -> None:  # noqa: ANN001 - a Figure
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        assert not _overlap(ax, fig)
    assert fig.get_suptitle()


def test_frontier_figure_draws_each_familys_pareto_frontier():
    rows = _rows()
    fig = scaling_study.frontier_figure(rows, {}, {"entropy_floor_valid": 3.5})
    _labelled(fig)
    flops_ax = fig.axes[1]
    legend = {t.get_text() for t in flops_ax.get_legend().get_texts()}
    assert {"LTM Pareto frontier", "AR Pareto frontier", "exp(entropy floor (valid))"} <= legend
    staircases = [line for line in flops_ax.get_lines() if line.get_drawstyle() == "steps-post"]
    # AR: both runs (the larger is better); LTM: the 64-wide run is worse at more FLOPs.
    assert sorted(list(line.get_ydata()) for line in staircases) == [[85.0, 75.0], [90.0, 80.0]]


def test_frontier_figure_draws_the_semi_amortised_frontier_only_when_it_has_runs():
    sa = {**_rows()[2], "family": "sa", "run": "sa-d32-T4", "train_flops": 3e9, "iwae_ppl": 84.0}
    fig = scaling_study.frontier_figure([*_rows(), sa], {}, {})
    legend = {t.get_text() for t in fig.axes[1].get_legend().get_texts()}
    assert "semi-amortised LTM Pareto frontier" in legend
    assert "semi-amortised LTM k4 z8 T4" in legend
    staircases = [line for line in fig.axes[1].get_lines() if line.get_drawstyle() == "steps-post"]
    assert [84.0] in [list(line.get_ydata()) for line in staircases]
    trade = scaling_study.trade_figure([*_rows(), {**sa, "encoder_params": 5000}])
    sizes = {x for line in trade.axes[0].get_lines() for x in line.get_xdata()}
    assert 32000 + 5000 in sizes  # a semi-amortised model's size counts its encoder
    plain = scaling_study.frontier_figure(_rows(), {}, {})
    assert "semi-amortised LTM Pareto frontier" not in {
        t.get_text() for t in plain.axes[1].get_legend().get_texts()}


def test_trade_figure_rings_runs_of_equal_flops():
    fig = scaling_study.trade_figure(_rows(), tolerance=0.15)
    _labelled(fig)
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert labels[-1] == "equal FLOPs #1 (±15%): 3.7G"  # the bigger AR and the LTM at T 4
    rings = [line for line in fig.axes[0].get_lines() if line.get_markersize() == 17]
    assert len(rings) == 1 and sorted(rings[0].get_xdata()) == [32000, 64000]
    table = scaling_study.equal_flop_tables(_rows())
    assert table.index("ar-d64-T0") < table.index("ltm-d32-T4")  # best first
    # A run that serves two budgets (the same steps) is listed once, naming both.
    twice = scaling_study.equal_flop_tables([*_rows(), dict(_rows()[1], budget="FLOPs 3.7G")])
    assert twice.count("ar-d64-T0") == 1 and "tokens 409.6k; FLOPs 3.7G" in twice
