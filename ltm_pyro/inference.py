"""The fast loop: fit a batch's local posterior q(z|x) from scratch in T optimizer steps.

Gradients are taken for the local parameters only (``torch.autograd.grad``), so no decoder
weight gradient is computed, unless ``accumulate_decoder_grads`` asks for the released
code's behaviour, where every inner backward also adds into the decoder's ``.grad``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from torch import Tensor

from .config import InferenceConfig
from .distributed import Shard
from .model import LatentThoughtModel, LocalPosterior


class SyncFreeMeanFieldELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO.differentiable_loss`` without host synchronisation.

    Pyro's version turns the loss into a Python float (``torch_item``) twice per call and
    checks it for NaN: a GPU pipeline stall at every inner step. This one returns the same
    surrogate (observed log-probabilities plus analytic KL, scaled and masked as Pyro does) as
    a tensor; with Pyro validation on it defers to Pyro's checked implementation.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:  # noqa: ANN001
        if is_validation_enabled():
            return super().differentiable_loss(model, guide, *args, **kwargs)
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss - self._elbo_particle(model_trace, guide_trace) / self.num_particles
        return loss

    @staticmethod
    def _elbo_particle(model_trace, guide_trace) -> Tensor:  # noqa: ANN001 - Pyro traces
        elbo = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                elbo = elbo + site["log_prob_sum"]
            else:
                guide_site = guide_trace.nodes[name]
                kl = torch.distributions.kl_divergence(guide_site["fn"], site["fn"])
                elbo = elbo - scale_and_mask(kl, guide_site["scale"], guide_site["mask"]).sum()
        return elbo


def scale_and_mask(value: Tensor, scale: float | Tensor, mask: Tensor | None) -> Tensor:
    """Pyro's site scaling (``poutine.scale``) and masking of a per-sequence term."""
    value = value * scale
    return value if mask is None else value.masked_fill(~mask, 0.0)


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Weights that need no gradient for a while: autograd then neither computes nor keeps
    what their gradients would need (the inner loop differentiates the local parameters only).
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def fast_lr(step: int, steps: int, config: InferenceConfig) -> float:
    """The learning rate of inner step ``step`` = 0..steps-1: a cosine from lr_max to lr_min.

    ``fast_schedule="cosine-to-min"`` reaches lr_min at the last step (progress s/(T-1));
    ``"released"`` uses progress s/T, so its last step is still above lr_min (released
    optimizer.py l.25-42, ``get_fast_lr``: decay_ratio = it / num_steps).
    """
    if config.fast_schedule == "released":
        progress = step / steps
    elif steps <= 1:
        return config.lr_max
    else:
        progress = step / (steps - 1)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr_min + (config.lr_max - config.lr_min) * cosine


def initial_posterior(
    ltm: LatentThoughtModel, batch: int, device: torch.device, config: InferenceConfig,
    generator: torch.Generator | None = None, shard: Shard | None = None,
) -> LocalPosterior:
    """loc at 0 and log-variance at ``init_log_var`` (-5 as released, sigma about 0.08),
    plus ``init_log_var_jitter`` * N(0, 1) drawn from ``generator`` when the jitter is not 0
    (released optimizer.py l.91-92: randn * 0.1 - 5; with no jitter nothing is drawn)."""
    loc = torch.zeros(batch, *ltm.latent_shape, device=device)
    log_var = torch.full_like(loc, config.init_log_var)
    if config.init_log_var_jitter:
        jitter = (shard or Shard()).randn(loc.shape, generator, device)
        log_var = log_var + config.init_log_var_jitter * jitter
    return LocalPosterior(loc, log_var)


@dataclass
class FitResult:
    """The fitted posterior (detached) and the noise of the last inner step."""

    posterior: LocalPosterior
    noise: Tensor


def fit_local_posterior(
    ltm: LatentThoughtModel,
    tokens: Tensor,
    mask: Tensor,
    config: InferenceConfig,
    generator: torch.Generator | None = None,
    steps: int | None = None,
    accumulate_decoder_grads: bool = False,
    shard: Shard | None = None,
    tokens_total: Tensor | None = None,
) -> FitResult:
    """Run ``steps`` (default ``config.steps``) inner steps of AdamW on (loc, log_var).

    The loss is the negative ELBO of the Pyro program, per token (``inner_loss="per-token"``,
    so that accumulated decoder gradients, ``accumulate_decoder_grads``, have the scale of
    the slow step's loss) or summed over tokens and sequences (``"sum"``, as released, so
    that they dwarf the slow step's own per-token gradient). The learning rate follows
    ``fast_lr``; AdamW's weight decay on (loc, log_var) is ``config.weight_decay``.
    ``noise="fixed"`` draws one standard-normal noise for all steps (as released);
    ``"fresh"`` draws a new one at each step. Draws come from ``generator`` so that
    evaluation never moves the training RNG. Under data parallelism (``shard``) the noise is
    this rank's slice of the global batch's and the loss is divided by the global token count
    (``tokens_total``), so each rank fits exactly what a single process would.
    """
    steps = config.steps if steps is None else steps
    shard = shard or Shard()
    start = initial_posterior(ltm, tokens.shape[0], tokens.device, config, generator, shard)
    loc = start.loc.requires_grad_()
    log_var = start.log_var.requires_grad_()
    local = LocalPosterior(loc, log_var)

    def draw() -> Tensor:
        return shard.randn(loc.shape, generator, loc.device)

    noise = draw()
    if steps == 0:
        return FitResult(local.detach(), noise)

    elbo = SyncFreeMeanFieldELBO(max_plate_nesting=1)
    optimizer = torch.optim.AdamW([loc, log_var], lr=config.lr_max, betas=config.betas,
                                  weight_decay=config.weight_decay)
    # "per-token" divides by the (global) token count; "sum" (released) keeps the sum.
    normaliser = 1.0 if config.inner_loss == "sum" else (
        mask.sum() if tokens_total is None else tokens_total)
    # "final" mode freezes the decoder: no weight-gradient work or activations kept for it.
    with contextlib.nullcontext() if accumulate_decoder_grads else frozen(ltm.decoder):
        for step in range(steps):
            if step > 0 and config.noise == "fresh":
                noise = draw()
            loss = elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask, local, noise)
            loss = loss / normaliser
            optimizer.zero_grad(set_to_none=True)
            if accumulate_decoder_grads:
                loss.backward()
            else:
                loc.grad, log_var.grad = torch.autograd.grad(loss, [loc, log_var])
            for group in optimizer.param_groups:
                group["lr"] = fast_lr(step, steps, config)
            optimizer.step()
    return FitResult(local.detach(), noise)
