"""The fast loop: fit a batch's local posterior q(z|x) from scratch in T optimizer steps.

Gradients are taken for the local parameters only (``torch.autograd.grad``), so no decoder
weight gradient is computed, unless ``accumulate_decoder_grads`` asks for the released
code's behaviour, where every inner backward also adds into the decoder's ``.grad``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from pyro.infer import ELBO
from torch import Tensor

from .config import InferenceConfig
from .model import LatentThoughtModel, LocalPosterior
from .objective import FreeBitsMeanFieldELBO, SyncFreeMeanFieldELBO

# Draws standard-normal noise of a shape from a generator on a device. Single-process code
# uses ``standard_normal``; under torchrun each rank passes its ``Shard.randn`` (its slice of
# the global batch's draw), so the fast loop itself needs no communication.
NoiseSource = Callable[[tuple[int, ...], "torch.Generator | None", torch.device], Tensor]


def standard_normal(shape: tuple[int, ...], generator: torch.Generator | None,
                    device: torch.device) -> Tensor:
    return torch.randn(shape, generator=generator, device=device)


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


SLOT_OFFSET_SEED = 20250213


def slot_offsets(shape: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """Fixed per-slot offsets [N_z, d]: N(0, I) draws from a fixed seed (never the global RNG),
    the same on every call, so a decoder can learn which slot starts where."""
    generator = torch.Generator().manual_seed(SLOT_OFFSET_SEED)
    return torch.randn(shape, generator=generator).to(device)


def initial_posterior(
    ltm: LatentThoughtModel, batch: int, device: torch.device, config: InferenceConfig,
    generator: torch.Generator | None = None, draw: NoiseSource = standard_normal,
) -> LocalPosterior:
    """loc at 0 and log-variance at ``init_log_var`` (-5 as released, sigma about 0.08),
    plus ``init_log_var_jitter`` * N(0, 1) drawn from ``generator`` when the jitter is not 0
    (released optimizer.py l.91-92: randn * 0.1 - 5; with no jitter nothing is drawn).
    ``init_loc_scale`` > 0 starts loc at that times ``slot_offsets`` instead of 0."""
    loc = torch.zeros(batch, *ltm.latent_shape, device=device)
    if config.init_loc_scale:
        loc = loc + config.init_loc_scale * slot_offsets(ltm.latent_shape, device)
    log_var = torch.full_like(loc, config.init_log_var)
    if config.init_log_var_jitter:
        jitter = draw(loc.shape, generator, device)
        log_var = log_var + config.init_log_var_jitter * jitter
    return LocalPosterior(loc, log_var)


def default_start(
    ltm: LatentThoughtModel, tokens: Tensor, mask: Tensor, config: InferenceConfig,
    generator: torch.Generator | None = None, draw: NoiseSource = standard_normal,
) -> LocalPosterior:
    """Where a fit starts when no ``start`` is given: the encoder's proposal from the tokens
    when the model has one (semi-amortised inference, ``amortised.py``; no gradient), else
    ``initial_posterior``."""
    if ltm.encoder is None:
        return initial_posterior(ltm, tokens.shape[0], tokens.device, config, generator, draw)
    with torch.no_grad():
        return ltm.encoder(tokens, mask)


def fit_objective(config: InferenceConfig, n_layers: int, training: bool) -> ELBO:
    """The fast loop's default objective: the sync-free mean-field ELBO, with
    ``config.free_bits`` in training fits (``training``); evaluation fits the full ELBO."""
    if training and config.free_bits > 0:
        return FreeBitsMeanFieldELBO(config.free_bits, config.free_bits_group, n_layers,
                                     max_plate_nesting=1)
    return SyncFreeMeanFieldELBO(max_plate_nesting=1)


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
    draw: NoiseSource = standard_normal,
    normaliser: Tensor | None = None,
    training: bool = False,
    kl_weight: float | None = None,
    elbo: ELBO | None = None,
    start: LocalPosterior | None = None,
) -> FitResult:
    """Run ``steps`` (default ``config.steps``) inner steps of AdamW on (loc, log_var).

    The loss is the negative ELBO (``elbo``, default ``fit_objective``: free bits apply when
    ``training``; any Pyro ELBO works, e.g. ``Trace_ELBO``) with the latent site scaled by
    ``kl_weight`` (default ``config.kl_weight``, the full weight). It is per token
    (``inner_loss="per-token"``, divided by ``normaliser``, default this batch's token count,
    so accumulated decoder gradients, ``accumulate_decoder_grads``, have the slow loss's
    scale) or summed (``"sum"``, as released). The learning rate follows ``fast_lr``.
    ``noise="fixed"`` draws one standard-normal noise for all steps (as released), ``"fresh"``
    a new one each step, from ``generator`` (evaluation never moves the training RNG) through
    ``draw``; under data parallelism ``draw`` gives this rank's slice of the global batch's
    draw and ``normaliser`` the global token count, so each rank fits what one process would.
    It starts at ``start`` (copied; default ``default_start``): with 0 steps q is the start.
    """
    steps = config.steps if steps is None else steps
    local = (start or default_start(ltm, tokens, mask, config, generator, draw)).leaf()
    loc, log_var = local.loc, local.log_var
    noise = draw(loc.shape, generator, loc.device)
    if steps == 0:
        return FitResult(local.detach(), noise)

    elbo = elbo or fit_objective(config, ltm.config.n_layers, training)
    kl_weight = config.kl_weight if kl_weight is None else kl_weight
    optimizer = torch.optim.AdamW([loc, log_var], lr=config.lr_max, betas=config.betas,
                                  weight_decay=config.weight_decay)
    # "per-token" divides by the (global) token count; "sum" (released) keeps the sum.
    divisor = 1.0 if config.inner_loss == "sum" else (
        mask.sum() if normaliser is None else normaliser)
    # "final" mode freezes the decoder: no weight-gradient work or activations kept for it.
    with contextlib.nullcontext() if accumulate_decoder_grads else frozen(ltm.decoder):
        for step in range(steps):
            if step > 0 and config.noise == "fresh":
                noise = draw(loc.shape, generator, loc.device)
            loss = elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask, local, noise,
                                            kl_weight)
            loss = loss / divisor
            optimizer.zero_grad(set_to_none=True)
            if accumulate_decoder_grads:
                loss.backward()
            else:
                loc.grad, log_var.grad = torch.autograd.grad(loss, [loc, log_var])
            for group in optimizer.param_groups:
                group["lr"] = fast_lr(step, steps, config)
            optimizer.step()
    return FitResult(local.detach(), noise)
