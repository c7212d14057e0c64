"""bench_quality's equal tuning (one grid for every family, the choice made on valid) and its
equal-FLOP baselines (trained for the LTM's training FLOPs, every inner step counted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ltm_pyro.comparisons import (
    NO_INFERENCE,
    comparison_configs,
    equal_flop_steps,
    run_flops_per_token,
)
from ltm_pyro.config import InferenceConfig, RunConfig, TrainConfig, preset
from ltm_pyro.errors import UsageError
from ltm_pyro.files import read_jsonl
from ltm_pyro.flops import forward_flops_per_token
from ltm_pyro.runner import METRICS_NAME
from ltm_pyro.studies import quality

from .conftest import REPO, load_script, micro_config

GridPoint = quality.GridPoint


def _base(steps: int = 6, decoder_grads: str = "final") -> RunConfig:
    return RunConfig(model=micro_config(), inference=InferenceConfig(steps=steps),
                     train=TrainConfig(max_steps=40, batch_size=4, lr=2e-3, min_lr=2e-4,
                                       warmup_steps=5, decoder_grads=decoder_grads))


def _runs(base: RunConfig) -> dict[str, RunConfig]:
    return comparison_configs(base, with_no_inference=True, with_mdlm=True)


def _point(family: str, lr: float, warmup: int, figure: float | None) -> dict:
    return {"family": family, "lr": lr, "warmup_steps": warmup, "valid_iwae_ppl": figure,
            "folder": f"{family}{GridPoint(lr, warmup).suffix}"}


def test_the_choice_is_the_point_with_the_best_valid_figure():
    points = [_point("ar-window", 1e-3, 30, 61.0), _point("ar-window", 3e-3, 30, 58.5),
              _point("ar-window", 1e-3, 100, 58.4), _point("ar-window", 3e-3, 100, 60.0),
              _point("ltm-T6", 1e-3, 30, None), _point("ltm-T6", 3e-3, 30, math.nan),
              _point("ltm-T6", 1e-3, 100, 70.0), _point("ltm-T6", 3e-3, 100, 70.0)]
    chosen = quality.choose(points)
    assert (chosen["ar-window"]["lr"], chosen["ar-window"]["warmup_steps"]) == (1e-3, 100)
    # A diverged or non-finite point is never chosen; of equal figures the first is.
    assert (chosen["ltm-T6"]["lr"], chosen["ltm-T6"]["warmup_steps"]) == (1e-3, 100)
    with pytest.raises(UsageError, match="mdlm"):
        quality.choose(points + [_point("mdlm", 1e-3, 30, None)])
    table = quality.tuning_table(points, chosen)
    assert "| ltm-T6 | diverged |" in table and table.count("lr 0.001, wu 100 |") == 3


def test_the_grid_is_both_flags_crossed_or_the_runs_own_value():
    base = _base()
    grid = quality.tuning_grid(SimpleNamespace(tune_lr=[1e-3, 3e-3, 1e-3],
                                                     tune_warmup=[30, 100]), base)
    assert [(p.lr, p.warmup_steps) for p in grid] == [(1e-3, 30), (1e-3, 100), (3e-3, 30),
                                                       (3e-3, 100)]
    only_lr = quality.tuning_grid(SimpleNamespace(tune_lr=[1e-3], tune_warmup=None), base)
    assert only_lr == [GridPoint(1e-3, base.train.warmup_steps)]
    assert quality.tuning_grid(SimpleNamespace(tune_lr=None, tune_warmup=None), base) == []


def test_every_family_gets_the_same_grid_and_its_own_choice(monkeypatch, tmp_path):
    base = _base()
    runs = _runs(base)
    grid = [GridPoint(1e-3, 30), GridPoint(3e-3, 30), GridPoint(1e-3, 100)]
    best = {"ltm-T6": (3e-3, 30), NO_INFERENCE: (1e-3, 100), "ar-window": (1e-3, 30),
            "ar-full": (3e-3, 30), "mdlm": (1e-3, 100)}
    trained = []

    def fake_figure(bench, name, config, seed, run_dir):  # noqa: ANN001, ANN202
        point = (config.train.lr, config.train.warmup_steps)
        trained.append((name, point, seed, run_dir.name))
        # Everything but the slow schedule and the seed is the family's own config.
        assert replace(config, train=runs[name].train) == runs[name]
        assert config.train.min_lr == pytest.approx(config.train.lr / 10)
        return {"valid_iwae_ppl": 50.0 if point == best[name] else 60.0 + point[1] / 1000}

    monkeypatch.setattr(quality, "tuning_figure", fake_figure)
    args = SimpleNamespace(runs=tmp_path, label="t", test_windows=None, sample_windows=None,
                           sample_seed=0, equal_flops=False)
    bench = quality.Bench(args, base)
    bench.corpus = SimpleNamespace(windows={"valid": torch.zeros(10, 13)})
    tuned = quality.tune(bench, runs, grid, seeds=[3, 4])
    for name in runs:
        assert [(p, s) for n, p, s, _ in trained if n == name] == [
            ((g.lr, g.warmup_steps), 3) for g in grid]
        assert (tuned[name].train.lr, tuned[name].train.warmup_steps) == best[name]
        assert bench.points[name] == GridPoint(*best[name])
    assert trained[0][3] == "ltm-T6@lr0.001-wu30-seed3"
    assert len(bench.tuning) == len(runs) * len(grid)
    record = quality.tuning_record(bench, grid)
    assert record["chosen"]["mdlm"]["valid_iwae_ppl"] == 50.0 and len(record["grid"]) == 3
    assert record["seed"] == 3 and record["windows"] == 10
    bench.args.sample_windows = 4
    _, intro, _ = quality.report_extras(bench, grid, "ltm-T6")
    assert "scored on valid (a random subset of 4 windows (seed 0))" in intro


@pytest.mark.parametrize("decoder_grads", ["final", "trajectory"])
def test_equal_flop_steps_give_the_ltms_training_flops_within_one_step(decoder_grads):
    base = _base(steps=6, decoder_grads=decoder_grads)
    runs = _runs(base)
    ltm = runs["ltm-T6"]
    forward = forward_flops_per_token(ltm.model)
    per_iteration = (6 * 2 + 3) if decoder_grads == "final" else 7 * 3
    tokens_per_step = base.train.batch_size * base.model.context
    budget = base.train.max_steps * tokens_per_step * per_iteration * forward
    for name in ("ar-window", "ar-full", "mdlm"):
        config = runs[name]
        steps = equal_flop_steps(ltm, config)
        per_step = tokens_per_step * run_flops_per_token(config)
        assert abs(steps * per_step - budget) <= per_step / 2, name
        assert steps > 3 * base.train.max_steps  # the LTM iteration is several AR steps
    ar = runs["ar-window"]
    assert run_flops_per_token(ar) == pytest.approx(3 * forward_flops_per_token(ar.model))


def test_equal_flop_runs_are_the_baselines_at_their_tuned_points():
    base = _base()
    runs = {name: config for name, config in _runs(replace(
        base, model=replace(base.model, vocab_size=0))).items()}  # vocab from the corpus
    bench = quality.Bench(SimpleNamespace(), base)
    bench.corpus = SimpleNamespace(tokenizer=SimpleNamespace(vocab_size=23))
    bench.points = {name: GridPoint(1e-3, 7) for name in runs}
    found = quality.equal_flop_runs(bench, runs, "ltm-T6")
    assert list(found) == ["ar-window@flops", "ar-full@flops", "mdlm@flops"]
    sized = _runs(base)
    for name, config in found.items():
        family = name.removesuffix("@flops")
        assert config.train.max_steps == equal_flop_steps(sized["ltm-T6"], sized[family])
        assert config.train.keep_best and not runs[family].train.keep_best  # stopped on valid
        assert replace(config, train=runs[family].train) == runs[family]
        assert bench.points[name] == GridPoint(1e-3, 7)


def _main_variants(monkeypatch, tmp_path, *flags: str) -> list[tuple[str, int, str]]:
    """bench_quality's main with training, scoring and the report replaced: the (variant,
    seed, folder) it would train and score, in order."""
    calls = []

    def fake_run(bench, name, config, seed, run_dir):  # noqa: ANN001, ANN202
        bench.corpus = SimpleNamespace(tokenizer=SimpleNamespace(vocab_size=23))
        calls.append((name, seed, str(run_dir.relative_to(tmp_path))))

    script = load_script("bench_quality")
    monkeypatch.setattr(script, "run_variant", fake_run)
    monkeypatch.setattr(script, "write_report", lambda *a: None)
    monkeypatch.setattr(quality, "tuning_figure", lambda bench, name, config, *_: {
        "valid_iwae_ppl": config.train.lr * (1 if name.startswith("ar") else -1)})
    monkeypatch.setattr(sys, "argv", ["bench_quality.py", "--label", "x", "--runs",
                                      str(tmp_path), "--preset", "tiny-v1", *flags])
    assert script.main() == 0
    return calls


def test_without_the_flags_the_variants_and_folders_are_unchanged(monkeypatch, tmp_path):
    plain = ["ltm-T16", NO_INFERENCE, "ar-window", "ar-full", "mdlm"]
    runs = _main_variants(monkeypatch, tmp_path, "--inference-steps", "16")
    assert runs == [(name, 0, f"x/{name}") for name in plain]
    runs = _main_variants(monkeypatch, tmp_path, "--inference-steps", "16", "--seeds", "0,1")
    assert runs == [(name, seed, f"x/{name}-seed{seed}") for seed in (0, 1) for name in plain]

    runs = _main_variants(monkeypatch, tmp_path, "--inference-steps", "16", "--tune-lr",
                          "1e-3,3e-3", "--equal-flops", "--no-mdlm")
    warmup = preset("tiny-v1").train.warmup_steps  # the run's own, --tune-warmup not given
    ltms = {name: f"@lr0.003-wu{warmup}" for name in ("ltm-T16", NO_INFERENCE)}
    assert runs == [(name, 0, f"x/{name}{ltms.get(name, f'@lr0.001-wu{warmup}')}")
                    for name in plain[:-1]] + [
        (f"{name}@flops", 0, f"x/{name}@flops@lr0.001-wu{warmup}") for name in ("ar-window",
                                                                                 "ar-full")]


def test_equal_flops_needs_the_baselines_and_the_reference_ltm(monkeypatch, tmp_path):
    for flags in (["--no-ar"], ["--train-inference-steps", "2,4", "--inference-steps", "8"]):
        with pytest.raises(UsageError, match="--equal-flops"):
            _main_variants(monkeypatch, tmp_path, "--equal-flops", *flags)


@pytest.mark.slow
def test_a_tuned_equal_flop_bench_records_its_grid_choices_and_budgets(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, lines in (("train", 60), ("valid", 12), ("test", 12)):
        (corpus / f"{split}.txt").write_text("\n".join(
            " ".join(words[(i * 7 + j * j) % 5] for j in range(10)) for i in range(lines)))
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "bench_quality.py"), "--data", str(corpus),
         "--max-steps", "3",
         "--eval-every", "3", "--eval-windows", "4", "--batch-size", "4", "--inference-steps",
         "2", "--seq-len", "16", "--d-model", "32", "--n-layers", "1", "--test-windows", "4",
         "--splits", "valid,test", "--iw-samples", "2", "--elbo-samples", "1",
         "--prior-samples", "2", "--mi-samples", "2", "--no-ablation", "--no-mdlm",
         "--tune-lr", "1e-3,1e-2", "--tune-warmup", "1", "--equal-flops", "--label", "tuned",
         "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"),
         "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "results" / "tuned.json").read_text())
    tuning = report["tuning"]
    families = ["ltm-T2", "ar-window", "ar-full"]
    assert [(p["family"], p["lr"]) for p in tuning["points"]] == [
        (f, lr) for f in families for lr in (1e-3, 1e-2)]
    rows = {(r["variant"], r["split"]): r for r in report["rows"]}
    for family in families:
        mine = [p for p in tuning["points"] if p["family"] == family]
        best = min(mine, key=lambda p: p["valid_iwae_ppl"])
        assert tuning["chosen"][family]["lr"] == best["lr"]
        # The chosen run's valid row is the figure it was chosen on.
        assert rows[(family, "valid")]["iwae_ppl"] == pytest.approx(best["valid_iwae_ppl"])
        assert rows[(family, "test")]["slow_lr"] == best["lr"]
        assert Path(tmp_path / "runs" / "tuned" / best["folder"] / "checkpoint.pt").is_file()
    budgets = {b["variant"]: b for b in report["budgets"]}
    for name in ("ar-window@flops", "ar-full@flops"):
        assert "ltm_vs_this" in rows[(name, "test")]
        # Scored where its validation was best: the step of best.pt, a validation step.
        family = name.removesuffix("@flops")
        run = tuning["chosen"][family]["folder"].replace(family, name, 1)
        best = [r for r in read_jsonl(tmp_path / "runs" / "tuned" / run / METRICS_NAME)
                if r["split"] == "valid"]
        assert budgets[name]["scored_step"] == min(best, key=lambda r: r["neg_elbo"])["step"]
        per_step = budgets[name]["train_pflops"] / budgets[name]["slow_steps"]
        gap = abs(budgets[name]["train_pflops"] - budgets["ltm-T2"]["train_pflops"])
        assert gap <= per_step / 2 and budgets[name]["tokens_seen"] > rows[("ar-window",
                                                                             "test")]["tokens_seen"]
        folder = tmp_path / "runs" / "tuned" / report["tuning"]["chosen"]["ar-window"]["folder"]
        train_windows = json.loads((folder / "config.json").read_text())["corpus"]["windows"]
        assert budgets[name]["epochs"] == pytest.approx(
            budgets[name]["slow_steps"] * 4 / train_windows["train"])
    assert torch.isfinite(torch.tensor([r["iwae_ppl"] for r in report["rows"]])).all()


def test_the_comparison_builds_each_family_as_it_says():
    """Catches: the LTM variants trained at the base T whatever T was asked, ARs that are not
    size-matched, an ar-window that sees the whole context or an ar-full that keeps the
    window, and an ablation whose q is not the prior exactly (a config that writes null)."""
    from ltm_pyro.decoder import count_parameters

    base = replace(_base(), model=replace(micro_config(), window=3),
                   inference=InferenceConfig(steps=6, init_log_var_jitter=0.5,
                                             init_loc_scale=0.5))
    found = comparison_configs(base, [2, 8], with_no_inference=True)
    assert [found[f"ltm-T{t}"].inference.steps for t in (2, 8)] == [2, 8]
    assert found["ar-window"].model.window == 3 and found["ar-full"].model.window is None
    ltm_size = count_parameters(base.model)
    for name in ("ar-window", "ar-full"):
        assert found[name].model.latents_per_layer == 0
        assert abs(count_parameters(found[name].model) / ltm_size - 1) < 0.02, name
        assert count_parameters(found[name].model) != count_parameters(
            replace(base.model, latents_per_layer=0)), name  # widened, not just stripped
    prior = found[NO_INFERENCE].inference
    assert (prior.steps, prior.init_log_var, prior.init_log_var_jitter,
            prior.init_loc_scale) == (0, 0.0, 0.0, 0.0)
    assert all(isinstance(v, float) for v in (prior.init_log_var_jitter, prior.init_loc_scale))


def test_step_flops_are_per_token_flops_times_the_batchs_tokens():
    """Catches: a step's FLOPs divided by its tokens instead of multiplied, an encoder left
    out of a run's count, and an equal-FLOP budget of at least two steps."""
    from ltm_pyro.comparisons import step_flops

    config = replace(_base(), model=replace(micro_config(), vocab_size=23))
    tokens = config.train.batch_size * config.model.context
    assert step_flops(config) == pytest.approx(run_flops_per_token(config) * tokens)
    encoded = replace(config, inference=replace(config.inference, encoder_layers=1))
    assert run_flops_per_token(encoded) > run_flops_per_token(config)
    one_step = replace(config, train=replace(config.train, max_steps=1))
    assert equal_flop_steps(one_step, one_step) == 1


def test_a_validation_curve_counts_tokens_and_flops_at_each_validation(tmp_path):
    from ltm_pyro.comparisons import step_flops, validation_curve

    config = replace(_base(), model=replace(micro_config(), vocab_size=23))
    records = [{"split": "train", "step": 1, "neg_elbo": 9.0},
               {"split": "valid", "step": 2, "neg_elbo": 5.0},
               {"split": "valid", "step": 4, "neg_elbo": 4.0}]
    (tmp_path / METRICS_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    curve = validation_curve(tmp_path, config)
    tokens = config.train.batch_size * config.model.context
    assert curve == [{"step": s, "tokens": s * tokens, "flops": s * step_flops(config),
                      "neg_elbo": v} for s, v in ((2, 5.0), (4, 4.0))]
    assert validation_curve(tmp_path / "none", config) == []
