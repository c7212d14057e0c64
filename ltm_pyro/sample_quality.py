"""Quality measures of generated token sequences: a scorer's perplexity, diversity, entropy.

Generative perplexity alone rewards dull, repetitive text, so it is always reported beside the
samples' unigram entropy and distinct-n, and beside the same measures on real held-out text.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import LatentThoughtModel


@torch.no_grad()
def scorer_nll_per_token(scorer: LatentThoughtModel, tokens: Tensor, batch_size: int = 32
                         ) -> float:
    """Mean NLL (nats) an AR scorer assigns to tokens[:, 1:] given what precedes them."""
    if scorer.has_latents:
        raise ValueError("the scorer must be an AR model (no latents): its NLL is then exact")
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start:start + batch_size]
        logits = scorer.logits(chunk[:, :-1], None).float()
        total += float(F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="sum"))
        count += chunk[:, 1:].numel()
    return total / count


def unigram_entropy(tokens: Tensor) -> float:
    """Entropy (nats) of the pooled token frequencies: low when samples repeat a few words."""
    counts = torch.bincount(tokens.flatten()).double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log()).sum())


def distinct_n(tokens: Tensor, n: int) -> float:
    """Distinct n-grams over all n-grams within the sequences (pooled), in [0, 1]."""
    grams: Counter = Counter()
    for row in tokens.tolist():
        grams.update(tuple(row[i:i + n]) for i in range(len(row) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else math.nan
