"""Generation: the KV cache is exact, sampling is reproducible and respects top-k/top-p."""

import json
import subprocess
import sys

import pytest
import torch

from ltm_pyro.config import InferenceConfig
from ltm_pyro.decoder import Decoder
from ltm_pyro.generate import (
    Sampling,
    filter_logits,
    next_tokens,
    posterior_latents,
    prior_latents,
    sample_tokens,
)
from ltm_pyro.model import LatentThoughtModel

from .conftest import REPO, micro_config


def _model(latents: int = 2, window: int | None = 4) -> LatentThoughtModel:
    torch.manual_seed(3)
    decoder = Decoder(micro_config(context=20, latents_per_layer=latents, window=window))
    for p in decoder.parameters():  # larger weights than the init: peaked, varied predictions
        p.data.mul_(8)
    return LatentThoughtModel(decoder)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("latents,window", [(2, 4), (2, None), (0, 4), (0, None)])
def test_cached_logits_match_recomputed_ones(latents, window):
    ltm = _model(latents, window)
    ltm.decoder.eval()
    tokens = torch.randint(0, 23, (3, 20), generator=_generator())
    z = prior_latents(ltm, 3, generator=_generator(1))
    with torch.no_grad():
        full = ltm.decoder(tokens, z)
        cache = ltm.decoder.new_cache()
        pieces = [ltm.decoder(tokens[:, :7], z, cache)]  # a prompt longer than the window
        pieces += [ltm.decoder(tokens[:, t:t + 1], z, cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-3, atol=1e-3)  # float32


@pytest.mark.parametrize("latents", [2, 0])
def test_cached_and_uncached_greedy_decoding_agree(latents):
    ltm = _model(latents)
    prompt = torch.randint(0, 23, (4, 6), generator=_generator())
    z = prior_latents(ltm, 4, generator=_generator(1))
    cached = sample_tokens(ltm, prompt, 15, z, greedy=True)
    uncached = sample_tokens(ltm, prompt, 15, z, greedy=True, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :6], prompt)
    assert len({tuple(row.tolist()) for row in cached}) > 1  # not a degenerate constant model


def test_sampling_is_reproducible_with_a_seed():
    ltm = _model()
    prompt = torch.zeros(3, 1, dtype=torch.long)
    z = prior_latents(ltm, 3, generator=_generator(1))
    first = sample_tokens(ltm, prompt, 12, z, top_k=5, top_p=0.9, generator=_generator(7))
    again = sample_tokens(ltm, prompt, 12, z, top_k=5, top_p=0.9, generator=_generator(7))
    other = sample_tokens(ltm, prompt, 12, z, top_k=5, top_p=0.9, generator=_generator(8))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_top_k_and_top_p_never_emit_excluded_tokens():
    probs = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02])
    logits = probs.log().repeat(4000, 1)
    k_draws = next_tokens(logits, Sampling(top_k=3), _generator())
    assert set(k_draws.unique().tolist()) == {0, 1, 2}
    # Nucleus 0.6: tokens 0 (0.40) and 1 (0.25 -> 0.65 reaches it); token 2 starts past it.
    p_draws = next_tokens(logits, Sampling(top_p=0.6), _generator())
    assert set(p_draws.unique().tolist()) == {0, 1}
    both = filter_logits(logits[:1], top_k=1, top_p=0.99)
    assert torch.isfinite(both).sum() == 1 and both[0, 0] == logits[0, 0]


def test_conditional_generation_fits_z_to_the_prompt():
    ltm = _model(window=None)
    prompt = torch.randint(0, 23, (4, 16), generator=_generator(5))
    fitted = posterior_latents(ltm, prompt, InferenceConfig(steps=16), generator=_generator())
    with torch.no_grad():
        logits_at = {name: ltm.decoder(prompt[:, :-1], z) for name, z in
                     (("fitted", fitted), ("prior_mean", torch.zeros_like(fitted)))}
    nll = {name: torch.nn.functional.cross_entropy(logits.transpose(1, 2), prompt[:, 1:])
           for name, logits in logits_at.items()}
    assert nll["fitted"] < nll["prior_mean"] - 0.05
    continued = sample_tokens(ltm, prompt, 4, fitted, greedy=True)
    assert continued.shape == (4, 20)


def test_generation_refuses_a_too_long_request():
    ltm = _model()
    with pytest.raises(ValueError, match="exceed the context"):
        sample_tokens(ltm, torch.zeros(1, 10, dtype=torch.long), 12, prior_latents(ltm, 1))


@pytest.mark.slow
def test_decoding_benchmark_runs_at_ci_size(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "bench_decoding.py"), "--preset", "tiny",
         "--new-tokens", "8", "--reps", "1", "--batch-size", "2", "--json",
         str(tmp_path / "d.json")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["ltm", "ar"] and all(r["identical"] for r in rows)
    assert (tmp_path / "d.md").is_file()


@pytest.mark.parametrize("settings, says", [
    ({"temperature": 0.0}, "temperature must be above 0"),
    ({"top_k": 0}, "top_k must be at least 1"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"), ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
])
def test_sampling_settings_out_of_range_are_refused(settings, says):
    from ltm_pyro.generate import Sampling

    with pytest.raises(ValueError, match=says):
        Sampling(**settings)


def test_the_edges_of_the_sampling_ranges_are_allowed():
    from ltm_pyro.generate import Sampling

    Sampling(top_k=1)
    Sampling(top_p=1.0)


def test_filtering_keeps_the_top_k_and_the_nucleus_per_row():
    """Rows are filtered independently: top-k of the vocabulary's own size keeps all, top-p
    keeps the smallest set of leading tokens reaching p (a set reaching p exactly stops)."""
    from ltm_pyro.generate import filter_logits

    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4]])
    logits = probs.log()
    kept = lambda out: torch.isfinite(out).tolist()  # noqa: E731
    assert kept(filter_logits(logits, 4, None)) == [[True] * 4] * 2
    assert kept(filter_logits(logits, 2, None)) == [[True, True, False, False],
                                                    [False, False, True, True]]
    assert kept(filter_logits(logits, None, 0.75)) == [[True, True, False, False],
                                                       [False, True, True, True]]
    assert kept(filter_logits(logits, None, 0.8)) == [[True, True, True, False],
                                                      [False, True, True, True]]
    assert torch.equal(filter_logits(logits, None, 1.0), logits)


def test_greedy_and_sampled_tokens_come_from_each_rows_own_logits():
    from ltm_pyro.generate import Sampling, next_tokens

    logits = torch.tensor([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0]])
    assert next_tokens(logits, Sampling(greedy=True), None).tolist() == [[1], [0]]
    drawn = next_tokens(logits.repeat(200, 1) * 5, Sampling(), _generator(1))
    assert drawn.view(200, 2).tolist() == [[1, 0]] * 200


def test_prior_latents_are_scaled_draws_repeatable_by_generator():
    from ltm_pyro.generate import prior_latents

    ltm = _model()
    base = prior_latents(ltm, 3, generator=_generator(4))
    assert torch.equal(base, torch.randn(3, *ltm.latent_shape, generator=_generator(4)))
    assert torch.allclose(prior_latents(ltm, 3, scale=0.5, generator=_generator(4)), 0.5 * base)


def test_posterior_latents_are_the_mean_or_a_repeatable_draw_from_q():
    """Catches: the draw's noise not from the generator, a draw that is not loc + sigma *
    noise, the steps or generator dropped on the way to the fit, and a one-token prompt
    fitted at all (it has nothing to predict: q stays at its start)."""
    from ltm_pyro.generate import posterior_latents, prompt_posterior

    ltm = _model()
    fit = InferenceConfig(steps=5, init_log_var=0.0, noise="fresh")  # asked for: 3 steps
    prompt = torch.randint(0, 23, (2, 6), generator=_generator(2))
    q = prompt_posterior(ltm, prompt, fit, steps=3, generator=_generator(5))
    mean = posterior_latents(ltm, prompt, fit, steps=3, generator=_generator(5))
    assert torch.equal(mean, q.loc)
    assert not torch.equal(q.loc, prompt_posterior(ltm, prompt, fit, steps=1,
                                                   generator=_generator(5)).loc)
    assert not torch.equal(q.loc, prompt_posterior(ltm, prompt, fit, steps=3,
                                                   generator=_generator(6)).loc)
    drawn = posterior_latents(ltm, prompt, fit, steps=3, generator=_generator(5), sample=True)
    replay = _generator(5)
    prompt_posterior(ltm, prompt, fit, steps=3, generator=replay)  # the fit's own draws
    noise = torch.randn(q.loc.shape, generator=replay)
    assert torch.allclose(drawn, q.loc + q.scale * noise)
    start = prompt_posterior(ltm, prompt[:, :1], fit, steps=3, generator=_generator(5))
    assert torch.equal(start.log_var, torch.zeros_like(start.log_var))


def test_filtering_treats_every_leading_dimension_as_rows():
    """[B, 1, V] logits (a batch of single positions) are filtered along V, as [B, V] are."""
    from ltm_pyro.generate import filter_logits

    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4]]).log()
    for top_k, top_p in ((2, None), (None, 0.75), (3, 0.8)):
        flat = filter_logits(logits, top_k, top_p)
        assert torch.equal(filter_logits(logits[:, None], top_k, top_p), flat[:, None])
