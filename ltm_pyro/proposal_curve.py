"""What fitting q buys over the prior as importance proposal, as a function of the draws K.

The prior control (``prior_iwae_ppl``, docs/latent-diagnostics.md) scores a trained model with
z drawn from the prior instead of the fitted q. Both are valid IWAE bounds and both reach
log p(x) as K grows; the prior gets there once K is of the order of exp(KL(p(z|x) || p(z)))
(Chatterjee & Diaconis 2018), i.e. once its draws land in the posterior's region often enough.
So at one K the control only shows the information a window's posterior holds *beyond about
log K nats*: a decoder that reads 3 nats of z per window gives almost no control at K 64
(log 64 = 4.2), whatever it does with them. The curve over K says how much the decoder
depends on z at all (K 1: E_p(z) log p(x|z), the likelihood with z drawn blind, against the
fitted q) and how fast the prior catches up (it meets the fitted q's bound at K of the order of
exp(KL(p(z|x) || p(z))), the information the decoder reads, plus the spread of the log-weights).

All K share draws: the figure at K is the bound from the first K of K_max draws per window
(each prefix is K independent draws, so each figure is the usual estimate at that K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .bounds import (
    PRIOR_SEED_OFFSET,
    log_importance_weights,
    log_mean_exp,
    prior_of,
)
from .config import InferenceConfig
from .errors import UsageError
from .inference import fit_local_posterior
from .latent_use import latent_use_summary
from .model import LatentThoughtModel, LocalPosterior
from .modes import evaluating


@dataclass
class ProposalCurve:
    """The curve's rows (one per K) and the fitted q they were drawn from, every window's."""

    rows: list[dict]
    posterior: LocalPosterior

    def information(self, n_layers: int, mi_samples: int = 4, seed: int = 0) -> dict:
        """KL, MI and slot statistics of the very q the curve drew from (no second fit)."""
        return latent_use_summary(self.posterior, n_layers, self.posterior.loc.shape[0],
                                  mi_samples, seed)


def proposal_curve(
    ltm: LatentThoughtModel,
    windows: Tensor,
    inference: InferenceConfig,
    samples: list[int],
    steps: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ProposalCurve:
    """One row per K in ``samples``: ``iwae_ppl`` (K draws from the fitted q),
    ``prior_iwae_ppl`` (K draws from the prior), ``prior_control`` (their ratio - 1) and
    ``gap_nats_per_window`` (how many nats per window the fitted q's bound is above the
    prior's). q is fitted as ``evaluate_windows`` fits it (``steps`` inner steps, ELBO), and
    the prior's draws come from the same generator as its prior control. The fitted q comes
    back with the rows, for its KL and MI (``ProposalCurve.information``)."""
    if not ltm.has_latents:
        raise UsageError("the model has no latents, so it has no prior control; pass an LTM")
    if not samples or min(samples) < 1:
        raise UsageError(f"--samples {samples}: give positive numbers of draws, e.g. 1,4,16,64")
    samples = sorted(set(samples))  # a K listed twice would be counted twice in its sum
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    prior_generator = torch.Generator(device=device).manual_seed(seed + PRIOR_SEED_OFFSET)
    most = max(samples)
    fitted = {k: 0.0 for k in samples}  # -log p(x) estimates summed over windows
    prior = {k: 0.0 for k in samples}
    tokens_scored = 0.0
    posteriors = []
    with evaluating(ltm.decoder):
        for start in range(0, len(windows), batch_size):
            tokens = windows[start:start + batch_size].to(device)
            mask = torch.ones(tokens.shape[0], tokens.shape[1] - 1, device=device)
            posterior = fit_local_posterior(ltm, tokens, mask, inference, generator,
                                            steps=steps).posterior
            posteriors.append(posterior.detach())
            log_w = log_importance_weights(ltm, tokens, mask, posterior, most, generator)
            log_w_prior = log_importance_weights(ltm, tokens, mask, prior_of(posterior),
                                                 most, prior_generator)
            for k in samples:
                fitted[k] -= float(log_mean_exp(log_w[:, :k]).sum())
                prior[k] -= float(log_mean_exp(log_w_prior[:, :k]).sum())
            tokens_scored += float(mask.sum())
    rows = [{"samples": k, "iwae_ppl": math.exp(fitted[k] / tokens_scored),
             "prior_iwae_ppl": math.exp(prior[k] / tokens_scored),
             "prior_control": math.exp((prior[k] - fitted[k]) / tokens_scored) - 1.0,
             "gap_nats_per_window": (prior[k] - fitted[k]) / len(windows)}
            for k in samples]
    return ProposalCurve(rows, LocalPosterior.concatenate(posteriors))
