"""The prior control against the draws K (ltm_pyro.proposal_curve), on cases whose answer is
known: a decoder that ignores z (no gap at any K), and a 1-D z whose log p(x) is known by
quadrature (a gap at K 1 that closes as the prior's draws find the posterior)."""

import math
from dataclasses import replace

import pytest
import torch

from ltm_pyro.bounds import ScoringConfig, evaluate_windows
from ltm_pyro.config import InferenceConfig
from ltm_pyro.decoder import Decoder
from ltm_pyro.errors import UsageError
from ltm_pyro.model import LatentThoughtModel
from ltm_pyro.proposal_curve import proposal_curve

from .conftest import micro_config
from .test_bounds import _quadrature_log_px, _sharp_ltm
from .test_recipe import z_blind_ltm

FIT = InferenceConfig(steps=30, noise="fresh", init_log_var=0.0)


def _windows(count: int, vocab: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(seed))


def test_a_decoder_that_ignores_z_shows_no_gap_at_any_k():
    rows = proposal_curve(z_blind_ltm(), _windows(12, 23, 13), InferenceConfig(
        steps=4, init_log_var=0.0), [1, 8, 2, 32, 8], batch_size=8).rows
    assert [r["samples"] for r in rows] == [1, 2, 8, 32]  # sorted, each K once
    for row in rows:
        assert row["prior_control"] == pytest.approx(0.0, abs=1e-6)
        assert row["gap_nats_per_window"] == pytest.approx(0.0, abs=1e-5)
        assert row["prior_iwae_ppl"] == pytest.approx(rows[0]["prior_iwae_ppl"], rel=1e-6)


def test_the_gap_is_large_at_one_draw_and_closes_on_the_exact_likelihood():
    """The decoder reads a 1-D z (its posterior holds about a nat): one prior draw misses it
    (the likelihood with z drawn blind), 2,048 find it, and both proposals reach log p(x)."""
    ltm = _sharp_ltm()
    windows = _windows(8, 7, 9)
    rows = proposal_curve(ltm, windows, FIT, [1, 2048], batch_size=8).rows
    exact_per_window = float(_quadrature_log_px(ltm, windows).mean())
    tokens = 8 * 8
    one, many = rows
    assert one["gap_nats_per_window"] > 0.5
    assert abs(many["gap_nats_per_window"]) < 0.05
    for key in ("iwae_ppl", "prior_iwae_ppl"):
        assert -math.log(many[key]) * tokens / 8 == pytest.approx(exact_per_window, abs=0.05)
    # one draw of the prior is the likelihood with z ignored: worse than the fitted q's ELBO
    assert one["prior_iwae_ppl"] > one["iwae_ppl"] * 1.05
    assert one["prior_control"] == pytest.approx(
        one["prior_iwae_ppl"] / one["iwae_ppl"] - 1, rel=1e-9)


def test_the_prior_figure_at_k_is_the_prior_control_of_evaluate_windows():
    """In one batch, the first K of the curve's prior draws are the draws of
    ``ScoringConfig(prior_samples=K)``: the two figures agree exactly."""
    ltm, windows = _sharp_ltm(), _windows(8, 7, 9)
    curve = proposal_curve(ltm, windows, FIT, [4, 32, 64, 32], batch_size=8, seed=3).rows
    assert len(curve) == 3  # K 32 listed twice is scored once, not summed twice
    for row in curve:
        scoring = ScoringConfig(batch_size=8, seed=3, prior_samples=row["samples"])
        control = evaluate_windows(ltm, windows, FIT, scoring)
        assert row["prior_iwae_ppl"] == pytest.approx(control["prior_iwae_ppl"], rel=1e-9)


def test_the_information_is_that_of_the_q_the_curve_drew_from():
    """In one batch the curve's q is the fit ``evaluate_windows`` makes with the same seed, so
    its KL and MI agree exactly; no second fit is needed for them."""
    ltm, windows = _sharp_ltm(), _windows(8, 7, 9)
    curve = proposal_curve(ltm, windows, FIT, [4], batch_size=8, seed=5)
    assert curve.posterior.loc.shape[0] == len(windows)
    fitted = evaluate_windows(ltm, windows, FIT,
                              ScoringConfig(batch_size=8, seed=5, latent_stats=True, mi_samples=3))
    information = curve.information(ltm.config.n_layers, mi_samples=3, seed=5)
    for key in ("kl_per_window", "mutual_info_per_window", "mutual_info_stderr"):
        assert information[key] == pytest.approx(fitted[key], rel=1e-9), key
    assert information["kl_per_window"] > 0.1  # the sharp decoder's q holds information


def test_a_model_without_latents_or_no_draws_is_refused_in_one_line():
    ar = LatentThoughtModel(Decoder(micro_config(latents_per_layer=0)))
    with pytest.raises(UsageError, match="no latents"):
        proposal_curve(ar, _windows(2, 23, 13), FIT, [1])
    with pytest.raises(UsageError, match="positive"):
        proposal_curve(_sharp_ltm(), _windows(2, 7, 9), FIT, [0, 4])


def test_the_curve_fits_q_with_the_steps_it_is_given():
    """Catches: ``steps`` dropped on the way to the fit (the config's T used instead)."""
    ltm, windows = _sharp_ltm(), _windows(8, 7, 9)
    given = proposal_curve(ltm, windows, FIT, [4], steps=1, batch_size=8).rows
    configured = proposal_curve(ltm, windows, replace(FIT, steps=1), [4], batch_size=8).rows
    default = proposal_curve(ltm, windows, FIT, [4], batch_size=8).rows
    assert given == configured
    assert given[0]["iwae_ppl"] != pytest.approx(default[0]["iwae_ppl"], rel=1e-6)


def test_the_figures_do_not_depend_on_how_the_windows_are_batched():
    """Catches: the token count kept for the last batch only. For a decoder that ignores z
    every bound is the exact likelihood, whatever the draws, so batching cannot move it."""
    ltm, windows = z_blind_ltm(), _windows(12, 23, 13)
    fit = InferenceConfig(steps=2, init_log_var=0.0)
    whole = proposal_curve(ltm, windows, fit, [2], batch_size=12).rows[0]
    batched = proposal_curve(ltm, windows, fit, [2], batch_size=5).rows[0]
    for key in ("iwae_ppl", "prior_iwae_ppl"):
        assert batched[key] == pytest.approx(whole[key], rel=1e-5), key
