"""Masked diffusion language model (MDLM, Sahoo et al. 2024): the discrete-diffusion baseline.

Forward process (absorbing state): at time t in [0, 1] each token of a window is still itself
with probability alpha_t and the mask token otherwise, independently, with MDLM's log-linear
schedule alpha_t = 1 - t. Without MDLM's epsilon: alpha_1 = 0 masks every token, so the
prior term of the ELBO is exactly 0 (with alpha_1 > 0 it would be an infinite KL against the
all-mask prior), and alpha_0 = 1 makes the reconstruction term exactly 0.

Denoiser: the decoder's blocks without the causal mask and without latents
(``ModelConfig.bidirectional``), reading the noisy window. Its mask-token logit is -inf and
unmasked tokens are carried over (MDLM's SUBS parametrisation). It is not told t: the optimal
denoiser, p(x_i | the unmasked tokens), does not depend on t for the absorbing state.

Bound: the continuous-time negative ELBO in its Rao-Blackwellised form,

    NELBO(x) = E_{t ~ U(0, 1]} E_{z_t ~ q(z_t | x)} [ (1/t) sum_{i masked} -log p(x_i | z_t) ]

(the schedule's weight -alpha'_t / (1 - alpha_t) is 1/t for the log-linear one). Integrating t
out given the number k of masked tokens, int_0^1 (1/t) C(L, k) t^k (1 - t)^(L - k) dt = 1/k,
gives the same expectation as

    NELBO(x) = E_{k ~ U{1..L}} E_{|M| = k} [ (L / k) sum_{i in M} -log p(x_i | x_{not M}) ]

(M uniform among the sets of k positions).

Training uses the first with low-discrepancy t over the batch (MDLM's antithetic sampling).
Evaluation uses the second, with stratified k: its draws are bounded, so its Monte-Carlo
standard error can be estimated, while the first has infinite variance (the integral of 1/t
diverges at t = 0) and an estimate of its error would not mean anything.

Same tokens as the LTM and the AR: a window holds context + 1 tokens and they predict tokens
1..context given token 0. Here token 0 is always given (never masked, never scored), so
exp(NELBO / tokens) is an upper bound on the perplexity of exactly the tokens they score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig, TrainConfig
from .decoder import Decoder, matched_ar_config
from .distributed import Shard
from .errors import UsageError
from .generate import Sampling, next_tokens
from .model import LatentThoughtModel
from .modes import autocast, evaluating
from .svi import StepStats, slow_optimizer, warmup_cosine

VALIDATION_SAMPLES = 8  # draws per window in validation at least: enough for a stderr


def mdlm_model_config(config: ModelConfig, match_params: bool = False) -> ModelConfig:
    """The MDLM denoiser of a model shape: bidirectional, no latents, no window. With
    ``match_params`` its MLP is widened to the LTM's parameter count as for the AR baseline
    (the mask token's embedding row, d_model parameters, comes on top)."""
    base = matched_ar_config(config) if match_params else replace(config, latents_per_layer=0)
    return replace(base, window=None, bidirectional=True)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> Tensor:
    """U[0, 1) draws made on the generator's device (training's is on the CPU), on ``device``."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def position_nll(decoder: Decoder, noisy: Tensor, clean: Tensor) -> Tensor:
    """-log p(clean_i | noisy) at every position [B, n], float32; the mask token's logit is
    -inf (the denoiser never predicts it)."""
    with autocast(noisy.device):
        logits = decoder(noisy)
    mask_id = torch.tensor([decoder.mask_token], device=noisy.device)
    logits = logits.float().index_fill(-1, mask_id, float("-inf"))
    nll = F.cross_entropy(logits.flatten(0, 1), clean.flatten(), reduction="none")
    return nll.view(clean.shape)


def scorable_positions(mask: Tensor) -> Tensor:
    """[B, L + 1] bool over a window: its positions 1..L where ``mask`` [B, L] (over the
    predicted tokens, as for the LTM) is 1. Position 0, the given first token, never is."""
    return F.pad(mask.bool(), (1, 0), value=False)


def training_times(batch: int, generator: torch.Generator | None,
                   device: torch.device) -> Tensor:
    """t in (0, 1] for each sequence: evenly spaced over the batch with one uniform offset
    (MDLM's antithetic sampling), so each t is U(0, 1] and a batch covers the schedule."""
    offset = _uniform((), generator, device)
    return 1 - (offset + torch.arange(batch, device=device) / batch) % 1


def continuous_nelbo(decoder: Decoder, tokens: Tensor, scorable: Tensor,
                     generator: torch.Generator | None) -> Tensor:
    """One-draw estimate of each window's NELBO [B] in nats: t from ``training_times``, each
    scorable position masked with probability t, then (1/t) x the masked positions' NLL."""
    t = training_times(tokens.shape[0], generator, tokens.device)
    masked = scorable & (_uniform(tokens.shape, generator, tokens.device) < t[:, None])
    nll = position_nll(decoder, tokens.masked_fill(masked, decoder.mask_token), tokens)
    return (nll * masked).sum(-1) / t


def stratified_counts(windows: int, samples: int, length: int,
                      generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Masked counts k [windows, samples] in 1..length: draw j is uniform over the j-th of
    ``samples`` equal slices of [0, 1), mapped to k = 1 + floor(length v), independently per
    draw and window. Their mean over the draws is unbiased for k ~ U{1..length}."""
    slices = torch.arange(samples, device=device)
    v = (slices + _uniform((windows, samples), generator, device)) / samples
    return (1 + (v * length).floor().long()).clamp(max=length)


def count_masks(scorable: Tensor, counts: Tensor, generator: torch.Generator | None) -> Tensor:
    """For each row, ``counts`` of its scorable positions chosen uniformly (bool, like
    ``scorable``)."""
    scores = _uniform(scorable.shape, generator, scorable.device).masked_fill(~scorable, 2.0)
    ranks = scores.argsort(-1).argsort(-1)
    return ranks < counts[:, None]


@torch.no_grad()
def window_bounds(decoder: Decoder, tokens: Tensor, samples: int,
                  generator: torch.Generator | None = None, chunk: int = 8) -> Tensor:
    """``samples`` unbiased estimates of each window's NELBO [B, samples], float64 nats, from
    the masked-count form with stratified counts; ``chunk`` draws go through the decoder at
    once. Every token but the first of each window [B, L + 1] is scored."""
    batch, length = tokens.shape[0], tokens.shape[1] - 1
    counts = stratified_counts(batch, samples, length, generator, tokens.device)
    scorable = scorable_positions(torch.ones(batch, length, device=tokens.device))
    pieces = []
    for start in range(0, samples, chunk):
        k = counts[:, start:start + chunk].T.flatten()  # draw-major, like bounds.py
        draws = len(k) // batch
        rows, allowed = tokens.repeat(draws, 1), scorable.repeat(draws, 1)
        masked = count_masks(allowed, k, generator)
        nll = position_nll(decoder, rows.masked_fill(masked, decoder.mask_token), rows)
        estimate = (nll.double() * masked).sum(-1) * length / k
        pieces.append(estimate.view(draws, batch).T)
    return torch.cat(pieces, dim=1)


def bound_summary(nats: float, variance: float, tokens: int, sequences: int,
                  samples: int) -> dict:
    """The bound's figures under evaluate_windows' names: elbo_ppl = iwae_ppl = the bound,
    nll_per_token = the NELBO (no KL term: the prior term is 0), recon_ppl None (no such
    figure). ``variance`` (of ``nats``) gives the Monte-Carlo standard errors."""
    per_token = nats / tokens
    stderr = math.sqrt(variance) / tokens if samples > 1 else None
    ppl = math.exp(per_token)
    return {
        "tokens": tokens, "sequences": sequences, "nll_per_token": per_token,
        "kl_per_token": 0.0, "elbo_per_token": -per_token, "iwae_per_token": -per_token,
        "recon_nll_per_token": None, "elbo_ppl": ppl, "iwae_ppl": ppl, "recon_ppl": None,
        "bound_stderr_per_token": stderr,
        "bound_ppl_rel_stderr": None if stderr is None else math.expm1(stderr),
        "bound_samples": samples, "inference_steps": 0, "elbo_samples": samples,
        "iw_samples": samples,
    }


def evaluate_bound(decoder: Decoder, windows: Tensor, samples: int = 128,
                   batch_size: int = 16, seed: int = 0, device: torch.device | str = "cpu",
                   on_batch: Callable[[int, float], None] | None = None) -> dict:
    """The NELBO bound over a split, as ``bound_summary``, from ``samples`` draws a window.

    The standard error is sqrt(sum over windows of s_w^2 / samples) / tokens, s_w^2 the
    sample variance of a window's draws: conservative in expectation, since stratification
    removes the between-slice part of the variance that s_w^2 still counts. Draws come from a
    generator seeded with ``seed``; ``on_batch(sequences, nelbo_per_token)`` reports progress.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    nats, variance, tokens, sequences = 0.0, 0.0, 0, 0
    with evaluating(decoder):
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            draws = window_bounds(decoder, batch, samples, generator)
            nats += float(draws.mean(1).sum())
            if samples > 1:
                variance += float((draws.var(1) / samples).sum())
            tokens += batch[:, 1:].numel()
            sequences += batch.shape[0]
            if on_batch is not None:
                on_batch(sequences, nats / tokens)
    return bound_summary(nats, variance, tokens, sequences, samples)


def validation_record(decoder: Decoder, windows: Tensor, train: TrainConfig,
                      device: torch.device) -> dict:
    """Validation figures for a training run's metrics.jsonl (at least VALIDATION_SAMPLES
    draws a window, so the record carries its standard error)."""
    summary = evaluate_bound(decoder, windows, max(train.eval_samples, VALIDATION_SAMPLES),
                             train.batch_size, train.seed, device)
    return {"neg_elbo": summary["nll_per_token"], "nll": summary["nll_per_token"], "kl": 0.0,
            "elbo_ppl": summary["elbo_ppl"], "recon_ppl": None,
            "bound_stderr_per_token": summary["bound_stderr_per_token"]}


class MaskedDiffusionTrainer:
    """One AdamW step per batch on the per-token continuous-time NELBO: DualRateSVI's slow
    step (optimizer, schedule, clipping, non-finite guard) with no fast loop. Takes the
    wrapped model, as DualRateSVI does, so a run's training state treats both alike."""

    def __init__(self, ltm: LatentThoughtModel, train: TrainConfig,
                 generator: torch.Generator | None = None, shard: Shard | None = None) -> None:
        if shard is not None and shard.distributed:
            raise UsageError("--model mdlm trains in one process: run it without torchrun")
        if train.word_dropout:
            raise UsageError("--word-dropout is for causal decoders; MDLM already masks its "
                             "inputs: drop the flag for --model mdlm")
        self.ltm = ltm
        self.decoder = ltm.decoder
        self.train = train
        self.generator = generator
        self.optimizer = slow_optimizer(ltm.decoder, train)
        self.step_count = 0

    def step(self, tokens: Tensor, mask: Tensor) -> StepStats:
        """Tokens [B, L + 1] (first token given), mask [B, L] over the predicted tokens."""
        self.decoder.train()
        self.optimizer.zero_grad(set_to_none=True)
        nelbo = continuous_nelbo(self.decoder, tokens, scorable_positions(mask), self.generator)
        loss = nelbo.sum() / mask.sum()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.decoder.parameters(),
                                                   self.train.grad_clip)
        slow_lr = warmup_cosine(self.step_count, self.train)
        skipped = not bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if not skipped:
            for group in self.optimizer.param_groups:
                group["lr"] = slow_lr
            self.optimizer.step()
        self.step_count += 1
        loss = loss.detach()  # no KL term: the KL weight is logged as 1, as for the AR
        return StepStats(-loss, loss, torch.zeros_like(loss), grad_norm, 0.0, slow_lr, 1.0,
                         skipped)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = state["step_count"]


@torch.no_grad()
def denoise_step(decoder: Decoder, z: Tensor, t: float, s: float, sampling: Sampling,
                 generator: torch.Generator | None = None) -> Tensor:
    """One ancestral step from time t to s < t: each masked position is revealed with
    probability (alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t, its token drawn from the
    denoiser; revealed positions are copied, never resampled. At s = 0 every one is revealed."""
    with autocast(z.device):
        logits = decoder(z)
    mask_id = torch.tensor([decoder.mask_token], device=z.device)
    logits = logits.float().index_fill(-1, mask_id, float("-inf"))
    drawn = next_tokens(logits.flatten(0, 1), sampling, generator).view(z.shape)
    reveal = (z == decoder.mask_token) & (_uniform(z.shape, generator, z.device) < (t - s) / t)
    return torch.where(reveal, drawn, z)


def sample_window(decoder: Decoder, prompt: Tensor, steps: int,
                  generator: torch.Generator | None = None,
                  sampling: Sampling | None = None) -> Tensor:
    """A whole window [B, context + 1] drawn by ancestral sampling in ``steps`` equal time
    steps from t = 1 (all masked) to 0, its first P positions the prompt [B, P], P >= 1 (the
    first token is given, as in training). It ends with no mask token."""
    length = decoder.max_tokens
    if not 1 <= prompt.shape[1] <= length:
        raise ValueError(f"the prompt needs 1 to {length} tokens, got {prompt.shape[1]}")
    if steps < 1:
        raise ValueError("ancestral sampling needs at least one denoising step")
    z = torch.full((prompt.shape[0], length), decoder.mask_token, device=prompt.device)
    z[:, :prompt.shape[1]] = prompt
    with evaluating(decoder):
        for i in range(steps, 0, -1):
            z = denoise_step(decoder, z, i / steps, (i - 1) / steps, sampling or Sampling(),
                             generator)
    return z
