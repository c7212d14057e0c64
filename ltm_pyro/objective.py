"""The objective's per-sequence terms, read off a model and a guide trace in one place.

Every figure the library computes from the Pyro program comes from ``sequence_terms``, and
every loss it differentiates from ``negative_elbo``: the surrogate of the fast loop and the
encoder step (``SyncFreeMeanFieldELBO``, ``FreeBitsMeanFieldELBO``) and of the slow step
(``LatentThoughtModel.objective_terms``), the NLL and KL that training and evaluation report
(``LatentThoughtModel.elbo_terms``) and the importance weights of the IWAE bound
(``LatentThoughtModel.log_weights``). A new latent site, or a new guide, changes what the
traces hold, never this walk over them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor

# A latent site's per-sequence term from its guide site and its model site.
LatentTerm = Callable[[dict, dict], Tensor]


def analytic_kl(guide_site: dict, model_site: dict) -> Tensor:
    """KL(q || p) of a latent site, in closed form."""
    return torch.distributions.kl_divergence(guide_site["fn"], model_site["fn"])


def site_log_prob(site: dict) -> Tensor:
    """A site's log-probability at its value before scale and mask: Pyro's, when its loss
    already computed it, else computed here (only for the sites a figure needs)."""
    if "unscaled_log_prob" in site:
        return site["unscaled_log_prob"]
    return site["fn"].log_prob(site["value"])


def log_density_ratio(guide_site: dict, model_site: dict) -> Tensor:
    """log q(z) - log p(z) at the guide's draw: the latent part of an importance weight."""
    return site_log_prob(guide_site) - site_log_prob(model_site)


def sequence_terms(model_trace: Trace, guide_trace: Trace, latent_term: LatentTerm = analytic_kl,
                   scaled: bool = False) -> tuple[Tensor, Tensor]:
    """Per-sequence log-likelihood of the observed sites and the sum of ``latent_term`` over the
    latent sites, each [B] (zeros when there is no latent site).

    ``scaled`` applies each site's ``poutine.scale`` and mask as Pyro's losses do (the training
    objective, e.g. a KL weight); unscaled terms are the figures the library reports.
    """
    log_lik: Tensor | float = 0.0
    latent: Tensor | float = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):  # plates record a site too
            continue
        if site["is_observed"]:
            term, scale, mask = site_log_prob(site), site["scale"], site["mask"]
            log_lik = log_lik + (scale_and_mask(term, scale, mask) if scaled else term)
        else:
            guide_site = guide_trace.nodes[name]
            term = latent_term(guide_site, site)
            scale, mask = guide_site["scale"], guide_site["mask"]
            latent = latent + (scale_and_mask(term, scale, mask) if scaled else term)
    if not torch.is_tensor(latent):
        latent = torch.zeros_like(log_lik)
    return log_lik, latent


def negative_elbo(model_trace: Trace, guide_trace: Trace,
                  latent_term: LatentTerm = analytic_kl) -> Tensor:
    """The loss every optimiser step differentiates, summed over sequences: the latent term
    minus the log-likelihood, each site scaled and masked as the program says, so a KL weight
    given through ``poutine.scale`` applies, and a free-bits ``latent_term`` replaces the KL."""
    log_lik, latent = sequence_terms(model_trace, guide_trace, latent_term, scaled=True)
    return latent.sum() - log_lik.sum()


class SyncFreeMeanFieldELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO.differentiable_loss`` without host synchronisation.

    Pyro's version turns the loss into a Python float (``torch_item``) twice per call and
    checks it for NaN: a GPU pipeline stall at every inner step. This one returns the same
    surrogate (observed log-probabilities plus analytic KL, scaled and masked as Pyro does) as
    a tensor; with Pyro validation on it defers to Pyro's checked implementation.
    """

    checked_by_pyro = True  # with Pyro validation on, defer to Pyro's checked loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:  # noqa: ANN001
        if self.checked_by_pyro and is_validation_enabled():
            return super().differentiable_loss(model, guide, *args, **kwargs)
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss + negative_elbo(model_trace, guide_trace, self.latent_term) / (
                self.num_particles)
        return loss

    def latent_term(self, guide_site: dict, model_site: dict) -> Tensor:
        """A latent site's penalty per sequence: its analytic KL."""
        return analytic_kl(guide_site, model_site)


class FreeBitsMeanFieldELBO(SyncFreeMeanFieldELBO):
    """The training objective with free bits (Kingma et al. 2016): each latent site's KL is
    summed per group (``"slot"``: a slot's coordinates; ``"layer"``: a layer's slots, which
    own consecutive slots) and each group's KL of each sequence counts as
    max(KL, ``free_bits``) nats before Pyro's site scale and mask. Below the floor a group's
    KL has no gradient, so the fit may move q that far from the prior for free. Not a bound:
    evaluation uses ``SyncFreeMeanFieldELBO``. Latent sites are [..., N_z, d] with
    ``to_event(2)``; ``n_layers`` groups the slots by layer. Pyro's checked loss would score
    the plain KL, so this one never defers to it.
    """

    checked_by_pyro = False

    def __init__(self, free_bits: float, group: str = "slot", n_layers: int = 1,
                 **kwargs) -> None:  # noqa: ANN003 - TraceMeanField_ELBO's options
        super().__init__(**kwargs)
        if group not in ("slot", "layer"):
            raise ValueError(f"free_bits_group must be 'slot' or 'layer', not {group!r}")
        self.free_bits, self.group, self.n_layers = free_bits, group, n_layers

    def latent_term(self, guide_site: dict, model_site: dict) -> Tensor:
        """sum over groups of max(KL of the group, free_bits): [batch]."""
        q, p = guide_site["fn"], model_site["fn"]  # Independent Normals
        per_slot = torch.distributions.kl_divergence(q.base_dist, p.base_dist).sum(-1)
        if self.group == "layer":
            per_slot = per_slot.unflatten(-1, (self.n_layers, -1)).sum(-1)
        return per_slot.clamp(min=self.free_bits).sum(-1)
