"""Estimators behind reported numbers, checked against their definitions (issue 43).

Each test computes the right answer independently, from the definition in the module's
docstring, on a case small enough to know it exactly: the MDLM bound (``mdlm.py``) by
enumerating masking patterns, its Monte-Carlo standard error in closed form; the paired
bootstrap (``uncertainty.py``) by enumerating every resample; the FLOP count (``flops.py``) by
hand, term by term, and against the linear layers the decoder really runs.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from ltm_pyro.config import ModelConfig
from ltm_pyro.decoder import Decoder
from ltm_pyro.flops import fit_flops_per_token, forward_flops_per_token, training_flops_per_token
from ltm_pyro.mdlm import evaluate_bound, window_bounds
from ltm_pyro.uncertainty import paired_bootstrap

# --- MDLM: the masked-count NELBO and its standard error ------------------------------------


def _denoiser(vocab: int, context: int, seed: int, context_free: bool = False) -> Decoder:
    """A tiny bidirectional decoder with fixed, large random weights. ``context_free`` zeroes
    the attention outputs, so each position's prediction depends on its own input token
    alone: every masked position gets the same distribution q over the vocabulary."""
    decoder = Decoder(ModelConfig(vocab_size=vocab, context=context, d_model=16, n_layers=1,
                                  n_heads=2, latents_per_layer=0, window=None,
                                  bidirectional=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            if context_free and name.endswith("attention.wo.weight"):
                p.zero_()
    return decoder.eval()


def _conditionals(decoder: Decoder, x: torch.Tensor, masked: tuple[int, ...]) -> torch.Tensor:
    """log p(. | x with the positions ``masked`` replaced by the mask token) [L + 1, V],
    float64, over the real vocabulary (the denoiser never predicts the mask token)."""
    noisy = x.clone()
    noisy[list(masked)] = decoder.mask_token
    with torch.no_grad():
        logits = decoder(noisy[None])[0].double()
    return torch.log_softmax(logits[:, :decoder.mask_token], -1)


def _masking_patterns(x: torch.Tensor, decoder: Decoder) -> list[tuple[int, float]]:
    """(|M|, sum_{i in M} -log p(x_i | x with M masked)) for every non-empty set M of the
    scored positions 1..L (position 0 is given)."""
    length = len(x) - 1
    patterns = []
    for k in range(1, length + 1):
        for masked in itertools.combinations(range(1, length + 1), k):
            log_p = _conditionals(decoder, x, masked)
            patterns.append((k, -sum(float(log_p[i, x[i]]) for i in masked)))
    return patterns


def _nelbo_by_quadrature(patterns: list[tuple[int, float]], length: int) -> float:
    """The continuous-time definition, int_0^1 (1/t) E_{z_t}[masked NLL] dt, each token masked
    with probability t: the integrand is a polynomial in t of degree < L, so Gauss-Legendre
    with L nodes is exact."""
    nodes, weights = np.polynomial.legendre.leggauss(length)
    t, weights = (nodes + 1) / 2, weights / 2  # [-1, 1] -> [0, 1]
    integrand = sum(t ** (k - 1) * (1 - t) ** (length - k) * nll for k, nll in patterns)
    return float(np.sum(weights * integrand))


def test_every_bound_draw_is_a_masking_pattern_drawn_with_its_probability():
    """Catches: a draw that is not (L/k) x the NLL of k masked tokens (the L/k weight lost,
    the given first token masked or scored), masked counts k not uniform on 1..L, masked sets
    not uniform among the k-sets, and counts that are not stratified over the draws.

    The masked-count form: k ~ U{1..L}, M uniform among the k-sets, draw = (L/k) NLL(M); so
    each M has probability 1 / (L C(L, |M|)), and the mean of the draws is the continuous-time
    NELBO (the definition, integrated over t by quadrature)."""
    length, samples = 3, 1200
    decoder = _denoiser(vocab=4, context=length, seed=0)
    x = torch.tensor([2, 0, 3, 1])
    patterns = _masking_patterns(x, decoder)
    values = np.array([length / k * nll for k, nll in patterns])
    probs = np.array([1 / (length * math.comb(length, k)) for k, _ in patterns])
    exact = _nelbo_by_quadrature(patterns, length)
    assert float(probs @ values) == pytest.approx(exact, rel=1e-12)  # the two forms agree
    gaps = np.abs(values[:, None] - values[None, :]) + np.eye(len(values))
    assert gaps.min() > 0.05  # each draw tells which masking pattern it came from

    draws = window_bounds(decoder, x[None], samples, torch.Generator().manual_seed(1),
                          chunk=400)[0].numpy()
    distance = np.abs(draws[:, None] - values[None, :])
    assert distance.min(1).max() < 1e-4, "a draw that no masking pattern gives"
    counts = np.bincount(distance.argmin(1), minlength=len(values))
    masked_k = np.array([k for k, _ in patterns])
    # Stratified: draw j's k comes from the j-th slice of [0, 1), so with samples a multiple
    # of L each k is drawn exactly samples / L times.
    assert [int(counts[masked_k == k].sum()) for k in (1, 2, 3)] == [samples // length] * 3
    chi2 = float(np.sum((counts - samples * probs) ** 2 / (samples * probs)))
    assert chi2 < 20.5, (counts, samples * probs)  # 7 cells, 4 free: p < 0.0005 by chance
    stderr = draws.std(ddof=1) / math.sqrt(samples)
    assert abs(draws.mean() - exact) < 4 * stderr


def test_bound_stderr_matches_the_spread_of_repeated_estimates():
    """Catches: the standard error without dividing the draws' variance by their number (too
    large by sqrt(samples)), summed over windows wrongly, scaled by the wrong token count,
    and a relative perplexity error that is not expm1 of it.

    With a denoiser whose conditionals ignore the context, a masked position i costs a fixed
    a_i = -log q(x_i), so the NELBO is exactly sum_i a_i, and a draw (L/k) sum_{i in M} a_i
    (M a uniform k-set, k uniform) has variance L sigma^2 / (L - 1) sum_k (L - k) / k, sigma^2
    the variance of the a_i (sampling without replacement); its mean does not depend on k, so
    stratifying k leaves the variance of a mean of S draws at that / S."""
    length, samples, repeats = 4, 16, 300
    decoder = _denoiser(vocab=6, context=length, seed=2, context_free=True)
    windows = torch.tensor([[0, 1, 2, 3, 4], [5, 5, 0, 2, 1]])
    log_q = _conditionals(decoder, windows[0], tuple(range(1, length + 1)))[1]
    for w in windows:  # the precondition: every masked position predicts q, whatever it sees
        for masked in ((1,), (2, 4), (1, 3, 4)):
            assert torch.allclose(_conditionals(decoder, w, masked)[list(masked)],
                                  log_q.expand(len(masked), -1), atol=1e-5)
    costs = -log_q[windows[:, 1:]].numpy()  # a_i per window [2, L]
    tokens = costs.size
    draw_variance = (length * costs.var(1) / (length - 1)
                     * sum((length - k) / k for k in range(1, length + 1)))
    true_stderr = math.sqrt(draw_variance.sum() / samples) / tokens  # of one evaluation
    exact = costs.sum() / tokens

    # ``repeats`` independent evaluations of the two windows, run as one batch: every row
    # draws its own masks. Their spread is the true standard error of one evaluation.
    rows = windows.repeat(repeats, 1)
    draws = window_bounds(decoder, rows, samples, torch.Generator().manual_seed(7))
    estimates = draws.mean(1).view(repeats, 2).sum(1).numpy() / tokens
    assert abs(estimates.mean() - exact) < 4 * true_stderr / math.sqrt(repeats)
    assert estimates.std(ddof=1) == pytest.approx(true_stderr, rel=0.15)
    # What evaluate_bound reports for all of them together; its errors add in variance, so
    # one evaluation's is sqrt(repeats) times the whole's.
    summary = evaluate_bound(decoder, rows, samples=samples, batch_size=len(rows), seed=8)
    reported = summary["bound_stderr_per_token"] * math.sqrt(repeats)
    assert reported == pytest.approx(true_stderr, rel=0.1)
    assert reported == pytest.approx(estimates.std(ddof=1), rel=0.2)
    assert abs(summary["nll_per_token"] - exact) < 4 * summary["bound_stderr_per_token"]
    # exp(NELBO per token) is the perplexity bound: one standard error up multiplies it by
    # exp(stderr), a relative change of expm1(stderr).
    assert summary["bound_ppl_rel_stderr"] == pytest.approx(
        math.expm1(summary["bound_stderr_per_token"]), rel=1e-12)
    one = evaluate_bound(decoder, windows, samples=samples, seed=9)
    assert one["bound_stderr_per_token"] == pytest.approx(true_stderr, rel=0.5)


# --- the paired bootstrap -------------------------------------------------------------------


def _exact_bootstrap(nll_a: np.ndarray, nll_b: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """ppl_A / ppl_B - 1 of every one of the n^n equally likely resamples of n windows, both
    models' sums over the same resampled windows, sorted."""
    n = len(tokens)
    picks = np.array(list(itertools.product(range(n), repeat=n)))
    return np.sort(np.expm1((nll_a[picks].sum(1) - nll_b[picks].sum(1))
                            / tokens[picks].sum(1)))


@pytest.mark.parametrize("which", [0, -1])
def test_bootstrap_resamples_every_window_first_and_last(which):
    """Catches: resampling indices drawn from 0..n-2 (the last window never drawn) or from
    1..n-1 (the first never drawn).

    Four windows of equal length, the models differ on one only, by d nats a token: a
    resample that draws it K times (K ~ Binomial(4, 1/4)) gives expm1(-d K / 4). P(K = 0) is
    0.32 and P(K >= 3) 0.051 > 0.025 > P(K = 4), so the 95% interval is exactly
    [expm1(-3d / 4), 0]; a bootstrap that never draws that window gives [0, 0]."""
    tokens = np.full(4, 50.0)
    nll_b = np.array([180.0, 210.0, 195.0, 205.0])
    nll_a = nll_b.copy()
    nll_a[which] -= 0.4 * 50.0
    result = paired_bootstrap(nll_a, nll_b, tokens, resamples=4000, seed=which % 7)
    assert result["difference"] == pytest.approx(math.expm1(-0.4 / 4), rel=1e-12)
    assert result["low"] == pytest.approx(math.expm1(-3 * 0.4 / 4), rel=1e-9)
    assert result["high"] == pytest.approx(0.0, abs=1e-12)
    assert result["windows"] == 4


def test_bootstrap_interval_is_the_percentile_interval_of_every_resample():
    """Catches: per-window perplexity ratios averaged instead of a ratio of sums, the two
    models resampled independently (unpaired), the wrong quantiles for the level, and
    resampling fewer windows than there are.

    Five windows of unequal lengths: the 5^5 resamples are enumerated, and the reported
    interval's ends must fall between the exact quantiles at (1 -+ level)/2 -+ 0.01 (the
    Monte-Carlo error of 20000 resamples is about 0.001 in probability)."""
    tokens = np.array([12.0, 80.0, 35.0, 150.0, 60.0])
    nll_b = tokens * np.array([4.1, 3.6, 4.4, 3.9, 3.8])
    nll_a = nll_b + tokens * np.array([-0.30, 0.05, -0.12, 0.02, -0.20])
    exact = _exact_bootstrap(nll_a, nll_b, tokens)

    def quantile(q: float) -> float:  # the smallest resample value with CDF >= q
        return float(exact[math.ceil(q * len(exact)) - 1])

    for level in (0.95, 0.8):
        result = paired_bootstrap(nll_a, nll_b, tokens, resamples=20000, level=level, seed=5)
        low, high = (1 - level) / 2, (1 + level) / 2
        assert quantile(low - 0.01) <= result["low"] <= quantile(low + 0.01), (level, result)
        assert quantile(high - 0.01) <= result["high"] <= quantile(high + 0.01), (level, result)
        width = quantile(high) - quantile(low)  # the check is tight: each end within 10%
        assert max(quantile(q + 0.01) - quantile(q - 0.01) for q in (low, high)) < 0.1 * width


def test_bootstrap_interval_covers_the_population_ratio_about_95_percent_of_the_time():
    """Catches: an interval too narrow or off-centre for the ratio of sums (per-window ratios
    averaged, resamples of fewer windows, the wrong level's quantiles).

    Windows of 10..100 tokens where A saves 2 nats a window whatever its length, so the
    per-token saving, -2 / E[tokens], is a property of the population and not of any window;
    the 95% interval from 40 windows must cover expm1(-2 / 55) in 90-99% of 200 samples."""
    truth = math.expm1(-2.0 / 55.0)
    covered = 0
    for rep in range(200):
        rng = np.random.default_rng(1000 + rep)
        tokens = rng.integers(10, 101, size=40).astype(float)
        nll_b = tokens * 4.0 + rng.normal(0.0, 8.0, size=40)
        nll_a = nll_b - 2.0 + rng.normal(0.0, 1.5, size=40)
        result = paired_bootstrap(nll_a, nll_b, tokens, resamples=400, seed=rep)
        covered += result["low"] <= truth <= result["high"]
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_bootstrap_is_reproducible_from_its_seed():
    """Catches: a bootstrap that ignores its seed (a fresh or the global random state), so a
    reported interval cannot be reproduced, or one that ignores the seed in favour of a
    fixed one (every seed the same interval)."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(20, 64, size=30).astype(float)
    nll_b = tokens * 4.0 + rng.normal(0.0, 6.0, size=30)
    nll_a = nll_b - 0.03 * tokens + rng.normal(0.0, 3.0, size=30)
    np.random.seed(0)
    first = paired_bootstrap(nll_a, nll_b, tokens, resamples=300, seed=11)
    np.random.seed(1)
    again = paired_bootstrap(nll_a, nll_b, tokens, resamples=300, seed=11)
    other = paired_bootstrap(nll_a, nll_b, tokens, resamples=300, seed=12)
    assert first == again
    assert (first["low"], first["high"]) != (other["low"], other["high"])


# --- FLOPs ------------------------------------------------------------------------------------

# One shape for the hand count: vocabulary 11, context 8, width 8, 2 layers, MLP 24 wide,
# 2 latent slots of 4 dimensions per layer; window 3 or the full context.
SHAPE = dict(vocab_size=11, context=8, d_model=8, n_layers=2, n_heads=2, latents_per_layer=2,
             latent_dim=4, mlp_hidden=24)


def _keys_seen(window: int | None) -> list[int]:
    """How many of the 8 positions each query's output depends on, in a one-layer decoder of
    this window: changing token j changes the output at i exactly when i attends to j."""
    decoder = Decoder(ModelConfig(**{**SHAPE, "n_layers": 1, "latents_per_layer": 0},
                                  window=window))
    tokens = torch.arange(8)[None]
    with torch.no_grad():
        base = decoder(tokens)[0]
        changed = torch.stack([(decoder(tokens.index_fill(1, torch.tensor([j]), 10))[0] != base
                                ).any(-1) for j in range(8)], dim=1)  # [query, key]
    return changed.sum(1).tolist()


def test_flops_by_hand_for_a_windowed_and_a_full_context_ltm():
    """Catches: a FLOP count that ignores the decoder's attention window, an off-by-one in
    the keys a query sees, a missing or doubled weight matrix (MLP, projections, LM head),
    latent keys/values counted per token instead of per sequence, a backward pass that is
    not 2 forwards (1 in the fast loop), and inner steps left out.

    Matrix-multiply FLOPs per token of a forward, 2 per multiply-add, term by term (the
    embedding is a lookup, no FLOPs; the LM head is tied to it but still a d x V product):"""
    d, hidden, vocab, context, slots, z_dim, layers = 8, 24, 11, 8, 2, 4, 2
    lm_head = 2 * d * vocab                             # 176
    projections = 4 * (2 * d * d)                       # q, k, v, o: 512
    mlp = 3 * (2 * d * hidden)                          # SwiGLU w1, w3, w2: 1152
    cross_projections = 2 * (2 * d * d)                 # cross-attention q, o: 256
    cross_scores = 2 * d * slots + 2 * d * slots        # q.k and weights x values: 64
    latent_kv = slots * 2 * (2 * z_dim * d) / context   # k, v of each slot, once a sequence: 32
    # Keys each of the 8 queries sees: causal within a window of 3 (itself and the 2 before),
    # or the whole prefix.
    keys = {3: [1, 2, 3, 3, 3, 3, 3, 3], None: [1, 2, 3, 4, 5, 6, 7, 8]}
    forward = {}
    for window, seen in keys.items():
        scores = 2 * d * sum(seen) / context + 2 * d * sum(seen) / context  # 84 or 144
        per_layer = projections + scores + cross_projections + cross_scores + latent_kv + mlp
        forward[window] = layers * per_layer + lm_head
    assert forward == {3: 4376, None: 4496}  # the arithmetic above, done once by hand

    steps = 3
    for window in (3, None):
        config = ModelConfig(**SHAPE, window=window)
        assert _keys_seen(window) == keys[window]  # as the decoder really attends
        assert forward_flops_per_token(config) == pytest.approx(forward[window], rel=1e-12)
        # Each inner step: a forward and an input-gradient backward (1 forward); the slow
        # step: a forward and a full backward (2 forwards). "trajectory" does T + 1 full steps.
        assert training_flops_per_token(config, steps) == pytest.approx(
            (steps * (1 + 1) + (1 + 2)) * forward[window], rel=1e-12)
        assert training_flops_per_token(config, steps, "trajectory") == pytest.approx(
            (steps + 1) * (1 + 2) * forward[window], rel=1e-12)
        assert fit_flops_per_token(config, steps) == pytest.approx(
            steps * 2 * forward[window], rel=1e-12)
    windowed = forward_flops_per_token(ModelConfig(**SHAPE, window=3))
    full = forward_flops_per_token(ModelConfig(**SHAPE, window=None))
    assert full - windowed == pytest.approx(layers * 4 * d * (36 - 21) / context, rel=1e-12)


def test_flops_by_hand_for_the_baselines():
    """Catches: the AR baseline charged for cross-attention or not for its window, the MDLM
    denoiser counted as causal (each of its context + 1 positions sees all context + 1 keys),
    its mask token's LM-head row left out, or its cost not spread over the context tokens it
    predicts; and a baseline step that is not forward + 2-forward backward."""
    d, hidden, vocab, context, layers = 8, 24, 11, 8, 2
    ar_layer = 4 * (2 * d * d) + 4 * d * (1 + 2 + 3 * 6) / context + 3 * (2 * d * hidden)
    ar = ModelConfig(**{**SHAPE, "latents_per_layer": 0}, window=3)
    ar_forward = layers * ar_layer + 2 * d * vocab  # 3672: no cross-attention, no latents
    assert forward_flops_per_token(ar) == pytest.approx(ar_forward)
    assert training_flops_per_token(ar, 16) == pytest.approx(3 * ar_forward)  # T is not used
    mdlm = ModelConfig(**{**SHAPE, "latents_per_layer": 0}, window=None, bidirectional=True)
    mdlm_layer = 4 * (2 * d * d) + 4 * d * (context + 1) + 3 * (2 * d * hidden)  # 1952
    mdlm_forward = layers * mdlm_layer + 2 * d * (vocab + 1)  # per position: 4096
    assert forward_flops_per_token(mdlm) == pytest.approx(mdlm_forward)
    # A step runs the 9 positions of a window and predicts its 8 tokens.
    assert training_flops_per_token(mdlm, 16) == pytest.approx(
        3 * mdlm_forward * (context + 1) / context)
    assert training_flops_per_token(mdlm, 16) == pytest.approx(13824)


@pytest.mark.parametrize("layers", [1, 2])
def test_encoder_flops_match_the_matrix_multiplies_the_encoder_does(layers):
    """Catches: an encoder FLOP count whose weights are not the encoder's (a block's
    projections or MLP, the pooling's projections, the head) or whose attention sees another
    number of keys: the linear products of one real forward (counted by torch's FLOP counter,
    layer by layer as they run) plus the attention scores and weighted sums counted by hand
    (4 d per query and key: every one of the window's context + 1 positions in each block,
    every slot's query in the pooling) give the count per position."""
    from torch.utils.flop_counter import FlopCounterMode

    from ltm_pyro.amortised import Encoder
    from ltm_pyro.config import InferenceConfig
    from ltm_pyro.flops import encoder_flops_per_token

    config = ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=2, context=12,
                         latents_per_layer=3, latent_dim=4)
    inference = InferenceConfig(encoder_layers=layers)
    windows, positions, d = 3, config.context + 1, config.d_model
    tokens = torch.randint(0, 50, (windows, positions), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:  # counts the linear layers' products
        Encoder(config, inference)(tokens, torch.ones(windows, config.context))
    attention = windows * 4 * d * positions * (layers * positions + config.n_latents)
    total = counter.get_total_flops() + attention
    assert encoder_flops_per_token(config, inference) * windows * positions == pytest.approx(
        total, rel=1e-12)
    assert fit_flops_per_token(config, 2, inference) == pytest.approx(
        2 * 2 * forward_flops_per_token(config) + total / windows / positions, rel=1e-12)


def test_a_model_without_latents_has_no_fit_to_pay_for():
    ar = ModelConfig(**{**SHAPE, "latents_per_layer": 0})
    assert fit_flops_per_token(ar, 16) == 0.0


@pytest.mark.parametrize("window", [3, None])
def test_flops_match_the_matrix_multiplies_the_decoder_does(window):
    """Catches: a FLOP count whose weight matrices are not the decoder's (a projection or MLP
    matrix missing, the LM head left out, latent projections per token): the products of
    one real forward of a sequence, 2 x rows x in x out for every linear layer as it is
    called, plus the attention scores and weighted sums (in scaled_dot_product_attention,
    their keys set by the window), must give the count per token."""
    config = ModelConfig(**SHAPE, window=window)
    decoder = Decoder(config)
    flops = []

    def count(layer: torch.nn.Linear, inputs: tuple, _output: torch.Tensor) -> None:
        flops.append(2 * inputs[0].numel() * layer.out_features)

    for layer in decoder.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_hook(count)
    tokens = torch.randint(0, 11, (1, 8), generator=torch.Generator().manual_seed(0))
    z = torch.randn(1, config.n_latents, config.z_dim)
    with torch.no_grad():
        decoder(tokens, z)
    assert len(flops) == config.n_layers * (4 + 4 + 3) + 1  # every linear layer ran once
    matmuls = sum(flops) / config.context
    d, keys = config.d_model, (1 + 2 + 3 * 6 if window else 36) / config.context
    attention = config.n_layers * (4 * d * keys + 4 * d * config.latents_per_layer)
    assert forward_flops_per_token(config) == pytest.approx(matmuls + attention, rel=1e-12)
