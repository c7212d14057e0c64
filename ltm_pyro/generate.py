"""Sampling text from a latent-thought model given z (from the prior or a fitted posterior).

This version recomputes the whole prefix at every step (no KV cache): simple and exact, fine
for the short continuations the notebooks decode.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import LatentThoughtModel


@torch.no_grad()
def sample_tokens(
    ltm: LatentThoughtModel,
    prompt: Tensor,
    max_new_tokens: int,
    z: Tensor | None = None,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue ``prompt`` [B, P] (P >= 1) by ``max_new_tokens``; returns [B, P + new]."""
    context = ltm.config.context
    if prompt.shape[1] + max_new_tokens > context + 1:
        raise ValueError(f"prompt + new tokens exceed the context of {context} (+1)")
    tokens = prompt
    for _ in range(max_new_tokens):
        logits = ltm.logits(tokens, z)[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens
