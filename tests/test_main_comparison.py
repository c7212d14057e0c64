"""The main comparison's study code (``ltm_pyro/studies``): the tuning choice, the intervals
over seeds and windows, and one tiny study trained, scored and reported end to end."""

from __future__ import annotations

import json
import math

import pytest

from ltm_pyro.cli import config_from_args
from ltm_pyro.commands.train import parser
from ltm_pyro.files import write_json
from ltm_pyro.runner import train
from ltm_pyro.studies import main_report as report
from ltm_pyro.studies.main_comparison import (
    Study,
    chosen_learning_rates,
    run_curve,
    score_run,
    tuning_points,
)


def test_each_family_takes_its_lowest_finite_valid_figure_once_its_grid_is_complete():
    """Catches: a choice made before every point of a family is scored, a NaN or infinite
    point chosen, the highest figure taken, or one family's choice given to another."""
    points = [{"family": "ltm", "lr": "1e-3", "valid_iwae_ppl": 300.0},
              {"family": "ltm", "lr": "3e-3", "valid_iwae_ppl": float("nan")},
              {"family": "ltm", "lr": "1e-2", "valid_iwae_ppl": 280.0},
              {"family": "ar-full", "lr": "1e-3", "valid_iwae_ppl": 250.0},
              {"family": "ar-full", "lr": "3e-3", "valid_iwae_ppl": None},
              {"family": "ar-window", "lr": "1e-3", "valid_iwae_ppl": float("inf")},
              {"family": "ar-window", "lr": "3e-3", "valid_iwae_ppl": 260.0}]
    assert chosen_learning_rates(points) == {"ltm": "1e-2", "ar-window": "3e-3"}


def test_seed_interval_is_the_student_t_interval_of_the_mean():
    """Catches: a normal quantile (1.96) instead of Student's t with n - 1 degrees of freedom
    (4.30 for three seeds), the population sd, or sqrt(n) left out."""
    got = report.seed_interval([1.0, 2.0, 6.0])
    half = 4.302652729911275 * math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) / (
        math.sqrt(3))
    assert got["mean"] == pytest.approx(3.0)
    assert (got["low"], got["high"]) == pytest.approx((3.0 - half, 3.0 + half))
    assert report.seed_interval([2.0])["low"] is None


def test_a_windows_margin_refuses_runs_scored_on_other_windows():
    """Catches: a paired interval formed from two different sets of windows."""
    a = {"tokens": [3.0, 3.0], "neg_iwae": [1.0, 2.0]}
    b = {"tokens": [3.0, 4.0], "neg_iwae": [1.0, 2.0]}
    with pytest.raises(ValueError, match="different windows"):
        report.windows_margin(a, b)
    assert report.windows_margin(a, a)["difference"] == 0.0


@pytest.mark.slow
def test_a_tiny_study_trains_scores_and_reports(tmp_path, monkeypatch):
    """Catches: family flags that do not build the family (an AR with latents, an ablation
    that fits q), a score that is not from best.pt, a decomposition missing a figure, and a
    report that pairs the LTM with a baseline of another seed."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "corpus"
    data.mkdir()
    words = "the cat sat on a mat and the dog ran to the cat".split()
    for split, lines in (("train", 400), ("valid", 40), ("test", 40)):
        (data / f"{split}.txt").write_text("\n".join(
            " ".join(words[(i + j) % len(words)] for j in range(9)) for i in range(lines)))
    study = Study(data=str(data), runs=tmp_path / "runs", results=tmp_path / "results",
                  learning_rates=("3e-3",), seeds=(0,), epoch_steps=6, max_epochs=2,
                  eval_every=3, train_steps=1, iw_samples=4, eval_steps=(1, 2),
                  sweep_windows=4, big_k=8, decomposition_windows=2,
                  model=("--d-model", "16", "--seq-len", "8", "--window", "4",
                         "--warmup-steps", "1", "--eval-windows", "8", "--batch-size", "4"))
    scores = []
    for family in ("ltm", "ltm-no-inference", "ar-window"):
        command = study.training_job(family, "3e-3", 0, "python")
        config = config_from_args(parser().parse_args(command[2:]))
        assert (config.model.latents_per_layer > 0) == family.startswith("ltm")
        assert config.train.keep_best and config.train.patience == 2
        train(config, study.long_run(family, 0), progress=False)
        scores.append(score_run(study, family, study.long_run(family, 0)))
    ltm, ablation, ar = scores
    assert ablation["T_eval"] in (0, 1, 2) and set(ablation["valid_sweep_iwae_ppl"]) == {
        "0", "1", "2"}
    assert ar["T_eval"] == 0 and "prior_mean_ppl" not in ar["test"]
    for score in (ltm, ablation):
        windows = score["test_windows"]
        assert len(windows["prior_mean_nll"]) == len(windows["neg_iwae"]) == score["windows"]
        assert score["valid_big_k"]["iw_samples"] == 8
    json.dumps(scores)  # a score file is plain JSON

    (study.results / "tuning").mkdir(parents=True)
    write_json(study.results / "tuning" / "ltm@lr3e-3.json", {"iwae_ppl": 5.0})
    assert tuning_points(study)[0]["valid_iwae_ppl"] == 5.0
    rows = {r["family"]: r for r in report.comparison_rows(scores)}
    assert set(rows["ar-window"]["ltm_vs_this_per_seed"]) == {0}
    parts = report.decomposition_rows(scores)
    assert [p["family"] for p in parts] == ["ltm", "ltm-no-inference"]
    assert "| ltm | 0 |" in report.decomposition_table(parts)
    assert "ar-window" in report.comparison_table(list(rows.values()))
    curves = {family: [run_curve(study.long_run(family, 0))]
              for family in ("ltm", "ltm-no-inference", "ar-window")}
    assert [p["step"] for p in curves["ltm"][0]] == [3, 6, 9, 12][: len(curves["ltm"][0])]
    assert curves["ltm"][0][0]["flops"] > curves["ar-window"][0][0]["flops"]  # inner steps count
    assert len(report.curves_figure(curves).axes) == 2


def _interval(low, high):
    return {"difference": (low + high) / 2, "low": low, "high": high}


@pytest.mark.parametrize("lead, read, fixed, says", [
    ((-0.05, -0.01), (-0.02, -0.01), (-0.04, -0.01), "survives with z fixed, and z read"),
    ((-0.05, -0.01), (-0.01, 0.01), (-0.04, -0.01), "adds nothing measurable"),
    ((-0.05, -0.01), (-0.03, -0.01), (-0.01, 0.02), "The lead is z read at test time"),
    ((-0.05, -0.01), (-0.01, 0.01), (-0.01, 0.02), "neither"),
    ((-0.01, 0.02), (-0.03, -0.01), (-0.04, -0.01), "is level with"),
    ((0.01, 0.02), (-0.03, -0.01), (-0.04, -0.01), "trails"),
])
def test_each_latent_run_gets_the_sentence_its_intervals_support(lead, read, fixed, says):
    """Catches: a lead claimed from an interval that spans zero, and a lead credited to z read
    at test time (or to training) when its own interval does not exclude zero."""
    row = {"family": "ltm", "seed": 1, "vs_ar_window": _interval(*lead),
           "q_vs_prior": _interval(*read), "prior_mean_vs_ar_window": _interval(*fixed)}
    sentence = report.gain_source(row)
    assert says in sentence and sentence.startswith("ltm seed 1")
    others = {"survives with z fixed, and z read", "adds nothing measurable",
              "The lead is z read at test time", "neither", "is level with", "trails"} - {says}
    assert not any(other in sentence for other in others)
    assert report.gain_source({**row, "vs_ar_window": None}).endswith("scored yet.")
