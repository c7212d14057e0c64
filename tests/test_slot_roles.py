"""Per-slot roles in cross-attention (``ModelConfig.slot_roles``, issue 13).

With shared projections and even attention over a layer's slots, every slot receives the
same gradient and the decoder cannot tell the slots apart: the symmetry that keeps them
near-copies. Slot-specific value (or key and value) projections break it; a per-slot embedding
added to z does not under even attention (only through the keys, like fixed offsets).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from ltm_pyro.cli import OneLineParser, add_run_arguments, config_from_args
from ltm_pyro.config import PRESETS, ModelConfig, RunConfig, preset
from ltm_pyro.decoder import Decoder, SlotLinear, count_parameters, matched_ar_config
from ltm_pyro.families import FAMILIES
from ltm_pyro.tokenizers import WordTokenizer

from .conftest import micro_config

ROLES = ("shared", "value", "key-value", "embedding")


def _decoder(roles: str, even_attention: bool, **overrides) -> Decoder:
    """A micro decoder in eval mode; ``even_attention`` zeroes the cross-attention keys, so
    every token weights a layer's slots equally whatever z and the latent RoPE positions."""
    decoder = Decoder(micro_config(slot_roles=roles, latent_dim=6, **overrides)).eval()
    if even_attention:
        with torch.no_grad():
            for block in decoder.layers:
                block.cross_attention.wk.weight.zero_()
    return decoder


def _same_slots(seed: int = 1) -> torch.Tensor:
    """z [2, L * S, d] whose slots are identical within each layer (L = S = 2)."""
    per_layer = torch.randn(2, 2, 1, 6, generator=torch.Generator().manual_seed(seed))
    return per_layer.expand(2, 2, 2, 6).flatten(1, 2).contiguous()


def _slot_gradients(decoder: Decoder, z: torch.Tensor) -> torch.Tensor:
    tokens = torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(2))
    z = z.clone().requires_grad_()
    torch.nn.functional.cross_entropy(decoder(tokens[:, :-1], z).flatten(0, 1),
                                      tokens[:, 1:].flatten()).backward()
    return z.grad.unflatten(1, (2, 2))  # [B, L, S, d]


def _swap_slots_of_layer0(z: torch.Tensor) -> torch.Tensor:
    return z[:, [1, 0, 2, 3]]


@pytest.mark.parametrize("roles", ["shared", "embedding"])
def test_even_attention_gives_identical_slots_identical_gradients(roles):
    """Today's symmetry, and (b)'s limit: nothing in the value path tells the slots apart."""
    grad = _slot_gradients(_decoder(roles, even_attention=True), _same_slots())
    assert grad.abs().amax() > 0
    torch.testing.assert_close(grad[:, :, 0], grad[:, :, 1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("roles", ["value", "key-value"])
def test_slot_projections_give_identical_slots_different_gradients(roles):
    grad = _slot_gradients(_decoder(roles, even_attention=True), _same_slots())
    for layer in range(2):
        difference = (grad[:, layer, 0] - grad[:, layer, 1]).norm()
        assert difference > 0.1 * grad[:, layer].norm()
        cosine = torch.nn.functional.cosine_similarity(grad[:, layer, 0].flatten(),
                                                       grad[:, layer, 1].flatten(), dim=0)
        assert cosine < 0.9  # different directions, not only different sizes


@pytest.mark.parametrize("roles", ["shared", "embedding"])
def test_even_attention_outputs_do_not_depend_on_the_order_of_a_layers_slots(roles):
    decoder = _decoder(roles, even_attention=True)
    tokens = torch.randint(0, 23, (2, 12))
    z = torch.randn(2, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(decoder(tokens, _swap_slots_of_layer0(z)), decoder(tokens, z))


@pytest.mark.parametrize("roles", ["value", "key-value"])
def test_slot_projections_make_outputs_depend_on_the_order_of_slots(roles):
    decoder = _decoder(roles, even_attention=True)
    tokens = torch.randint(0, 23, (2, 12))
    z = torch.randn(2, 4, 6)
    with torch.no_grad():
        change = (decoder(tokens, _swap_slots_of_layer0(z)) - decoder(tokens, z)).abs().amax()
    assert change > 1e-3


def test_embedding_roles_break_the_symmetry_through_the_keys_only():
    """With the keys on, per-slot embeddings make the attention, hence the output, depend on
    which slot holds which vector; (shared projections do too, through the latent RoPE)."""
    decoder = _decoder("embedding", even_attention=False)
    tokens = torch.randint(0, 23, (2, 12))
    z = torch.randn(2, 4, 6)
    with torch.no_grad():
        plain = decoder(tokens, z)
        for block in decoder.layers:
            block.cross_attention.slot_embedding.zero_()
        assert (decoder(tokens, z) - plain).abs().amax() > 1e-4


def test_default_is_shared_and_builds_the_released_weights():
    assert ModelConfig().slot_roles == "shared"
    for name, config in PRESETS.items():  # tiny is the latents study's recipe
        assert config.model.slot_roles == ("key-value" if name == "tiny" else "shared")
    torch.manual_seed(3)
    default = Decoder(micro_config())
    torch.manual_seed(3)
    explicit = Decoder(micro_config(slot_roles="shared"))
    assert list(default.state_dict()) == list(explicit.state_dict())
    for name, tensor in default.state_dict().items():
        assert torch.equal(tensor, explicit.state_dict()[name]), name
    assert not any("slot" in name for name in default.state_dict())
    cross = default.layers[0].cross_attention
    assert isinstance(cross.wv, torch.nn.Linear) and cross.wv.weight.shape == (32, 32)


def test_slot_weights_are_initialised_like_the_shared_ones():
    decoder = Decoder(micro_config(slot_roles="key-value", latent_dim=6, d_model=64))
    cross = decoder.layers[0].cross_attention
    assert isinstance(cross.wk, SlotLinear) and cross.wk.weight.shape == (2, 64, 6)
    for weight in (cross.wk.weight, cross.wv.weight):
        assert 0.015 < float(weight.detach().std()) < 0.025
        assert not torch.allclose(weight[0], weight[1])
    embedded = Decoder(micro_config(slot_roles="embedding", latent_dim=6)).layers[0]
    assert embedded.cross_attention.slot_embedding.shape == (2, 6)
    assert embedded.cross_attention.slot_embedding.abs().amax() > 0.1  # the prior's scale


@pytest.mark.parametrize("roles", ROLES)
def test_extra_parameters_are_counted_and_given_to_the_matched_ar(roles):
    config = replace(preset("tiny").model, vocab_size=98, window=4,
                     slot_roles=roles)  # the study's shape
    shared = count_parameters(replace(config, slot_roles="shared"))
    layers, slots, z, d = config.n_layers, config.latents_per_layer, config.z_dim, config.d_model
    extra = {"shared": 0, "value": (slots - 1) * z * d, "key-value": 2 * (slots - 1) * z * d,
             "embedding": slots * z}[roles] * layers
    ltm = count_parameters(config)
    assert ltm == shared + extra
    ar = matched_ar_config(config)
    assert ar.latents_per_layer == 0
    # A uniform MLP width matches to within half a hidden unit (3 d L weights) ...
    assert abs(count_parameters(ar) - ltm) <= 3 * d * layers / 2
    if roles in ("shared", "value", "key-value"):  # ... which is within 0.1% here
        assert abs(count_parameters(ar) - ltm) <= 0.001 * ltm
    big = replace(config, vocab_size=10000)
    assert abs(count_parameters(matched_ar_config(big)) - count_parameters(big)) \
        <= 0.001 * count_parameters(big)


@pytest.mark.parametrize("roles", ["value", "key-value", "embedding"])
def test_cached_decoding_matches_the_full_pass(roles):
    decoder = _decoder(roles, even_attention=False)
    tokens = torch.randint(0, 23, (2, 12))
    z = torch.randn(2, 4, 6)
    with torch.no_grad():
        full = decoder(tokens, z)
        cache = decoder.new_cache()
        pieces = [decoder(tokens[:, :5], z, cache)]
        pieces += [decoder(tokens[:, t:t + 1], z, cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("roles", ["value", "key-value", "embedding"])
def test_checkpoint_round_trip_keeps_the_roles_and_weights(tmp_path, roles):
    config = RunConfig(model=micro_config(slot_roles=roles, latent_dim=6))
    decoder = Decoder(config.model).eval()
    tokenizer = WordTokenizer.fit("a b c d e f g h i j k l m n o p q r s t u")
    save_checkpoint(tmp_path / "checkpoint.pt", {
        "config": config.to_dict(), "decoder": decoder.state_dict(),
        "tokenizer": tokenizer.to_dict()})
    ltm, loaded, _ = model_from_checkpoint(load_checkpoint(tmp_path))
    assert loaded.model.slot_roles == roles
    tokens, z = torch.randint(0, 23, (2, 12)), torch.randn(2, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(ltm.decoder(tokens, z), decoder(tokens, z), rtol=0, atol=0)
    # A config written before the field existed loads as the shared projections.
    old = config.to_dict()
    del old["model"]["slot_roles"]
    assert RunConfig.from_dict(old).model.slot_roles == "shared"


def test_slot_roles_flag_and_bad_values():
    p = OneLineParser()
    add_run_arguments(p)
    assert config_from_args(p.parse_args([])).model.slot_roles == "key-value"  # tiny's
    assert config_from_args(p.parse_args(["--preset", "small"])).model.slot_roles == "shared"
    assert config_from_args(p.parse_args(["--slot-roles", "value"])).model.slot_roles == "value"
    with pytest.raises(SystemExit):
        p.parse_args(["--slot-roles", "per-slot"])
    with pytest.raises(ValueError, match="slot_roles"):
        Decoder(micro_config(slot_roles="per-slot"))


def test_config_summary_names_what_decides_the_latents():
    text = preset("tiny").summary()
    for part in ("preset tiny", "window 16", "slot roles key-value", "T = 16", "log-var 0",
                 "slot offsets 0.5", "free bits 1/slot", "400 steps"):
        assert part in text, part
    semi_amortised = preset("tiny").updated(inference={"encoder_layers": 2})
    assert "from a 2-block encoder's proposal (elbo loss; log-var 0" in semi_amortised.summary()
    assert "encoder" not in text
    tiny = preset("tiny")
    ar = tiny.updated(model_kind="ar", model=FAMILIES["ar"].shape(tiny.model, match_params=True))
    assert ar.summary().startswith("ar (preset tiny") and "no latents" in ar.summary()
