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
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from torch import Tensor

from .config import InferenceConfig
from .model import LatentThoughtModel, LocalPosterior

# Draws standard-normal noise of a shape from a generator on a device. Single-process code
# uses ``standard_normal``; under torchrun each rank passes its ``Shard.randn`` (its slice of
# the global batch's draw), so the fast loop itself needs no communication.
NoiseSource = Callable[[tuple[int, ...], "torch.Generator | None", torch.device], Tensor]


def standard_normal(shape: tuple[int, ...], generator: torch.Generator | None,
                    device: torch.device) -> Tensor:
    return torch.randn(shape, generator=generator, device=device)


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
            loss = loss - self._elbo_particle(model_trace, guide_trace) / self.num_particles
        return loss

    def site_kl(self, q, p) -> Tensor:  # noqa: ANN001 - a latent site's guide and prior
        """The KL of a latent site, per sequence (before Pyro's scale and mask)."""
        return torch.distributions.kl_divergence(q, p)

    def _elbo_particle(self, model_trace, guide_trace) -> Tensor:  # noqa: ANN001 - traces
        elbo = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                elbo = elbo + site["log_prob_sum"]
            else:
                guide_site = guide_trace.nodes[name]
                kl = self.site_kl(guide_site["fn"], site["fn"])
                elbo = elbo - scale_and_mask(kl, guide_site["scale"], guide_site["mask"]).sum()
        return elbo


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

    def site_kl(self, q, p) -> Tensor:  # noqa: ANN001 - Independent Normals
        """sum over groups of max(KL of the group, free_bits): [batch]."""
        per_slot = torch.distributions.kl_divergence(q.base_dist, p.base_dist).sum(-1)
        if self.group == "layer":
            per_slot = per_slot.unflatten(-1, (self.n_layers, -1)).sum(-1)
        return per_slot.clamp(min=self.free_bits).sum(-1)


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
) -> FitResult:
    """Run ``steps`` (default ``config.steps``) inner steps of AdamW on (loc, log_var).

    The loss is the negative ELBO of the Pyro program, per token (``inner_loss="per-token"``,
    so that accumulated decoder gradients, ``accumulate_decoder_grads``, have the scale of
    the slow step's loss) or summed over tokens and sequences (``"sum"``, as released, so
    that they dwarf the slow step's own per-token gradient). The learning rate follows
    ``fast_lr``; AdamW's weight decay on (loc, log_var) is ``config.weight_decay``.
    ``noise="fixed"`` draws one standard-normal noise for all steps (as released);
    ``"fresh"`` draws a new one at each step. Draws come from ``generator`` so that
    evaluation never moves the training RNG, through ``draw`` (under data parallelism: this
    rank's slice of the global batch's draw); a per-token loss is divided by ``normaliser``
    (default: this batch's token count; under data parallelism the global batch's), so each
    rank fits exactly what a single process would.
    ``training`` (the slow loop's fits) applies ``config.free_bits`` to the fit's objective;
    evaluation fits the full ELBO.
    """
    steps = config.steps if steps is None else steps
    start = initial_posterior(ltm, tokens.shape[0], tokens.device, config, generator, draw)
    loc = start.loc.requires_grad_()
    log_var = start.log_var.requires_grad_()
    local = LocalPosterior(loc, log_var)

    noise = draw(loc.shape, generator, loc.device)
    if steps == 0:
        return FitResult(local.detach(), noise)

    if training and config.free_bits > 0:
        elbo = FreeBitsMeanFieldELBO(config.free_bits, config.free_bits_group,
                                     ltm.config.n_layers, max_plate_nesting=1)
    else:
        elbo = SyncFreeMeanFieldELBO(max_plate_nesting=1)
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
            loss = elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask, local, noise)
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
