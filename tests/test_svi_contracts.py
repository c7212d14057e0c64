"""Contracts of the dual-rate SVI step (ltm_pyro/svi.py) that the mutation run found unguarded.

Each test checks what a training step promises against an independent computation or a
written-out value: the schedules (the slow lr peaks at ``lr`` and ends at ``min_lr``; the KL
weight ramps to the full weight and holds it), the training fit's free bits, both optimizers
as AdamW written out over two steps (the slow one's betas and decay groups, the encoder's
undecayed update on the slow schedule's shape), a step skipped whole when any gradient is not
finite, the figures a step reports, a model without latents training as a plain language model,
the encoder's ELBO at the warm-up weight, the fused kernel on GPUs only, and the one-line
refusal of an encoder under torchrun. The docstrings name the change each test catches.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from ltm_pyro.amortised import Encoder
from ltm_pyro.config import InferenceConfig, TrainConfig
from ltm_pyro.decoder import Decoder
from ltm_pyro.distributed import Shard
from ltm_pyro.errors import UsageError
from ltm_pyro.model import LatentThoughtModel, LocalPosterior
from ltm_pyro.svi import DualRateSVI, kl_weight_at, slow_optimizer, warmup_cosine

from .conftest import assert_gradients_match, micro_config, sequence_nll


def _encoded(inference: InferenceConfig, head_scale: float = 0.3) -> LatentThoughtModel:
    """A micro LTM with an encoder whose head has random weights (its proposal depends on x)."""
    config = micro_config()
    ltm = LatentThoughtModel(Decoder(config), encoder=Encoder(config, inference))
    with torch.no_grad():
        ltm.encoder.head.weight.normal_(0, head_scale)
        ltm.encoder.head.bias.normal_(0, head_scale)
    return ltm


def _snapshot(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


# --- schedules ------------------------------------------------------------------------------


def test_slow_lr_peaks_at_lr_and_holds_min_lr_from_max_steps():
    """Catches: the warm-up branch taking the first cosine step too (``step <=``: the lr
    overshoots ``lr`` there), and a schedule that misses ``min_lr`` at ``max_steps`` (a span
    floor of 2 when one step follows the warm-up) or climbs again after it (progress not
    capped at 1)."""
    for max_steps, warmup in ((100, 10), (11, 10), (5, 4)):
        config = TrainConfig(max_steps=max_steps, warmup_steps=warmup, lr=1e-3, min_lr=1e-4)
        lrs = [warmup_cosine(step, config) for step in range(3 * max_steps)]
        assert lrs[warmup] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
        assert lrs[max_steps:] == pytest.approx([1e-4] * (2 * max_steps)), (max_steps, warmup)


def test_kl_weight_ramps_to_the_full_weight_and_holds_it():
    """Catches: the ramp not capped at 1 (past ``kl_warmup_steps`` the weight keeps growing,
    e.g. ``min(2.0, ...)``)."""
    inference, train = InferenceConfig(kl_weight=0.5), TrainConfig(kl_warmup_steps=4)
    weights = [kl_weight_at(step, inference, train) for step in range(10)]
    assert weights == pytest.approx([0.125, 0.25, 0.375] + [0.5] * 7)
    assert kl_weight_at(7, inference, TrainConfig(kl_warmup_steps=0)) == 0.5


def test_cyclical_annealing_restarts_the_ramp_each_cycle_and_ends_at_the_full_weight():
    """Cyclical annealing: with 3 cycles of 4 steps and a 2-step ramp the weight restarts at
    each cycle's first step. Catches: the ramp counted from the run's start, or restarts that
    never reach the full weight."""
    inference = InferenceConfig(kl_weight=1.0)
    train = TrainConfig(max_steps=12, kl_warmup_steps=2, kl_cycles=3)
    weights = [kl_weight_at(step, inference, train) for step in range(12)]
    assert weights == pytest.approx([0.5, 1, 1, 1] * 3)
    uneven = TrainConfig(max_steps=10, kl_warmup_steps=2, kl_cycles=3)  # cycles of 4, 4, 2
    assert [kl_weight_at(s, inference, uneven) for s in range(10)] == pytest.approx(
        [0.5, 1, 1, 1, 0.5, 1, 1, 1, 0.5, 1])


def test_a_cycle_without_a_warm_up_that_ends_within_it_is_refused_from_python_too(batch):
    """The command line refuses it at parse time (test_latent_levers); a notebook building
    the config by hand meets the same one-line refusal when the SVI is built."""
    ltm = LatentThoughtModel(Decoder(micro_config()))
    for warmup in (0, 4):  # cycles of 4 steps: no ramp, or one that never ends
        with pytest.raises(UsageError, match="between 1 and 3"):
            DualRateSVI(ltm, InferenceConfig(), TrainConfig(max_steps=12, kl_cycles=3,
                                                            kl_warmup_steps=warmup))
    DualRateSVI(ltm, InferenceConfig(), TrainConfig(max_steps=12, kl_cycles=3, kl_warmup_steps=2))


# --- the training fit's objective -----------------------------------------------------------


def test_training_fits_count_each_layers_kl_as_at_least_its_free_bits(batch):
    """Catches: DualRateSVI's fit objective built as for evaluation (``training=False`` or
    ``None``: no free bits) or without the layer count that groups slots by layer. At q = p
    every KL is 0, so the objective exceeds the plain ELBO by the floor of each of the 2
    layers of each of the 5 sequences, at the KL weight."""
    tokens, mask = batch
    ltm = LatentThoughtModel(Decoder(micro_config()))  # 2 layers of 2 slots
    inference = InferenceConfig(steps=1, free_bits=3.0, free_bits_group="layer")
    svi = DualRateSVI(ltm, inference, TrainConfig())
    shape = (tokens.shape[0], *ltm.latent_shape)
    prior = LocalPosterior(torch.zeros(shape), torch.zeros(shape))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = svi.elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask, prior, noise,
                                            0.5)
        plain = TraceMeanField_ELBO(max_plate_nesting=1).differentiable_loss(
            ltm.model, ltm.guide, tokens, mask, prior, noise, 0.5)
    assert float(ours - plain) == pytest.approx(0.5 * 5 * 2 * 3.0, rel=1e-5)


# --- the optimizers ---------------------------------------------------------------------------


def test_slow_and_encoder_steps_are_adamw_written_out(batch):
    """Catches: the slow optimizer ignoring ``train.betas``, the encoder's optimizer decaying
    its weights (AdamW's default 0.01, or 1.0), and the encoder's lr not following the slow
    schedule's shape (left at ``encoder_lr``, or ``encoder_lr * slow_lr * lr``, or
    ``encoder_lr / slow_lr / lr``). Two warm-up steps, each checked against AdamW written out
    from the gradients the step left (decay on decoder matrices only, encoder undecayed at
    ``encoder_lr * slow_lr / lr`` with betas (0.9, 0.999))."""
    tokens, mask = batch
    inference = InferenceConfig(steps=1, init_log_var=0.0, encoder_layers=1, encoder_lr=2e-3,
                                encoder_loss="fit")
    ltm = _encoded(inference)
    train = TrainConfig(max_steps=10, warmup_steps=4, lr=1e-3, betas=(0.8, 0.9),
                        weight_decay=0.1, grad_clip=1e9)
    svi = DualRateSVI(ltm, inference, train, torch.Generator().manual_seed(2))
    slow_lrs, encoder_lrs = [2.5e-4, 5e-4], [5e-4, 1e-3]  # warm-up: lr (t + 1) / 4
    tracked = [(p, train.betas, 0.1 if p.dim() >= 2 else 0.0, slow_lrs)
               for p in ltm.decoder.parameters()]
    tracked += [(p, (0.9, 0.999), 0.0, encoder_lrs) for p in ltm.encoder.parameters()]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p, *_ in tracked]
    for t in range(2):
        before = [p.detach().clone() for p, *_ in tracked]
        assert not svi.step(tokens, mask).skipped
        for i, ((p, (b1, b2), decay, lrs), old) in enumerate(zip(tracked, before, strict=True)):
            g = p.grad  # as the optimizer saw it (clipping is in place; here a no-op)
            m, v = moments[i]
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            moments[i] = (m, v)
            denom = (v / (1 - b2 ** (t + 1))).sqrt() + 1e-8
            expected = old * (1 - lrs[t] * decay) - lrs[t] / (1 - b1 ** (t + 1)) * m / denom
            torch.testing.assert_close(p.detach() - old, expected - old, rtol=1e-4, atol=1e-7,
                                       msg=f"step {t}, parameter {i}")


def test_slow_optimizer_is_fused_exactly_on_cuda(monkeypatch):
    """Catches: the fused AdamW kernel (a GPU speed-up) dropped on CUDA (``fused`` None,
    False or not passed, or compared against a misspelt device type) or asked for elsewhere.
    The decoder is a stand-in whose parameters report a device, so no GPU is needed."""
    made = []
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, **options: made.append(options))
    for device, fused in (("cuda", True), ("cpu", False)):
        weight = SimpleNamespace(requires_grad=True, dim=lambda: 2, device=torch.device(device))
        slow_optimizer(SimpleNamespace(parameters=lambda w=weight: iter([w])), TrainConfig())
        assert made[-1]["fused"] is fused, device


# --- the step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("poisoned,encoder", [("decoder", False), ("decoder", True),
                                              ("encoder", True)])
def test_a_non_finite_gradient_skips_the_whole_update(batch, poisoned, encoder):
    """Catches: a step applied when the loss is finite but a gradient is not (``isfinite(loss)
    | isfinite(norm)``, for the decoder's gradient or the encoder's), and a NaN decoder
    gradient let through because the encoder's side was finite (``finite | encoder's``).
    A hook turns one weight's gradient into NaN: the step reports the skip, changes neither
    network and still counts."""
    tokens, mask = batch
    inference = InferenceConfig(steps=1, init_log_var=0.0, encoder_layers=int(encoder),
                                encoder_loss="fit")
    ltm = _encoded(inference) if encoder else LatentThoughtModel(Decoder(micro_config()))
    target = next((ltm.encoder if poisoned == "encoder" else ltm.decoder).parameters())
    target.register_hook(lambda grad: grad * float("nan"))
    svi = DualRateSVI(ltm, inference, TrainConfig(max_steps=10, warmup_steps=1))
    modules = [ltm.decoder] + ([ltm.encoder] if encoder else [])
    before = _snapshot(*modules)
    stats = svi.step(tokens, mask)
    assert torch.isfinite(stats.nll) and torch.isfinite(stats.kl)  # the loss itself was fine
    assert stats.skipped and svi.step_count == 1
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(*modules), strict=True))


def test_a_step_reports_the_kl_weight_and_rates_it_used(batch):
    """Catches: the reported KL weight dropped (``None``) and the reported fast lr wrong
    (0 for a model with latents)."""
    tokens, mask = batch
    ltm = LatentThoughtModel(Decoder(micro_config()))
    inference = InferenceConfig(steps=1, kl_weight=0.5, lr_max=0.2)
    train = TrainConfig(max_steps=10, warmup_steps=1, kl_warmup_steps=2)
    svi = DualRateSVI(ltm, inference, train)
    reported = [svi.step(tokens, mask) for _ in range(3)]
    assert [s.kl_weight for s in reported] == pytest.approx([0.25, 0.5, 0.5])
    assert [s.fast_lr for s in reported] == [0.2] * 3
    assert [s.slow_lr for s in reported] == pytest.approx(
        [warmup_cosine(step, train) for step in range(3)])


def test_a_model_without_latents_takes_plain_language_model_steps(batch):
    """Catches: the AR baseline's slow loss made non-finite by its zero KL (``kl_weight /
    kl``: every step skipped, the decoder never trained) and a fast lr reported for a model
    that has no fast loop (``lr_max`` or 1.0 instead of 0). Its step's gradient is the plain
    per-token cross-entropy's, written out."""
    tokens, mask = batch
    ar = LatentThoughtModel(Decoder(micro_config(latents_per_layer=0)))
    twin = copy.deepcopy(ar.decoder)
    loss = sequence_nll(twin, tokens, None, mask).sum() / mask.sum()
    expected = torch.autograd.grad(loss, list(twin.parameters()))
    svi = DualRateSVI(ar, InferenceConfig(), TrainConfig(max_steps=10, warmup_steps=1,
                                                        grad_clip=1e9))
    before = _snapshot(ar.decoder)
    stats = svi.step(tokens, mask)
    assert not stats.skipped and stats.fast_lr == 0.0 and float(stats.kl) == 0.0
    assert float(stats.nll) == pytest.approx(float(loss.detach()), rel=1e-5)
    for (name, p), e in zip(ar.decoder.named_parameters(), expected, strict=True):
        assert_gradients_match(p.grad, e, name)
    assert not all(torch.equal(a, b) for a, b in zip(before, _snapshot(ar.decoder)))


def test_the_encoders_elbo_is_weighted_like_the_fits_during_the_ramp(batch):
    """Catches: the encoder's ELBO loss scored at the full KL weight (``kl_weight`` not passed
    on, Pyro's default 1) while the fit and slow step use the warm-up weight. With T = 0 the
    generator gives the fit's draw, the slow step's fresh draw, then the encoder's; its
    gradient is that of (NLL at its draw + 1/4 KL(proposal || p)) per token, written out."""
    tokens, mask = batch
    inference = InferenceConfig(steps=0, init_log_var=0.0, noise="fresh", encoder_layers=1,
                                encoder_loss="elbo")
    ltm = _encoded(inference)
    twin = LatentThoughtModel(copy.deepcopy(ltm.decoder), encoder=copy.deepcopy(ltm.encoder))
    proposal = twin.encoder(tokens, mask)
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):  # the fit's draw and the slow step's
        torch.randn(proposal.loc.shape, generator=generator)
    z = proposal.loc + proposal.scale * torch.randn(proposal.loc.shape, generator=generator)
    kl = 0.5 * (proposal.log_var.exp() + proposal.loc**2 - 1 - proposal.log_var).sum()
    own = (sequence_nll(twin.decoder, tokens, z, mask).sum() + 0.25 * kl) / mask.sum()
    expected = torch.autograd.grad(own, list(twin.encoder.parameters()))

    train = TrainConfig(max_steps=10, warmup_steps=1, kl_warmup_steps=4, grad_clip=1e9)
    stats = DualRateSVI(ltm, inference, train, torch.Generator().manual_seed(5)).step(
        tokens, mask)
    assert stats.kl_weight == pytest.approx(0.25)
    for (name, p), e in zip(ltm.encoder.named_parameters(), expected, strict=True):
        assert_gradients_match(p.grad, e, name)


def test_an_encoder_under_torchrun_is_refused_in_one_line():
    """Catches: the refusal's message lost or garbled (``None``, case or padding changed): it
    leads with the flag at fault and ends with what to do instead."""
    inference = InferenceConfig(encoder_layers=1)
    ltm = _encoded(inference)
    with pytest.raises(UsageError) as refused:
        DualRateSVI(ltm, inference, TrainConfig(), shard=Shard(rank=0, world=2))
    message = str(refused.value)
    assert message.startswith("--encoder-layers is not supported under torchrun")
    assert message.endswith("train the encoder in one process") and "\n" not in message
