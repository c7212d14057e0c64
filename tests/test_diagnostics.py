import math

import arviz as az
import numpy as np
import pytest
import torch

from ltm_pyro.decoder import Decoder
from ltm_pyro.diagnostics import (
    active_units,
    compare_to_reference,
    guide_inference_data,
    importance_ess,
    kl_per_layer,
    kl_per_slot,
    nuts_reference,
    pareto_k,
    posterior_contraction,
)
from ltm_pyro.model import LatentThoughtModel, LocalPosterior

from .conftest import micro_config


def _normal_log_pdf(x, sd):
    return -0.5 * (x / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)


def test_khat_small_when_guide_equals_target():
    rng = np.random.default_rng(0)
    draws = rng.normal(0, 1, size=(20, 2000))
    log_w = _normal_log_pdf(draws, 1.0) - _normal_log_pdf(draws, 1.0) - 3.0  # unnormalised
    assert np.all(pareto_k(log_w) < 0.5)
    assert np.allclose(importance_ess(log_w), 2000)
    # nearly equal: a guide slightly wider than the target (sd 1.1 for 1.0) still has k < 0.5
    wide = rng.normal(0, 1.1, size=(20, 2000))
    log_w = _normal_log_pdf(wide, 1.0) - _normal_log_pdf(wide, 1.1)
    assert np.all(pareto_k(log_w) < 0.5)
    assert np.all(importance_ess(log_w) > 0.9 * 2000)


def test_khat_large_when_guide_is_much_narrower():
    rng = np.random.default_rng(1)
    draws = rng.normal(0, 0.1, size=(20, 20000))  # guide sd 0.1, target sd 1: true k = 0.99
    log_w = _normal_log_pdf(draws, 1.0) - _normal_log_pdf(draws, 0.1)
    assert np.all(pareto_k(log_w) > 0.7)
    assert np.all(importance_ess(log_w) < 0.2 * 20000)


def test_kl_per_slot_and_layer_on_constructed_posteriors():
    loc = torch.zeros(3, 4, 5)
    log_var = torch.zeros(3, 4, 5)
    loc[:, 1, :] = 2.0  # slot 1: each of 5 dims costs 0.5 * 4 = 2 nats
    log_var[:, 3, 0] = math.log(0.25)  # slot 3: one dim, 0.5 * (0.25 - 1 - log 0.25)
    posterior = LocalPosterior(loc, log_var)
    per_slot = kl_per_slot(posterior)
    expected = torch.tensor([0.0, 10.0, 0.0, 0.5 * (0.25 - 1 - math.log(0.25))])
    assert torch.allclose(per_slot, expected.expand(3, 4), atol=1e-6)
    assert torch.allclose(kl_per_layer(posterior, 2), torch.stack(
        [expected[:2].sum(), expected[2:].sum()]).expand(3, 2), atol=1e-6)


def test_active_units_and_contraction_on_constructed_posteriors():
    generator = torch.Generator().manual_seed(0)
    loc = torch.zeros(500, 2, 3)
    loc[:, 0, 1] = torch.randn(500, generator=generator)  # one coordinate varies
    loc[:, 1, 2] = 0.01 * torch.randn(500, generator=generator)  # below the threshold
    active = active_units(loc)
    assert active.sum() == 1 and active[0, 1]
    posterior = LocalPosterior(loc, torch.full_like(loc, math.log(0.2)))
    assert torch.allclose(posterior_contraction(posterior), torch.full((2, 3), 0.8))


def _grid_posterior(ltm, tokens):
    """Posterior mean and variance of a 1-D z by quadrature, per sequence."""
    grid = torch.linspace(-8, 8, 3001)
    moments = []
    with torch.no_grad():
        for seq in tokens:
            rep = seq.expand(len(grid), -1)
            logits = ltm.decoder(rep[:, :-1], grid.view(-1, 1, 1))
            log_lik = -torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), rep[:, 1:].flatten(), reduction="none"
            ).view(len(grid), -1).sum(-1)
            weights = torch.softmax(log_lik.double() - 0.5 * grid.double() ** 2, 0)
            mean = (weights * grid).sum()
            moments.append((float(mean), float((weights * (grid - mean) ** 2).sum())))
    return np.array(moments)


@pytest.mark.slow
def test_nuts_agrees_with_quadrature():
    config = micro_config(vocab_size=5, context=6, n_layers=1, latents_per_layer=1,
                          latent_dim=1, window=None)
    decoder = Decoder(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in decoder.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    ltm = LatentThoughtModel(decoder)
    tokens = torch.randint(0, 5, (2, 7), generator=torch.Generator().manual_seed(1))
    reference = nuts_reference(ltm, tokens, torch.ones(2, 6), num_samples=1000,
                               warmup_steps=300, chains=2)
    r_hat = az.rhat(reference)["z"].values
    assert np.all(r_hat < 1.05)
    draws = reference.posterior["z"].values.reshape(-1, 2)
    exact = _grid_posterior(ltm, tokens)
    sd = np.sqrt(exact[:, 1])
    assert np.all(np.abs(draws.mean(0) - exact[:, 0]) < 0.15 * sd + 0.02)
    assert np.all(np.abs(draws.var(0) / exact[:, 1] - 1) < 0.2)

    guide = guide_inference_data(LocalPosterior(torch.tensor(exact[:, 0]).float().view(2, 1, 1),
                                                torch.tensor(exact[:, 1]).float().log().view(
                                                    2, 1, 1)), draws=4000)
    comparison = compare_to_reference(guide, reference)
    assert np.all(np.abs(comparison["standardised_mean_difference"]) < 0.2)
    assert np.all(np.abs(comparison["variance_ratio"] - 1) < 0.3)
