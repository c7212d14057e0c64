"""The built-in default corpus: documents from a latent-variable process with known factors.

Every document has two hidden factors, a ``topic`` (one of 32) and a ``style`` (one of 8), drawn
uniformly. Its tokens follow a Markov chain whose next-word logits add a shared bigram term,
a topic term and a style term:

    x_0 ~ softmax(topic_logits[k] + style_logits[s])
    x_t ~ softmax(bigram_logits[x_{t-1}] + topic_logits[k] + style_logits[s])

Predicting well needs the factors, which only the whole document reveals: a decoder that sees
a short window must guess them, while one whose latents capture them need not. Because the
process is known, the exact log p(x) of every document (factors summed out) is computable;
its per-token mean is the entropy floor no model can beat in expectation. Words are
pronounceable pseudo-words, so samples and interpolations read as text.
All arrays come from a fixed seed: the corpus is the same on every machine.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

N_TOPICS = 32
N_STYLES = 8
VOCAB_WORDS = 96
PROCESS_SEED = 20250201


def pseudo_words(count: int) -> list[str]:
    """``count`` distinct two-syllable words (consonant-vowel pairs), in a fixed order."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    rng = np.random.default_rng(PROCESS_SEED)
    pairs = list(itertools.product(syllables, repeat=2))
    chosen = rng.choice(len(pairs), size=count, replace=False)
    return ["".join(pairs[i]) for i in chosen]


@dataclass(frozen=True)
class TopicStyleProcess:
    """The generating process' parameters (log-linear logits)."""

    bigram_logits: np.ndarray  # [V, V]
    topic_logits: np.ndarray  # [K, V]
    style_logits: np.ndarray  # [S, V]

    @classmethod
    def default(cls) -> TopicStyleProcess:
        rng = np.random.default_rng(PROCESS_SEED)
        v = VOCAB_WORDS
        return cls(
            bigram_logits=rng.normal(0.0, 1.0, size=(v, v)),
            topic_logits=rng.normal(0.0, 1.0, size=(N_TOPICS, v)),
            style_logits=rng.normal(0.0, 0.7, size=(N_STYLES, v)),
        )

    @property
    def vocab_size(self) -> int:
        return self.bigram_logits.shape[0]

    def _log_transitions(self) -> np.ndarray:
        """log p(x_t | x_{t-1}, k, s), shape [K, S, V, V]."""
        logits = (
            self.bigram_logits[None, None]
            + self.topic_logits[:, None, None, :]
            + self.style_logits[None, :, None, :]
        )
        return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)

    def _log_initial(self) -> np.ndarray:
        logits = self.topic_logits[:, None, :] + self.style_logits[None, :, :]
        return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)  # [K, S, V]

    def sample(self, n_docs: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [n_docs, length] and factors [n_docs, 2] (topic, style)."""
        rng = np.random.default_rng(seed)
        topics = rng.integers(0, N_TOPICS, n_docs)
        styles = rng.integers(0, N_STYLES, n_docs)
        probs_next = np.exp(self._log_transitions())
        probs_first = np.exp(self._log_initial())
        tokens = np.empty((n_docs, length), dtype=np.int64)
        cdf = np.cumsum(probs_first[topics, styles], axis=-1)
        tokens[:, 0] = (rng.random((n_docs, 1)) < cdf).argmax(-1)
        for t in range(1, length):
            cdf = np.cumsum(probs_next[topics, styles, tokens[:, t - 1]], axis=-1)
            tokens[:, t] = (rng.random((n_docs, 1)) < cdf).argmax(-1)
        return tokens, np.stack([topics, styles], axis=1)

    def log_likelihood(self, tokens: np.ndarray, first_scored: int = 1) -> np.ndarray:
        """Exact log p(x_first_scored.. | x_<first_scored) per document, factors summed out.

        ``first_scored=1`` matches a language model that predicts tokens 1..L-1 from the
        first one, so the result is directly comparable with its per-token NLL.
        """
        log_next = self._log_transitions()
        log_first = self._log_initial()
        # log p(k, s, x_0..x_{L-1}) for every factor pair, then condition on x_<first_scored.
        joint = log_first[:, :, tokens[:, 0]]  # [K, S, N]
        prefix = joint.copy() if first_scored == 1 else None
        for t in range(1, tokens.shape[1]):
            joint = joint + log_next[:, :, tokens[:, t - 1], tokens[:, t]]
            if t + 1 == first_scored:
                prefix = joint.copy()
        # The factors' prior is uniform, so its constant cancels between joint and prefix.
        log_joint = np.logaddexp.reduce(joint.reshape(-1, tokens.shape[0]), axis=0)
        log_prefix = np.logaddexp.reduce(prefix.reshape(-1, tokens.shape[0]), axis=0)
        return log_joint - log_prefix
