"""Sampling text from a latent-thought model (or the AR baseline), with a KV cache.

z is fixed for a whole sequence, so its cross-attention keys and values are projected once
per sequence; self-attention keys and values are cached and trimmed to the sliding window.
Unconditional samples draw z from the (optionally scaled) prior; conditional ones fit the
local posterior to the prompt with T inference steps first, exactly as evaluation does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import InferenceConfig
from .errors import UsageError
from .inference import fit_local_posterior
from .model import LatentThoughtModel, LocalPosterior
from .modes import autocast, evaluating


@dataclass
class Sampling:
    """How each next token is chosen. ``greedy`` overrides the rest."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError("temperature must be above 0 (use greedy=True for argmax)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Logits with every token outside the top-k / nucleus set to -inf (rows independent)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top one stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> Tensor:
    """One token per row [B, 1] from last-position logits [B, V]."""
    if sampling.greedy:
        return logits.argmax(-1, keepdim=True)
    filtered = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(torch.softmax(filtered, -1), 1, generator=generator)


def prior_latents(ltm: LatentThoughtModel, batch: int, scale: float = 1.0,
                  generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Tensor | None:
    """z ~ N(0, scale^2 I) for unconditional samples (None for the AR baseline).

    The released code samples with a multiplier on the prior's scale; 1 is the model itself.
    """
    if not ltm.has_latents:
        return None
    return scale * torch.randn(batch, *ltm.latent_shape, generator=generator, device=device)


def prompt_posterior(ltm: LatentThoughtModel, prompt: Tensor, inference: InferenceConfig,
                     steps: int | None = None, generator: torch.Generator | None = None
                     ) -> LocalPosterior:
    """q(z | prompt) for a prompt [B, P], fitted with ``steps`` inner steps (default: the
    training T) in eval mode, as evaluation fits it, also when called under ``no_grad``.

    A prompt of one token has nothing to predict, so its posterior is the initial guide.
    """
    mask = torch.ones(prompt.shape[0], prompt.shape[1] - 1, device=prompt.device)
    steps = 0 if mask.shape[1] == 0 else steps
    with evaluating(ltm.decoder), torch.enable_grad():
        return fit_local_posterior(ltm, prompt, mask, inference, generator, steps=steps).posterior


def posterior_latents(ltm: LatentThoughtModel, prompt: Tensor, inference: InferenceConfig,
                      steps: int | None = None, generator: torch.Generator | None = None,
                      sample: bool = False) -> Tensor | None:
    """z fitted to the prompt [B, P] with ``steps`` inner steps: the posterior mean, or a draw."""
    if not ltm.has_latents:
        return None
    posterior = prompt_posterior(ltm, prompt, inference, steps, generator)
    if not sample:
        return posterior.loc
    noise = torch.randn(posterior.loc.shape, generator=generator, device=prompt.device)
    return posterior.loc + posterior.scale * noise


@torch.no_grad()
def sample_tokens(
    ltm: LatentThoughtModel,
    prompt: Tensor,
    max_new_tokens: int,
    z: Tensor | None = None,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Continue ``prompt`` [B, P] (P >= 1) by ``max_new_tokens``; returns [B, P + new].

    ``use_cache=False`` recomputes the whole prefix at every step: the reference the cached
    path is tested against, and the baseline of experiments/bench_decoding.py.
    """
    if ltm.config.bidirectional:
        raise UsageError("an MDLM samples by ancestral sampling (ltm_pyro.mdlm.sample_window)")
    sampling = Sampling(temperature, top_k, top_p, greedy)
    context = ltm.config.context
    if prompt.shape[1] < 1:
        raise ValueError("the prompt needs at least one token")
    if prompt.shape[1] + max_new_tokens > context + 1:
        raise ValueError(f"prompt ({prompt.shape[1]}) + new tokens ({max_new_tokens}) exceed "
                         f"the context of {context} (+1)")
    if ltm.has_latents and z is None:
        raise ValueError("an LTM samples given z: use prior_latents or posterior_latents")
    decoder = ltm.decoder
    tokens, cache, pending = prompt, decoder.new_cache() if use_cache else None, prompt
    with evaluating(decoder), autocast(prompt.device):
        for _ in range(max_new_tokens):
            logits = decoder(pending if use_cache else tokens, z, cache)[:, -1].float()
            nxt = next_tokens(logits, sampling, generator)
            tokens = torch.cat([tokens, nxt], dim=1)
            pending = nxt
    return tokens


@torch.no_grad()
def continue_tokens(ltm: LatentThoughtModel, start: Tensor, new_tokens: int, z: Tensor | None,
                    sampling: Sampling, generator: torch.Generator | None = None,
                    with_log_probs: bool = False) -> tuple[Tensor, Tensor | None]:
    """``new_tokens`` tokens after ``start`` [B, P] with z fixed, past the context if asked:
    once the window of context + 1 tokens is full, sampling goes on from its last half
    (the decoder never sees more than its context). Returns the new ids [B, new] and, with
    ``with_log_probs`` (one more decoder pass a window), each one's log-probability under
    the model at temperature 1, unfiltered [B, new], in the context it was drawn in."""
    context = ltm.config.context
    tokens, done, drawn, log_probs = start[:, -context:], 0, [], []
    while done < new_tokens:
        prefix = tokens[:, -(context // 2):] if done else tokens
        step = min(new_tokens - done, context + 1 - prefix.shape[1])
        window = sample_tokens(ltm, prefix, step, z, sampling.temperature, sampling.greedy,
                               generator, sampling.top_k, sampling.top_p)
        chosen = window[:, -step:]
        if with_log_probs:
            with evaluating(ltm.decoder):
                logits = ltm.logits(window[:, :-1], z)[:, -step:].float()
            log_probs.append(torch.log_softmax(logits, -1).gather(-1, chosen[..., None])[..., 0])
        drawn.append(chosen)
        tokens, done = torch.cat([tokens, chosen], dim=1), done + step
    ids = torch.cat(drawn, 1) if drawn else start.new_zeros(start.shape[0], 0)
    if not with_log_probs:
        return ids, None
    return ids, torch.cat(log_probs, 1) if log_probs else ids.float()
