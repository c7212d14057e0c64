"""Contracts of the evaluator (``ltm_pyro/bounds.py``) that its figures alone do not pin down.

``tests/test_core_behaviour.py`` checks the three bounds against a written-out reference and
``tests/test_bounds.py`` against the exact likelihood; neither reads the rest of what
``evaluate_windows`` returns or promises: the settings it reports (``inference_steps``, the
sample counts), the per-window figures behind the paired intervals (``per_window``), the prior
control's own generator (the global RNG never moves), the ``chunk`` that bounds the decoder's
batch in the IWAE estimate, and ``log_mean_exp`` on weights of any leading shape. The full
mutation run (issue 20) let a change to each of these through; every test names the change
it catches.
"""

from __future__ import annotations

import math

import pytest
import torch

from ltm_pyro.bounds import ScoringConfig, evaluate_windows, iwae_log_likelihood, log_mean_exp
from ltm_pyro.config import InferenceConfig
from ltm_pyro.decoder import Decoder
from ltm_pyro.inference import fit_local_posterior
from ltm_pyro.model import LatentThoughtModel

from .conftest import micro_config


def _windows(count: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 23, (count, 13), generator=torch.Generator().manual_seed(seed))


def test_summary_reports_its_settings_and_keeps_per_window_figures_only_when_asked():
    """Catches: ``inference_steps`` reported as None when ``steps`` is left to the config (or as
    T, or 1, for a model without latents), the sample counts reported as None or left out, and
    the per-window lists added to every summary (``per_window`` on by default)."""
    ltm = LatentThoughtModel(Decoder(micro_config()).eval())
    summary = evaluate_windows(ltm, _windows(6), InferenceConfig(steps=2),
                               ScoringConfig(batch_size=4, elbo_samples=3, iw_samples=2))
    assert summary["inference_steps"] == 2
    assert summary["elbo_samples"] == 3 and summary["iw_samples"] == 2
    assert "per_window" not in summary

    ar = LatentThoughtModel(Decoder(micro_config(latents_per_layer=0)).eval())
    summary = evaluate_windows(ar, _windows(3), InferenceConfig(steps=2),
                               ScoringConfig(batch_size=4))
    assert summary["inference_steps"] == 0  # nothing is fitted without latents


def test_per_window_figures_add_up_to_the_totals():
    """Catches: a batch's per-window lists replacing the earlier batches' instead of extending
    them, tokens summed over the batch instead of per window, -ELBO per window with the KL
    subtracted, and the lists stored under another key or as None."""
    ltm = LatentThoughtModel(Decoder(micro_config()).eval())
    summary = evaluate_windows(ltm, _windows(10), InferenceConfig(steps=2, init_log_var=-1.0),
                               ScoringConfig(batch_size=4, elbo_samples=2, iw_samples=3,
                                             per_window=True))
    per = summary["per_window"]
    assert set(per) == {"tokens", "neg_elbo", "neg_iwae"}
    assert per["tokens"] == [12.0] * 10  # 3 batches (4, 4, 2), 12 predicted tokens each
    assert len(per["neg_elbo"]) == len(per["neg_iwae"]) == 10
    assert summary["kl_per_token"] > 0.1  # the KL's sign matters below
    tokens = summary["tokens"]
    assert sum(per["neg_elbo"]) / tokens == pytest.approx(-summary["elbo_per_token"], rel=1e-9)
    assert sum(per["neg_iwae"]) / tokens == pytest.approx(-summary["iwae_per_token"], rel=1e-9)


def test_prior_control_draws_from_its_own_seeded_generator():
    """Catches: the prior control's draws taken from the global RNG (its generator dropped or
    None): the call then moves the global RNG and ``prior_iwae_ppl`` depends on it."""
    ltm = LatentThoughtModel(Decoder(micro_config()).eval())
    figures = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        summary = evaluate_windows(ltm, _windows(4), InferenceConfig(steps=1),
                                   ScoringConfig(batch_size=4, prior_samples=3))
        assert torch.equal(torch.get_rng_state(), before)
        figures.append(summary["prior_iwae_ppl"])
    assert figures[0] == figures[1]


def test_iwae_decodes_chunk_draws_at_a_time(batch, monkeypatch):
    """Catches: ``chunk`` not passed on by ``iwae_log_likelihood`` (the decoder then runs on the
    default 8 draws at a time, whatever memory bound the caller asked for)."""
    tokens, mask = batch
    ltm = LatentThoughtModel(Decoder(micro_config()).eval())
    fit = fit_local_posterior(ltm, tokens, mask, InferenceConfig(steps=1))
    sizes = []
    original = LatentThoughtModel.log_weights

    def recorded(self, tokens, *args):  # noqa: ANN001, ANN002, ANN202
        sizes.append(tokens.shape[0])
        return original(self, tokens, *args)

    monkeypatch.setattr(LatentThoughtModel, "log_weights", recorded)
    log_px = iwae_log_likelihood(ltm, tokens, mask, fit.posterior, 5,
                                 torch.Generator().manual_seed(0), chunk=2)
    assert sizes == [2 * 5, 2 * 5, 5]  # draws 2 + 2 + 1, each for the 5 sequences
    assert log_px.shape == (5,)


def test_log_mean_exp_reads_the_last_axis_of_any_shape():
    """Catches: ``log_mean_exp`` summing, or counting K on, axis 1 instead of the last (the
    same only for [B, K]; ``diagnostics.iwae_from_log_weights`` takes any [..., K])."""
    weights = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
    expected = torch.log(weights.exp().mean(-1))
    torch.testing.assert_close(log_mean_exp(weights), expected)
    torch.testing.assert_close(log_mean_exp(weights[0, 0]), expected[0, 0])
    assert float(log_mean_exp(torch.zeros(4))) == pytest.approx(0.0)
    assert float(log_mean_exp(torch.log(torch.tensor([1.0, 3.0])))) == pytest.approx(math.log(2))


def test_per_window_prior_figures_add_up_to_the_prior_total():
    """Catches: the prior control's per-window -IWAE missing (the paired interval of q against
    the prior then cannot be formed), replaced batch by batch, or stored unsigned."""
    ltm = LatentThoughtModel(Decoder(micro_config()).eval())
    summary = evaluate_windows(ltm, _windows(10), InferenceConfig(steps=1),
                               ScoringConfig(batch_size=4, prior_samples=3, per_window=True))
    per = summary["per_window"]
    assert len(per["neg_prior_iwae"]) == 10 and min(per["neg_prior_iwae"]) > 0
    assert sum(per["neg_prior_iwae"]) / summary["tokens"] == pytest.approx(
        -summary["prior_iwae_per_token"], rel=1e-9)


def test_prior_mean_nll_is_the_exact_likelihood_with_z_at_zero():
    """Catches: z left to a draw (or to the guide) instead of held at the prior's mean, a
    window's NLL averaged over tokens instead of summed, batches dropped or reordered, and an
    AR's figure that is not its exact likelihood."""
    import pyro.poutine as poutine

    from ltm_pyro.bounds import prior_mean_nll

    windows = _windows(7)
    ltm = LatentThoughtModel(Decoder(micro_config()).eval())
    got = prior_mean_nll(ltm, windows, batch_size=3)
    mask = torch.ones(7, 12)
    zeros = torch.zeros(7, *ltm.latent_shape)
    trace = poutine.trace(poutine.condition(ltm.model, data={"z": zeros})).get_trace(
        windows, mask)
    want = -trace.nodes["x"]["fn"].log_prob(trace.nodes["x"]["value"]).double()
    assert got.shape == (7,) and torch.allclose(got, want, rtol=1e-6)
    assert not torch.allclose(got, prior_mean_nll(ltm, windows.flip(0), batch_size=3))

    ar = LatentThoughtModel(Decoder(micro_config(latents_per_layer=0)).eval())
    exact = evaluate_windows(ar, windows, InferenceConfig(),
                             ScoringConfig(batch_size=3, per_window=True))
    assert prior_mean_nll(ar, windows, batch_size=3).tolist() == pytest.approx(
        exact["per_window"]["neg_iwae"], rel=1e-6)
