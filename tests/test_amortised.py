"""Semi-amortised inference (ltm_pyro/amortised.py): an encoder proposes the fit's start.

Each test checks a promise of the design against an independent computation: the proposal is
the start (and with zero steps the fitted q), an untrained encoder changes nothing, the slow
step is still the decoder's ELBO gradient at the fitted q while the encoder gets the gradient
of its own loss written out here, a run with an encoder resumes bit-identically, and on a
constructed case the encoder learns to propose a q better than the prior.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from ltm_pyro import runner
from ltm_pyro.amortised import Encoder, build_encoder, count_encoder_parameters
from ltm_pyro.bounds import ScoringConfig, evaluate_windows
from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint
from ltm_pyro.cli import OneLineParser, add_run_arguments, config_from_args
from ltm_pyro.config import InferenceConfig, TrainConfig
from ltm_pyro.decoder import Decoder
from ltm_pyro.flops import (
    encoder_flops_per_token,
    fit_flops_per_token,
    forward_flops_per_token,
    training_flops_per_token,
)
from ltm_pyro.generate import prompt_posterior
from ltm_pyro.inference import fit_local_posterior, slot_offsets
from ltm_pyro.model import LatentThoughtModel, LocalPosterior
from ltm_pyro.svi import DualRateSVI

from .conftest import assert_gradients_match, micro_config, sequence_nll
from .test_core_behaviour import _records, _sharpened, _tiny_run, train_stopped_then_resumed


def _encoded(inference: InferenceConfig, head_scale: float = 0.0, seed: int = 0,
             sharpen: float | None = 0.1) -> LatentThoughtModel:
    """A micro LTM with an encoder; ``head_scale`` > 0 gives its head random weights, so the
    proposal depends on x (an untrained encoder's head is zero)."""
    config = micro_config()
    torch.manual_seed(seed)
    ltm = LatentThoughtModel(Decoder(config), encoder=Encoder(config, inference))
    if sharpen:
        _sharpened(ltm, scale=sharpen, seed=seed)
    if head_scale:
        with torch.no_grad():
            ltm.encoder.head.weight.normal_(0, head_scale)
            ltm.encoder.head.bias.normal_(0, head_scale)
    return ltm


def _kl(loc: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, exp(log_var)) || N(0, 1)) per slot [B, N_z]."""
    return 0.5 * (log_var.exp() + loc**2 - 1 - log_var).sum(-1)


# --- the proposal is the start -------------------------------------------------------------


def test_an_untrained_encoder_proposes_the_usual_start_and_changes_no_fit(batch):
    """The zero-initialised head adds nothing: the proposal is loc = c x the fixed slot
    offsets, log-var = init_log_var, and a fit from it is bit-identical to a fit without an
    encoder (same generator)."""
    tokens, mask = batch
    inference = InferenceConfig(steps=3, init_log_var=0.0, init_loc_scale=0.5, noise="fresh")
    ltm = _encoded(inference)
    proposal = ltm.encoder(tokens, mask)
    offsets = 0.5 * slot_offsets(ltm.latent_shape)
    assert torch.equal(proposal.loc, offsets.expand_as(proposal.loc))
    assert torch.equal(proposal.log_var, torch.zeros_like(proposal.log_var))
    with_encoder = fit_local_posterior(ltm, tokens, mask, inference,
                                       torch.Generator().manual_seed(2))
    without = fit_local_posterior(LatentThoughtModel(ltm.decoder), tokens, mask, inference,
                                  torch.Generator().manual_seed(2))
    assert torch.equal(with_encoder.posterior.loc, without.posterior.loc)
    assert torch.equal(with_encoder.posterior.log_var, without.posterior.log_var)


def test_zero_steps_give_exactly_the_proposal_and_more_steps_refine_it(batch):
    """With T = 0 the fitted q is the encoder's proposal, in the fast loop, in evaluation
    (its KL is the proposal's, written out) and for a prompt; with T > 0 the fit moves from
    it, and a given ``start`` wins over the encoder and is not modified."""
    tokens, mask = batch
    inference = InferenceConfig(steps=3, init_log_var=0.0)
    ltm = _encoded(inference, head_scale=0.5)
    with torch.no_grad():
        proposal = ltm.encoder(tokens, mask)
    assert float((proposal.loc[0] - proposal.loc[1]).abs().max()) > 1e-2  # depends on x
    fit = fit_local_posterior(ltm, tokens, mask, inference, steps=0)
    assert torch.equal(fit.posterior.loc, proposal.loc)
    assert torch.equal(fit.posterior.log_var, proposal.log_var)
    refined = fit_local_posterior(ltm, tokens, mask, inference, torch.Generator().manual_seed(0))
    assert float((refined.posterior.loc - proposal.loc).abs().max()) > 1e-2

    start = LocalPosterior(torch.zeros_like(proposal.loc), torch.zeros_like(proposal.log_var))
    given = fit_local_posterior(ltm, tokens, mask, inference, steps=0, start=start)
    assert torch.equal(given.posterior.loc, start.loc) and not start.loc.requires_grad

    windows = tokens[[0, 2, 4]]  # the unpadded ones
    summary = evaluate_windows(ltm, windows, inference, ScoringConfig(steps=0, batch_size=2))
    expected_kl = _kl(proposal.loc[[0, 2, 4]], proposal.log_var[[0, 2, 4]]).sum()
    assert summary["kl_per_token"] == pytest.approx(float(expected_kl) / (3 * 12), rel=1e-5)
    prompt = prompt_posterior(ltm, tokens[:1, :7], inference, steps=0)
    assert torch.equal(prompt.loc, ltm.encoder(tokens[:1, :7], mask[:1, :6]).loc.detach())


# --- the training step ---------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["elbo", "fit"])
def test_slow_step_is_unchanged_in_meaning_and_the_encoder_gets_its_own_gradient(batch, loss):
    """The decoder's gradient is the written-out ELBO gradient at a draw from the q fitted
    from the proposal; the encoder's is the gradient of its loss written out here: the
    free-bits ELBO at the proposal with the next draw (``elbo``) or KL(fitted || proposal)
    (``fit``), per token, with no encoder gradient leaking into the decoder's."""
    tokens, mask = batch
    inference = InferenceConfig(steps=3, init_log_var=0.0, noise="fresh", free_bits=0.5,
                                encoder_loss=loss)
    ltm = _encoded(inference, head_scale=0.3)
    twin = LatentThoughtModel(copy.deepcopy(ltm.decoder),
                              encoder=copy.deepcopy(ltm.encoder))
    generator = torch.Generator().manual_seed(5)
    proposal = twin.encoder(tokens, mask)
    fit = fit_local_posterior(twin, tokens, mask, inference, generator, training=True,
                              start=proposal.detach())
    q = fit.posterior
    z = q.loc + q.scale * torch.randn(q.loc.shape, generator=generator)
    slow = (sequence_nll(twin.decoder, tokens, z, mask).sum()
            + _kl(q.loc, q.log_var).sum()) / mask.sum()
    decoder_grads = torch.autograd.grad(slow, list(twin.decoder.parameters()))
    if loss == "elbo":
        noise = torch.randn(q.loc.shape, generator=generator)
        z_e = proposal.loc + torch.exp(0.5 * proposal.log_var) * noise
        per_slot = _kl(proposal.loc, proposal.log_var).clamp(min=0.5)
        own = (sequence_nll(twin.decoder, tokens, z_e, mask).sum() + per_slot.sum()) / mask.sum()
    else:
        fitted = torch.distributions.Normal(q.loc, q.scale)
        proposed = torch.distributions.Normal(proposal.loc, proposal.scale)
        own = torch.distributions.kl_divergence(fitted, proposed).sum() / mask.sum()
    encoder_grads = torch.autograd.grad(own, list(twin.encoder.parameters()))

    train = TrainConfig(max_steps=10, warmup_steps=1, grad_clip=1e9)
    svi = DualRateSVI(ltm, inference, train, torch.Generator().manual_seed(5))
    before = [p.detach().clone() for p in ltm.encoder.parameters()]
    svi.step(tokens, mask)
    for (name, p), e in zip(ltm.decoder.named_parameters(), decoder_grads, strict=True):
        assert_gradients_match(p.grad, e, name)
    for (name, p), e in zip(ltm.encoder.named_parameters(), encoder_grads, strict=True):
        assert_gradients_match(p.grad, e, name)
    assert any(not torch.equal(b, p) for b, p in zip(before, ltm.encoder.parameters()))
    assert "encoder_optimizer" in svi.state_dict()


def test_flops_count_the_encoder():
    """An encoder adds its forward and backward (3 forwards) to an iteration, and for the
    ELBO loss a decoder forward and input-gradient backward; a fit adds one encoder forward."""
    config = micro_config()
    base = InferenceConfig()
    forward = forward_flops_per_token(config)
    for loss, decoder_extra in (("elbo", 2), ("fit", 0)):
        inference = InferenceConfig(encoder_layers=2, encoder_loss=loss)
        encoder = encoder_flops_per_token(config, inference)
        assert encoder > 0
        assert training_flops_per_token(config, 4, "final", inference) == pytest.approx(
            (4 * 2 + 3 + decoder_extra) * forward + 3 * encoder)
        assert fit_flops_per_token(config, 4, inference) == pytest.approx(
            4 * 2 * forward + encoder)
    assert encoder_flops_per_token(config, base) == 0
    assert training_flops_per_token(config, 4, "final", base) == training_flops_per_token(
        config, 4)


@pytest.mark.parametrize("loc_scale", [0.0, 0.5])  # 0.5: the encoder holds slot offsets
def test_encoder_parameters_are_counted_as_built(loc_scale):
    config = micro_config()
    inference = InferenceConfig(encoder_layers=2, init_loc_scale=loc_scale)
    built = build_encoder(config, inference)
    assert count_encoder_parameters(config, inference) == sum(
        p.numel() for p in built.parameters()) > 0
    assert count_encoder_parameters(config, InferenceConfig()) == 0


# --- runs, flags, checkpoints ----------------------------------------------------------------


def test_flags_set_the_encoder_and_the_default_has_none():
    parser = OneLineParser()
    add_run_arguments(parser)
    default = config_from_args(parser.parse_args([]))
    assert default.inference.encoder_layers == 0
    assert build_encoder(default.model, default.inference) is None
    config = config_from_args(parser.parse_args(
        ["--encoder-layers", "2", "--encoder-lr", "0.003", "--encoder-loss", "fit"]))
    assert (config.inference.encoder_layers, config.inference.encoder_lr,
            config.inference.encoder_loss) == (2, 0.003, "fit")
    model = replace(config.model, vocab_size=30)
    assert len(build_encoder(model, config.inference).blocks) == 2


def test_a_run_with_an_encoder_resumes_bit_identically_and_loads_it(tmp_path, monkeypatch):
    """The encoder's weights and optimizer travel in the checkpoint: a run stopped after step
    4 of 6 and resumed ends with the uninterrupted run's metrics, decoder and encoder; the
    loaded model scores with the saved encoder (T_eval 0: its proposal's KL)."""
    def config():  # noqa: ANN202
        return _tiny_run().updated(inference={"encoder_layers": 1})

    reference = tmp_path / "reference"
    runner.train(config(), reference, progress=False)
    resumed = tmp_path / "resumed"
    train_stopped_then_resumed(config, resumed, monkeypatch)

    assert _records(resumed) == _records(reference)
    a, b = load_checkpoint(reference), load_checkpoint(resumed)
    for key in ("decoder", "encoder"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert "encoder_optimizer" in b["svi"]
    untrained = Encoder(_tiny_run().model, _tiny_run().inference).state_dict()
    assert not torch.equal(b["encoder"]["head.weight"], untrained["head.weight"])

    ltm, run_config, _ = model_from_checkpoint(b)
    assert all(torch.equal(ltm.encoder.state_dict()[k], b["encoder"][k]) for k in b["encoder"])
    windows = runner.load_corpus(run_config.data, run_config.model.context, None).windows["valid"]
    windows = windows[:4]
    mask = torch.ones(4, windows.shape[1] - 1)
    with torch.no_grad():
        proposal = ltm.encoder(windows, mask)
    summary = evaluate_windows(ltm, windows, run_config.inference,
                               ScoringConfig(steps=0, batch_size=4))
    expected = float(_kl(proposal.loc, proposal.log_var).sum()) / mask.sum().item()
    assert summary["kl_per_token"] == pytest.approx(expected, rel=1e-5)


# --- learning -------------------------------------------------------------------------------


def _elbo_per_token(ltm: LatentThoughtModel, tokens: torch.Tensor, q: LocalPosterior,
                    draws: int = 64) -> float:
    """E_q[log p(x|z)] - KL(q || p) per token, written out, with many fresh draws."""
    generator = torch.Generator().manual_seed(99)
    mask = torch.ones(tokens.shape[0], tokens.shape[1] - 1)
    with torch.no_grad():
        nll = sum(sequence_nll(ltm.decoder, tokens,
                       q.loc + q.scale * torch.randn(q.loc.shape, generator=generator), mask)
                  for _ in range(draws)) / draws
        return -float((nll + _kl(q.loc, q.log_var).sum(-1)).sum() / mask.sum())


def test_an_encoder_learns_to_propose_a_better_than_prior_q():
    """A fixed decoder that reads z, and windows drawn from 4 distinct sequences: the
    encoder, trained only through DualRateSVI's encoder step (T = 0, so the decoder always
    sees its proposal; the decoder's slow lr is ~0), ends with an ELBO at its proposal well
    above the prior's (q = p: the untrained proposal) and proposes a different q per sequence.
    """
    torch.manual_seed(0)
    config = micro_config(window=2)
    inference = InferenceConfig(steps=0, init_log_var=0.0, noise="fresh", encoder_lr=3e-3)
    ltm = _sharpened(LatentThoughtModel(Decoder(config), encoder=Encoder(config, inference)),
                     scale=0.15)
    sequences = torch.randint(0, 23, (4, 13), generator=torch.Generator().manual_seed(3))
    train = TrainConfig(max_steps=150, warmup_steps=1, lr=1e-12, min_lr=1e-12, grad_clip=1e9)
    svi = DualRateSVI(ltm, inference, train, torch.Generator().manual_seed(1))
    prior = LocalPosterior(torch.zeros(4, *ltm.latent_shape), torch.zeros(4, *ltm.latent_shape))
    mask = torch.ones(4, 12)
    assert torch.equal(ltm.encoder(sequences, mask).loc, prior.loc)  # untrained: the prior
    picks = torch.Generator().manual_seed(2)
    for _ in range(150):
        svi.step(sequences[torch.randint(0, 4, (8,), generator=picks)], torch.ones(8, 12))
    with torch.no_grad():
        proposal = ltm.encoder(sequences, mask)
    gain = _elbo_per_token(ltm, sequences, proposal) - _elbo_per_token(ltm, sequences, prior)
    assert gain > 0.05, gain
    distances = torch.cdist(proposal.loc.flatten(1), proposal.loc.flatten(1))
    assert float(distances[~torch.eye(4, dtype=torch.bool)].min()) > 0.1
