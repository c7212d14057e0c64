"""How good is the fast posterior, and what does the latent space hold?

- importance diagnostics from log p(x, z) - log q(z) under the fitted guide: PSIS Pareto k-hat
  (k > 0.7: the guide misses mass the posterior has, and IWAE/ELBO figures are unreliable),
  importance-sampling ESS, and the IWAE bound;
- posterior contraction; KL per layer and per latent slot and active units (defined in
  ``latent_use``, with the information measures: KL and mutual information per window, slot
  correlation, and the prior-proposal IWAE control);
- a reference posterior from NUTS (decoder fixed) and the guide's standardised mean difference
  and variance ratio against it;
- ArviZ ``InferenceData`` with named dims (sequence, slot, dim) for both.
"""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import torch
from pyro.infer import MCMC, NUTS
from torch import Tensor

from .bounds import log_mean_exp
from .latent_use import active_units, kl_per_layer, kl_per_slot  # noqa: F401 - re-exported
from .model import LatentThoughtModel, LocalPosterior

DIMS = ["sequence", "slot", "dim"]


def pareto_k(log_weights: np.ndarray | Tensor) -> np.ndarray:
    """PSIS shape estimate per row of log weights [..., K] (samples on the last axis).

    Rows of equal weights (the guide is the posterior up to a constant) get -inf: there is
    no tail to fit, and importance sampling is exact.
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns when k is large: that is the finding
        _, k_hat = az.psislw(log_weights)
    k_hat = np.asarray(k_hat, dtype=np.float64)
    flat = np.ptp(log_weights, axis=-1) < 1e-9
    return np.where(flat, -np.inf, k_hat)


def importance_ess(log_weights: np.ndarray | Tensor) -> np.ndarray:
    """Kish effective sample size (sum w)^2 / sum w^2 per row of log weights [..., K]."""
    lw = torch.as_tensor(np.asarray(log_weights, dtype=np.float64))
    return (2 * torch.logsumexp(lw, -1) - torch.logsumexp(2 * lw, -1)).exp().numpy()


def iwae_from_log_weights(log_weights: np.ndarray | Tensor) -> np.ndarray:
    return log_mean_exp(torch.as_tensor(np.asarray(log_weights, dtype=np.float64))).numpy()


def posterior_contraction(posterior: LocalPosterior) -> Tensor:
    """1 - posterior variance / prior variance per coordinate, averaged over sequences."""
    return 1.0 - posterior.log_var.exp().mean(0)


def guide_inference_data(posterior: LocalPosterior, draws: int = 200,
                         generator: torch.Generator | None = None) -> az.InferenceData:
    """Draws from the fitted guide as InferenceData: z[chain=1, draw, sequence, slot, dim]."""
    noise = torch.randn((draws, *posterior.loc.shape), generator=generator)
    z = posterior.loc + posterior.scale * noise
    return az.from_dict(posterior={"z": z.unsqueeze(0).numpy()}, dims={"z": DIMS})


def nuts_reference(
    ltm: LatentThoughtModel, tokens: Tensor, mask: Tensor, num_samples: int = 300,
    warmup_steps: int = 300, chains: int = 2, seed: int = 0,
) -> az.InferenceData:
    """A reference posterior over z for a few sequences by NUTS, with the decoder fixed.

    Chains run one after another (each seeded), so r_hat and ESS are available without
    multiprocessing. Meant for tiny configurations: cost grows with N_z * latent_dim.
    """
    import pyro

    draws = []
    for chain in range(chains):
        pyro.set_rng_seed(seed + chain)
        mcmc = MCMC(NUTS(ltm.model), num_samples=num_samples, warmup_steps=warmup_steps,
                    disable_progbar=True)
        mcmc.run(tokens, mask)
        draws.append(mcmc.get_samples()["z"].detach())
    z = torch.stack(draws).numpy()  # [chain, draw, sequence, slot, dim]
    return az.from_dict(posterior={"z": z}, dims={"z": DIMS})


def compare_to_reference(guide: az.InferenceData, reference: az.InferenceData) -> dict:
    """Standardised mean difference and variance ratio of guide vs reference, per coordinate.

    SMD = (mean_guide - mean_ref) / sd_ref; variance ratio = var_guide / var_ref (below 1:
    the guide is overconfident, as mean-field variational posteriors usually are).
    """
    g = guide.posterior["z"].stack(sample=("chain", "draw"))
    r = reference.posterior["z"].stack(sample=("chain", "draw"))
    ref_sd = r.std("sample")
    return {
        "standardised_mean_difference": ((g.mean("sample") - r.mean("sample")) / ref_sd).values,
        "variance_ratio": (g.var("sample") / r.var("sample")).values,
    }
