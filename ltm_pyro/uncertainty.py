"""How sure a comparison is: paired bootstrap intervals over windows, and spread over seeds.

Two models scored on the same windows differ window by window far less than either varies
across windows, so the interval of their difference comes from resampling windows *together*
(paired), not from two separate intervals. Perplexity is a ratio of sums (nats over tokens),
so each resample recomputes both sums rather than averaging per-window perplexities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def relative_ppl_difference(nll_a: np.ndarray, nll_b: np.ndarray, tokens: np.ndarray) -> float:
    """ppl_A / ppl_B - 1 from per-window nats and token counts (negative: A is better)."""
    return math.expm1((float(np.sum(nll_a)) - float(np.sum(nll_b))) / float(np.sum(tokens)))


def paired_bootstrap(nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[float],
                     resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """``relative_ppl_difference`` of A against B with a percentile interval from resampling
    the windows with replacement (the same windows for both models)."""
    nll_a, nll_b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    if not (nll_a.shape == nll_b.shape == tokens.shape) or nll_a.ndim != 1 or not len(tokens):
        raise ValueError("paired_bootstrap needs the same non-empty list of windows for both")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(tokens), size=(resamples, len(tokens)))
    per_token = (nll_a[picks].sum(1) - nll_b[picks].sum(1)) / tokens[picks].sum(1)
    low, high = np.quantile(np.expm1(per_token), [(1 - level) / 2, (1 + level) / 2])
    return {"difference": relative_ppl_difference(nll_a, nll_b, tokens), "low": float(low),
            "high": float(high), "level": level, "windows": len(tokens),
            "resamples": resamples}


def mean_and_sd(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation over seeds (sd None for one seed)."""
    values = [float(v) for v in values]
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "sd": sd, "seeds": len(values)}
