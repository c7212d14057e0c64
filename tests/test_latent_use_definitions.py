"""ltm_pyro.latent_use against its definitions (issue 43), on planted cases whose answer is known.

Every expected value here is computed independently of the code under test: in closed form
(the MI of a Gaussian channel, the singular values of a planted slot mixture), by quadrature (the
MI of a few 1-D posteriors), or with numpy (the held-out least squares). tests/test_latent_use.py
holds the end-to-end and discrete-factor cases; this file holds the definition checks, each
with the bug it catches in its docstring (the changes are listed in tests/mutants/listed.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ltm_pyro.latent_use import (
    active_units,
    latent_use_summary,
    mutual_information,
    slot_correlation_matrices,
    slot_linear_r2,
    slot_similarity,
)
from ltm_pyro.model import LocalPosterior
from ltm_pyro.studies.latents import probe

# ---------------------------------------------------------------- mutual information

# Per coordinate: q(z|x) = N(mu_x, s^2), mu_x ~ N(0, t^2). The aggregate posterior is
# N(0, s^2 + t^2), not the prior, and I(x; z) = sum 0.5 log(1 + t^2 / s^2) = log 2 + log 2 + 0
# + 0.5 log 5 nats (the third coordinate is wide and never moves: it carries nothing, but pays
# KL). E_x KL(q(z|x) || N(0, I)), what the prior in place of the aggregate would give, is 4.83.
S2 = torch.tensor([0.25, 1.0, 4.0, 0.01], dtype=torch.float64)
T2 = torch.tensor([0.75, 3.0, 0.0, 0.04], dtype=torch.float64)


def _gaussian_channel(n: int, seed: int) -> LocalPosterior:
    generator = torch.Generator().manual_seed(seed)
    loc = T2.sqrt() * torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return LocalPosterior(loc.view(n, 2, 2), S2.log().expand(n, 4).reshape(n, 2, 2))


def test_mi_of_a_multivariate_gaussian_channel_is_its_closed_form():
    """Catches: a mixture without its 1/N (log-sum-exp not normalised), the mixture divided
    by the number of draws instead of windows, the prior in place of the aggregate posterior,
    a log-density without its log-variance, draws at the wrong scale."""
    mi_exact = float(0.5 * torch.log1p(T2 / S2).sum())
    kl_prior = float(0.5 * (S2 + T2 - 1 - S2.log()).sum())
    assert mi_exact == pytest.approx(2 * math.log(2) + 0.5 * math.log(5))
    assert kl_prior - mi_exact > 2  # what the prior would give instead is far off
    n = 1500
    mi = mutual_information(_gaussian_channel(n, 0), samples=4,
                            generator=torch.Generator().manual_seed(1))
    assert mi.cap == pytest.approx(math.log(n)) and mi.windows == n
    # MI well below log N = 7.3: the InfoNCE bias is negligible next to 4 standard errors
    assert mi.estimate == pytest.approx(mi_exact, abs=0.1)
    assert mi.stderr < 0.035  # 0.028 here


def test_mi_stderr_is_the_spread_of_the_estimate_over_fresh_windows():
    """The reported standard error matches the standard deviation of the estimate over
    independent draws of the N windows and their z.
    Catches: a standard error without the 1/sqrt(N), or divided by N."""
    n, replicates = 300, 40
    estimates, stderrs = [], []
    for seed in range(replicates):
        mi = mutual_information(_gaussian_channel(n, 100 + seed), samples=4,
                                generator=torch.Generator().manual_seed(seed))
        estimates.append(mi.estimate)
        stderrs.append(mi.stderr)
    spread = float(np.std(estimates, ddof=1))
    assert 0.6 < float(np.mean(stderrs)) / spread < 1.6


def test_mi_of_identical_posteriors_is_zero():
    """Every window has the same q (away from the prior, so the KL is large): the aggregate
    is that q and every term is 0 exactly.
    Catches: the prior in place of the aggregate (gives the KL), an unnormalised mixture
    (gives -log N), the own log-density and the mixture's with different constants."""
    n = 50
    loc = torch.tensor([3.0, -1.0, 0.5]).expand(n, 2, 3).clone()
    log_var = torch.tensor([-1.0, 0.5, -3.0]).expand(n, 2, 3).clone()
    mi = mutual_information(LocalPosterior(loc, log_var), samples=3,
                            generator=torch.Generator().manual_seed(0))
    assert mi.estimate == pytest.approx(0.0, abs=1e-9)
    assert mi.stderr == pytest.approx(0.0, abs=1e-9)
    assert mi.cap == pytest.approx(math.log(n))


def test_mi_of_a_few_1d_posteriors_matches_quadrature():
    """Five 1-D posteriors with different means and variances (two share a mean and differ
    only in width): the estimate is the exact MI of their empirical distribution,
    (1/N) sum_n int q_n log(q_n / mean_m q_m) dz, here computed by quadrature on a grid.
    Catches: one variance (the mean log-variance) for every component of the mixture, the
    precision taken as the variance, a log-density without its log-variance term."""
    means = torch.tensor([-1.0, 0.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    variances = torch.tensor([0.02, 1.0, 9.0, 0.1, 0.5], dtype=torch.float64)
    grid = torch.linspace(-20, 20, 80001, dtype=torch.float64)
    log_q = (-0.5 * (grid - means[:, None]) ** 2 / variances[:, None]
             - 0.5 * torch.log(2 * math.pi * variances[:, None]))  # [N, grid]
    log_mix = torch.logsumexp(log_q, 0) - math.log(5)
    exact = float(torch.trapezoid(log_q.exp() * (log_q - log_mix), grid, dim=1).mean())
    assert 0.5 < exact < math.log(5) - 0.3  # well inside (0, log N): overlapping posteriors
    posterior = LocalPosterior(means.view(5, 1, 1), variances.log().view(5, 1, 1))
    mi = mutual_information(posterior, samples=20000, generator=torch.Generator().manual_seed(0))
    assert mi.estimate == pytest.approx(exact, abs=0.015)  # Monte-Carlo sd about 0.003


# ---------------------------------------------------------------- active units


def test_active_units_are_the_coordinates_whose_mean_varies_above_the_threshold():
    """Planted per-coordinate variances of the posterior mean over windows: 0.05 (active),
    0.001 (inactive, though its standard deviation 0.03 exceeds 0.01), 0 around an offset of
    5 (inactive), and 0.05 around an offset of -3 (active).
    Catches: the standard deviation compared with the threshold, the mean square instead of
    the variance (an offset taken for use), the variance over coordinates not windows."""
    n = 400
    signs = torch.tensor([1.0, -1.0]).repeat(n // 2)  # unbiased variance n / (n - 1)
    planted = torch.tensor([0.05, 0.001, 0.0, 0.05]) * (n - 1) / n
    offsets = torch.tensor([0.0, 0.0, 5.0, -3.0])
    loc = (offsets + planted.sqrt() * signs[:, None]).view(n, 2, 2)
    assert torch.allclose(loc.flatten(1).var(0), torch.tensor([0.05, 0.001, 0.0, 0.05]))
    mask = active_units(loc)
    assert mask.tolist() == [[True, False], [False, True]]
    summary = latent_use_summary(LocalPosterior(loc, torch.zeros_like(loc)), 1, n)
    assert summary["active_units"] == 2 and summary["active_units_total"] == 4


# ---------------------------------------------------------------- slot statistics


def _orthonormal_centred(n: int, d: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` [n, d] float64 arrays, each coordinate centred over the n rows, orthonormal
    as flattened vectors (Gram-Schmidt by QR of the flattened columns)."""
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, d, count, generator=generator, dtype=torch.float64)
    raw = raw - raw.mean(0)
    q, _ = torch.linalg.qr(raw.reshape(n * d, count))
    return [q[:, i].reshape(n, d) for i in range(count)]


def _mixture_layer(n: int, d: int, seed: int) -> torch.Tensor:
    """[n, 3, d]: slots u0, u1 (orthogonal) and -(u0 + u1) / sqrt 2, each with a constant
    offset per coordinate and its own scale (neither carries information)."""
    u0, u1 = _orthonormal_centred(n, d, 2, seed)
    offsets = torch.arange(3 * d, dtype=torch.float64).view(3, d)
    slots = [3.0 * u0, 0.5 * u1, -7.0 * (u0 + u1) / math.sqrt(2)]
    return torch.stack(slots, 1) + offsets


def _effective_rank(singular: list[float]) -> float:
    p = [s / sum(singular) for s in singular if s > 0]
    return math.exp(-sum(x * math.log(x) for x in p))


def test_slot_correlation_and_rank_of_a_planted_mixture():
    """Slots u0, u1 and -(u0 + u1)/sqrt 2 with u0 orthogonal to u1: |correlations| 0, a, a
    with a = 1/sqrt 2, so the mean is 2a/3; the Gram matrix [[1,0,-a],[0,1,-a],[-a,-a,1]] has
    eigenvalues 2, 1, 0, so the singular values are sqrt 2, 1, 0 and the effective rank
    exp(H(sqrt 2, 1)/(1 + sqrt 2)) = 1.97, worked out by hand (not 3, not 1).
    Catches: a signed mean of correlations, the diagonal counted among the pairs, the means
    not centred (offsets taken for correlation), p from squared singular values (eigenvalues
    of the Gram matrix)."""
    a = 1 / math.sqrt(2)
    loc = _mixture_layer(50, 4, seed=0)
    correlation, rank = slot_similarity(loc, 1)
    assert correlation == pytest.approx(2 * a / 3, abs=1e-9)
    assert rank == pytest.approx(_effective_rank([math.sqrt(2), 1.0]), abs=1e-6)
    assert _effective_rank([math.sqrt(2), 1.0]) == pytest.approx(1.971, abs=1e-3)
    matrices = slot_correlation_matrices(loc, 1)
    expected = torch.tensor([[1, 0, a], [0, 1, a], [a, a, 1]], dtype=torch.float64)
    assert matrices.shape == (1, 3, 3)
    assert torch.allclose(matrices[0], expected, atol=1e-9)


def test_slot_statistics_of_two_layers_average_over_layers():
    """Layer 0 the planted mixture (2a/3, rank 1.97), layer 1 three orthonormal slots
    (correlation 0, rank 3): the statistics are the means over the two layers.
    Catches: slots grouped across layers, a statistic of the first layer only."""
    a = 1 / math.sqrt(2)
    independent = torch.stack(_orthonormal_centred(50, 4, 3, seed=1), 1) + 2.0
    loc = torch.cat([_mixture_layer(50, 4, seed=0), independent], 1)
    correlation, rank = slot_similarity(loc, 2)
    assert correlation == pytest.approx((2 * a / 3 + 0) / 2, abs=1e-9)
    assert rank == pytest.approx((_effective_rank([math.sqrt(2), 1.0]) + 3) / 2, abs=1e-6)


def test_slots_that_never_move_are_masked():
    """Layer 0: a slot, a still slot (a constant plus wobbles of 1e-9, RMS far below the 1e-6
    floor) and a negated copy of the first. Its one pair of moving slots correlates at 1 and
    has rank 1; the still slot counts in neither and has NaN in its row and column of the
    matrices. Layer 1: one moving slot and two still ones, rank 1 and no pair; layer 2:
    nothing moves, it does not count.
    Catches: a still slot kept when its norm is not exactly 0 (its wobble normalised to a
    unit vector), the NaN mask of the matrices on rows only, a floor not scaled by the size."""
    n, d = 60, 3
    generator = torch.Generator().manual_seed(4)
    moving = torch.randn(n, d, generator=generator, dtype=torch.float64)
    other = torch.randn(n, d, generator=generator, dtype=torch.float64)

    def still() -> torch.Tensor:
        return 5.0 + 1e-9 * torch.randn(n, d, generator=generator, dtype=torch.float64)

    layer0 = torch.stack([moving, still(), -2 * moving + 1], 1)
    correlation, rank = slot_similarity(layer0, 1)
    assert correlation == pytest.approx(1.0, abs=1e-9)
    assert rank == pytest.approx(1.0, abs=1e-6)
    matrix = slot_correlation_matrices(layer0, 1)[0]
    nan = torch.isnan(matrix)
    assert nan[1].all() and nan[:, 1].all() and nan.sum() == 5
    assert matrix[0, 2] == pytest.approx(1.0, abs=1e-9)

    layer1 = torch.stack([still(), other, still()], 1)
    layer2 = torch.stack([still(), still(), still()], 1)
    correlation, rank = slot_similarity(torch.cat([layer1, layer2], 1), 2)
    assert correlation is None and rank == pytest.approx(1.0, abs=1e-9)
    correlation, rank = slot_similarity(torch.cat([layer0, layer1, layer2], 1), 3)
    assert correlation == pytest.approx(1.0, abs=1e-9)  # layer 0's pair alone
    assert rank == pytest.approx(1.0, abs=1e-6)  # layers 0 and 1; layer 2 does not count


# ---------------------------------------------------------------- slot_linear_r2


def _heldout_r2_numpy(source: np.ndarray, target: np.ndarray) -> float:
    """R^2 of the least-squares affine map from ``source`` to ``target`` fitted on the first
    half of the rows and scored on the other half (pooled over the target's dims)."""
    half = len(source) // 2
    design = np.hstack([source, np.ones((len(source), 1))])
    coef = np.linalg.lstsq(design[:half], target[:half], rcond=None)[0]
    residual = ((design[half:] @ coef - target[half:]) ** 2).sum()
    total = ((target[half:] - target[half:].mean(0)) ** 2).sum()
    return 1 - residual / total


def test_slot_linear_r2_of_affine_copies_is_one():
    """Each slot an invertible (not orthogonal) linear map of the first plus its own offset:
    every ordered pair is predicted exactly, R^2 = 1.
    Catches: a least-squares map without its intercept."""
    generator = torch.Generator().manual_seed(5)
    n, d = 40, 4
    base = torch.randn(n, d, generator=generator, dtype=torch.float64)
    maps = [torch.eye(d, dtype=torch.float64)] + [
        torch.randn(d, d, generator=generator, dtype=torch.float64) + 2 * torch.eye(d)
        for _ in range(2)]
    offsets = 10 * torch.randn(3, d, generator=generator, dtype=torch.float64)
    loc = torch.stack([base @ m + o for m, o in zip(maps, offsets)], 1)
    assert slot_linear_r2(loc, 1) == pytest.approx(1.0, abs=1e-9)


def test_slot_linear_r2_of_pure_noise_is_scored_on_held_out_windows():
    """Independent noise slots with d = 15 dims and 20 fitting windows: the map fitted on the
    windows it is scored on would explain most of the target (in-sample R^2 about 15/19, and
    about 0.4 on the half scored if the fit had seen it); held out it explains nothing, so
    every clamped score is 0.
    Catches: the map fitted on all windows, the map scored on the windows it was fitted on."""
    generator = torch.Generator().manual_seed(6)
    n, d = 40, 15
    loc = torch.randn(n, 2, d, generator=generator, dtype=torch.float64)
    x, y = loc[:, 0].numpy(), loc[:, 1].numpy()
    design = np.hstack([x, np.ones((n, 1))])
    in_sample = 1 - (((design @ np.linalg.lstsq(design, y, rcond=None)[0] - y) ** 2).sum()
                     / ((y - y.mean(0)) ** 2).sum())
    assert in_sample > 0.3  # what a fit on the scored windows would report
    assert _heldout_r2_numpy(x, y) < 0
    assert slot_linear_r2(loc, 1) == 0.0


def test_slot_linear_r2_pools_dims_and_averages_ordered_pairs():
    """Slot 1 = (slot 0's first coordinate, small noise) plus offsets: slot 1 from slot 0 is
    R^2 = 1 - 0.01/1.01 = 0.99 (pooled over its dims), slot 0 from slot 1 only 1/2 (its second
    coordinate is unpredictable); the layer's figure is their mean, 0.745 in population,
    and it equals the held-out least squares computed with numpy.
    Catches: unordered pairs only (0.99 or 0.5), per-dim R^2 averaged instead of pooled (0.5
    for slot 1 from slot 0), the target's total sum of squares about its global mean rather
    than each dim's."""
    generator = torch.Generator().manual_seed(7)
    n = 4000
    s0 = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    s1 = torch.stack([s0[:, 0], 0.1 * torch.randn(n, generator=generator,
                                                  dtype=torch.float64)], 1)
    loc = torch.stack([s0 + torch.tensor([3.0, -4.0]), s1 + torch.tensor([20.0, -20.0])], 1)
    population = (1 - 0.01 / 1.01 + 0.5) / 2
    got = slot_linear_r2(loc, 1)
    assert got == pytest.approx(population, abs=0.02)
    x, y = loc[:, 0].numpy(), loc[:, 1].numpy()
    by_numpy = (_heldout_r2_numpy(x, y) + _heldout_r2_numpy(y, x)) / 2
    assert got == pytest.approx(by_numpy, abs=1e-12)


def test_slot_linear_r2_is_bitwise_reproducible():
    """Issue 43 point 4: the same input gives the same bits on every call, wherever its
    memory lies (MKL's default least-squares driver, gelsy, does not: a same-seed run would
    not reproduce its own metrics), and the value is the numpy least squares' to rounding.
    Catches: the least squares back on the default driver."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 1, 16, generator=generator)
    loc = (base @ torch.randn(16, 16, generator=generator)
           + 0.5 * torch.randn(64, 8, 16, generator=generator))  # float32, as evaluated
    values = set()
    for i in range(40):
        buffer = torch.empty(loc.numel() + i)  # the same values at another address
        copy = buffer[i:i + loc.numel()].view(loc.shape)
        copy.copy_(loc)
        values.add(slot_linear_r2(copy, 2).hex())
    assert len(values) == 1
    per_layer = loc.double().numpy().reshape(64, 2, 4, 16)
    by_numpy = np.mean([max(0.0, _heldout_r2_numpy(per_layer[:, layer, s], per_layer[:, layer, t]))
                        for layer in range(2) for s in range(4) for t in range(4) if s != t])
    assert float.fromhex(values.pop()) == pytest.approx(float(by_numpy), abs=1e-12)


# ---------------------------------------------------------------- the held-out probe


def test_probe_scores_held_out_rows_only():
    """The latents study's linear probe (``ltm_pyro/studies/latents.py``) on pure-noise
    labels (4 classes) with more features than fitting rows: on its fitting rows it is right
    about every time, on fresh rows at chance. The probe reports chance.
    Catches: the probe scored on the rows it was fitted on."""
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(40, 60)), rng.normal(size=(400, 60))
    train_y, test_y = rng.integers(0, 4, 40), rng.integers(0, 4, 400)
    assert probe(train_x, train_y, train_x, train_y) > 0.9  # seen rows
    assert probe(train_x, train_y, test_x, test_y) < 0.4  # chance is 0.25
