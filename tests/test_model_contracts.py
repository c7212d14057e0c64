"""Contracts of ``ltm_pyro/model.py`` that the full mutation run found unguarded.

- ``LatentThoughtModel.through(network)`` is how the slow step runs through the decoder's DDP
  wrapper under torchrun: the view must send its forward passes through ``network``, share
  the decoder (and so the parameters the optimizer owns), and leave the original model as it
  was. Only the slow two-process tests exercised it, outside the fast selection.
- The guide's latent site lives in the plate ``sequences`` of the batch's size, as the
  model's does: one independent draw of z per sequence, and a local posterior whose batch
  is not the tokens' is refused by the plate there (Pyro's own shape check) rather than
  failing, or broadcasting, somewhere downstream.
- The model's side mirrors it: both its sites live in the plate ``sequences`` of the batch's
  size, its prior is on the tokens' device, its default KL weight is 1 (the true ELBO, which
  ``nuts_reference`` and any plain Pyro ELBO score), the AR baseline's forward passes get no
  latents (``z=None``), the likelihood is scored with the model's ``token_nll`` (the compiled
  one after ``compile``), and the constructor's ``network`` is the one forward passes use.
- ``TokenSequence`` refuses to be broadcast to a new batch shape, with a message naming it.
"""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from ltm_pyro.decoder import Decoder
from ltm_pyro.model import LatentThoughtModel, LocalPosterior, TokenSequence, masked_token_nll

from .conftest import micro_config


class _Recording(torch.nn.Module):
    """A stand-in for the DDP wrapper: delegates to the decoder and counts its calls."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.calls = 0

    def forward(self, tokens, z=None):  # noqa: ANN001, ANN201 - the decoder's signature
        self.calls += 1
        return self.decoder(tokens, z)


def test_through_routes_forward_passes_and_leaves_the_original(ltm, batch):
    """Catches: ``through`` returning no view, a copy of nothing, or a view whose network
    is not the given one."""
    tokens, mask = batch
    local = LocalPosterior(0.3 * torch.randn(5, *ltm.latent_shape),
                           torch.full((5, *ltm.latent_shape), -1.0))
    noise = torch.randn(5, *ltm.latent_shape)
    wrapper = _Recording(ltm.decoder)
    view = ltm.through(wrapper)
    assert isinstance(view, LatentThoughtModel) and view is not ltm
    assert view.network is wrapper and view.decoder is ltm.decoder
    assert ltm.network is ltm.decoder  # the original is left as it is
    nll, kl = view.elbo_terms(tokens, mask, local, noise)
    assert wrapper.calls == 1
    nll_direct, kl_direct = ltm.elbo_terms(tokens, mask, local, noise)
    assert wrapper.calls == 1  # the original does not go through the wrapper
    torch.testing.assert_close(nll, nll_direct)
    torch.testing.assert_close(kl, kl_direct)


def test_guide_draws_one_latent_per_sequence_in_the_sequences_plate(ltm, batch):
    """Catches: the guide's plate without the batch size (or without its name), which stops
    Pyro expanding a shared local posterior to one independent draw per sequence and
    checking that the posterior's batch is the tokens'."""
    tokens, mask = batch
    shared = LocalPosterior(torch.zeros(1, *ltm.latent_shape),
                            torch.zeros(1, *ltm.latent_shape))
    trace = poutine.trace(ltm.guide).get_trace(tokens, mask, shared)
    site = trace.nodes["z"]
    assert [(f.name, f.size, f.dim) for f in site["cond_indep_stack"]] == [("sequences", 5, -1)]
    assert site["value"].shape == (5, *ltm.latent_shape)
    assert site["fn"].batch_shape == (5,)
    draws = site["value"].flatten(1)
    off_diagonal = torch.cdist(draws, draws)[~torch.eye(5, dtype=torch.bool)]
    assert off_diagonal.min() > 1.0  # independent draws, not one shared by all
    wrong = LocalPosterior(torch.zeros(3, *ltm.latent_shape), torch.zeros(3, *ltm.latent_shape))
    with pytest.raises(ValueError, match="plate\\('sequences'\\)"):
        ltm.elbo_terms(tokens, mask, wrong, None)


def _posterior(ltm: LatentThoughtModel, size: int = 5) -> tuple[LocalPosterior, torch.Tensor]:
    local = LocalPosterior(0.3 * torch.randn(size, *ltm.latent_shape),
                           torch.full((size, *ltm.latent_shape), -1.0))
    return local, torch.randn(size, *ltm.latent_shape)


def test_constructor_network_carries_the_forward_passes(ltm, batch):
    """Catches: the constructor ignoring its ``network`` argument (always the decoder)."""
    tokens, mask = batch
    local, noise = _posterior(ltm)
    wrapper = _Recording(ltm.decoder)
    wrapped = LatentThoughtModel(ltm.decoder, network=wrapper)
    assert wrapped.network is wrapper and wrapped.decoder is ltm.decoder
    assert ltm.network is ltm.decoder  # without one: the decoder itself
    nll, kl = wrapped.elbo_terms(tokens, mask, local, noise)
    assert wrapper.calls == 1
    nll_direct, kl_direct = ltm.elbo_terms(tokens, mask, local, noise)
    torch.testing.assert_close(nll, nll_direct)
    torch.testing.assert_close(kl, kl_direct)


def test_model_sites_live_in_the_sequences_plate_of_the_batch(ltm, batch):
    """Catches: the model's plate without the batch size (``None`` or omitted), which turns
    Pyro's per-sequence shape checks of both sites off (a broadcasting plate of size -1)."""
    tokens, mask = batch
    trace = poutine.trace(ltm.model).get_trace(tokens, mask)
    for name in ("z", "x"):
        site = trace.nodes[name]
        assert [(f.name, f.size, f.dim) for f in site["cond_indep_stack"]] == [
            ("sequences", 5, -1)], name
        assert site["fn"].batch_shape == (5,)


def test_model_default_kl_weight_is_the_true_elbo(ltm, batch):
    """Catches: a model whose default ``kl_weight`` is not 1, so that Pyro's plain ELBO (and
    NUTS in ``nuts_reference``, which calls the model with its defaults) scores a tempered
    prior rather than the model's joint density."""
    tokens, mask = batch
    local, noise = _posterior(ltm)
    assert poutine.trace(ltm.model).get_trace(tokens, mask).nodes["z"]["scale"] == 1.0
    loss = Trace_ELBO().differentiable_loss(ltm.model, ltm.guide, tokens, mask, local, noise)
    torch.testing.assert_close(loss, -ltm.log_weights(tokens, mask, local, noise).sum())


def test_model_draws_the_prior_on_the_tokens_device(ltm, batch):
    """Catches: the prior built without the tokens' device (always on the CPU), which breaks
    the model on an accelerator; the meta device stands in for one here."""
    tokens, mask = (t.to("meta") for t in batch)
    seen = {}

    class _Stub(torch.nn.Module):
        def forward(self, inputs, z=None):  # noqa: ANN001, ANN201 - the decoder's signature
            seen["z"] = z
            return torch.zeros(*inputs.shape, 23, device=inputs.device)

    with pyro.validation_enabled(False):  # validation would read meta values
        trace = poutine.trace(ltm.through(_Stub()).model).get_trace(tokens, mask)
    assert trace.nodes["z"]["fn"].base_dist.loc.device.type == "meta"
    assert seen["z"].device.type == "meta" and seen["z"].shape == (5, *ltm.latent_shape)


def test_ar_model_passes_no_latents_to_its_network(batch):
    """Catches: the AR baseline's model handing its network a placeholder other than None
    for z (the decoder ignores it, but a wrapper, e.g. DDP's, sees it)."""
    tokens, mask = batch
    ar = LatentThoughtModel(Decoder(micro_config(latents_per_layer=0)))
    seen = []

    class _Spy(torch.nn.Module):
        def forward(self, inputs, z=None):  # noqa: ANN001, ANN201 - the decoder's signature
            seen.append(z)
            return ar.decoder(inputs, z)

    nll, kl = ar.through(_Spy()).elbo_terms(tokens, mask, None, None)
    assert seen == [None]
    assert nll.shape == (5,) and torch.equal(kl, torch.zeros(5))


def test_model_scores_tokens_with_its_token_nll(ltm, batch):
    """Catches: the observed site built without the model's ``token_nll`` (always the eager
    ``masked_token_nll``), which would leave ``compile``'s fused NLL unused."""
    tokens, mask = batch
    local, noise = _posterior(ltm)
    nll_eager, _ = ltm.elbo_terms(tokens, mask, local, noise)
    calls = []

    def doubled(logits, targets, mask):  # noqa: ANN001, ANN202
        calls.append(logits.shape)
        return 2 * masked_token_nll(logits, targets, mask)

    ltm.token_nll = doubled
    nll, _ = ltm.elbo_terms(tokens, mask, local, noise)
    assert calls == [(5, 12, 23)]
    torch.testing.assert_close(nll, 2 * nll_eager)


def test_token_sequence_refuses_a_new_batch_shape_by_name():
    """Catches: the refusal's message changed (it names the distribution and the cause), or
    the refusal dropped; reached through Pyro when an outer plate broadcasts the site."""
    logits = torch.randn(5, 12, 23)
    targets = torch.randint(0, 23, (5, 12))
    d = TokenSequence(logits, torch.ones(5, 12))
    assert d.expand((5,)) is d
    message = "TokenSequence cannot be broadcast to a new batch shape"
    with pytest.raises(NotImplementedError, match=message):
        d.expand((2, 5))

    def particles() -> None:
        with pyro.plate("particles", 2, dim=-2), pyro.plate("sequences", 5):
            pyro.sample("x", d, obs=targets)

    with pytest.raises(NotImplementedError, match=message):
        poutine.trace(particles).get_trace()
