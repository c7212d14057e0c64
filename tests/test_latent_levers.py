"""Levers against posterior collapse: free bits (training objective only) and a start that
breaks the symmetry between a layer's slots (docs/latent-diagnostics.md, "Levers")."""

import pytest
import torch

from ltm_pyro import svi as svi_module
from ltm_pyro.bounds import ScoringConfig, evaluate_windows
from ltm_pyro.cli import OneLineParser, add_run_arguments, config_from_args
from ltm_pyro.config import InferenceConfig, TrainConfig, preset
from ltm_pyro.errors import UsageError
from ltm_pyro.inference import (
    FreeBitsMeanFieldELBO,
    SyncFreeMeanFieldELBO,
    fit_local_posterior,
    initial_posterior,
    slot_offsets,
)
from ltm_pyro.latent_use import kl_per_slot
from ltm_pyro.model import LocalPosterior
from ltm_pyro.svi import DualRateSVI


def _posterior(ltm, batch: int, seed: int = 7) -> LocalPosterior:
    """Slots 0-1 (layer 0) near the prior, slots 2-3 (layer 1) far from it."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *ltm.latent_shape)
    assert ltm.latent_shape[0] == 4
    spread = torch.tensor([0.02, 0.05, 1.0, 1.5])[:, None]
    loc = torch.randn(shape, generator=g) * spread
    log_var = torch.randn(shape, generator=g) * torch.tensor([0.02, 0.02, 0.5, 0.5])[:, None]
    return LocalPosterior(loc, log_var - torch.tensor([0.0, 0.0, 0.5, 0.5])[:, None])


@pytest.mark.parametrize("group", ["slot", "layer"])
@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_free_bits_loss_is_nll_plus_clamped_kl(ltm, batch, group, kl_weight):
    tokens, mask = batch
    local = _posterior(ltm, tokens.shape[0])
    noise = torch.randn(tokens.shape[0], *ltm.latent_shape,
                        generator=torch.Generator().manual_seed(2))
    free_bits = 0.8
    loss = FreeBitsMeanFieldELBO(free_bits, group, ltm.config.n_layers, max_plate_nesting=1
                                 ).differentiable_loss(ltm.model, ltm.guide, tokens, mask, local,
                                                       noise, kl_weight)
    nll, _ = ltm.elbo_terms(tokens, mask, local, noise)
    per_group = kl_per_slot(local)  # [B, N_z], written out: 0.5 (var + mu^2 - 1 - log var)
    if group == "layer":
        per_group = per_group.unflatten(-1, (ltm.config.n_layers, -1)).sum(-1)
    # the constructed posterior has groups on both sides of the floor
    assert bool((per_group < free_bits).any()) and bool((per_group > free_bits).any())
    expected = nll.sum() + kl_weight * torch.maximum(per_group, torch.tensor(free_bits)).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    # zero free bits is the plain mean-field ELBO
    plain = SyncFreeMeanFieldELBO(max_plate_nesting=1).differentiable_loss(
        ltm.model, ltm.guide, tokens, mask, local, noise, kl_weight)
    zero = FreeBitsMeanFieldELBO(0.0, group, ltm.config.n_layers, max_plate_nesting=1
                                 ).differentiable_loss(ltm.model, ltm.guide, tokens, mask, local,
                                                       noise, kl_weight)
    torch.testing.assert_close(zero, plain, rtol=1e-5, atol=1e-4)


def test_free_bits_floor_removes_the_kl_gradient_below_it(ltm, batch):
    tokens, mask = batch
    loc = torch.full((tokens.shape[0], *ltm.latent_shape), 0.05, requires_grad=True)
    log_var = torch.full_like(loc, -0.01).requires_grad_()
    noise = torch.zeros_like(loc)
    with torch.no_grad():
        assert float(kl_per_slot(LocalPosterior(loc, log_var)).max()) < 1.0
    free = FreeBitsMeanFieldELBO(1.0, "slot", ltm.config.n_layers, max_plate_nesting=1)
    loss = free.differentiable_loss(ltm.model, ltm.guide, tokens, mask,
                                    LocalPosterior(loc, log_var), noise)
    grad_loc, grad_log_var = torch.autograd.grad(loss, [loc, log_var])
    nll, _ = ltm.elbo_terms(tokens, mask, LocalPosterior(loc, log_var), noise)
    nll_loc, nll_log_var = torch.autograd.grad(nll.sum(), [loc, log_var])
    torch.testing.assert_close(grad_loc, nll_loc)
    torch.testing.assert_close(grad_log_var, nll_log_var)


def test_free_bits_change_the_training_fit_only(ltm, batch):
    tokens, mask = batch
    plain = InferenceConfig(steps=5, noise="fresh", init_log_var=-2.0)
    # the floor binds: each slot starts at ~18 nats (32 dims at log-var -2), below 50
    free = InferenceConfig(steps=5, noise="fresh", init_log_var=-2.0, free_bits=50.0)

    def fit(config, training):
        return fit_local_posterior(ltm, tokens, mask, config, torch.Generator().manual_seed(4),
                                   training=training).posterior

    assert torch.equal(fit(plain, True).loc, fit(plain, False).loc)
    assert torch.equal(fit(free, False).loc, fit(plain, False).loc)
    assert not torch.equal(fit(free, True).loc, fit(plain, True).loc)
    # evaluation fits and scores the full bound, whatever free_bits says
    windows = torch.randint(0, 23, (6, 13), generator=torch.Generator().manual_seed(9))
    with_free = evaluate_windows(ltm, windows, free,
                                 ScoringConfig(batch_size=3, iw_samples=2, latent_stats=True))
    without = evaluate_windows(ltm, windows, plain,
                               ScoringConfig(batch_size=3, iw_samples=2, latent_stats=True))
    assert with_free == without


def test_slow_step_fits_with_the_training_objective(ltm, batch, monkeypatch):
    tokens, mask = batch
    seen = []
    real = svi_module.fit_local_posterior

    def spy(*args, **kwargs):
        seen.append(kwargs.get("training"))
        return real(*args, **kwargs)

    monkeypatch.setattr(svi_module, "fit_local_posterior", spy)
    config = InferenceConfig(steps=2, free_bits=0.5)
    stats = DualRateSVI(ltm, config, TrainConfig(max_steps=2)).step(tokens, mask)
    assert seen == [True]
    assert torch.isfinite(stats.elbo)


def test_symmetry_breaking_start_gives_distinct_fixed_slots(ltm):
    config = InferenceConfig(init_log_var=-2.0, init_loc_scale=0.5)
    rng_before = torch.get_rng_state()
    start = initial_posterior(ltm, 3, torch.device("cpu"), config)
    assert torch.equal(torch.get_rng_state(), rng_before)  # never the global RNG
    expected = 0.5 * slot_offsets(ltm.latent_shape)
    for row in start.loc:
        torch.testing.assert_close(row, expected)  # the same offsets for every sequence
    flat = start.loc[0]
    n_slots = flat.shape[0]
    for i in range(n_slots):
        for j in range(i + 1, n_slots):
            assert not torch.allclose(flat[i], flat[j])
    torch.testing.assert_close(initial_posterior(ltm, 3, torch.device("cpu"), config).loc,
                               start.loc)
    assert torch.all(start.log_var == -2.0)
    # the default start is unchanged: every slot at 0
    assert torch.all(initial_posterior(ltm, 2, torch.device("cpu"), InferenceConfig()).loc == 0)


def test_levers_are_off_by_default_and_set_by_flags():
    """Off in the dataclass and every preset but ``tiny``, which is the latents study's
    recipe (prior start, 1 free nat per slot, offsets 0.5)."""
    for inference in [InferenceConfig()] + [preset(n).inference for n in ("tiny-v1", "small",
                                                                            "ltm-s")]:
        assert inference.free_bits == 0.0 and inference.init_loc_scale == 0.0
        assert inference.free_bits_group == "slot"
    tiny = preset("tiny").inference
    assert (tiny.init_log_var, tiny.free_bits, tiny.init_loc_scale) == (0.0, 1.0, 0.5)
    p = OneLineParser()
    add_run_arguments(p)
    config = config_from_args(p.parse_args(["--free-bits", "1.5", "--free-bits-group", "layer",
                                            "--init-loc-scale", "0.25"]))
    assert config.inference.free_bits == 1.5
    assert config.inference.free_bits_group == "layer"
    assert config.inference.init_loc_scale == 0.25
    with pytest.raises(SystemExit):
        p.parse_args(["--free-bits", "-1"])


@pytest.mark.parametrize("warmup", ["0", "50"])
def test_kl_cycles_need_a_warm_up_shorter_than_a_cycle(warmup):
    p = OneLineParser()
    add_run_arguments(p)
    good = config_from_args(p.parse_args(["--max-steps", "100", "--kl-cycles", "4",
                                          "--kl-warmup-steps", "12"]))
    assert (good.train.kl_cycles, good.train.kl_warmup_steps) == (4, 12)
    assert "KL warm-up 12 in each of 4 cycles" in good.summary()
    with pytest.raises(UsageError, match="between 1 and 24"):
        config_from_args(p.parse_args(["--max-steps", "100", "--kl-cycles", "4",
                                       "--kl-warmup-steps", warmup]))

