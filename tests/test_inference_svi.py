import copy
import os
import sys
from dataclasses import replace

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from ltm_pyro.bounds import expected_nll_and_kl
from ltm_pyro.config import InferenceConfig, TrainConfig
from ltm_pyro.decoder import Decoder
from ltm_pyro.inference import fast_lr, fit_local_posterior, initial_posterior
from ltm_pyro.model import LatentThoughtModel, LocalPosterior
from ltm_pyro.objective import SyncFreeMeanFieldELBO
from ltm_pyro.svi import DualRateSVI, warmup_cosine

from .conftest import micro_config


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[name]) for name, p in module.named_parameters())


def test_fast_lr_schedule_runs_from_max_to_min():
    config = InferenceConfig(steps=16)
    lrs = [fast_lr(t, 16, config) for t in range(16)]
    assert lrs[0] == pytest.approx(0.34) and lrs[-1] == pytest.approx(0.034)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert fast_lr(0, 1, config) == pytest.approx(0.34)  # one inner step: the peak rate


def test_initial_posterior_as_released(ltm):
    start = initial_posterior(ltm, 3, torch.device("cpu"), InferenceConfig())
    assert torch.all(start.loc == 0) and torch.all(start.log_var == -5.0)


@pytest.mark.parametrize("noise", ["fixed", "fresh"])
def test_fast_loop_lowers_every_sequences_negative_elbo(ltm, batch, noise):
    tokens, mask = batch
    config = InferenceConfig(steps=12, noise=noise)
    fit = fit_local_posterior(ltm, tokens, mask, config, torch.Generator().manual_seed(3))
    start = initial_posterior(ltm, 5, torch.device("cpu"), config)
    draws = torch.randn(64, 5, *ltm.latent_shape, generator=torch.Generator().manual_seed(4))

    def expected_neg_elbo(posterior: LocalPosterior) -> torch.Tensor:
        with torch.no_grad():
            terms = [sum(ltm.elbo_terms(tokens, mask, posterior, e)) for e in draws]
        return torch.stack(terms).mean(0)

    before, after = expected_neg_elbo(start), expected_neg_elbo(fit.posterior)
    assert torch.all(after < before), (before, after)


@pytest.mark.parametrize("trajectory", [False, True])
def test_final_mode_freezes_the_decoder_during_the_inner_steps(ltm, batch, inference, trajectory):
    """In ``final`` mode no decoder weight takes part in autograd during the inner steps (no
    weight-gradient work, no activations kept for it); ``trajectory`` needs them."""
    tokens, mask = batch
    seen = []
    hook = ltm.decoder.register_forward_pre_hook(
        lambda module, args: seen.append([p.requires_grad for p in module.parameters()]))
    fit_local_posterior(ltm, tokens, mask, inference, accumulate_decoder_grads=trajectory)
    hook.remove()
    assert len(seen) == inference.steps
    assert all(all(flags) if trajectory else not any(flags) for flags in seen)
    assert all(p.grad is None for p in ltm.decoder.parameters()) != trajectory


def test_only_the_slow_optimizer_changes_the_decoder(ltm, batch, inference):
    tokens, mask = batch
    svi = DualRateSVI(ltm, inference, TrainConfig(max_steps=10, warmup_steps=1))
    slow_params = {id(p) for g in svi.optimizer.param_groups for p in g["params"]}
    assert slow_params == {id(p) for p in ltm.decoder.parameters()}
    before = _snapshot(ltm.decoder)
    svi.step(tokens, mask)
    assert not _unchanged(ltm.decoder, before)


def test_trajectory_mode_decoder_gradient_is_the_sum_over_inner_steps(ltm, batch, inference):
    tokens, mask = batch
    before = _snapshot(ltm.decoder)
    fit_local_posterior(ltm, tokens, mask, inference, torch.Generator().manual_seed(5),
                        accumulate_decoder_grads=True)
    assert _unchanged(ltm.decoder, before)  # the fast optimizer owns (loc, log_var) only
    accumulated = [p.grad.clone() for p in ltm.decoder.parameters()]

    # The same trajectory, written out: at each step the decoder gradient of that step's loss.
    params = list(ltm.decoder.parameters())
    start = initial_posterior(ltm, 5, torch.device("cpu"), inference)
    loc, log_var = start.loc.requires_grad_(), start.log_var.requires_grad_()
    noise = torch.randn(loc.shape, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.AdamW([loc, log_var], lr=inference.lr_max, weight_decay=0.0,
                                  betas=inference.betas)
    direct = [torch.zeros_like(p) for p in params]
    elbo = TraceMeanField_ELBO(max_plate_nesting=1)
    for step in range(inference.steps):
        loss = elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask,
                                        LocalPosterior(loc, log_var), noise) / mask.sum()
        grads = torch.autograd.grad(loss, params + [loc, log_var])
        direct = [d + g for d, g in zip(direct, grads[:len(params)])]
        loc.grad, log_var.grad = grads[len(params):]
        optimizer.param_groups[0]["lr"] = fast_lr(step, inference.steps, inference)
        optimizer.step()
    for a, d in zip(accumulated, direct):
        assert torch.allclose(a, d, rtol=1e-4, atol=1e-7)


def test_trajectory_step_adds_the_final_gradient(ltm, batch, inference):
    """The slow step's gradient = inner-trajectory gradients + the final posterior's."""
    tokens, mask = batch
    twin = type(ltm)(copy.deepcopy(ltm.decoder))
    fit = fit_local_posterior(twin, tokens, mask, inference, torch.Generator().manual_seed(6),
                              accumulate_decoder_grads=True)
    nll, kl = twin.elbo_terms(tokens, mask, fit.posterior, fit.noise)
    ((nll.sum() + kl.sum()) / mask.sum()).backward()
    expected = [p.grad for p in twin.decoder.parameters()]

    train = TrainConfig(max_steps=10, warmup_steps=1, decoder_grads="trajectory", grad_clip=1e9)
    DualRateSVI(ltm, inference, train, torch.Generator().manual_seed(6)).step(tokens, mask)
    for p, e in zip(ltm.decoder.parameters(), expected):
        assert torch.allclose(p.grad, e, rtol=1e-4, atol=1e-7)


def test_slow_schedule_warms_up_then_decays():
    config = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert warmup_cosine(0, config) == pytest.approx(1e-4)
    assert warmup_cosine(9, config) == pytest.approx(1e-3)
    assert warmup_cosine(99, config) == pytest.approx(1e-4, rel=1e-2)


@pytest.mark.parametrize("particles", [1, 4])
@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_sync_free_elbo_matches_pyro_without_validation(batch, kl_weight, particles):
    """Loss and gradients equal Pyro's; with K particles both average over them (the noise is
    given, so each particle is the same draw)."""
    tokens, mask = batch
    ltm = LatentThoughtModel(Decoder(micro_config()))
    start = initial_posterior(ltm, tokens.shape[0], tokens.device, InferenceConfig(
        init_log_var=-1.0))
    loc = (start.loc + 0.3 * torch.randn_like(start.loc)).requires_grad_()
    log_var = start.log_var.clone().requires_grad_()
    noise = torch.randn_like(loc)
    results = []
    with pyro.validation_enabled(False):
        for elbo in (TraceMeanField_ELBO(num_particles=particles, max_plate_nesting=1),
                     SyncFreeMeanFieldELBO(num_particles=particles, max_plate_nesting=1)):
            loss = elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask,
                                            LocalPosterior(loc, log_var), noise, kl_weight)
            results.append((loss, *torch.autograd.grad(loss, [loc, log_var])))
    for pyro_value, ours in zip(*results):
        torch.testing.assert_close(ours, pyro_value)


@pytest.mark.parametrize("noise", ["fixed", "fresh"])
def test_inner_loop_never_reads_a_tensor_back_to_the_host(ltm, batch, monkeypatch, noise):
    """As training runs it (Pyro's checks off), the fast loop turns no tensor into a Python
    value: on a GPU each such read is a pipeline stall at every inner step. (The optimizer's
    own step counters are exempt: torch keeps them on the host, even on a GPU.)"""
    tokens, mask = batch
    reads = []

    def spy(name):  # noqa: ANN001, ANN202
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            caller = sys._getframe(1).f_code.co_filename
            if f"torch{os.sep}optim{os.sep}" not in caller:
                reads.append(f"{name} in {caller}")
            return original(self, *args, **kwargs)
        return read

    config = InferenceConfig(steps=3, noise=noise)
    with pyro.validation_enabled(TrainConfig().validate):
        for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, spy(name))
        fit_local_posterior(ltm, tokens, mask, config, torch.Generator().manual_seed(0))
        monkeypatch.undo()
    assert reads == []


def test_inner_loop_leaves_decoder_trainable_and_without_grads(ltm, batch, inference):
    tokens, mask = batch
    fit_local_posterior(ltm, tokens, mask, inference)
    assert all(p.requires_grad and p.grad is None for p in ltm.decoder.parameters())


def test_trace_elbo_gives_the_same_expected_loss(ltm, batch):
    """Pyro's ``Trace_ELBO`` (a Monte-Carlo KL at the draw) and the sync-free mean-field ELBO
    (analytic KL) agree in expectation, KL weight included, so either can drive the loop."""
    tokens, mask = batch
    g = torch.Generator().manual_seed(3)
    shape = (tokens.shape[0], *ltm.latent_shape)
    local = LocalPosterior(0.7 * torch.randn(shape, generator=g),
                           torch.full(shape, -1.0) + 0.3 * torch.randn(shape, generator=g))
    differences = []
    with torch.no_grad():
        for _ in range(300):
            noise = torch.randn(shape, generator=g)
            losses = [elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask, local, noise,
                                               0.5)
                      for elbo in (Trace_ELBO(max_plate_nesting=1),
                                   SyncFreeMeanFieldELBO(max_plate_nesting=1))]
            differences.append(float(losses[0] - losses[1]))
    differences = torch.tensor(differences, dtype=torch.float64)
    stderr = differences.std() / len(differences) ** 0.5
    assert differences.std() > 0.1  # the Monte-Carlo KL does vary from draw to draw
    assert abs(differences.mean()) < 4 * stderr


def test_the_fast_loop_uses_the_objective_it_is_given(ltm, batch, inference, monkeypatch):
    """``DualRateSVI(elbo=...)`` reaches every inner step; ``Trace_ELBO`` fits q as well."""
    tokens, mask = batch
    calls = []

    class Counted(Trace_ELBO):
        def differentiable_loss(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(args[-1])  # the KL weight
            return super().differentiable_loss(*args, **kwargs)

    train = TrainConfig(max_steps=10, warmup_steps=1, kl_warmup_steps=4)
    svi = DualRateSVI(ltm, inference, train, torch.Generator().manual_seed(6),
                      elbo=Counted(max_plate_nesting=1))
    svi.step(tokens, mask)
    assert calls == [0.25] * inference.steps

    def neg_elbo(steps: int, **objective) -> torch.Tensor:  # noqa: ANN003
        fit = fit_local_posterior(ltm, tokens, mask, replace(inference, steps=steps),
                                  torch.Generator().manual_seed(4), **objective)
        nll, kl = expected_nll_and_kl(ltm, tokens, mask, fit.posterior, 64,
                                      torch.Generator().manual_seed(5))
        return (nll + kl).sum()

    assert neg_elbo(30, elbo=Trace_ELBO(max_plate_nesting=1)) < neg_elbo(0)
