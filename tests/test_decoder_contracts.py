"""Contracts of ``ltm_pyro/decoder.py`` that the full mutation run found unguarded.

- The KV cache is exact when it is extended by several tokens at once, not only by the
  prompt and then one token at a time (the only pattern ``generate.sample_tokens`` uses):
  ``hidden_states(tokens, z, cache)`` documents that any tokens continue the cached ones,
  and ``Decoder._cached_mask`` builds the causal, windowed mask of such a chunk against the
  cached keys (its one-token fast path must not swallow longer chunks).
- With a window the cache keeps exactly the ``window - 1`` newest keys: decoding memory and
  per-token cost stay bounded by the window however long the sequence grows.
- ``matched_ar_config`` works before the tokenizer has set ``vocab_size`` (0, as the CLI
  calls it) and leaves it unset, and matches the parameter count of a shape whose MLP width
  is given explicitly (``mlp_hidden``), not only of one using the default rule.
"""

from dataclasses import replace

import pytest
import torch

from ltm_pyro.decoder import Decoder, count_parameters, matched_ar_config

from .conftest import micro_config


def _decoder(window: int | None) -> Decoder:
    torch.manual_seed(3)
    decoder = Decoder(micro_config(context=20, window=window))
    for p in decoder.parameters():  # larger weights than the init: a wrong mask shows clearly
        p.data.mul_(8)
    return decoder.eval()


@pytest.mark.parametrize("window", [4, None])
def test_cache_extended_by_chunks_matches_the_full_pass(window):
    """Catches: the one-token fast path of ``_cached_mask`` taken for two-token chunks
    (no causal mask among them), and a chunk's query or key positions counted from 0
    instead of from the cache's length / its oldest kept key."""
    decoder = _decoder(window)
    tokens = torch.randint(0, 23, (3, 20), generator=torch.Generator().manual_seed(0))
    z = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = decoder(tokens, z)
        cache = decoder.new_cache()
        pieces, start = [], 0
        for length in (3, 2, 3, 1, 2, 4, 5):  # after the first chunk the window has slid
            pieces.append(decoder(tokens[:, start:start + length], z, cache))
            start += length
    assert start == 20 and cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


def test_cache_keeps_only_the_window_minus_one_newest_keys():
    """Catches: ``DecodingCache.trim`` keeping more keys than the next token may see."""
    window = 4
    decoder = _decoder(window)
    tokens = torch.randint(0, 23, (2, 20), generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))
    cache = decoder.new_cache()
    with torch.no_grad():
        decoder(tokens[:, :2], z, cache)
        kept = [cache.layers[0].keys.shape[2]]
        for t in range(2, 20):
            decoder(tokens[:, t:t + 1], z, cache)
            assert cache.first == max(0, cache.length - (window - 1))
            for layer in cache.layers:
                assert layer.keys.shape[2] == layer.values.shape[2] == cache.length - cache.first
            kept.append(cache.layers[0].keys.shape[2])
    assert kept == [2] + [3] * 18


def test_matched_ar_config_before_the_vocabulary_is_known():
    """Catches: ``matched_ar_config`` counting parameters of a decoder with ``vocab_size`` 0
    (which refuses to build) or returning a made-up vocabulary size instead of leaving it
    unset for the tokenizer."""
    unset = micro_config(vocab_size=0)
    ar = matched_ar_config(unset)
    assert ar.vocab_size == 0 and ar.latents_per_layer == 0
    # The embeddings cancel out: the width is the one of the same shape with a vocabulary.
    assert ar.mlp_hidden == matched_ar_config(micro_config()).mlp_hidden


@pytest.mark.parametrize("mlp_hidden", [40, 160])
def test_matched_ar_config_with_an_explicit_mlp_width(mlp_hidden):
    """Catches: the AR shape counted with the default MLP rule instead of the LTM's own
    ``mlp_hidden``, which misses the parameter count by the difference in width."""
    config = micro_config(mlp_hidden=mlp_hidden)
    assert config.hidden_dim != replace(config, mlp_hidden=None).hidden_dim
    ar = matched_ar_config(config)
    assert ar.latents_per_layer == 0 and ar.mlp_hidden > mlp_hidden
    # A uniform MLP width matches to within half a hidden unit (3 d L weights).
    half_unit = 3 * config.d_model * config.n_layers / 2
    assert abs(count_parameters(ar) - count_parameters(config)) <= half_unit
