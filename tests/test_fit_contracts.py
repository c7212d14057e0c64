"""Contracts of the fast loop (``ltm_pyro/inference.py``) and of the objective it minimises
(``ltm_pyro/objective.py``) that the behavioural tests leave unpinned.

The fast loop: the noise source a caller passes (a rank's ``Shard.randn`` under torchrun) also
draws the initial log-variance jitter; one inner step is a step; the inner optimizer uses the
configured betas and a two-step cosine ends at lr_min; ``normaliser`` sets the scale of the
decoder gradients the loop accumulates; a training fit applies free bits, grouped by layer
with the model's layer count. The objective: ``SyncFreeMeanFieldELBO`` scales and masks
every site as Pyro does, ``sequence_terms`` leaves them unscaled unless asked, keyword
arguments reach Pyro's checked loss, and ``FreeBitsMeanFieldELBO.latent_term`` is one figure
per sequence. The full mutation run (issue 20) let a change to each through; every test
names the change it catches. Each checks against a computation written out here (Adam's
first step, a hand-made KL), not against the code path it tests.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from ltm_pyro.bounds import ScoringConfig, evaluate_windows
from ltm_pyro.config import InferenceConfig
from ltm_pyro.decoder import Decoder
from ltm_pyro.inference import fast_lr, fit_local_posterior
from ltm_pyro.model import LatentThoughtModel, LocalPosterior
from ltm_pyro.objective import FreeBitsMeanFieldELBO, SyncFreeMeanFieldELBO, sequence_terms

from .conftest import micro_config


def _sharpened(scale: float = 0.3, **overrides) -> LatentThoughtModel:
    """Large random weights, so that z visibly changes the logits (at init it barely does)."""
    decoder = Decoder(micro_config(**overrides))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in decoder.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return LatentThoughtModel(decoder)


# --- the fast loop ------------------------------------------------------------------------


def test_the_noise_source_also_draws_the_initial_jitter(ltm, batch):
    """Catches: the caller's ``draw`` not passed on to the default start (the jitter then comes
    from ``torch.randn``, not this rank's slice), and the jitter subtracted instead of added."""
    tokens, mask = batch
    shapes = []

    def half(shape, generator, device):  # noqa: ANN001, ANN202
        shapes.append(tuple(shape))
        return torch.full(shape, 0.5, device=device)

    config = InferenceConfig(init_log_var=-5.0, init_log_var_jitter=0.1)
    fit = fit_local_posterior(ltm, tokens, mask, config, steps=0, draw=half)
    expected_shape = (tokens.shape[0], *ltm.latent_shape)
    assert shapes == [expected_shape, expected_shape]  # the jitter, then the noise
    torch.testing.assert_close(fit.posterior.log_var, torch.full(expected_shape, -4.95))
    assert torch.equal(fit.posterior.loc, torch.zeros(expected_shape))
    assert torch.equal(fit.noise, torch.full(expected_shape, 0.5))


def test_one_inner_step_is_adams_first_step_at_lr_max(batch):
    """Catches: a fit of one step returning its start unchanged (the early return taken at 1
    step instead of 0). Adam's first step moves each coordinate by lr * g / (|g| + eps), so
    loc (starting at 0, no weight decay) lands at -lr_max * sign(g)."""
    tokens, mask = batch
    ltm = _sharpened()
    config = InferenceConfig(steps=1, lr_max=0.3, init_log_var=-1.0)
    fit = fit_local_posterior(ltm, tokens, mask, config, torch.Generator().manual_seed(0))
    torch.testing.assert_close(fit.posterior.loc.abs(),
                               torch.full_like(fit.posterior.loc, 0.3), rtol=2e-3, atol=0)


def test_inner_steps_use_the_configured_betas_and_end_at_lr_min(batch):
    """Catches: the configured betas not reaching the inner AdamW (its defaults used instead),
    and a two-step cosine that stays at lr_max (``steps <= 2`` read as the one-step case).
    With betas (0, 0) every Adam step is lr * sign(g), so after the two steps (lr_max, then
    lr_min) each loc coordinate is lr_max +- lr_min away from 0."""
    tokens, mask = batch
    ltm = _sharpened()
    config = InferenceConfig(steps=2, lr_max=0.3, lr_min=0.1, betas=(0.0, 0.0),
                             init_log_var=-1.0)
    assert fast_lr(0, 2, config) == 0.3 and fast_lr(1, 2, config) == pytest.approx(0.1)
    fit = fit_local_posterior(ltm, tokens, mask, config, torch.Generator().manual_seed(0))
    moved = fit.posterior.loc.abs()
    near = torch.minimum((moved - 0.4).abs(), (moved - 0.2).abs())
    assert float(near.max()) < 1e-4, moved


def test_the_normaliser_sets_the_scale_of_accumulated_decoder_gradients(batch):
    """Catches: ``normaliser`` ignored (the per-token loss then always divided by this batch's
    own token count, so ranks under data parallelism would accumulate at the wrong scale)."""
    tokens, mask = batch
    ltm = _sharpened(scale=0.1)
    config = InferenceConfig(steps=1, init_log_var=-1.0)  # the gradient at the start alone
    grads = []
    for normaliser in (None, 4 * mask.sum()):
        for p in ltm.decoder.parameters():
            p.grad = None
        fit_local_posterior(ltm, tokens, mask, config, torch.Generator().manual_seed(0),
                            accumulate_decoder_grads=True, normaliser=normaliser)
        grads.append([p.grad.clone() for p in ltm.decoder.parameters()])
    for own, global_ in zip(*grads, strict=True):
        torch.testing.assert_close(global_, own / 4, rtol=1e-4, atol=1e-9)


def test_a_training_fit_applies_free_bits_per_layer_of_the_model(batch):
    """Catches: the training fit's objective built without the model's layer count (free bits
    then grouped over all slots as one layer, or not built at all) and free bits below one nat
    ignored (``free_bits > 1`` for ``> 0``). The default objective must fit exactly what the
    explicitly built one fits, and that must differ from the other groupings."""
    tokens, mask = batch
    ltm = _sharpened(scale=0.1)  # 2 layers of 2 slots
    # Slow steps from the prior: some groups' KL stays below the floor, the total rises above.
    config = InferenceConfig(steps=4, lr_max=0.02, lr_min=0.02, free_bits=0.25,
                             free_bits_group="layer", init_log_var=0.0)

    def fitted(**objective):  # noqa: ANN003, ANN202
        return fit_local_posterior(ltm, tokens, mask, config, torch.Generator().manual_seed(0),
                                   **objective).posterior.loc

    default = fitted(training=True)
    by_layer = fitted(elbo=FreeBitsMeanFieldELBO(0.25, "layer", 2, max_plate_nesting=1))
    one_group = fitted(elbo=FreeBitsMeanFieldELBO(0.25, "layer", 1, max_plate_nesting=1))
    plain = fitted(training=False)
    torch.testing.assert_close(default, by_layer, rtol=0, atol=1e-6)
    assert (default - one_group).abs().max() > 1e-3
    assert (default - plain).abs().max() > 1e-3


# --- the objective ------------------------------------------------------------------------


def _local(ltm: LatentThoughtModel, batch: int) -> tuple[LocalPosterior, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    shape = (batch, *ltm.latent_shape)
    local = LocalPosterior(0.7 * torch.randn(shape, generator=g),
                           torch.full(shape, -1.0) + 0.3 * torch.randn(shape, generator=g))
    return local, torch.randn(shape, generator=g)


def test_sync_free_loss_scales_and_masks_every_site_as_pyro_does(batch):
    """Catches: the likelihood's scale or mask, or the latent site's mask, left out of the
    sync-free surrogate (Pyro validation off), on a program whose sites all carry a scale and
    a per-sequence mask (``poutine.scale`` and ``poutine.mask`` around model and guide)."""
    tokens, mask = batch
    ltm = _sharpened()
    local, noise = _local(ltm, tokens.shape[0])
    keep = torch.tensor([True, False, True, True, False])

    def wrap(fn):  # noqa: ANN001, ANN202
        return poutine.scale(poutine.mask(fn, mask=keep), scale=0.7)

    args = (tokens, mask, local, noise, 0.5)
    reference = TraceMeanField_ELBO(max_plate_nesting=1).differentiable_loss(
        wrap(ltm.model), wrap(ltm.guide), *args)
    with pyro.validation_enabled(False):
        ours = SyncFreeMeanFieldELBO(max_plate_nesting=1).differentiable_loss(
            wrap(ltm.model), wrap(ltm.guide), *args)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)


def test_sequence_terms_are_unscaled_unless_asked(batch):
    """Catches: ``sequence_terms`` applying scale and mask by default, or always (to the
    likelihood or to the latent term): the figures the library reports are unweighted."""
    tokens, mask = batch
    ltm = _sharpened()
    local, noise = _local(ltm, tokens.shape[0])
    keep = torch.tensor([True, False, True, True, False])

    def traces(weighted: bool):  # noqa: ANN202
        model, guide = ltm.model, ltm.guide
        if weighted:
            model, guide = (poutine.scale(poutine.mask(fn, mask=keep), scale=0.7)
                            for fn in (model, guide))
        guide_trace = poutine.trace(guide).get_trace(tokens, mask, local, noise,
                                                     0.5 if weighted else 1.0)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            tokens, mask, local, noise, 0.5 if weighted else 1.0)
        return model_trace, guide_trace

    log_lik, kl = sequence_terms(*traces(weighted=False))
    plain_lik, plain_kl = sequence_terms(*traces(weighted=True))
    torch.testing.assert_close(plain_lik, log_lik)
    torch.testing.assert_close(plain_kl, kl)
    scaled_lik, scaled_kl = sequence_terms(*traces(weighted=True), scaled=True)
    torch.testing.assert_close(scaled_lik, 0.7 * log_lik * keep)
    torch.testing.assert_close(scaled_kl, 0.35 * kl * keep)


def test_keyword_arguments_reach_pyros_checked_loss(batch):
    """Catches: keyword arguments dropped when the loss defers to Pyro's checked one (Pyro
    validation on): a KL weight passed by keyword then silently reads as 1."""
    tokens, mask = batch
    ltm = _sharpened()
    local, noise = _local(ltm, tokens.shape[0])
    elbo = SyncFreeMeanFieldELBO(max_plate_nesting=1)
    positional = elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask, local, noise, 0.25)
    keyword = elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask, local, noise,
                                       kl_weight=0.25)
    full = elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask, local, noise)
    torch.testing.assert_close(keyword, positional)
    assert abs(float(full.detach() - positional.detach())) > 1.0


def test_free_bits_latent_term_is_one_figure_per_sequence():
    """Catches: the floored group KLs summed over the batch (or over everything) instead of
    per sequence, and a default group that the constructor refuses. KL(N(m, 1) || N(0, 1)) is
    m^2 / 2 per coordinate, so each group's KL is written out here."""
    loc = torch.tensor([0.0, 0.5, 1.0, 2.0]).view(4, 1, 1).expand(4, 4, 2).clone()
    loc[:, 2:] = 0.0  # slots 2, 3 (the second layer's) at the prior
    q = dist.Normal(loc, torch.ones_like(loc)).to_event(2)
    p = dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(2)
    per_slot = loc[:, :, 0] ** 2  # two coordinates of m^2 / 2 each: [4 sequences, 4 slots]
    by_slot = FreeBitsMeanFieldELBO(0.3).latent_term({"fn": q}, {"fn": p})
    torch.testing.assert_close(by_slot, per_slot.clamp(min=0.3).sum(-1))
    by_layer = FreeBitsMeanFieldELBO(0.3, "layer", 2).latent_term({"fn": q}, {"fn": p})
    layers = per_slot.view(4, 2, 2).sum(-1)
    torch.testing.assert_close(by_layer, layers.clamp(min=0.3).sum(-1))
    assert by_layer.shape == (4,)


def test_an_evaluation_fit_with_free_bits_fits_what_training_fits():
    """``ScoringConfig(fit_free_bits=True)`` must fit q with the training objective (free
    bits), and by default with the plain ELBO: the reported KL is that of the fit asked for."""
    ltm = _sharpened(scale=0.1)
    windows = torch.randint(0, 23, (6, 13), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(6, 12)
    config = InferenceConfig(steps=4, lr_max=0.02, lr_min=0.02, free_bits=0.25,
                             free_bits_group="layer", init_log_var=0.0)

    def kl_per_window(training: bool) -> float:
        fit = fit_local_posterior(ltm, windows, mask, config, torch.Generator().manual_seed(0),
                                  training=training)
        q = fit.posterior
        kl = 0.5 * (q.loc ** 2 + q.log_var.exp() - 1 - q.log_var)
        return kl.sum().item() / len(windows)

    figures = {free_bits: evaluate_windows(ltm, windows, config,
                                           ScoringConfig(batch_size=6, latent_stats=True,
                                                         fit_free_bits=free_bits))["kl_per_window"]
               for free_bits in (False, True)}
    assert figures[True] == pytest.approx(kl_per_window(True), rel=1e-4)
    assert figures[False] == pytest.approx(kl_per_window(False), rel=1e-4)
    assert abs(figures[True] - figures[False]) > 1e-3
