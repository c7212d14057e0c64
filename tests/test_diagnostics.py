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


def test_pareto_k_and_ess_are_per_row_of_any_leading_shape():
    """Catches: the flat-row test or the log-sum-exp taken over another axis (or all of them),
    and a spread below 1 nat mistaken for equal weights: rows [..., K] are independent."""
    rng = np.random.default_rng(2)
    spread = rng.normal(0, 0.05, size=(2, 3, 500))  # weights that differ, by under a nat
    assert np.ptp(spread, axis=-1).max() < 1.0
    spread[1, 2] = -4.0  # one row of equal weights
    k_hat, ess = pareto_k(spread), importance_ess(spread)
    assert k_hat.shape == ess.shape == (2, 3)
    assert k_hat[1, 2] == -np.inf and np.isfinite(np.delete(k_hat.ravel(), 5)).all()
    for index in np.ndindex(2, 3):
        w = np.exp(spread[index])
        assert ess[index] == pytest.approx(w.sum() ** 2 / (w ** 2).sum(), rel=1e-9)
        alone = pareto_k(spread[index][None])[0]
        assert k_hat[index] == alone or (np.isinf(alone) and np.isinf(k_hat[index]))


def test_contraction_is_per_coordinate():
    log_var = torch.log(torch.tensor([[0.5, 1.0, 0.1], [0.5, 1.0, 0.3]]))
    contraction = posterior_contraction(LocalPosterior(torch.zeros(2, 3), log_var))
    assert torch.allclose(contraction, torch.tensor([0.5, 0.0, 0.8]))


def test_iwae_from_log_weights_is_the_log_mean_of_the_weights():
    from ltm_pyro.diagnostics import iwae_from_log_weights

    log_w = np.array([[0.0, math.log(3.0)], [-1000.0, -1000.0 + math.log(5.0)]])
    assert iwae_from_log_weights(log_w) == pytest.approx([math.log(2.0), -1000.0 + math.log(3.0)])


def test_guide_draws_have_the_guides_moments_and_named_dims():
    loc = torch.tensor([[[1.0, -2.0]], [[0.0, 3.0]]])  # [sequence 2, slot 1, dim 2]
    log_var = torch.log(torch.tensor([[[0.25, 4.0]], [[1.0, 0.01]]]))
    data = guide_inference_data(LocalPosterior(loc, log_var), draws=20000,
                                generator=torch.Generator().manual_seed(0))
    z = data.posterior["z"]
    assert z.dims == ("chain", "draw", "sequence", "slot", "dim") and z.shape == (1, 20000, 2, 1, 2)
    values = z.values[0]
    assert np.allclose(values.mean(0), loc.numpy(), atol=0.05)
    assert np.allclose(values.var(0) / log_var.exp().numpy(), 1.0, atol=0.05)
    again = guide_inference_data(LocalPosterior(loc, log_var), draws=20000,
                                 generator=torch.Generator().manual_seed(0))
    assert np.array_equal(again.posterior["z"].values, z.values)


def test_comparison_to_a_reference_by_its_definition():
    """Catches: moments taken over one chain only, or over the wrong dims, the SMD scaled by
    the guide's sd, a variance ratio inverted: checked against numpy on constructed draws."""
    rng = np.random.default_rng(3)
    reference_z = rng.normal(1.0, 2.0, size=(3, 400, 2, 1, 2))  # 3 chains
    guide_z = rng.normal(1.5, 1.0, size=(1, 900, 2, 1, 2))
    as_data = lambda z: az.from_dict(posterior={"z": z}, dims={"z": ["sequence", "slot", "dim"]})  # noqa: E731
    result = compare_to_reference(as_data(guide_z), as_data(reference_z))
    r, g = reference_z.reshape(-1, 2, 1, 2), guide_z.reshape(-1, 2, 1, 2)
    assert np.allclose(result["standardised_mean_difference"],
                       (g.mean(0) - r.mean(0)) / r.std(0), rtol=1e-9)
    assert np.allclose(result["variance_ratio"], g.var(0) / r.var(0), rtol=1e-9)
    assert np.all(result["variance_ratio"] < 0.5)  # the guide here is the narrower one


def test_nuts_reference_runs_seeded_chains_and_names_the_dims():
    """Catches: chains that share a seed (identical, so r_hat is meaningless), draws stacked
    in the wrong order, a run that does not repeat under its seed, and the warm-up asked for
    not passed to the sampler."""
    config = micro_config(vocab_size=5, context=4, n_layers=1, latents_per_layer=1,
                          latent_dim=1, window=None)
    ltm = LatentThoughtModel(Decoder(config).eval())
    tokens = torch.randint(0, 5, (1, 5), generator=torch.Generator().manual_seed(1))
    run = lambda seed, warmup=4: nuts_reference(  # noqa: E731
        ltm, tokens, torch.ones(1, 4), num_samples=6, warmup_steps=warmup, chains=2, seed=seed)
    first = run(0)
    z = first.posterior["z"]
    assert z.dims == ("chain", "draw", "sequence", "slot", "dim") and z.shape == (2, 6, 1, 1, 1)
    assert not np.array_equal(z.values[0], z.values[1])
    assert np.array_equal(run(0).posterior["z"].values, z.values)
    assert np.array_equal(run(1).posterior["z"].values[0], z.values[1])  # chain c: seed + c
    assert not np.array_equal(run(0, warmup=5).posterior["z"].values, z.values)


def test_single_precision_log_weights_give_double_precision_figures():
    """Catches: float32 log-weights (a float32 model's) kept in float32, so an ESS or IWAE
    figure carries float32 rounding into the results."""
    from ltm_pyro.diagnostics import iwae_from_log_weights

    log_w = np.random.default_rng(4).normal(-300.0, 2.0, size=(3, 64))
    single = log_w.astype(np.float32)
    for measure in (importance_ess, iwae_from_log_weights, pareto_k):
        out = measure(single)
        assert out.dtype == np.float64, measure.__name__
    assert iwae_from_log_weights(single) == pytest.approx(
        iwae_from_log_weights(single.astype(np.float64)), abs=1e-12)
