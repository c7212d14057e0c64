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

from ltm_pyro.decoder import (
    Decoder,
    apply_rope,
    count_parameters,
    matched_ar_config,
    rope_angles,
)

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


def test_rms_norm_is_the_written_out_formula_with_its_gain():
    """Catches: ``RMSNorm`` dividing by its learned gain instead of multiplying by it, which
    no test saw while every gain sat at its initial ones."""
    norm = Decoder(micro_config()).norm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 3.0, 32))
    x = 3 * torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(0))
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_embedding_is_added_to_the_latents_in_their_dtype(dtype):
    """Catches: ``slot_roles="embedding"`` replacing the latents by None, subtracting the
    slot embedding instead of adding it, or adding it uncast (``.to(None)``: bf16 latents
    under autocast promoted to float32 before the key projection). The keys and values of
    latents z are those a zero embedding gives for z + embedding, added in z's dtype."""
    torch.manual_seed(0)
    cross = Decoder(micro_config(slot_roles="embedding")).layers[0].cross_attention
    rotation = torch.stack((torch.ones(2, 8), torch.zeros(2, 8)), -1)  # two slots, no turn
    z = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    bf16 = dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        keys, values = cross.keys_values(z, rotation)
        shifted = z + cross.slot_embedding.to(dtype)
        cross.slot_embedding.zero_()
        expected_keys, expected_values = cross.keys_values(shifted, rotation)
    assert keys.dtype == expected_keys.dtype
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


def test_bidirectional_decoder_sees_later_tokens_and_refuses_a_cache():
    """Catches: self-attention left causal in a bidirectional (MDLM) decoder (``mask is None
    or causal``), and the KV-cache refusal turned round (``cache is None``), which makes the
    plain bidirectional pass raise and lets a cached one through."""
    torch.manual_seed(0)
    decoder = Decoder(micro_config(bidirectional=True, latents_per_layer=0, window=None))
    tokens = torch.randint(0, 23, (2, 13), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 23
    with torch.no_grad():
        diff = (decoder.eval()(tokens) - decoder(changed)).abs().amax(-1)
    assert torch.all(diff > 0)  # every position, the first included, sees the last token
    with pytest.raises(ValueError, match="no KV cache"):
        decoder(tokens[:, :3], cache=decoder.new_cache())


def test_inputs_longer_than_the_context_are_refused_with_their_length():
    """Catches: the length check written ``start - length > max_tokens`` (never true: a
    too-long input fails deep inside RoPE instead), and its message lost or counting
    ``start - length`` tokens; with a cache the length counts the cached tokens too."""
    decoder = _decoder(None)  # a context of 20
    tokens = torch.randint(0, 23, (2, 21), generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with pytest.raises(ValueError, match="^sequence of 21 tokens exceeds the context of 20$"):
            decoder(tokens, z)
        cache = decoder.new_cache()
        decoder(tokens[:, :15], z, cache)
        with pytest.raises(ValueError, match="^sequence of 21 tokens exceeds the context of 20$"):
            decoder(tokens[:, 15:], z, cache)
        assert decoder(tokens[:, 15:20], z, cache).shape == (2, 5, 23)  # exactly the context


@pytest.mark.parametrize("window", [4, None])
def test_decoder_runs_on_the_device_of_its_input(window):
    """Catches: the RoPE tables (token or latent positions) or the window mask built on the
    default device instead of the input's, or the tables looked up for device None: on any
    other device the decoder then mixes devices. ``meta`` (the shape-only device that
    ``count_parameters`` builds on) stands for an accelerator in this CPU-only suite."""
    with torch.device("meta"):
        decoder = Decoder(micro_config(context=20, window=window))
    meta = torch.device("meta")  # the forward runs outside the block: no default device
    tokens = torch.zeros(3, 20, dtype=torch.long, device=meta)
    z = torch.zeros(3, 4, 32, device=meta)
    out = decoder(tokens, z)
    assert out.shape == (3, 20, 23) and out.device == meta
    cache = decoder.new_cache()
    decoder(tokens[:, :6], z, cache)
    out = decoder(tokens[:, 6:7], z, cache)
    assert out.shape == (3, 1, 23) and out.device == meta


def test_a_window_covering_the_input_runs_plain_causal_attention(monkeypatch):
    """Catches: a window exactly as long as the input still building a mask (``window >
    length``): such a window excludes nothing, so self-attention must run as SDPA's plain
    causal call (no mask materialised, the fused causal kernel), exactly as with no window."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    tokens = torch.randint(0, 23, (2, 7), generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unwindowed = _decoder(None)(tokens[:, :6], z)
        calls.clear()
        covered = _decoder(6)(tokens[:, :6], z)
        assert calls.count((True, True)) == 2 and all(no_mask for no_mask, _ in calls)
        calls.clear()
        _decoder(6)(tokens, z)  # one token more than the window: now a mask is needed
        assert calls.count((False, False)) == 2
    torch.testing.assert_close(covered, unwindowed, rtol=0, atol=0)


@pytest.mark.parametrize("compiling", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotates_each_interleaved_pair_by_position_times_its_frequency(
        monkeypatch, compiling, dtype):
    """Catches: the real (cos/sin) form of ``apply_rope`` that runs under ``torch.compile``
    (``--compile``) using sin for cos, indexing past the pair, taking the wrong half of a
    pair, flipping the sign of ``imag * sin``, or stacking the rotated halves on the wrong
    axis. Both forms must be the written-out RoPE: pair i = (x[2i], x[2i+1]) turned by
    angle position * base^(-2i/d), at token positions and at fractional latent positions.
    ``is_compiling`` is forced here (a real compilation is the slow compiled-model test)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    head_dim, base = 8, 10000.0
    positions = torch.tensor([0.0, 1.0, 2.0, 7.0, 2.5, 13.75])  # latent positions: fractional
    x = torch.randn(2, 3, len(positions), head_dim,
                    generator=torch.Generator().manual_seed(0)).to(dtype)
    rotated = apply_rope(x, rope_angles(head_dim, positions, base))
    assert rotated.shape == x.shape and rotated.dtype == dtype
    xd = x.double()
    expected = torch.empty_like(xd)
    for i in range(head_dim // 2):
        angle = positions.double() * base ** (-2 * i / head_dim)
        a, b = xd[..., 2 * i], xd[..., 2 * i + 1]
        expected[..., 2 * i] = a * angle.cos() - b * angle.sin()
        expected[..., 2 * i + 1] = a * angle.sin() + b * angle.cos()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(rotated.double(), expected, rtol=tolerance, atol=tolerance)


def test_missing_latents_and_a_cache_for_a_bidirectional_decoder_are_refused_by_name():
    """Catches: the two refusals of ``hidden_states`` raised with their message lost or
    altered (``ValueError(None)``, decorated or re-cased text): the messages are what a
    caller sees of a decoder given no latents, or an MDLM denoiser given a KV cache."""
    tokens = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with pytest.raises(ValueError,
                           match="^this decoder cross-attends to latents: pass z$"):
            Decoder(micro_config())(tokens)
        mdlm = Decoder(micro_config(bidirectional=True, latents_per_layer=0, window=None))
        with pytest.raises(ValueError,
                           match="^a bidirectional decoder has no KV cache: every step sees all$"):
            mdlm(tokens, cache=mdlm.new_cache())


def test_latents_of_another_dtype_are_cast_to_the_decoders():
    """Catches: the latents passed to the blocks uncast (``z_l.to(None)``): a float32
    decoder given float64 or bf16 latents (outside autocast), or a bf16 decoder given
    float32 ones, then fails in the cross-attention projections. The result must be that
    of the latents converted to the decoder's dtype first, with or without a KV cache."""
    decoder = _decoder(4)
    tokens = torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for latents in (z.double(), z.bfloat16()):
            expected = decoder(tokens, latents.float())
            torch.testing.assert_close(decoder(tokens, latents), expected, rtol=0, atol=0)
            cache = decoder.new_cache()
            decoder(tokens[:, :5], latents, cache)
            torch.testing.assert_close(decoder(tokens[:, 5:], latents, cache),
                                       expected[:, 5:], rtol=1e-4, atol=1e-4)
        decoder.to(torch.bfloat16)
        out = decoder(tokens, z)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, decoder(tokens, z.bfloat16()), rtol=0, atol=0)


@pytest.mark.parametrize("overrides, message", [
    (dict(vocab_size=0), r"^ModelConfig\.vocab_size must be set \(from the tokenizer\)$"),
    (dict(d_model=32, n_heads=3), "^d_model must split into an even head dimension per head$"),
    (dict(d_model=36, n_heads=4), "^d_model must split into an even head dimension per head$"),
    (dict(bidirectional=True, latents_per_layer=2, window=None),
     r"^a bidirectional \(MDLM\) decoder has no latents and no window$"),
    (dict(bidirectional=True, latents_per_layer=0, window=4),
     r"^a bidirectional \(MDLM\) decoder has no latents and no window$"),
])
def test_unbuildable_shapes_are_refused_by_name(overrides, message):
    """Catches: a decoder built with no vocabulary (``vocab_size < 0``: an empty embedding
    table before the tokenizer has set it), a width that does not split evenly over the
    heads (32 over 3) or splits into odd head dimensions (36 over 4: RoPE turns pairs)
    let through when only one of the two holds (``and``), an MDLM denoiser given latents
    but no window let through (``and``), and each refusal's message lost or altered."""
    with pytest.raises(ValueError, match=message):
        Decoder(micro_config(**overrides))


def test_each_slot_role_adds_the_weights_it_documents():
    """Catches: ``slot_roles="value"`` building a shared value projection (the role's name
    mistyped in the test for it) and ``"embedding"`` a single vector [kv_dim] shared by the
    slots instead of one per slot, [S, kv_dim]. Per layer, ``"value"`` gives each of the S
    slots its own z_dim x d value weights ((S - 1) z_dim d more than shared), ``"key-value"``
    its own key and value weights (twice that), ``"embedding"`` an S x z_dim table; the
    extra weights count in ``count_parameters``."""
    slots, z_dim, d, layers = 3, 8, 32, 2
    config = micro_config(latents_per_layer=slots, latent_dim=z_dim, context=12)
    shared = count_parameters(config)
    extra = {"value": (slots - 1) * z_dim * d, "key-value": 2 * (slots - 1) * z_dim * d,
             "embedding": slots * z_dim}
    for roles, per_layer in extra.items():
        assert count_parameters(replace(config, slot_roles=roles)) == shared + layers * per_layer
    cross = Decoder(replace(config, slot_roles="embedding")).layers[0].cross_attention
    assert cross.slot_embedding.shape == (slots, z_dim)


@pytest.mark.parametrize("roles", ["value", "key-value", "embedding"])
def test_slot_roles_tell_identical_latents_apart_by_their_values(roles):
    """Catches: the same two mutants by behaviour. The same latent vector in every slot of a
    layer gives every slot the same values under ``"shared"`` (only the keys' RoPE differs);
    the levers exist to give each slot its own values, so under them no two agree."""
    torch.manual_seed(0)
    config = micro_config(latents_per_layer=3, latent_dim=8, context=12)
    rotation = torch.stack((torch.ones(3, 8), torch.zeros(3, 8)), -1)  # no turn
    z = torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(1)).expand(2, 3, 8)
    with torch.no_grad():
        shared = Decoder(config).layers[0].cross_attention
        _, values = shared.keys_values(z, rotation)  # [B, H, S, hd]
        assert torch.equal(values[:, :, 0], values[:, :, 1])
        lever = Decoder(replace(config, slot_roles=roles)).layers[0].cross_attention
        _, values = lever.keys_values(z, rotation)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (values[:, :, a] - values[:, :, b]).abs().amax() > 1e-3


@pytest.mark.parametrize("roles", ["shared", "value", "key-value", "embedding"])
def test_every_documented_slot_role_builds_and_an_unknown_one_is_refused_by_name(roles):
    """Catches: one of the four ``SlotRoles`` of ``ModelConfig`` (``"value"``,
    ``"embedding"``) mistyped or re-cased in the decoder's list of known roles, so that a
    documented lever refuses to build, and the refusal of an unknown role raised with its
    message lost (``ValueError(None)``): the message names the role the caller passed."""
    decoder = Decoder(micro_config(slot_roles=roles))
    assert decoder.config.slot_roles == roles
    wrong = roles.upper() if roles != "shared" else "values"
    with pytest.raises(ValueError, match=f"^unknown slot_roles '{wrong}'$"):
        Decoder(micro_config(slot_roles=wrong))


def test_mdlm_embedding_table_has_the_mask_tokens_extra_row():
    """Catches: the bidirectional (MDLM) embedding table built one row short
    (``vocab_size - 1``) instead of one row longer than the vocabulary: the mask token, id
    ``vocab_size``, must embed, and the tied output scores vocab_size + 1 classes."""
    vocab = 23
    mdlm = Decoder(micro_config(vocab_size=vocab, bidirectional=True, latents_per_layer=0,
                                window=None))
    assert mdlm.mask_token == vocab
    assert mdlm.tok_embeddings.weight.shape == (vocab + 1, 32)
    assert mdlm.output.weight is mdlm.tok_embeddings.weight
    tokens = torch.tensor([[0, vocab - 1, mdlm.mask_token, vocab]])
    with torch.no_grad():
        assert mdlm(tokens).shape == (1, 4, vocab + 1)
    assert Decoder(micro_config(vocab_size=vocab)).tok_embeddings.weight.shape == (vocab, 32)


def test_residual_output_projections_start_scaled_down_by_depth():
    """Catches: the MLP's output projection (``w2``) not recognised as a residual output,
    so it starts at std 0.02 instead of 0.02 / sqrt(2 n_layers) as the attention output
    (``wo``) does (GPT-2's depth scaling, the released init); every other linear map and
    the (tied) embedding start at 0.02. Sample stds of 700 to 3000 weights, fixed seed,
    within 25% (about ten standard errors; the two stds differ by a factor sqrt(2 L) = 2)."""
    torch.manual_seed(0)
    layers = 2
    decoder = Decoder(micro_config(n_layers=layers))
    residual = 0.02 / (2 * layers) ** 0.5

    def close(weight, std):
        return abs(weight.std().item() / std - 1) < 0.25 and abs(weight.mean().item()) < std / 5

    for block in decoder.layers:
        assert block.feed_forward.w2.weight.numel() >= 3000
        for module in (block.feed_forward.w2, block.self_attention.wo, block.cross_attention.wo):
            assert close(module.weight, residual)
        for module in (block.feed_forward.w1, block.feed_forward.w3, block.self_attention.wq,
                       block.self_attention.wk, block.cross_attention.wv):
            assert close(module.weight, 0.02)
    assert close(decoder.tok_embeddings.weight, 0.02)


def test_slot_embedding_starts_at_the_priors_scale():
    """Catches: the per-slot embedding (``slot_roles="embedding"``) initialised with a mean
    of 1 or a std of 2 instead of the prior's N(0, 1) that the comment states (each slot's
    embedding moves its keys and values as much as a typical latent draw does).
    8 slots x 128 dims x 2 layers, fixed seed, bounds many standard errors wide (mean within
    0.2, std within 15%)."""
    torch.manual_seed(0)
    decoder = Decoder(micro_config(slot_roles="embedding", latents_per_layer=8,
                                   latent_dim=128, context=16))
    table = torch.cat([block.cross_attention.slot_embedding.detach()
                       for block in decoder.layers])
    assert table.shape == (16, 128) and torch.isfinite(table).all()
    assert abs(table.mean().item()) < 0.2
    assert 0.85 < table.std().item() < 1.15
