"""Word dropout (``TrainConfig.word_dropout``, Bowman et al. 2016): a lever against posterior
collapse that hides input words from the decoder in training only, so what they said has to
come from z (docs/latent-diagnostics.md, "Levers"). The docstrings name what each test catches.
"""

from __future__ import annotations

import pytest
import torch

from ltm_pyro.cli import OneLineParser, add_run_arguments, config_from_args
from ltm_pyro.comparisons import comparison_configs
from ltm_pyro.config import InferenceConfig, RunConfig, TrainConfig
from ltm_pyro.decoder import Decoder, dropping_words
from ltm_pyro.errors import UsageError
from ltm_pyro.mdlm import MaskedDiffusionTrainer
from ltm_pyro.model import LatentThoughtModel
from ltm_pyro.svi import DualRateSVI

from .conftest import micro_config


def test_a_dropped_word_has_no_influence_and_the_decoder_is_restored(ltm):
    """Catches: the mask applied to the wrong axis or not at all, the decoder left dropping
    words after the block (also when it raises), or a mask of the wrong shape accepted."""
    decoder = ltm.decoder.eval()
    tokens = torch.randint(0, 23, (2, 10), generator=torch.Generator().manual_seed(3))
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 23
    z = torch.randn(2, *ltm.latent_shape)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[:, 4] = False
    with torch.no_grad():
        assert not torch.allclose(decoder(tokens, z), decoder(changed, z))
        with dropping_words(decoder, keep):
            torch.testing.assert_close(decoder(tokens, z), decoder(changed, z))
            with pytest.raises(ValueError, match="does not match the inputs"):
                decoder(tokens[:, :9], z)
        assert decoder.input_keep is None
        with pytest.raises(RuntimeError), dropping_words(decoder, keep):
            raise RuntimeError
        assert decoder.input_keep is None
        torch.testing.assert_close(decoder(tokens, z), ltm.decoder(tokens, z))


def _spy_on_masks(ltm: LatentThoughtModel, monkeypatch) -> list:
    """Record the keep mask every decoder forward pass runs with."""
    seen = []
    original = ltm.decoder.hidden_states

    def spy(tokens, z=None, cache=None):
        seen.append(ltm.decoder.input_keep)
        return original(tokens, z, cache)

    monkeypatch.setattr(ltm.decoder, "hidden_states", spy)
    return seen


def test_the_fit_and_the_slow_step_see_one_mask_per_step(ltm, batch, monkeypatch):
    """One draw per window and step, shared by every inner step and the slow step, a new one
    at the next step, and none once the step is over. Catches: a mask drawn per forward pass,
    the slow step run without it, or the mask left on the decoder for evaluation."""
    tokens, mask = batch
    svi = DualRateSVI(ltm, InferenceConfig(steps=3), TrainConfig(word_dropout=0.5),
                      generator=torch.Generator().manual_seed(0))
    seen = _spy_on_masks(ltm, monkeypatch)
    svi.step(tokens, mask)
    assert len(seen) == 3 + 1  # the fit's inner steps, then the slow step
    first = seen[0]
    assert first is not None and first.shape == (5, 12)
    assert all(m is first for m in seen)
    assert ltm.decoder.input_keep is None
    seen.clear()
    svi.step(tokens, mask)
    assert not torch.equal(seen[0], first)


def test_the_rate_is_the_share_of_words_dropped():
    """Catches: the threshold on the wrong side of the normal quantile (keeping a quarter
    instead of three quarters)."""
    ltm = LatentThoughtModel(Decoder(micro_config()))
    svi = DualRateSVI(ltm, InferenceConfig(), TrainConfig(word_dropout=0.25),
                      generator=torch.Generator().manual_seed(0))
    keep = svi._word_keep(torch.zeros(400, 101, dtype=torch.long))
    assert keep.shape == (400, 100)
    assert abs(keep.float().mean().item() - 0.75) < 0.01  # 40,000 draws: sd 0.002


def test_no_word_dropout_draws_nothing(ltm, batch, monkeypatch):
    """The default leaves training as it was: no mask, and the noise generator not advanced
    by an extra draw (runs before the lever keep their figures)."""
    tokens, mask = batch
    generator = torch.Generator().manual_seed(0)
    svi = DualRateSVI(ltm, InferenceConfig(steps=2), TrainConfig(), generator=generator)
    state = generator.get_state()
    assert svi._word_keep(tokens) is None
    assert torch.equal(generator.get_state(), state)
    seen = _spy_on_masks(ltm, monkeypatch)
    svi.step(tokens, mask)
    assert seen and all(m is None for m in seen)


def test_an_ar_baseline_trains_with_it_too(batch, monkeypatch):
    """The matched ARs share the LTM's training config, word dropout included (equal
    regularisation); a model without latents still gets the mask in its one forward pass."""
    tokens, mask = batch
    ar = LatentThoughtModel(Decoder(micro_config(latents_per_layer=0)))
    seen = _spy_on_masks(ar, monkeypatch)
    DualRateSVI(ar, InferenceConfig(), TrainConfig(word_dropout=0.3)).step(tokens, mask)
    assert len(seen) == 1 and seen[0] is not None
    base = RunConfig(model=micro_config(), train=TrainConfig(word_dropout=0.3))
    found = comparison_configs(base, with_no_inference=True, with_mdlm=True)
    assert {name: c.train.word_dropout for name, c in found.items()} == {
        "ltm-T16": 0.3, "ltm-no-inference": 0.3, "ar-window": 0.3, "ar-full": 0.3, "mdlm": 0.0}


def test_word_dropout_flag_and_refusals():
    p = OneLineParser()
    add_run_arguments(p)
    config = config_from_args(p.parse_args(["--word-dropout", "0.25"]))
    assert config.train.word_dropout == 0.25
    assert "word dropout 0.25" in config.summary()
    assert config_from_args(p.parse_args([])).train.word_dropout == 0.0
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(SystemExit):
            p.parse_args(["--word-dropout", bad])
    ltm = LatentThoughtModel(Decoder(micro_config()))
    with pytest.raises(UsageError, match="not a probability below 1"):
        DualRateSVI(ltm, InferenceConfig(), TrainConfig(word_dropout=1.0))
    mdlm = LatentThoughtModel(Decoder(micro_config(latents_per_layer=0, window=None,
                                                   bidirectional=True)))
    with pytest.raises(UsageError, match="MDLM already masks"):
        MaskedDiffusionTrainer(mdlm, TrainConfig(word_dropout=0.25))


def test_configs_written_before_the_lever_load_without_it():
    raw = RunConfig().to_dict()
    del raw["train"]["word_dropout"]
    assert RunConfig.from_dict(raw).train.word_dropout == 0.0
