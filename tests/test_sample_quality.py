"""Generation metrics on sequences whose values are known by construction."""

import math

import pytest
import torch

from ltm_pyro.decoder import Decoder
from ltm_pyro.model import LatentThoughtModel
from ltm_pyro.sample_quality import distinct_n, scorer_nll_per_token, unigram_entropy

from .conftest import micro_config


def test_unigram_entropy_and_distinct_n_on_known_sequences():
    uniform = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    assert unigram_entropy(uniform) == pytest.approx(math.log(4))
    assert unigram_entropy(torch.zeros(3, 5, dtype=torch.long)) == pytest.approx(0.0)
    assert distinct_n(uniform, 1) == pytest.approx(4 / 8)
    assert distinct_n(uniform, 2) == pytest.approx(3 / 6)
    assert distinct_n(torch.tensor([[5, 5, 5, 5]]), 2) == pytest.approx(1 / 3)


def test_scorer_nll_matches_cross_entropy_and_refuses_an_ltm():
    ar = LatentThoughtModel(Decoder(micro_config(latents_per_layer=0)))
    tokens = torch.randint(0, 23, (5, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ar.decoder(tokens[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:])
    assert scorer_nll_per_token(ar, tokens, batch_size=2) == pytest.approx(float(expected),
                                                                           rel=1e-5)
    with pytest.raises(ValueError, match="AR model"):
        scorer_nll_per_token(LatentThoughtModel(Decoder(micro_config())), tokens)


def test_unigram_entropy_skips_absent_ids_and_counts_singletons():
    """Catches: ids that never occur counted (0 log 0 is nan) and ids seen once left out."""
    tokens = torch.tensor([[0, 3, 3, 3]])  # ids 1 and 2 absent; 0 seen once
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert unigram_entropy(tokens) == pytest.approx(expected)


def test_distinct_n_of_sequences_shorter_than_n_is_undefined():
    assert math.isnan(distinct_n(torch.tensor([[1, 2]]), 3))
