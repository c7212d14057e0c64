"""Dual-rate SVI: a fast optimizer fits local posteriors, a slow one moves the decoder.

One ``step(tokens, mask)`` fits q(z|x) for the batch from scratch (``inference.py``), then
takes one slow AdamW step on the per-token negative ELBO with z drawn from the fitted guide
and held fixed (z carries no gradient into the decoder's update).

``decoder_grads="final"`` (default, the paper's separation): the decoder is frozen during the
inner steps and its gradient comes from the final posterior only. ``"trajectory"`` reproduces
the released code: every inner backward also accumulates decoder gradients, never zeroed
before the slow step, so the decoder trains on the whole inference trajectory.

With an encoder (``ltm.encoder``, semi-amortised inference, ``amortised.py``) the fit starts
at its proposal, and the encoder takes one AdamW step of its own per iteration, on
``encoder_objective`` at the same decoder weights as the slow step (decoder frozen for it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
from pyro.infer import ELBO
from torch import Tensor

from .amortised import gaussian_kl
from .config import InferenceConfig, TrainConfig
from .decoder import dropping_words
from .distributed import Shard, data_parallel
from .errors import UsageError
from .inference import fit_local_posterior, fit_objective, frozen
from .model import LatentThoughtModel, LocalPosterior


def warmup_cosine(step: int, config: TrainConfig) -> float:
    """Slow learning rate: linear warm-up to ``lr``, then cosine to ``min_lr`` at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def kl_weight_at(step: int, inference: InferenceConfig, train: TrainConfig) -> float:
    """The KL weight of slow step ``step`` (0-based): a linear ramp over ``kl_warmup_steps``
    to ``inference.kl_weight`` (the full weight, at which every bound is scored). With
    ``kl_cycles`` C > 1 the ramp restarts at the start of each of C equal cycles of the run
    (cyclical annealing, Fu et al. 2019: each restart lets z take information back before the
    KL is paid in full again)."""
    ramp = train.kl_warmup_steps
    if not ramp:
        return inference.kl_weight
    position = step % kl_cycle_length(train) if train.kl_cycles > 1 else step
    return inference.kl_weight * min(1.0, (position + 1) / ramp)


def kl_cycle_length(train: TrainConfig) -> int:
    """Slow steps per KL annealing cycle (the last cycle may be shorter)."""
    return math.ceil(train.max_steps / train.kl_cycles)


def check_kl_cycles(train: TrainConfig) -> None:
    """Cyclical annealing needs a warm-up that ends within each cycle, or z never sees the
    full KL before the next restart (checked for command-line and Python users alike)."""
    if train.kl_cycles == 1:
        return
    cycle = kl_cycle_length(train)
    if not 0 < train.kl_warmup_steps < cycle:
        raise UsageError(
            f"--kl-cycles {train.kl_cycles} restarts the KL warm-up every {cycle} steps: give "
            f"a --kl-warmup-steps (TrainConfig.kl_warmup_steps) between 1 and {cycle - 1} "
            f"(e.g. {cycle // 2}, half a cycle)")


def check_word_dropout(train: TrainConfig) -> None:
    """Refuse a word-dropout rate that is not a probability below 1, in one line."""
    if not 0.0 <= train.word_dropout < 1.0:
        raise UsageError(f"--word-dropout {train.word_dropout:g} is not a probability below 1;"
                         " give a rate in [0, 1), e.g. 0.25")


def slow_optimizer(decoder: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed)."""
    params = [p for p in decoder.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = next(decoder.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused)


def encoder_objective(ltm: LatentThoughtModel, tokens: Tensor, mask: Tensor,
                      proposal: LocalPosterior, fitted: LocalPosterior, noise: Tensor,
                      inference: InferenceConfig, elbo: ELBO, kl_weight: float,
                      normaliser: Tensor) -> Tensor:
    """The encoder's loss per token for one batch (its gradient reaches the encoder only):

    ``"elbo"``: the fit's training objective (``elbo``, e.g. with free bits, at ``kl_weight``)
    at the proposal with one reparameterised draw ``noise``, the decoder frozen;
    ``"fit"``: KL(fitted || proposal), the fitted q held fixed (no decoder pass).
    """
    if inference.encoder_loss == "fit":
        return gaussian_kl(fitted.detach(), proposal).sum() / normaliser
    with frozen(ltm.decoder):
        return elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask, proposal, noise,
                                        kl_weight) / normaliser


def encoder_optimizer(encoder: torch.nn.Module, inference: InferenceConfig
                      ) -> torch.optim.AdamW:
    return torch.optim.AdamW(encoder.parameters(), lr=inference.encoder_lr, betas=(0.9, 0.999),
                             weight_decay=0.0)


@dataclass
class StepStats:
    """Per-token figures of one iteration, as tensors (no host sync until logged)."""

    elbo: Tensor
    nll: Tensor
    kl: Tensor
    grad_norm: Tensor
    fast_lr: float
    slow_lr: float
    kl_weight: float
    skipped: bool  # the loss or a gradient was not finite, so no update was applied


class DualRateSVI:
    """Fast local + slow global optimisation of a latent-thought model.

    Owns everything that changes with the step: both learning-rate schedules, the KL warm-up
    and, under torchrun, the DDP view the slow step runs through. ``elbo`` is the fast loop's
    objective (default: ``inference.fit_objective``). For a model without latents (the AR
    baseline) a step is a plain language-model step.
    """

    def __init__(
        self,
        ltm: LatentThoughtModel,
        inference: InferenceConfig,
        train: TrainConfig,
        generator: torch.Generator | None = None,
        shard: Shard | None = None,
        elbo: ELBO | None = None,
    ) -> None:
        check_kl_cycles(train)
        check_word_dropout(train)
        self.ltm = ltm
        self.inference = inference
        self.train = train
        self.generator = generator
        # The training fits' objective, built once (free bits apply: ``training=True``).
        self.elbo = elbo or fit_objective(inference, ltm.config.n_layers, training=True)
        self.optimizer = slow_optimizer(ltm.decoder, train)
        self.step_count = 0
        self.shard = shard or Shard()
        self.encoder_optimizer = None
        if ltm.encoder is not None and ltm.has_latents:
            if self.shard.distributed:
                raise UsageError("--encoder-layers is not supported under torchrun yet; "
                                 "train the encoder in one process")
            self.encoder_optimizer = encoder_optimizer(ltm.encoder, inference)
        device = next(ltm.decoder.parameters()).device
        # Under torchrun the slow step runs through DDP; the fast loop needs no communication.
        self.slow_view = ltm.through(data_parallel(ltm.decoder, self.shard, device)) if (
            self.shard.distributed) else ltm

    def step(self, tokens: Tensor, mask: Tensor) -> StepStats:
        """One iteration: fit this batch's q (fast loop), then one slow decoder step; with
        word dropout both see the same inputs dropped."""
        self.ltm.decoder.train()
        with dropping_words(self.ltm.decoder, self._word_keep(tokens)):
            return self._step(tokens, mask)

    def _word_keep(self, tokens: Tensor) -> Tensor | None:
        """This step's word-dropout keep mask [B, T] over input positions (None: no word
        dropout). Drawn as normals through the shard, so each window gets the draw a single
        process would give it, and thresholded at the rate's normal quantile."""
        rate = self.train.word_dropout
        if not rate:
            return None
        draw = self.shard.randn((tokens.shape[0], tokens.shape[1] - 1), self.generator,
                                tokens.device)
        return draw >= NormalDist().inv_cdf(rate)

    def _step(self, tokens: Tensor, mask: Tensor) -> StepStats:
        decoder = self.ltm.decoder
        self.optimizer.zero_grad(set_to_none=True)
        tokens_in_batch = self.shard.total(mask.sum())  # the global batch's, under torchrun
        kl_weight = kl_weight_at(self.step_count, self.inference, self.train)
        posterior, noise, proposal = None, None, None
        if self.ltm.has_latents:
            if self.encoder_optimizer is not None:
                self.ltm.encoder.train()
                self.encoder_optimizer.zero_grad(set_to_none=True)
                proposal = self.ltm.encoder(tokens, mask)  # with the encoder's gradient
            fit = fit_local_posterior(
                self.ltm, tokens, mask, self.inference, generator=self.generator,
                accumulate_decoder_grads=self.train.decoder_grads == "trajectory",
                draw=self.shard.randn, normaliser=tokens_in_batch, training=True,
                kl_weight=kl_weight, elbo=self.elbo,
                start=None if proposal is None else proposal.detach(),
            )
            posterior, noise = fit.posterior, fit.noise
            if self.inference.noise == "fresh":
                noise = self.shard.randn(noise.shape, self.generator, noise.device)
        loss, nll, kl = self.slow_view.objective_terms(tokens, mask, posterior, noise, kl_weight)
        # The KL of the fixed, fitted q carries no decoder gradient: free bits and the KL
        # weight act through the fit only, and the reported KL stays the full one.
        loss = loss / tokens_in_batch
        nll, kl = nll.sum() / tokens_in_batch, kl.sum() / tokens_in_batch
        loss.backward()  # under DDP: gradients summed over ranks = the global batch's
        grad_norm = torch.nn.utils.clip_grad_norm_(decoder.parameters(), self.train.grad_clip)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if proposal is not None:
            finite = finite & self._encoder_backward(tokens, mask, proposal, posterior,
                                                     kl_weight, tokens_in_batch)
        slow_lr = warmup_cosine(self.step_count, self.train)
        # One host sync per iteration (never inside the fast loop) guards against NaN/inf;
        # under torchrun all ranks agree, so they skip (or not) together.
        skipped = self.shard.any(not bool(finite), loss.device)
        if not skipped:
            for group in self.optimizer.param_groups:
                group["lr"] = slow_lr
            self.optimizer.step()
            if proposal is not None:
                for group in self.encoder_optimizer.param_groups:
                    group["lr"] = self.inference.encoder_lr * slow_lr / self.train.lr
                self.encoder_optimizer.step()
        self.step_count += 1
        fast_lr = self.inference.lr_max if self.ltm.has_latents else 0.0
        nll, kl = self.shard.total(nll.detach()), self.shard.total(kl.detach())
        return StepStats(-(nll + kl), nll, kl, grad_norm, fast_lr, slow_lr, kl_weight, skipped)

    def _encoder_backward(self, tokens: Tensor, mask: Tensor, proposal: LocalPosterior,
                          fitted: LocalPosterior, kl_weight: float, normaliser: Tensor
                          ) -> Tensor:
        """The encoder's gradient (``encoder_objective``, clipped like the decoder's), at the
        decoder weights of this slow step; returns whether loss and gradient are finite."""
        noise = None
        if self.inference.encoder_loss == "elbo":
            noise = self.shard.randn(proposal.loc.shape, self.generator, proposal.loc.device)
        loss = encoder_objective(self.ltm, tokens, mask, proposal, fitted, noise,
                                 self.inference, self.elbo, kl_weight, normaliser)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.ltm.encoder.parameters(),
                                              self.train.grad_clip)
        return torch.isfinite(loss) & torch.isfinite(norm)

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "step_count": self.step_count}
        if self.encoder_optimizer is not None:
            state["encoder_optimizer"] = self.encoder_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = state["step_count"]
        if self.encoder_optimizer is not None:
            self.encoder_optimizer.load_state_dict(state["encoder_optimizer"])
