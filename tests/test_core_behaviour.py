"""Behaviours of the core that a plausible bug would break, each checked against an
independent computation (not against the code path it tests).

Every test here was written against a named change to the core that the rest of the suite let
through (issue 20); the docstrings name the change each one catches.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from ltm_pyro import runner
from ltm_pyro.bounds import ScoringConfig, evaluate_windows
from ltm_pyro.checkpoint import (
    BEST_NAME,
    checkpoint_path,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from ltm_pyro.config import DataConfig, InferenceConfig, TrainConfig, preset
from ltm_pyro.decoder import Decoder
from ltm_pyro.families import LatentThought
from ltm_pyro.inference import fit_local_posterior
from ltm_pyro.model import LatentThoughtModel
from ltm_pyro.svi import DualRateSVI

from .conftest import assert_gradients_match, micro_config


def _sharpened(ltm: LatentThoughtModel, scale: float = 0.3, seed: int = 0) -> LatentThoughtModel:
    """Large random weights, so that z visibly changes the logits (at init it barely does)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ltm.decoder.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return ltm


def _sequence_nll(decoder: Decoder, tokens: torch.Tensor, z: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """-log p(x|z) per sequence, written out with a plain cross-entropy."""
    logits = decoder(tokens[:, :-1], z)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(),
                          reduction="none").view(tokens.shape[0], -1)
    return (nll if mask is None else nll * mask).sum(-1)


def _gaussian_log_density(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
                          ) -> torch.Tensor:
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log()
            - 0.5 * math.log(2 * math.pi)).sum((-2, -1))


def _kl_to_standard_normal(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (0.5 * (scale**2 + loc**2 - 1) - scale.log()).sum((-2, -1))


# --- the slow step ------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["fixed", "fresh"])
def test_final_mode_slow_gradient_is_the_final_posteriors_alone(batch, noise):
    """Catches: ``final`` silently accumulating the inner trajectory's decoder gradients, and
    the slow step in ``fresh`` mode reusing the last inner draw instead of a new one."""
    tokens, mask = batch
    ltm = _sharpened(LatentThoughtModel(Decoder(micro_config())), scale=0.1)
    inference = InferenceConfig(steps=4, noise=noise, init_log_var=-1.0)
    twin = LatentThoughtModel(copy.deepcopy(ltm.decoder))
    generator = torch.Generator().manual_seed(11)
    fit = fit_local_posterior(twin, tokens, mask, inference, generator)
    slow_noise = fit.noise if noise == "fixed" else torch.randn(fit.noise.shape,
                                                                generator=generator)
    z = fit.posterior.loc + fit.posterior.scale * slow_noise
    loss = (_sequence_nll(twin.decoder, tokens, z, mask).sum()
            + _kl_to_standard_normal(fit.posterior.loc, fit.posterior.scale).sum()) / mask.sum()
    expected = torch.autograd.grad(loss, list(twin.decoder.parameters()))

    train = TrainConfig(max_steps=10, warmup_steps=1, grad_clip=1e9)
    DualRateSVI(ltm, inference, train, torch.Generator().manual_seed(11)).step(tokens, mask)
    for (name, p), e in zip(ltm.decoder.named_parameters(), expected, strict=True):
        assert_gradients_match(p.grad, e, name)


def test_slow_optimizer_decays_matrices_only():
    """Catches: weight decay applied to the norm gains (or to nothing). With zero gradients an
    AdamW step only decays, so each parameter shows the decay its group applies."""
    ltm = LatentThoughtModel(Decoder(micro_config()))
    train = TrainConfig(weight_decay=0.1)
    svi = DualRateSVI(ltm, InferenceConfig(steps=1), train)
    before = {name: p.detach().clone() for name, p in ltm.decoder.named_parameters()}
    for group in svi.optimizer.param_groups:
        group["lr"] = 0.5
    for p in ltm.decoder.parameters():
        p.grad = torch.zeros_like(p)
    svi.optimizer.step()
    gains = [name for name, p in ltm.decoder.named_parameters() if p.dim() < 2]
    assert gains and all("norm" in name for name in gains)
    for name, p in ltm.decoder.named_parameters():
        factor = 1.0 if p.dim() < 2 else 1 - 0.5 * 0.1
        torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)


def test_slow_step_clips_the_gradient_norm(batch):
    """Catches: gradient clipping disabled. The reported norm is the one before clipping."""
    tokens, mask = batch
    ltm = _sharpened(LatentThoughtModel(Decoder(micro_config())))
    svi = DualRateSVI(ltm, InferenceConfig(steps=2), TrainConfig(grad_clip=1e-3))
    stats = svi.step(tokens, mask)
    clipped = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in ltm.decoder.parameters()]))
    assert float(stats.grad_norm) > 1e-2
    assert float(clipped) == pytest.approx(1e-3, rel=1e-3)


# --- the decoder --------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1])
def test_each_layer_reads_its_own_slots_of_z(layer):
    """Catches: latent vectors routed to the layers in another order. With every other
    layer's cross-attention output silenced, only this layer's slots can change the logits."""
    config = micro_config(n_layers=2, latents_per_layer=3, window=None)
    decoder = Decoder(config).eval()
    with torch.no_grad():
        for index, block in enumerate(decoder.layers):
            if index != layer:
                block.cross_attention.wo.weight.zero_()
            else:
                block.cross_attention.wo.weight.mul_(20)
    tokens = torch.randint(0, 23, (2, 10), generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, config.n_latents, config.z_dim)
    with torch.no_grad():
        base = decoder(tokens, z)
        for owner in range(config.n_layers):
            moved = z.clone()
            slots = slice(owner * 3, (owner + 1) * 3)
            moved[:, slots] += 2 * torch.randn_like(moved[:, slots])
            changed = (decoder(tokens, moved) - base).abs().max().item() > 1e-4
            assert changed == (owner == layer), (owner, layer)


# --- evaluation ---------------------------------------------------------------------------


def _draws(tokens, loc, scale, count, chunk, generator):
    """``count`` draws from q for every sequence, ``chunk`` draws at a time, with the
    sequences repeated alongside (the evaluator's layout: draw-major)."""
    batch = tokens.shape[0]
    for first in range(0, count, chunk):
        k = min(chunk, count - first)
        noise = torch.randn((k * batch, *loc.shape[1:]), generator=generator)
        rep_loc, rep_scale = loc.repeat(k, 1, 1), scale.repeat(k, 1, 1)
        yield k, tokens.repeat(k, 1), rep_loc, rep_scale, rep_loc + rep_scale * noise


def _reference_evaluation(ltm, windows, inference, steps, batch_size, elbo_samples, iw_samples,
                          seed, chunk=8):
    """The three bounds written out from their definitions (bounds.py's docstring).

    Draws are taken from one generator in the order the evaluator documents (fit, then the
    ELBO's draws, then the importance draws, ``chunk`` samples at a time), so the figures
    match to float precision; everything else is computed here, not through the library.
    """
    generator = torch.Generator().manual_seed(seed)
    totals = dict(tokens=0.0, nll=0.0, kl=0.0, iwae=0.0, recon=0.0)
    for start in range(0, len(windows), batch_size):
        tokens = windows[start:start + batch_size]
        batch = tokens.shape[0]
        mask = torch.ones(batch, tokens.shape[1] - 1)
        fit = fit_local_posterior(ltm, tokens, mask, inference, generator, steps=steps)
        loc, scale = fit.posterior.loc, fit.posterior.scale

        with torch.no_grad():
            recon = _sequence_nll(ltm.decoder, tokens, loc + scale * fit.noise)
            nll = torch.zeros(batch, dtype=torch.float64)
            for k, rep_tokens, _, _, z in _draws(tokens, loc, scale, elbo_samples, chunk,
                                                 generator):
                nll += _sequence_nll(ltm.decoder, rep_tokens, z).double().view(k, batch).sum(0)
            nll /= elbo_samples
            log_w = []
            for k, rep_tokens, rep_loc, rep_scale, z in _draws(tokens, loc, scale, iw_samples,
                                                               chunk, generator):
                w = (-_sequence_nll(ltm.decoder, rep_tokens, z)
                     + _gaussian_log_density(z, torch.zeros_like(z), torch.ones_like(z))
                     - _gaussian_log_density(z, rep_loc, rep_scale))
                log_w.append(w.double().view(k, batch).T)
            log_px = torch.logsumexp(torch.cat(log_w, 1), 1) - math.log(iw_samples)
        totals["tokens"] += mask.sum().item()
        totals["nll"] += nll.sum().item()
        totals["kl"] += _kl_to_standard_normal(loc, scale).double().sum().item()
        totals["iwae"] -= log_px.sum().item()
        totals["recon"] += recon.double().sum().item()
    tokens = totals["tokens"]
    return {
        "tokens": tokens,
        "nll_per_token": totals["nll"] / tokens,
        "kl_per_token": totals["kl"] / tokens,
        "elbo_per_token": -(totals["nll"] + totals["kl"]) / tokens,
        "iwae_per_token": -totals["iwae"] / tokens,
        "recon_nll_per_token": totals["recon"] / tokens,
        "elbo_ppl": math.exp((totals["nll"] + totals["kl"]) / tokens),
        "iwae_ppl": math.exp(totals["iwae"] / tokens),
        "recon_ppl": math.exp(totals["recon"] / tokens),
    }


@pytest.mark.parametrize("noise", ["fixed", "fresh"])
def test_evaluation_matches_the_bounds_written_out(noise):
    """Catches: ``steps`` (T_eval) ignored, a sample count that is not a multiple of the chunk
    losing its remainder, the KL dropped from the ELBO, ``recon`` at a fresh draw instead of
    the fitting draw, and importance weights taken at the fitting noise."""
    ltm = _sharpened(LatentThoughtModel(Decoder(micro_config()).eval()))
    windows = torch.randint(0, 23, (10, 13), generator=torch.Generator().manual_seed(5))
    inference = InferenceConfig(steps=6, noise=noise, init_log_var=-1.0)
    settings = dict(steps=3, batch_size=4, elbo_samples=11, iw_samples=13, seed=7)
    summary = evaluate_windows(ltm, windows, inference, ScoringConfig(**settings))
    expected = _reference_evaluation(ltm, windows, inference, **settings)
    assert summary["inference_steps"] == 3 and summary["sequences"] == len(windows)
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-5), key
    # T_eval matters for this model: the same call at the training T gives other figures.
    other = evaluate_windows(ltm, windows, inference, ScoringConfig(**{**settings, "steps": 6}))
    assert abs(other["recon_nll_per_token"] - summary["recon_nll_per_token"]) > 1e-3


# --- training runs ------------------------------------------------------------------------


def _tiny_run(**train_overrides) -> runner.RunConfig:
    train = dict(max_steps=6, batch_size=4, warmup_steps=2, eval_every=3, eval_windows=4,
                 log_every=1, checkpoint_every=3)
    train.update(train_overrides)
    return preset("tiny").updated(
        model={"context": 16, "window": 8}, inference={"steps": 2}, train=train,
        data=DataConfig(synthetic_train_docs=64, synthetic_eval_docs=16))


def _records(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"}
            for r in runner.read_jsonl(out / runner.METRICS_NAME)]


def test_kl_warmup_weights_the_training_loss_and_never_the_validation(tmp_path):
    """Catches: the KL warm-up logged but not applied in the training loop, and validation
    scored at the warm-up weight instead of the full bound."""
    warm = _tiny_run(max_steps=3, eval_every=3, kl_warmup_steps=4)
    runner.train(warm, tmp_path / "warm", progress=False)
    records = _records(tmp_path / "warm")
    logged = [r["kl_weight"] for r in records if r["split"] == "train"]
    assert logged == pytest.approx([0.25, 0.5, 0.75])

    # One step at warm-up weight 1/4 is one step of a run whose KL weight is 1/4 throughout.
    first = _tiny_run(max_steps=1, eval_every=1, kl_warmup_steps=4)
    constant = _tiny_run(max_steps=1, eval_every=1).updated(inference={"kl_weight": 0.25})
    full = _tiny_run(max_steps=1, eval_every=1)
    weights = {}
    for name, config in (("first", first), ("constant", constant), ("full", full)):
        runner.train(config, tmp_path / name, progress=False)
        weights[name] = load_checkpoint(tmp_path / name)["decoder"]
    assert all(torch.equal(weights["first"][k], weights["constant"][k]) for k in weights["first"])
    assert not all(torch.equal(weights["first"][k], weights["full"][k]) for k in weights["full"])

    # The logged validation is the full-weight bound of the weights at that step.
    valid = next(r for r in records if r["split"] == "valid")
    ltm, config, _ = model_from_checkpoint(load_checkpoint(tmp_path / "warm"))
    corpus = runner.load_corpus(config.data, config.model.context, None)
    summary = evaluate_windows(ltm, corpus.windows["valid"][:4], config.inference,
                               ScoringConfig(batch_size=4, elbo_samples=config.train.eval_samples,
                                             seed=config.train.seed))
    assert valid["neg_elbo"] == pytest.approx(-summary["elbo_per_token"], rel=1e-6)
    assert valid["kl"] == pytest.approx(summary["kl_per_token"], rel=1e-6)


def train_stopped_then_resumed(make_config, out, monkeypatch, stop_after: int = 4) -> None:
    """Train ``make_config()`` into ``out``, stopped by SIGTERM after slow step ``stop_after``
    as a signal would stop it (a checkpoint is written), then resume it with the same config."""
    original = DualRateSVI.step

    def step_then_stop(self, tokens, mask):  # noqa: ANN001, ANN202
        stats = original(self, tokens, mask)
        if self.step_count == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    monkeypatch.setattr(DualRateSVI, "step", step_then_stop)
    with pytest.raises(runner.Interrupted):
        runner.train(make_config(), out, progress=False)
    assert load_checkpoint(out)["step"] == stop_after
    monkeypatch.setattr(DualRateSVI, "step", original)
    runner.train(make_config(), out, progress=False)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Catches: a resume that restarts, skips or repeats steps, or loses the RNG, optimizer or
    logging state. The run is stopped after step 4 of 6 as SIGTERM would stop it."""
    reference = tmp_path / "reference"
    runner.train(_tiny_run(), reference, progress=False)
    resumed = tmp_path / "resumed"
    train_stopped_then_resumed(_tiny_run, resumed, monkeypatch)

    assert _records(resumed) == _records(reference)
    a, b = load_checkpoint(reference), load_checkpoint(resumed)
    assert b["step"] == 6
    assert all(torch.equal(a["decoder"][k], b["decoder"][k]) for k in a["decoder"])


def test_keep_best_saves_the_weights_of_the_lowest_validation(tmp_path, monkeypatch):
    """Catches: best.pt written at every validation, at the last one, or with weights other
    than those validated (early stopping would then score the wrong model)."""
    figures = iter([4.0, 3.0, 3.5])  # best at the second validation (step 4 of 6), not the last
    validated = {}
    evaluate = LatentThought.validate

    def scripted(family, ltm, windows, config, device):  # noqa: ANN001, ANN202
        validated[len(validated) + 1] = copy.deepcopy(ltm.decoder.state_dict())
        return {**evaluate(family, ltm, windows, config, device), "neg_elbo": next(figures)}

    monkeypatch.setattr(LatentThought, "validate", scripted)
    runner.train(_tiny_run(eval_every=2, checkpoint_every=2, keep_best=True), tmp_path / "run",
                 progress=False)
    best = load_checkpoint(tmp_path / "run" / BEST_NAME)
    assert best["step"] == 4
    assert all(torch.equal(best["decoder"][k], validated[2][k]) for k in validated[2])
    assert not all(torch.equal(best["decoder"][k], validated[3][k]) for k in validated[3])
    assert load_checkpoint(tmp_path / "run")["step"] == 6  # the run itself goes on to the end

    monkeypatch.setattr(LatentThought, "validate", evaluate)
    runner.train(_tiny_run(max_steps=2, eval_every=2), tmp_path / "plain", progress=False)
    assert not (tmp_path / "plain" / BEST_NAME).exists()


@pytest.mark.parametrize(("losses", "since"), [
    ([], 0), ([4.0], 0), ([4.0, 3.0, 3.5], 1), ([4.0, 3.0, 3.0], 1), ([3.0, 4.0, 5.0], 2),
    ([float("nan"), 5.0], 0), ([5.0, float("nan")], 1), ([float("nan")], 1)])
def test_validations_since_best_counts_from_the_first_lowest_finite_figure(losses, since):
    """Catches: an equal figure counted as an improvement, a NaN taken for the best, or the
    count taken from the last validation instead of the best one."""
    records = [{"split": "train", "step": 0}] + [
        {"split": "valid", "step": i, "neg_elbo": loss} for i, loss in enumerate(losses)]
    assert runner.validations_since_best(records) == since


def test_patience_stops_the_run_and_a_rerun_trains_no_further(tmp_path, monkeypatch):
    """Catches: early stopping that never fires, fires one validation early or late, is not
    checkpointed where it stopped, or is undone by rerunning the same command (which would
    train past the point the run was scored at)."""
    figures = iter([4.0, 3.0, 3.5, 3.6, 1.0, 1.0])  # best at step 2; steps 3 and 4 are worse
    evaluate = LatentThought.validate

    def scripted(family, ltm, windows, config, device):  # noqa: ANN001, ANN202
        return {**evaluate(family, ltm, windows, config, device), "neg_elbo": next(figures)}

    monkeypatch.setattr(LatentThought, "validate", scripted)
    config = _tiny_run(eval_every=1, checkpoint_every=6, patience=2)
    out = tmp_path / "run"
    runner.train(config, out, progress=False)
    assert load_checkpoint(out)["step"] == 4
    assert runner.finished_run(out, config)
    before = _records(out)
    assert [r["step"] for r in before if r["split"] == "valid"] == [1, 2, 3, 4]

    runner.train(config, out, progress=False)
    assert load_checkpoint(out)["step"] == 4 and _records(out) == before
    assert not runner.finished_run(out, _tiny_run(eval_every=1, checkpoint_every=6, patience=3))


def test_raising_max_steps_extends_a_run_and_any_other_change_is_named(tmp_path):
    """Catches: a finished run that cannot be extended (issue 39), an extension that starts
    over or repeats steps, config.json left at the old length, and a refusal that does not
    say which field differs."""
    out = tmp_path / "run"
    runner.train(_tiny_run(max_steps=3), out, progress=False)
    runner.train(_tiny_run(max_steps=6), out, progress=False)
    assert load_checkpoint(out)["step"] == 6
    assert [r["step"] for r in _records(out) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / runner.CONFIG_NAME).read_text())["train"]["max_steps"] == 6
    with pytest.raises(runner.UsageError, match=r"train\.lr is 0\.003 in the folder, 0\.01 now"):
        runner.train(_tiny_run(max_steps=8, lr=1e-2), out, progress=False)


def test_finished_run_is_only_the_same_config_at_its_last_step(tmp_path):
    """Catches: a benchmark taking an unfinished or differently configured run for a finished
    one (it would then report no training time, or score the wrong model)."""
    config = _tiny_run(max_steps=2, eval_every=2, checkpoint_every=2)
    assert not runner.finished_run(tmp_path / "run", config)
    runner.train(config, tmp_path / "run", progress=False)
    assert runner.finished_run(tmp_path / "run", config)
    assert not runner.finished_run(tmp_path / "run", _tiny_run(max_steps=3, eval_every=2,
                                                                checkpoint_every=2))
    other = _tiny_run(max_steps=2, eval_every=2, checkpoint_every=2, lr=1e-2)
    assert not runner.finished_run(tmp_path / "run", other)


# --- smaller contracts that the mutation run found unguarded --------------------------------


def test_fresh_noise_draws_a_new_sample_at_every_inner_step(batch):
    """``fresh`` takes T draws from the generator (one per inner step), ``fixed`` one."""
    tokens, mask = batch
    ltm = LatentThoughtModel(Decoder(micro_config()))
    for noise, draws in (("fresh", 5), ("fixed", 1)):
        generator = torch.Generator().manual_seed(3)
        fit_local_posterior(ltm, tokens, mask, InferenceConfig(steps=5, noise=noise), generator)
        replay = torch.Generator().manual_seed(3)
        for _ in range(draws):
            torch.randn((5, *ltm.latent_shape), generator=replay)
        assert torch.equal(generator.get_state(), replay.get_state()), noise


def test_slow_schedule_passes_the_cosine_midpoint_and_reaches_the_optimizer(batch):
    from ltm_pyro.svi import warmup_cosine

    train = TrainConfig(max_steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert warmup_cosine(60, train) == pytest.approx((1e-3 + 1e-4) / 2)
    lrs = [warmup_cosine(s, train) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and min(lrs) >= 1e-4
    tokens, mask = batch
    ltm = LatentThoughtModel(Decoder(micro_config()))
    svi = DualRateSVI(ltm, InferenceConfig(steps=1), train)
    for step in range(2):
        stats = svi.step(tokens, mask)
        assert stats.slow_lr == pytest.approx(warmup_cosine(step, train))
        assert all(g["lr"] == stats.slow_lr for g in svi.optimizer.param_groups)
    assert svi.step_count == 2
    assert float(stats.elbo) == pytest.approx(-float(stats.nll + stats.kl))


def test_logged_kl_is_the_fitted_posteriors_per_token(batch):
    """The training log's KL is KL(q || p) of the posterior the slow step used, per token."""
    tokens, mask = batch
    ltm = LatentThoughtModel(Decoder(micro_config()))
    inference = InferenceConfig(steps=3, init_log_var=-1.0)
    fit = fit_local_posterior(LatentThoughtModel(copy.deepcopy(ltm.decoder)), tokens, mask,
                              inference, torch.Generator().manual_seed(4))
    expected = _kl_to_standard_normal(fit.posterior.loc, fit.posterior.scale).sum() / mask.sum()
    stats = DualRateSVI(ltm, inference, TrainConfig(), torch.Generator().manual_seed(4)).step(
        tokens, mask)
    assert float(stats.kl) == pytest.approx(float(expected), rel=1e-5)


def test_slow_state_round_trips(batch):
    tokens, mask = batch
    ltm = LatentThoughtModel(Decoder(micro_config()))
    svi = DualRateSVI(ltm, InferenceConfig(steps=1), TrainConfig())
    svi.step(tokens, mask)
    fresh = DualRateSVI(LatentThoughtModel(Decoder(micro_config())), InferenceConfig(steps=1),
                        TrainConfig())
    fresh.load_state_dict(svi.state_dict())
    assert fresh.step_count == 1
    assert fresh.optimizer.state_dict()["state"].keys() == svi.optimizer.state_dict()[
        "state"].keys()


def test_residual_projections_start_smaller():
    """Init N(0, 0.02), output projections of each residual branch N(0, 0.02 / sqrt(2L))."""
    config = micro_config(d_model=256, n_layers=8, n_heads=4)
    decoder = Decoder(config)
    wo = torch.cat([b.self_attention.wo.weight.detach().flatten() for b in decoder.layers])
    wq = torch.cat([b.self_attention.wq.weight.detach().flatten() for b in decoder.layers])
    assert float(wo.std()) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert float(wq.std()) == pytest.approx(0.02, rel=0.05)


def test_a_run_saved_before_a_config_field_existed_still_resumes(tmp_path):
    """A field added to the config after a checkpoint was written takes its default, so the
    same command resumes the run instead of calling its config different."""
    out = tmp_path / "old"
    runner.train(_tiny_run(max_steps=3), out, progress=False)
    payload = load_checkpoint(out)
    # as written before the field existed (the tiny preset keeps its default, "slot")
    del payload["config"]["inference"]["free_bits_group"]
    save_checkpoint(checkpoint_path(out), payload)
    before = _records(out)
    runner.train(_tiny_run(max_steps=3), out, progress=False)
    assert _records(out) == before and load_checkpoint(out)["step"] == 3
    changed = _tiny_run(max_steps=3).updated(inference={"free_bits_group": "layer"})
    with pytest.raises(runner.UsageError, match="different config"):
        runner.train(changed, out, progress=False)
