"""Pyro all the way (issue 39): with x unobserved the model draws text, so
``pyro.infer.Predictive`` gives prior and posterior predictive token sequences."""

from __future__ import annotations

import pyro
import torch
from pyro.infer import Predictive

from ltm_pyro.decoder import Decoder
from ltm_pyro.model import LatentThoughtModel, LocalPosterior

from .conftest import micro_config


def test_posterior_predictive_first_tokens_follow_the_decoders_softmax():
    """Catches: x drawn from something other than the decoder given the guide's z (the prior's
    z, another row's z, a temperature), and draws of a batch that are copies of one row."""
    torch.manual_seed(0)
    decoder = Decoder(micro_config()).eval()
    with torch.no_grad():  # sharper next-token distributions than at initialisation
        decoder.output.weight.mul_(3.0)
    ltm = LatentThoughtModel(decoder)
    rows, draws = 400, 10
    tokens = torch.full((rows, 2), 3)
    loc = torch.randn(1, *ltm.latent_shape).expand(rows, -1, -1) * 10
    local = LocalPosterior(loc, torch.full_like(loc, -30.0))  # z = loc, to float precision
    pyro.set_rng_seed(1)
    samples = Predictive(ltm.model, guide=ltm.guide, num_samples=draws)(tokens, None, local)
    assert samples["x"].shape == (draws, rows, 1)
    counts = torch.bincount(samples["x"].flatten(), minlength=23).double()
    exact = torch.softmax(ltm.decoder(tokens[:1, :1], loc[:1])[0, -1].double(), -1)
    total_variation = 0.5 * (counts / counts.sum() - exact).abs().sum()
    assert total_variation < 0.06, total_variation  # ~0.03 expected from 4,000 draws
    other = torch.softmax(ltm.decoder(tokens[:1, :1], -loc[:1])[0, -1].double(), -1)
    assert 0.5 * (exact - other).abs().sum() > 0.12  # the check can tell z apart


def test_prior_predictive_draws_z_and_whole_sequences_that_the_model_scores():
    """Catches: an unobserved x that is not sampled (Predictive returning the template), a
    wrong length, and a log-probability of the drawn text that is not the decoder's."""
    ltm = LatentThoughtModel(Decoder(micro_config()).eval())
    tokens = torch.randint(0, 23, (4, 7), generator=torch.Generator().manual_seed(2))
    pyro.set_rng_seed(3)
    samples = Predictive(ltm.model, num_samples=3, return_sites=["z", "x"])(tokens, None)
    assert samples["z"].shape == (3, 4, *ltm.latent_shape)
    assert samples["x"].shape == (3, 4, 6)
    assert not torch.equal(samples["x"][0], tokens[:, 1:])
    trace = pyro.poutine.trace(pyro.poutine.condition(ltm.model, data={
        "z": samples["z"][0], "x": samples["x"][0]})).get_trace(tokens, None)
    site = trace.nodes["x"]
    whole = torch.cat([tokens[:, :1], samples["x"][0]], dim=1)
    logits = ltm.decoder(whole[:, :-1], samples["z"][0])
    want = torch.distributions.Categorical(logits=logits).log_prob(whole[:, 1:]).sum(-1)
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), want, rtol=1e-5, atol=1e-5)
