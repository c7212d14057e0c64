"""Contracts of ``ltm_pyro/model.py`` that the full mutation run found unguarded.

- ``LatentThoughtModel.through(network)`` is how the slow step runs through the decoder's DDP
  wrapper under torchrun: the view must send its forward passes through ``network``, share
  the decoder (and so the parameters the optimizer owns), and leave the original model as it
  was. Only the slow two-process tests exercised it, outside the fast selection.
- The guide's latent site lives in the plate ``sequences`` of the batch's size, as the
  model's does: one independent draw of z per sequence, and a local posterior whose batch
  is not the tokens' is refused by the plate there (Pyro's own shape check) rather than
  failing, or broadcasting, somewhere downstream.
"""

import pytest
import torch
from pyro import poutine

from ltm_pyro.model import LatentThoughtModel, LocalPosterior


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
