"""Does the model use its latent thoughts? Measures of posterior collapse, per window.

Each takes the fitted local posteriors q(z|x_n) = N(loc_n, exp(log_var_n)) of the N evaluated
windows (``loc`` and ``log_var`` of shape [N, N_z, d]) and says how much of x they carry.
``evaluate_windows`` with ``ScoringConfig(latent_stats=True, prior_samples=K)`` reports them
all; a collapsed model shows MI near 0, few active units, slots of a layer that are copies of
one another, and ``prior_iwae_ppl`` equal to ``iwae_ppl``. docs/latent-diagnostics.md reads them.

- ``kl_per_window``: E_x KL(q(z|x) || p(z)) in nats, summed over a window's latents. The
  price the bound pays for the latents; an *upper* bound on what they carry, not a measure of
  it: a fit that has not relaxed (q narrow around 0 for every x) pays KL and carries nothing.
- ``mutual_info_per_window``: I(x; z) under the aggregate posterior q(z) = E_x q(z|x)
  (Hoffman & Johnson 2016; He et al. 2019). E_x KL(q(z|x) || p) = I(x; z) + KL(q(z) || p),
  so the MI is the part of the KL that depends on x. Estimated as
  E_n E_{z ~ q(z|x_n)} [log q(z|x_n) - log (1/N) sum_m q(z|x_m)]
  with the mixture over all N evaluated windows (the window itself included), ``mi_samples``
  draws per window, in float64 and chunked so memory stays at about ``max_elements`` values.
  Each term is at most log N, so the estimate is capped by ``mutual_info_cap = log N``: it is
  the exact MI of the N windows' empirical distribution up to the Monte-Carlo error of the
  draws, and, averaged over draws of N windows, a *lower* bound on the population MI (the
  InfoNCE bound with the true q(z|x) as critic; Poole et al. 2019), tight when the MI is well
  below log N and biased low for small N. ``mutual_info_stderr`` is the standard error of
  the mean over windows (window sampling and z draws), not that bias: compare the estimate
  to the cap before reading it, and use the same N to compare runs.
- ``active_units``: coordinates of z whose posterior mean varies across windows,
  Var_x(E_q[z]) > 0.01 (Burda et al. 2016), out of ``active_units_total = N_z * d``. It counts
  variation, not information: tiny independent wobbles of every coordinate count as active.
- ``slot_correlation``: mean |Pearson correlation| between the posterior means of two slots of
  the same layer (layers own consecutive slots, as in ``kl_per_layer``), over windows and dims
  of the flattened slot vectors, each coordinate centred over windows first (a constant
  offset carries no information and is not counted), averaged over slot pairs then layers.
  1: the slots of a layer are copies (up to sign), one vector per layer in effect; near 0:
  they vary independently. ``slot_effective_rank``: exp(entropy of the normalised singular
  values) of a layer's [slots x (windows * dims)] matrix of those centred means, each slot's row
  scaled to unit norm, averaged over layers: 1 when the slots are copies, slots_per_layer when
  they are uncorrelated. Slots whose means never move count in neither (None for a model
  without latents).
- ``slot_linear_r2``: how well one slot's posterior means predict another's of the same layer
  by a least-squares map (cross-validated R^2, clamped at 0, averaged over ordered pairs and
  layers). ``slot_correlation`` compares coordinate i of one slot with coordinate i of
  another, which means little once each slot has its own projections (``--slot-roles``):
  rotated copies score 0 there and near 1 here. 1: a slot is a linear function of another;
  0: nothing linear in common. None with fewer than 4 windows or 2 slots a layer.
- ``prior_iwae_ppl`` (in ``bounds.evaluate_windows``): the same model scored with the prior as
  importance proposal, w = p(x|z), z ~ p(z), K draws. A model whose decoder ignores z scores
  the same as with its fitted q; the gap to ``iwae_ppl`` is what inference buys at test time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import LocalPosterior

ACTIVE_THRESHOLD = 0.01
# Offset of the MI draws' seed from the evaluation seed (see ``latent_use_summary``).
MI_SEED_OFFSET = 2**40
_STILL = 1e-6  # a slot whose centred means have a smaller RMS does not move


def kl_per_slot(posterior: LocalPosterior) -> Tensor:
    """KL(q || N(0, I)) of each latent vector, summed over its dims: [B, N_z]."""
    var = posterior.log_var.exp()
    return 0.5 * (var + posterior.loc**2 - 1.0 - posterior.log_var).sum(-1)


def kl_per_layer(posterior: LocalPosterior, n_layers: int) -> Tensor:
    """KL per decoder layer (each layer owns N_z / L consecutive slots): [B, L]."""
    per_slot = kl_per_slot(posterior)
    return per_slot.unflatten(-1, (n_layers, -1)).sum(-1)


def kl_per_window(posterior: LocalPosterior) -> Tensor:
    """KL(q(z|x) || p(z)) of each window, summed over all its latents: [B] nats."""
    return kl_per_slot(posterior).sum(-1)


def active_units(loc: Tensor, threshold: float = ACTIVE_THRESHOLD) -> Tensor:
    """Which latent coordinates are used: variance over sequences of E_q[z] above threshold.

    ``loc`` is [N, N_z, d] (posterior means of N sequences); returns a bool mask [N_z, d].
    """
    return loc.var(dim=0) > threshold


@dataclass
class MutualInformation:
    """An estimate of I(x; z) in nats per window, its standard error and its cap log N."""

    estimate: float
    stderr: float
    cap: float
    windows: int


@torch.no_grad()
def mutual_information(posterior: LocalPosterior, samples: int = 4,
                       generator: torch.Generator | None = None,
                       max_elements: int = 2**22) -> MutualInformation:
    """I(x; z) under the aggregate posterior of the N windows in ``posterior`` ([N, N_z, d]).

    E_n E_{z ~ q(z|x_n)} [log q(z|x_n) - log (1/N) sum_m q(z|x_m)], ``samples`` draws per
    window (see the module docstring for its cap log N and bias). The log-densities of a chunk
    of draws under all N components are two float64 matrix products, so memory stays at about
    ``max_elements`` values whatever N; draws come from ``generator``.
    """
    n = posterior.loc.shape[0]
    loc = posterior.loc.flatten(1).double()  # [N, D]
    log_var = posterior.log_var.flatten(1).double()
    precision = torch.exp(-log_var)
    log_2pi = loc.shape[1] * math.log(2 * math.pi)
    # log N(z; loc_m, var_m) = -0.5 (z^2 . prec_m - 2 z . loc_m prec_m + constant_m)
    constant = (loc**2 * precision + log_var).sum(-1) + log_2pi
    noise = torch.randn((samples, *loc.shape), generator=generator, device=loc.device,
                        dtype=loc.dtype)
    draws = (loc + torch.exp(0.5 * log_var) * noise).flatten(0, 1)  # row s * N + n: window n
    own = -0.5 * ((noise**2).sum(-1) + log_var.sum(-1) + log_2pi)  # log q(z | x_n), [S, N]
    chunk = max(1, max_elements // n)
    log_mixture = []
    for start in range(0, draws.shape[0], chunk):
        z = draws[start:start + chunk]
        log_q = -0.5 * ((z**2) @ precision.T - 2 * z @ (loc * precision).T + constant)
        log_mixture.append(torch.logsumexp(log_q, dim=1) - math.log(n))
    per_window = (own.flatten() - torch.cat(log_mixture)).view(samples, n).mean(0)
    stderr = float(per_window.std() / math.sqrt(n)) if n > 1 else 0.0
    return MutualInformation(float(per_window.mean()), stderr, math.log(n), n)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def slot_similarity(loc: Tensor, n_layers: int) -> tuple[float | None, float | None]:
    """(mean |correlation| between slots of a layer, mean effective rank of a layer's slots).

    ``loc`` is [N, N_z, d]; layer l owns slots l * N_z / L .. (l + 1) * N_z / L - 1. Each
    coordinate is centred over windows; a slot's row is its centred means flattened over
    windows and dims, scaled to unit norm; slots whose means do not move are left out. The
    correlation is None where no layer has two moving slots, the rank where none has one.
    """
    per_layer = loc.double().unflatten(1, (n_layers, -1))  # [N, L, S, d]
    correlations, ranks = [], []
    for layer in per_layer.unbind(1):
        rows = (layer - layer.mean(0)).transpose(0, 1).flatten(1)  # [S, N * d]
        norms = rows.norm(dim=1)
        moving = norms > _STILL * math.sqrt(rows.shape[1])
        if not bool(moving.any()):
            continue
        unit = rows[moving] / norms[moving, None]
        singular = torch.linalg.svdvals(unit)
        p = singular / singular.sum()
        p = p[p > 0]
        ranks.append(float(torch.exp(-(p * p.log()).sum())))
        if unit.shape[0] >= 2:
            pairs = torch.triu_indices(unit.shape[0], unit.shape[0], offset=1)
            correlations.append(float((unit @ unit.T)[pairs[0], pairs[1]].abs().mean()))
    return _mean(correlations), _mean(ranks)


def slot_correlation_matrices(loc: Tensor, n_layers: int) -> Tensor:
    """Per layer, |correlation| between its slots' posterior means: [L, S, S] float64.

    The same statistic as ``slot_similarity``'s (each coordinate centred over windows, a
    slot's row its centred means flattened and scaled to unit norm), before averaging over
    pairs; a slot whose means do not move has NaN in its row and column.
    """
    out = []
    for layer in loc.double().unflatten(1, (n_layers, -1)).unbind(1):  # [N, S, d]
        rows = (layer - layer.mean(0)).transpose(0, 1).flatten(1)  # [S, N * d]
        norms = rows.norm(dim=1)
        still = norms <= _STILL * math.sqrt(rows.shape[1])
        unit = rows / norms.clamp_min(1e-300)[:, None]
        matrix = (unit @ unit.T).abs()
        matrix[still, :] = math.nan
        matrix[:, still] = math.nan
        out.append(matrix)
    return torch.stack(out)


def slot_linear_r2(loc: Tensor, n_layers: int) -> float | None:
    """Cross-validated R^2 of a least-squares map (with intercept) from one slot's posterior
    means [N, d] to another's of the same layer: fitted on the first half of the windows,
    scored on the other half (1 - residual / total sum of squares over the target's dims),
    clamped at 0 (a map worse than the target's mean is no linear dependence), averaged over
    ordered pairs and layers. None when there is nothing to score.

    The least squares run on the CPU in float64 with LAPACK's SVD-based ``gelsd``: the default
    ``gelsy`` of MKL differs in its last bits from one call to the next on the same input, so
    a same-seed run would not reproduce its own metrics (issue 43)."""
    per_layer = loc.detach().cpu().double().unflatten(1, (n_layers, -1))  # [N, L, S, d]
    half = loc.shape[0] // 2
    if half < 2:
        return None
    scores = []
    for layer in per_layer.unbind(1):
        design = torch.cat([layer, torch.ones(*layer.shape[:2], 1, dtype=layer.dtype)], 2)
        for s in range(layer.shape[1]):
            for t in range(layer.shape[1]):
                if s == t:
                    continue
                target = layer[:, t]
                coef = torch.linalg.lstsq(design[:half, s], target[:half],
                                          driver="gelsd").solution
                residual = ((design[half:, s] @ coef - target[half:]) ** 2).sum()
                total = ((target[half:] - target[half:].mean(0)) ** 2).sum()
                if total > 0:
                    scores.append(max(0.0, float(1 - residual / total)))
    return _mean(scores)


def latent_use_summary(posterior: LocalPosterior | None, n_layers: int, windows: int,
                       mi_samples: int = 4, seed: int = 0) -> dict:
    """Every per-window measure of the module docstring from the ``windows`` posteriors.

    The MI's draws come from their own generator, seeded ``seed + MI_SEED_OFFSET``, so they
    never shift the draws of the bounds scored with ``seed``. ``posterior`` None (a model
    without latents): MI and KL 0, no active units, slot statistics None.
    """
    if posterior is None:
        return {"kl_per_window": 0.0, "mutual_info_per_window": 0.0, "mutual_info_stderr": 0.0,
                "mutual_info_cap": math.log(windows), "mutual_info_samples": mi_samples,
                "active_units": 0, "active_units_total": 0,
                "slot_correlation": None, "slot_effective_rank": None, "slot_linear_r2": None}
    generator = torch.Generator(device=posterior.loc.device).manual_seed(seed + MI_SEED_OFFSET)
    mi = mutual_information(posterior, mi_samples, generator)
    correlation, rank = slot_similarity(posterior.loc, n_layers)
    return {
        "kl_per_window": float(kl_per_window(posterior).double().mean()),
        "mutual_info_per_window": mi.estimate,
        "mutual_info_stderr": mi.stderr,
        "mutual_info_cap": mi.cap,
        "mutual_info_samples": mi_samples,
        "active_units": int(active_units(posterior.loc).sum()),
        "active_units_total": posterior.loc[0].numel(),
        "slot_correlation": correlation,
        "slot_effective_rank": rank,
        "slot_linear_r2": slot_linear_r2(posterior.loc, n_layers),
    }
