import math

import torch

from ltm_pyro.bounds import evaluate_windows, expected_nll_and_kl, iwae_log_likelihood
from ltm_pyro.config import InferenceConfig, TrainConfig
from ltm_pyro.decoder import Decoder
from ltm_pyro.inference import fit_local_posterior
from ltm_pyro.model import LatentThoughtModel
from ltm_pyro.svi import DualRateSVI

from .conftest import micro_config


def _sharp_ltm(latent_dim: int = 1, latents_per_layer: int = 1) -> LatentThoughtModel:
    """A small LTM with large weights, so p(x|z) depends strongly on a low-dimensional z."""
    config = micro_config(vocab_size=7, context=8, n_layers=1, latents_per_layer=latents_per_layer,
                          latent_dim=latent_dim, window=None)
    decoder = Decoder(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in decoder.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.4)
    return LatentThoughtModel(decoder.eval())


def _quadrature_log_px(ltm: LatentThoughtModel, tokens: torch.Tensor) -> torch.Tensor:
    """log ∫ p(x|z) N(z; 0, 1) dz on a fine grid, per sequence (1-D z)."""
    grid = torch.linspace(-9, 9, 4001, dtype=torch.float64)
    step = float(grid[1] - grid[0])
    results = []
    with torch.no_grad():
        for seq in tokens:
            z = grid.float().view(-1, 1, 1)
            rep = seq.expand(len(grid), -1)
            logits = ltm.decoder(rep[:, :-1], z)
            log_lik = -torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), rep[:, 1:].flatten(), reduction="none"
            ).view(len(grid), -1).sum(-1).double()
            log_prior = -0.5 * grid**2 - 0.5 * math.log(2 * math.pi)
            results.append(torch.logsumexp(log_lik + log_prior, 0) + math.log(step))
    return torch.stack(results)


def test_iwae_matches_quadrature_and_elbo_stays_below():
    ltm = _sharp_ltm()
    tokens = torch.randint(0, 7, (4, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 8)
    exact = _quadrature_log_px(ltm, tokens)
    fit = fit_local_posterior(ltm, tokens, mask, InferenceConfig(steps=60, noise="fresh",
                                                                 init_log_var=0.0),
                              torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    iwae = iwae_log_likelihood(ltm, tokens, mask, fit.posterior, 4096, gen, chunk=1024)
    elbos = torch.stack([
        -sum(expected_nll_and_kl(ltm, tokens, mask, fit.posterior, 128, gen, chunk=128)).double()
        for _ in range(16)])
    elbo, standard_error = elbos.mean(0), elbos.std(0) / 4
    assert torch.all((iwae - exact).abs() <= 0.01 * exact.abs()), (iwae, exact)
    assert torch.all(elbo <= exact + 3 * standard_error), (elbo, exact)


def test_iwae_is_above_elbo_and_rises_with_k():
    ltm = _sharp_ltm(latent_dim=2, latents_per_layer=2)
    tokens = torch.randint(0, 7, (6, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(6, 8)
    fit = fit_local_posterior(ltm, tokens, mask, InferenceConfig(steps=4),
                              torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    nll, kl = expected_nll_and_kl(ltm, tokens, mask, fit.posterior, 512, gen, chunk=512)
    elbo = -(nll + kl).double()
    means = []
    for k in (1, 4, 32, 256):
        runs = torch.stack([iwae_log_likelihood(ltm, tokens, mask, fit.posterior, k, gen, 256)
                            for _ in range(8)])
        means.append(runs.mean(0))
        assert torch.all(runs.mean(0) >= elbo - 0.05 * elbo.abs())  # K=1 is the ELBO itself
    for small, large in zip(means, means[1:]):
        assert small.mean() < large.mean()
    assert torch.all(means[-1] > elbo)


def test_ar_bounds_are_its_exact_perplexity():
    ar = LatentThoughtModel(Decoder(micro_config(latents_per_layer=0)))
    windows = torch.randint(0, 23, (10, 13), generator=torch.Generator().manual_seed(7))
    summary = evaluate_windows(ar, windows, InferenceConfig(), batch_size=4, iw_samples=8)
    assert summary["kl_per_token"] == 0
    assert math.isclose(summary["elbo_ppl"], summary["iwae_ppl"], rel_tol=1e-6)
    assert math.isclose(summary["elbo_ppl"], summary["recon_ppl"], rel_tol=1e-6)


def _markov_chain(n_docs: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents of a fixed 6-state chain and their exact log p(x_1.. | x_0)."""
    generator = torch.Generator().manual_seed(123)
    transition = torch.softmax(2.0 * torch.randn(6, 6, generator=generator), -1).double()
    generator = torch.Generator().manual_seed(seed)
    docs = torch.empty(n_docs, length, dtype=torch.long)
    docs[:, 0] = torch.randint(0, 6, (n_docs,), generator=generator)
    for t in range(1, length):
        docs[:, t] = torch.multinomial(transition[docs[:, t - 1]], 1, generator=generator)[:, 0]
    log_p = transition.log()[docs[:, :-1], docs[:, 1:]].sum(-1)
    return docs, log_p


def test_valid_bounds_never_beat_the_true_entropy():
    train, _ = _markov_chain(512, 13, seed=1)
    held_out, true_log_p = _markov_chain(256, 13, seed=2)
    ltm = LatentThoughtModel(Decoder(micro_config(vocab_size=6)))
    inference = InferenceConfig(steps=4, init_log_var=0.0)  # fixed noise, as released
    svi = DualRateSVI(ltm, inference, TrainConfig(max_steps=80, warmup_steps=10, lr=3e-3),
                      torch.Generator().manual_seed(0))
    for step in range(80):
        batch = train[torch.randperm(512, generator=torch.Generator().manual_seed(step))[:32]]
        svi.step(batch, torch.ones(32, 12))

    tokens = held_out.shape[0] * 12
    true_nll = float(-true_log_p.sum()) / tokens
    summary = evaluate_windows(ltm, held_out, inference, batch_size=64, elbo_samples=4,
                               iw_samples=16)
    per_doc_sd = float(true_log_p.std()) / 12
    mc_error = 3 * per_doc_sd / math.sqrt(held_out.shape[0])
    assert -summary["elbo_per_token"] >= true_nll - mc_error
    assert -summary["iwae_per_token"] >= true_nll - mc_error
    assert summary["recon_ppl"] > 0  # reported, may fall below the floor
