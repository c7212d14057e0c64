"""Paired bootstrap intervals and seed spread, on cases whose answer is known."""

import math

import numpy as np
import pytest

from ltm_pyro.uncertainty import mean_and_sd, paired_bootstrap, relative_ppl_difference


def _windows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 64, size=n).astype(float)
    return tokens * rng.uniform(3.0, 5.0, size=n), tokens  # nats per window varies a lot


def test_a_constant_per_token_gain_is_exact_and_certain():
    nll_b, tokens = _windows(200)
    nll_a = nll_b - 0.05 * tokens  # A is better by exactly 0.05 nats on every token
    result = paired_bootstrap(nll_a, nll_b, tokens)
    assert result["difference"] == pytest.approx(math.expm1(-0.05))
    assert result["low"] == pytest.approx(result["high"]) == pytest.approx(math.expm1(-0.05))


def test_pairing_gives_a_narrower_interval_than_the_spread_across_windows():
    nll_b, tokens = _windows(400)
    noise = np.random.default_rng(1).normal(0.0, 0.5, size=400)
    nll_a = nll_b - 0.02 * tokens + noise
    paired = paired_bootstrap(nll_a, nll_b, tokens, seed=3)
    assert paired["low"] < paired["difference"] < paired["high"] < 0
    # unpaired: resample each model's windows independently, as two separate intervals would
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 400, size=(2, 2000, 400))
    unpaired = np.expm1((nll_a[a].sum(1) / tokens[a].sum(1)) - (nll_b[b].sum(1) / tokens[b].sum(1)))
    width = np.subtract(*np.quantile(unpaired, [0.975, 0.025]))
    assert paired["high"] - paired["low"] < width / 5


def test_the_interval_covers_the_truth_about_as_often_as_it_says():
    """Windows drawn from a population with a known per-token difference of -2%: the 90%
    interval covers the population value in about 90% of 200 repetitions."""
    covered = 0
    for rep in range(200):
        rng = np.random.default_rng(100 + rep)
        tokens = np.full(60, 50.0)
        nll_b = tokens * 4.0 + rng.normal(0, 5.0, size=60)
        nll_a = nll_b + tokens * math.log1p(-0.02) + rng.normal(0, 2.0, size=60)
        result = paired_bootstrap(nll_a, nll_b, tokens, resamples=500, level=0.9, seed=rep)
        covered += result["low"] <= -0.02 <= result["high"]
    assert 0.82 <= covered / 200 <= 0.97


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same non-empty list"):
        paired_bootstrap([1.0, 2.0], [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="same non-empty list"):
        paired_bootstrap([], [], [])


def test_relative_difference_and_seed_spread():
    assert relative_ppl_difference(np.array([10.0]), np.array([10.0]), np.array([5.0])) == 0.0
    assert mean_and_sd([1.0, 2.0, 3.0]) == {"mean": 2.0, "sd": 1.0, "seeds": 3}
    assert mean_and_sd([4.0]) == {"mean": 4.0, "sd": None, "seeds": 1}


def test_per_window_figures_add_up_to_the_split_totals():
    import torch

    from ltm_pyro.bounds import ScoringConfig, evaluate_windows
    from ltm_pyro.config import InferenceConfig
    from ltm_pyro.decoder import Decoder
    from ltm_pyro.model import LatentThoughtModel

    from .conftest import micro_config

    ltm = LatentThoughtModel(Decoder(micro_config()))
    windows = torch.randint(0, 23, (7, 13), generator=torch.Generator().manual_seed(2))
    summary = evaluate_windows(ltm, windows, InferenceConfig(steps=2),
                               ScoringConfig(batch_size=3, elbo_samples=2, iw_samples=3,
                                             per_window=True))
    per = summary["per_window"]
    assert len(per["tokens"]) == len(per["neg_iwae"]) == len(per["neg_elbo"]) == 7
    assert sum(per["tokens"]) == summary["tokens"]
    assert -sum(per["neg_iwae"]) / sum(per["tokens"]) == pytest.approx(summary["iwae_per_token"])
    assert -sum(per["neg_elbo"]) / sum(per["tokens"]) == pytest.approx(summary["elbo_per_token"])


def test_bench_quality_puts_a_paired_interval_on_each_baseline_row():

    from ltm_pyro.studies import quality as bench

    nll, tokens = _windows(50)
    ltm_nll = nll - 0.03 * tokens + np.random.default_rng(4).normal(0, 1.0, size=50)
    windows = {("ltm-T4", 0, "test", 4): {"neg_iwae": list(ltm_nll), "tokens": list(tokens)},
               ("ar-window", 0, "test", 0): {"neg_iwae": list(nll), "tokens": list(tokens)},
               ("ar-window", 1, "test", 0): {"neg_iwae": list(nll), "tokens": list(tokens)}}
    rows = [{"variant": "ltm-T4", "seed": 0, "split": "test", "T_eval": 4},
            {"variant": "ar-window", "seed": 0, "split": "test", "T_eval": 0},
            {"variant": "mdlm", "seed": 0, "split": "test", "T_eval": 0},
            {"variant": "ar-window", "seed": 1, "split": "test", "T_eval": 0}]
    bench.add_paired_intervals(rows, windows, "ltm-T4", 4)
    assert not any("ltm_vs_this" in rows[i] for i in (0, 2, 3))  # no LTM of seed 1 to pair
    assert rows[1]["ltm_vs_this"] == pytest.approx(relative_ppl_difference(ltm_nll, nll, tokens))
    assert rows[1]["ltm_vs_this_low"] < rows[1]["ltm_vs_this"] < rows[1]["ltm_vs_this_high"] < 0


def test_bench_quality_gives_mean_and_sd_over_seeds():

    from ltm_pyro.studies import quality as bench

    rows = [{"variant": "ar", "split": "test", "T_eval": 0, "iwae_ppl": v, "elbo_ppl": v,
             "ltm_vs_this": d} for v, d in ((50.0, -0.04), (52.0, -0.05), (54.0, -0.06))]
    rows.append({"variant": "ltm", "split": "test", "T_eval": 4, "iwae_ppl": 49.0,
                 "elbo_ppl": 51.0})
    summary = {(r["variant"], r["T_eval"]): r for r in bench.over_seeds(rows)}
    ar = summary[("ar", 0)]
    assert ar["seeds"] == 3 and ar["iwae_ppl_mean"] == pytest.approx(52.0)
    assert ar["iwae_ppl_sd"] == pytest.approx(2.0)
    assert ar["ltm_vs_this_mean"] == pytest.approx(-0.05)
    ltm = summary[("ltm", 4)]
    assert ltm["iwae_ppl_sd"] is None and "ltm_vs_this_mean" not in ltm


def test_two_seeds_have_a_spread():
    """Catches: the sd left out below three seeds (two seeds have a sample sd)."""
    assert mean_and_sd([1.0, 3.0]) == {"mean": 2.0, "sd": pytest.approx(math.sqrt(2)), "seeds": 2}


def test_the_result_names_its_level_windows_and_resamples():
    """Catches: a renamed key of the interval every result file records."""
    nll_b, tokens = _windows(30)
    result = paired_bootstrap(nll_b - 0.01 * tokens, nll_b, tokens, resamples=300, level=0.8)
    assert {k: result[k] for k in ("level", "windows", "resamples")} == {
        "level": 0.8, "windows": 30, "resamples": 300}


def test_single_precision_inputs_are_summed_in_double():
    """Catches: float32 inputs summed in float32. Windows of ~4,000 nats each differ by 1/1024
    nats a window (exact in float32): float32 sums of 1,000 of them cannot see it."""
    nll_b = np.full(1000, 4000.0, dtype=np.float32) + np.arange(1000, dtype=np.float32) / 8
    nll_a = nll_b - np.float32(1 / 1024)  # exact in float32: the difference survives the cast
    tokens = np.full(1000, 100.0, dtype=np.float32)
    expected = math.expm1(-1000 / 1024 / 100_000)
    result = paired_bootstrap(nll_a, nll_b, tokens, resamples=50)
    assert result["difference"] == pytest.approx(expected, rel=1e-6)
    assert result["low"] == pytest.approx(expected, rel=1e-6)
    assert result["high"] == pytest.approx(expected, rel=1e-6)
