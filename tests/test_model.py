import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from ltm_pyro.decoder import Decoder
from ltm_pyro.model import LatentThoughtModel, LocalPosterior

from .conftest import micro_config


def _latent_sites(trace) -> list[str]:
    """Unobserved sample sites, without the plate's own subsample site."""
    return [name for name in trace.stochastic_nodes if name != "sequences"]


def _posterior(batch: int, ltm: LatentThoughtModel) -> LocalPosterior:
    loc = 0.3 * torch.randn(batch, *ltm.latent_shape)
    log_var = -1.0 + 0.5 * torch.randn(batch, *ltm.latent_shape)
    return LocalPosterior(loc, log_var)


def test_site_names_and_shapes(ltm, batch):
    tokens, mask = batch
    local = _posterior(5, ltm)
    guide_trace = poutine.trace(ltm.guide).get_trace(tokens, mask, local)
    model_trace = poutine.trace(poutine.replay(ltm.model, trace=guide_trace)).get_trace(
        tokens, mask)
    assert _latent_sites(guide_trace) == ["z"]
    assert _latent_sites(model_trace) == ["z"] and model_trace.observation_nodes == ["x"]
    z, x = model_trace.nodes["z"], model_trace.nodes["x"]
    assert z["value"].shape == (5, 4, 32)
    assert z["fn"].batch_shape == (5,) and z["fn"].event_shape == (4, 32)
    assert x["is_observed"] and x["value"].shape == (5, 12)
    assert x["fn"].batch_shape == (5,) and x["fn"].event_shape == (12,)
    assert z["cond_indep_stack"][0].name == "sequences"


def test_prior_draw_has_shape_and_unit_scale():
    ltm = LatentThoughtModel(Decoder(micro_config(latent_dim=8)))
    tokens, mask = torch.zeros(4000, 13, dtype=torch.long), torch.ones(4000, 12)
    with torch.no_grad():
        trace = poutine.trace(poutine.block(ltm.model, hide=["x"])).get_trace(tokens[:2], mask[:2])
    assert trace.nodes["z"]["value"].shape == (2, 4, 8)
    draws = ltm.prior(4000, torch.device("cpu")).sample()
    assert draws.shape == (4000, 4, 8)
    assert abs(draws.mean().item()) < 0.02
    assert abs(draws.std().item() - 1.0) < 0.02


def test_pyro_loss_equals_masked_nll_plus_analytic_kl(ltm, batch):
    tokens, mask = batch
    local = _posterior(5, ltm)
    noise = torch.randn(5, *ltm.latent_shape)
    loss = TraceMeanField_ELBO(max_plate_nesting=1).differentiable_loss(
        ltm.model, ltm.guide, tokens, mask, local, noise)

    z = local.loc + local.scale * noise
    logits = ltm.decoder(tokens[:, :-1], z)
    log_probs = torch.log_softmax(logits.double(), -1)
    token_lp = log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    nll = -(token_lp * mask.double()).sum()
    var = local.log_var.double().exp()
    kl = 0.5 * (var + local.loc.double() ** 2 - 1 - local.log_var.double()).sum()
    assert loss.item() == pytest.approx((nll + kl).item(), rel=1e-5)

    nll_terms, kl_terms = ltm.elbo_terms(tokens, mask, local, noise)
    assert (nll_terms.sum() + kl_terms.sum()).item() == pytest.approx(loss.item(), rel=1e-5)
    # padded positions contribute nothing
    changed = tokens.clone()
    changed[1, 10:] = (changed[1, 10:] + 1) % 23
    nll_changed, _ = ltm.elbo_terms(changed, mask, local, noise)
    assert nll_changed[1].item() == pytest.approx(nll_terms[1].item(), rel=1e-6)


def test_kl_weight_scales_both_sides(batch):
    tokens, mask = batch
    ltm = LatentThoughtModel(Decoder(micro_config()))
    local = _posterior(5, ltm)
    noise = torch.randn(5, *ltm.latent_shape)
    loss = TraceMeanField_ELBO(max_plate_nesting=1).differentiable_loss(
        ltm.model, ltm.guide, tokens, mask, local, noise, kl_weight=0.25)
    nll, kl = ltm.elbo_terms(tokens, mask, local, noise)
    assert loss.item() == pytest.approx((nll.sum() + 0.25 * kl.sum()).item(), rel=1e-5)


def test_token_likelihood_matches_categorical():
    from ltm_pyro.model import TokenSequence

    logits = torch.randn(3, 7, 11)
    values = torch.randint(0, 11, (3, 7))
    mask = torch.ones(3, 7)
    expected = dist.Categorical(logits=logits).log_prob(values).sum(-1)
    assert torch.allclose(TokenSequence(logits, mask).log_prob(values), expected, atol=1e-5)


def test_decoder_is_not_in_the_param_store(ltm, batch):
    tokens, mask = batch
    TraceMeanField_ELBO(max_plate_nesting=1).differentiable_loss(
        ltm.model, ltm.guide, tokens, mask, _posterior(5, ltm), None)
    assert len(pyro.get_param_store()) == 0


def test_ar_model_has_only_the_observation(batch):
    tokens, mask = batch
    ar = LatentThoughtModel(Decoder(micro_config(latents_per_layer=0)))
    trace = poutine.trace(ar.model).get_trace(tokens, mask)
    assert _latent_sites(trace) == [] and trace.observation_nodes == ["x"]
    nll, kl = ar.elbo_terms(tokens, mask, None, None)
    expected = -(F.log_softmax(ar.decoder(tokens[:, :-1]), -1).gather(
        -1, tokens[:, 1:, None]).squeeze(-1) * mask).sum(-1)
    assert torch.allclose(nll, expected, atol=1e-4) and torch.all(kl == 0)


def test_evaluating_restores_the_mode_even_when_the_work_fails():
    from ltm_pyro.modes import evaluating

    decoder = Decoder(micro_config()).train()
    with pytest.raises(RuntimeError), evaluating(decoder):
        assert not decoder.training
        raise RuntimeError("the work inside failed")
    assert decoder.training
    with evaluating(decoder.eval()):
        pass
    assert not decoder.training


def test_compile_compiles_the_decoder_in_place_and_the_token_nll(monkeypatch):
    """What ``--compile`` does, without paying for a compilation (compiled and eager values
    are compared in test_decoder's slow test)."""
    from ltm_pyro.model import masked_token_nll

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or fn)
    ltm = LatentThoughtModel(Decoder(micro_config()))
    monkeypatch.setattr(ltm.decoder, "compile", lambda: compiled.append("decoder"))
    ltm.compile()
    assert compiled == ["decoder", masked_token_nll] and ltm.token_nll is masked_token_nll
