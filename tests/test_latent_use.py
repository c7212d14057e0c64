"""What the latents carry (ltm_pyro.latent_use), on cases whose answer is known by construction.

Each test also checks that a plausible wrong estimator would fail it (e.g. the posterior's own
KL taken for the mutual information, or slots grouped into layers the wrong way).
"""

import json
import math
import random
import sys
from dataclasses import replace

import pytest
import torch

from ltm_pyro.bounds import ScoringConfig, evaluate_windows
from ltm_pyro.cli import OneLineParser, add_run_arguments, config_from_args
from ltm_pyro.comparisons import NO_INFERENCE, comparison_configs, prior_as_posterior
from ltm_pyro.config import DataConfig, InferenceConfig, RunConfig, TrainConfig
from ltm_pyro.decoder import Decoder
from ltm_pyro.families import LATENT_KEYS, family_of
from ltm_pyro.files import read_jsonl
from ltm_pyro.inference import fit_local_posterior
from ltm_pyro.latent_use import (
    kl_per_window,
    latent_use_summary,
    mutual_information,
    slot_linear_r2,
    slot_similarity,
)
from ltm_pyro.model import LatentThoughtModel, LocalPosterior
from ltm_pyro.runner import METRICS_NAME, train
from ltm_pyro.svi import DualRateSVI
from ltm_pyro.viz import training_curves

from .conftest import load_script, micro_config
from .test_bounds import _quadrature_log_px, _sharp_ltm
from .test_recipe import z_blind_ltm  # cross-attention outputs zeroed: p(x|z) ignores z

HONEST = InferenceConfig(steps=6, noise="fresh", init_log_var=-2.0)


def _windows(count: int, vocab: int = 23, length: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(seed))


def _posterior(loc: torch.Tensor, log_var: float) -> LocalPosterior:
    return LocalPosterior(loc, torch.full_like(loc, log_var))


def test_a_decoder_that_ignores_z_carries_no_information():
    ltm = z_blind_ltm()
    summary = evaluate_windows(ltm, _windows(48), HONEST,
                               ScoringConfig(batch_size=16, iw_samples=8, latent_stats=True,
                                             prior_samples=32))
    mi, stderr = summary["mutual_info_per_window"], summary["mutual_info_stderr"]
    assert abs(mi) <= 3 * stderr + 1e-6, summary
    # the fit still pays KL (q has not relaxed to the prior): KL taken for MI would fail here
    assert summary["kl_per_window"] > 1.0
    assert summary["active_units"] == 0 and summary["active_units_total"] == 2 * 2 * 32
    assert summary["slot_correlation"] is None  # no slot's mean moves
    assert summary["mutual_info_cap"] == pytest.approx(math.log(48))
    # the prior control is the model's exact perplexity; the fitted q, not yet relaxed to the
    # prior, pays for its mismatch at K = 8 (the IWAE gap) and scores worse
    assert summary["prior_iwae_ppl"] == pytest.approx(math.exp(summary["nll_per_token"]),
                                                      rel=1e-5)
    assert summary["iwae_ppl"] > summary["prior_iwae_ppl"] * 1.5
    assert summary["prior_samples"] == 32


def test_a_decoder_that_ignores_z_scores_the_same_with_its_fit_and_with_the_prior():
    """Fitted from the prior, q stays the prior (the decoder gives no gradient): the fitted
    IWAE and the prior control coincide, and so do all the bounds."""
    summary = evaluate_windows(z_blind_ltm(), _windows(32),
                               InferenceConfig(steps=6,
                               init_log_var=0.0),
                               ScoringConfig(batch_size=16, iw_samples=8, latent_stats=True,
                                             prior_samples=32))
    assert summary["prior_iwae_ppl"] == pytest.approx(summary["iwae_ppl"], rel=1e-5)
    assert summary["prior_iwae_ppl"] == pytest.approx(summary["elbo_ppl"], rel=1e-5)
    assert summary["mutual_info_per_window"] == pytest.approx(0.0, abs=1e-6)
    assert summary["kl_per_window"] == pytest.approx(0.0, abs=1e-6)


def test_prior_control_is_the_likelihood_when_z_matters():
    """With a 1-D z the prior-proposal IWAE converges to log p(x) by quadrature. The decoder
    depends on z, so a control scored at z = 0, or the NLL at the fitted draw, is off."""
    ltm = _sharp_ltm()
    windows = _windows(4, vocab=7, length=9, seed=1)
    exact = float(_quadrature_log_px(ltm, windows).sum())
    fitted = InferenceConfig(steps=30, noise="fresh", init_log_var=0.0)
    summary = evaluate_windows(ltm, windows, fitted,
                               ScoringConfig(batch_size=4, iw_samples=4, prior_samples=4096))
    tokens = summary["tokens"]
    assert summary["prior_iwae_per_token"] * tokens == pytest.approx(exact, abs=0.15)
    with torch.no_grad():
        zeros = torch.zeros(4, 1, 1)
        at_zero = -float(ltm.elbo_terms(windows, torch.ones(4, 8), LocalPosterior(zeros, zeros),
                                        zeros)[0].sum())
    assert abs(at_zero - exact) > 0.5
    assert abs(-summary["recon_nll_per_token"] * tokens - exact) > 0.5


def test_mi_of_a_known_discrete_factor_is_its_entropy():
    factors, windows = 8, 400
    generator = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(factors, 4, 3, generator=generator)
    factor = torch.arange(windows) % factors
    posterior = _posterior(centres[factor], -10.0)  # tight and well separated
    mi = mutual_information(posterior, samples=4, generator=generator)
    assert mi.estimate == pytest.approx(math.log(factors), abs=0.01)
    assert mi.estimate <= mi.cap == pytest.approx(math.log(windows))
    assert mi.stderr < 0.01
    # the posterior's own KL is far from the factor's entropy: it would not pass as MI
    kl = float(kl_per_window(posterior).mean())
    assert abs(kl - math.log(factors)) > 10


def test_mi_is_capped_by_log_n():
    """More distinct values than windows: every window is told apart, and MI = log N."""
    generator = torch.Generator().manual_seed(1)
    centres = 4 * torch.randn(64, 2, 3, generator=generator)
    posterior = _posterior(centres[:16], -10.0)
    mi = mutual_information(posterior, samples=8, generator=generator)
    assert mi.estimate == pytest.approx(math.log(16), abs=1e-3)
    assert mi.estimate <= mi.cap + 1e-9
    assert mi.estimate < math.log(64) - 1  # not the factor's entropy: N caps it


def test_mi_of_a_gaussian_channel():
    """q(z|x) = N(mu_x, 1) with mu_x ~ N(0, s^2): I(x; z) = 0.5 log(1 + s^2), here log 2."""
    generator = torch.Generator().manual_seed(2)
    loc = math.sqrt(3.0) * torch.randn(3000, 1, 1, generator=generator)
    mi = mutual_information(_posterior(loc, 0.0), samples=4, generator=generator)
    assert mi.estimate == pytest.approx(0.5 * math.log(4.0), abs=3 * mi.stderr + 0.02)
    assert mi.stderr < 0.02


def test_mi_chunking_does_not_change_the_estimate():
    generator = torch.Generator().manual_seed(3)
    loc = torch.randn(50, 4, 2, generator=generator)
    posterior = LocalPosterior(loc, -torch.rand(50, 4, 2, generator=generator))
    whole = mutual_information(posterior, 3, torch.Generator().manual_seed(4), max_elements=10**6)
    chunked = mutual_information(posterior, 3, torch.Generator().manual_seed(4), max_elements=7)
    assert chunked.estimate == pytest.approx(whole.estimate, abs=1e-9)
    assert chunked.stderr == pytest.approx(whole.stderr, abs=1e-9)


def _layered(layers: int, slots: int, slot_of) -> torch.Tensor:  # noqa: ANN001 - a callable
    """Means [N, layers * slots, dim] with slot s of layer l given by ``slot_of(l, s)``."""
    return torch.stack([slot_of(layer, slot) for layer in range(layers) for slot in range(slots)],
                       dim=1)


def test_slot_correlation_and_rank_of_copies_and_of_independent_slots():
    generator = torch.Generator().manual_seed(5)
    n, layers, slots, dim = 300, 2, 4, 5
    base = [torch.randn(n, dim, generator=generator) for _ in range(layers)]
    offsets = torch.randn(layers, slots, dim, generator=generator)
    # copies up to sign and a constant offset per slot
    copies = _layered(layers, slots,
                      lambda layer, s: (-1) ** s * base[layer] + 3 * offsets[layer, s])
    correlation, rank = slot_similarity(copies, layers)
    assert correlation == pytest.approx(1.0, abs=1e-9)  # a signed mean would give -1/3 here
    assert rank == pytest.approx(1.0, abs=1e-4)  # float32 means: rounding at 1e-7
    independent = torch.randn(n, layers * slots, dim, generator=generator)
    correlation, rank = slot_similarity(independent, layers)
    assert correlation < 0.05
    assert rank > slots - 0.05


def test_slot_statistics_group_consecutive_slots_into_layers():
    """Slot s of layer 0 equals slot s of layer 1, and slots within a layer are independent:
    low correlation. Grouping slots by index modulo the layer count would pair the copies."""
    generator = torch.Generator().manual_seed(6)
    n, layers, slots, dim = 300, 2, 4, 5
    own = [torch.randn(n, dim, generator=generator) for _ in range(slots)]
    loc = _layered(layers, slots, lambda layer, s: own[s])
    correlation, rank = slot_similarity(loc, layers)
    assert correlation < 0.05 and rank > slots - 0.05
    interleaved, _ = slot_similarity(loc.view(n, slots, layers, dim).transpose(1, 2)
                                     .flatten(1, 2), layers)
    assert interleaved > 0.3  # the wrong grouping sees the copies


def test_a_shared_constant_offset_is_not_correlation():
    generator = torch.Generator().manual_seed(7)
    loc = 5 + 0.1 * torch.randn(200, 4, 6, generator=generator)  # slots share a mean of 5
    correlation, _ = slot_similarity(loc, 1)
    assert correlation < 0.05


def test_slot_linear_r2_sees_rotated_copies_that_correlation_misses():
    """Slots that are rotations of one another are linear copies (R^2 near 1) although their
    coordinate-wise correlation is near 0; independent slots share nothing (near 0)."""
    generator = torch.Generator().manual_seed(3)
    n, d = 400, 6
    base = torch.randn(n, d, generator=generator)
    rotations = [torch.linalg.qr(torch.randn(d, d, generator=generator))[0] for _ in range(3)]
    copies = torch.stack([base] + [base @ r for r in rotations], 1)  # [N, 4 slots, d]
    correlation, _ = slot_similarity(copies, 1)
    assert correlation < 0.2
    assert slot_linear_r2(copies, 1) > 0.99
    independent = torch.randn(n, 4, d, generator=generator)
    assert slot_linear_r2(independent, 1) < 0.05
    # two layers: one of copies, one independent, average to about a half
    both = torch.cat([copies, independent], 1)
    assert slot_linear_r2(both, 2) == pytest.approx(0.5, abs=0.03)
    assert slot_linear_r2(copies[:3], 1) is None  # too few windows to hold any out


def test_summary_of_a_model_without_latents():
    ar = LatentThoughtModel(Decoder(micro_config(latents_per_layer=0)))
    summary = evaluate_windows(ar, _windows(10), InferenceConfig(),
                               ScoringConfig(batch_size=4, iw_samples=2, latent_stats=True,
                                             prior_samples=8))
    assert summary["mutual_info_per_window"] == 0 and summary["kl_per_window"] == 0
    assert summary["active_units"] == summary["active_units_total"] == 0
    assert summary["slot_correlation"] is None and summary["slot_effective_rank"] is None
    assert summary["slot_linear_r2"] is None
    assert summary["prior_iwae_ppl"] == summary["iwae_ppl"]
    assert latent_use_summary(None, 2, 10)["mutual_info_cap"] == pytest.approx(math.log(10))


def test_latent_options_leave_the_bounds_unchanged():
    ltm = LatentThoughtModel(Decoder(micro_config()))
    windows = _windows(24)
    plain = evaluate_windows(ltm, windows, HONEST,
                             ScoringConfig(batch_size=8, elbo_samples=2, iw_samples=4))
    full = evaluate_windows(ltm, windows, HONEST,
                            ScoringConfig(batch_size=8, elbo_samples=2, iw_samples=4,
                                          latent_stats=True, prior_samples=8))
    assert {k: full[k] for k in plain} == plain
    assert not set(plain) & {"mutual_info_per_window", "prior_iwae_ppl", "kl_per_window"}
    # KL per window is KL per token times tokens per window
    assert full["kl_per_window"] == pytest.approx(full["kl_per_token"] * 12, rel=1e-5)
    assert 0 <= full["mutual_info_per_window"] <= full["mutual_info_cap"] + 1e-9


def _validate(ltm, windows, config, device):  # noqa: ANN001, ANN202
    """The validation record a training run writes for this config's family."""
    return family_of(config).validate(ltm, windows, config, device)


def test_validation_records_carry_latent_use():
    config = RunConfig(model=micro_config(), inference=HONEST,
                       train=TrainConfig(eval_windows=16, batch_size=8))
    record = _validate(LatentThoughtModel(Decoder(config.model)), _windows(20), config,
                       torch.device("cpu"))
    assert set(LATENT_KEYS) <= record.keys()
    assert "prior_iwae_ppl" not in record  # the validation record skips the prior control
    assert record["mutual_info_cap"] == pytest.approx(math.log(16))


def test_validation_records_carry_the_prior_control_when_asked():
    """--eval-prior-control K: both proposals get K draws, and the ratio is reported; an AR
    (no z to draw) skips it. The K draws advance the evaluation's own generator (never the
    training's), so the other figures are other Monte-Carlo draws of the same quantities."""
    config = RunConfig(model=micro_config(), inference=HONEST,
                       train=TrainConfig(eval_windows=16, batch_size=8, eval_prior_control=8))
    ltm, windows = LatentThoughtModel(Decoder(config.model)), _windows(20)
    record = _validate(ltm, windows, config, torch.device("cpu"))
    direct = evaluate_windows(ltm, windows[:16], HONEST,
                              ScoringConfig(batch_size=8, iw_samples=8, prior_samples=8,
                                            seed=config.train.seed))
    assert record["iwae_ppl"] == pytest.approx(direct["iwae_ppl"])
    assert record["prior_iwae_ppl"] == pytest.approx(direct["prior_iwae_ppl"])
    assert record["prior_control"] == pytest.approx(
        direct["prior_iwae_ppl"] / direct["iwae_ppl"] - 1)
    plain = _validate(ltm, windows, replace(config, train=replace(
        config.train, eval_prior_control=0)), torch.device("cpu"))
    assert record.keys() - plain.keys() == {"iwae_ppl", "prior_iwae_ppl", "prior_control"}
    ar_config = replace(config, model_kind="ar", model=micro_config(latents_per_layer=0))
    ar = _validate(LatentThoughtModel(Decoder(ar_config.model)), windows, ar_config,
                   torch.device("cpu"))
    assert not {"iwae_ppl", "prior_iwae_ppl", "prior_control"} & ar.keys()


def test_eval_prior_control_flag():
    p = OneLineParser()
    add_run_arguments(p)
    assert config_from_args(p.parse_args(["--eval-prior-control", "32"])
                            ).train.eval_prior_control == 32
    assert config_from_args(p.parse_args([])).train.eval_prior_control == 0
    with pytest.raises(SystemExit):
        p.parse_args(["--eval-prior-control", "-1"])


def test_no_inference_ablation_trains_with_q_equal_to_the_prior():
    base = RunConfig(model=micro_config(), inference=HONEST)
    assert NO_INFERENCE not in comparison_configs(base)  # other callers keep their variants
    runs = comparison_configs(base, with_no_inference=True)
    assert list(runs) == ["ltm-T6", NO_INFERENCE, "ar-window", "ar-full"]
    ablation = runs[NO_INFERENCE]
    assert ablation.inference.steps == 0 and ablation.inference.init_log_var == 0.0
    assert ablation.model == base.model and ablation.model_kind == "ltm"
    ltm = LatentThoughtModel(Decoder(ablation.model))
    tokens, mask = _windows(4), torch.ones(4, 12)
    fit = fit_local_posterior(ltm, tokens, mask, ablation.inference, torch.Generator())
    assert torch.equal(fit.posterior.loc, torch.zeros_like(fit.posterior.loc))
    assert torch.equal(fit.posterior.log_var, torch.zeros_like(fit.posterior.log_var))
    # steps = 0 alone is not the prior: q stays at init_log_var -2 and pays KL
    not_prior = fit_local_posterior(ltm, tokens, mask, InferenceConfig(steps=0, init_log_var=-2.0),
                                    torch.Generator())
    assert float(kl_per_window(not_prior.posterior).min()) > 1.0
    svi = DualRateSVI(ltm, ablation.inference, TrainConfig(max_steps=2),
                      torch.Generator().manual_seed(0))
    assert float(svi.step(tokens, mask).kl) == 0.0
    assert prior_as_posterior(HONEST).noise == HONEST.noise


def test_the_ablation_starts_at_the_prior_whatever_the_ltm_start():
    """Jittered log-variances and per-slot loc offsets would move q_0 off the prior."""
    base = RunConfig(model=micro_config(), inference=InferenceConfig(
        steps=4, init_log_var=-5.0, init_log_var_jitter=0.1, init_loc_scale=1.0))
    ablation = comparison_configs(base, with_no_inference=True)[NO_INFERENCE].inference
    ltm = LatentThoughtModel(Decoder(base.model))
    tokens, mask = _windows(3), torch.ones(3, 12)
    for config, is_prior in ((ablation, True), (replace(base.inference, steps=0), False)):
        q = fit_local_posterior(ltm, tokens, mask, config, torch.Generator()).posterior
        assert (float(kl_per_window(q).abs().max()) == 0.0) == is_prior


def test_bench_quality_fits_the_ablation_like_the_ltm_and_with_the_prior():
    from ltm_pyro.studies import quality as bench

    base = RunConfig(model=micro_config(), inference=HONEST)
    runs = comparison_configs(base, with_no_inference=True)
    ablation = runs[NO_INFERENCE]
    assert bench.eval_inference(NO_INFERENCE, 0, ablation, base) == prior_as_posterior(HONEST)
    assert bench.eval_inference(NO_INFERENCE, 6, ablation, base) == HONEST
    assert bench.eval_inference("ltm-T6", 0, runs["ltm-T6"], base) == HONEST  # as trained


NEW_KEYS = {"kl_per_window", "mutual_info_per_window", "mutual_info_stderr", "mutual_info_cap",
            "active_units", "active_units_total", "slot_correlation", "slot_effective_rank",
            "slot_linear_r2", "prior_iwae_ppl", "prior_samples"}


def test_a_run_logs_latent_use_and_evaluate_reports_it(tmp_path, monkeypatch, capsys):
    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, lines in (("train", 100), ("valid", 20), ("test", 20)):
        (corpus / f"{split}.txt").write_text("\n".join(" ".join(
            rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(12))
            for _ in range(lines)) + "\n")
    config = RunConfig(model=micro_config(vocab_size=0, context=16), inference=HONEST,
                       train=TrainConfig(max_steps=2, batch_size=4, eval_every=2, eval_windows=6,
                                         log_every=1, checkpoint_every=2),
                       data=DataConfig(path=str(corpus)))
    train(config, tmp_path / "run", progress=False)
    valid = [r for r in read_jsonl(tmp_path / "run" / METRICS_NAME) if r["split"] == "valid"]
    assert valid and all(set(LATENT_KEYS) <= r.keys() for r in valid)
    assert len(training_curves(valid).axes) == 6  # a second row: the latent panels
    assert len(training_curves([{k: v for k, v in r.items() if k not in LATENT_KEYS}
                                for r in valid]).axes) == 3

    out = tmp_path / "eval.json"
    monkeypatch.setattr(sys, "argv", [
        "evaluate.py", "--checkpoint", str(tmp_path / "run"), "--max-windows", "8",
        "--iw-samples", "2", "--elbo-samples", "1", "--prior-samples", "4", "--json", str(out),
        "--no-progress"])
    assert load_script("evaluate").main() == 0
    results = json.loads(out.read_text())
    assert NEW_KEYS <= results.keys()
    assert results["prior_samples"] == 4 and results["mutual_info_cap"] == pytest.approx(
        math.log(results["windows"]))
    printed = capsys.readouterr().out
    assert "mutual_info_per_window" in printed and "prior_iwae_ppl" in printed
