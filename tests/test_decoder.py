from dataclasses import replace

import pytest
import torch

from ltm_pyro.config import preset
from ltm_pyro.decoder import Decoder, apply_rope, rope_angles
from ltm_pyro.model import LatentThoughtModel, LocalPosterior

from .conftest import micro_config


@pytest.mark.parametrize("name,expected", [
    ("ltm-s", 38_369_280), ("ltm-m", 51_005_952), ("ltm-l", 76_279_296),
])
def test_paper_preset_parameter_counts(name, expected):
    config = replace(preset(name).model, vocab_size=50258)
    assert config.context == 1024
    with torch.device("meta"):
        decoder = Decoder(config)
    assert decoder.num_parameters() == expected


def test_output_embedding_is_tied():
    decoder = Decoder(micro_config())
    assert decoder.output.weight is decoder.tok_embeddings.weight


def test_latent_width_can_differ_from_model_width():
    decoder = Decoder(micro_config(latent_dim=3))
    z = torch.randn(2, 4, 3)
    assert decoder(torch.randint(0, 23, (2, 12)), z).shape == (2, 12, 23)


def test_causal_and_windowed():
    """Changing token j changes logits only at positions i >= j, and only within the window."""
    decoder = Decoder(micro_config(latents_per_layer=0, window=4, n_layers=1)).eval()
    tokens = torch.randint(0, 23, (1, 12))
    changed = tokens.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 23
    diff = (decoder(tokens) - decoder(changed)).abs().amax(-1)[0]
    assert torch.all(diff[:5] == 0)
    assert torch.all(diff[5:9] > 0)  # positions 5..8 see token 5 within a window of 4
    assert torch.all(diff[9:] == 0)  # one layer: nothing reaches further


def test_latents_reach_every_position():
    decoder = Decoder(micro_config()).eval()
    tokens = torch.randint(0, 23, (1, 12))
    z = torch.randn(1, 4, 32)
    diff = (decoder(tokens, z) - decoder(tokens, z + 1)).abs().amax(-1)[0]
    assert torch.all(diff > 0)


def test_ar_baseline_has_no_cross_attention():
    decoder = Decoder(micro_config(latents_per_layer=0))
    assert not any("cross" in name for name, _ in decoder.named_parameters())
    assert decoder(torch.randint(0, 23, (2, 12))).shape == (2, 12, 23)


def test_rope_scores_depend_on_relative_position_only():
    rotation = rope_angles(8, torch.arange(12), 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> torch.Tensor:
        return (apply_rope(q, rotation[i:i + 1]) * apply_rope(k, rotation[j:j + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(9, 6))
    torch.testing.assert_close(apply_rope(q, rotation[:1]), q)  # position 0: no rotation
    assert not torch.allclose(score(5, 2), score(5, 4))


@pytest.mark.slow
def test_compiled_model_matches_eager_values_and_gradients():
    """``LatentThoughtModel.compile`` (decoder and token NLL) changes no number, only speed."""
    config = micro_config()
    eager = LatentThoughtModel(Decoder(config))
    compiled = LatentThoughtModel(Decoder(config))
    compiled.decoder.load_state_dict(eager.decoder.state_dict())
    compiled.compile()
    tokens = torch.randint(0, config.vocab_size, (3, 13))
    mask = torch.ones(3, 12)
    mask[0, 7:] = 0
    shape = (3, config.n_latents, config.z_dim)
    loc, log_var = torch.randn(shape).requires_grad_(), (torch.randn(shape) - 1).requires_grad_()
    noise = torch.randn(shape)
    outputs = []
    for ltm in (eager, compiled):
        nll, kl = ltm.elbo_terms(tokens, mask, LocalPosterior(loc, log_var), noise)
        inputs = [loc, log_var, *ltm.decoder.parameters()]
        outputs.append((nll, kl, *torch.autograd.grad((nll + kl).sum(), inputs)))
    for reference, value in zip(*outputs):
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-5)
    assert list(compiled.decoder.state_dict()) == list(eager.decoder.state_dict())
