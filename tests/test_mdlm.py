"""The masked-diffusion baseline (ltm_pyro/mdlm.py) against exact computations."""

import itertools
import json
import math
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch

from ltm_pyro.bounds import evaluate_windows
from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint
from ltm_pyro.cli import config_from_args
from ltm_pyro.comparisons import comparison_configs
from ltm_pyro.config import InferenceConfig, ModelConfig, TrainConfig, preset
from ltm_pyro.decoder import Decoder, count_parameters
from ltm_pyro.errors import UsageError
from ltm_pyro.files import read_jsonl
from ltm_pyro.flops import forward_flops_per_token, mean_keys_attended, training_flops_per_token
from ltm_pyro.generate import Sampling, sample_tokens
from ltm_pyro.mdlm import (
    MaskedDiffusionTrainer,
    continuous_nelbo,
    denoise_step,
    evaluate_bound,
    mdlm_model_config,
    sample_window,
    scorable_positions,
    window_bounds,
)
from ltm_pyro.model import LatentThoughtModel
from ltm_pyro.runner import Interrupted, train

from .conftest import load_script, train_in_process
from .test_bad_input import run_in_process

VOCAB, LENGTH = 3, 3  # the tiny case: 3 words, windows of 1 given + 3 predicted tokens


def _sharp_denoiser(vocab: int = VOCAB, context: int = LENGTH, seed: int = 0) -> Decoder:
    """A small bidirectional decoder with large weights, so its conditionals differ a lot."""
    decoder = Decoder(ModelConfig(vocab_size=vocab, context=context, d_model=16, n_layers=1,
                                  n_heads=2, latents_per_layer=0, window=None,
                                  bidirectional=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in decoder.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return decoder.eval()


def _subsets(length: int) -> list[frozenset]:
    positions = range(1, length + 1)
    return [frozenset(c) for k in range(length + 1) for c in itertools.combinations(positions, k)]


def _log_probs(decoder: Decoder, x: torch.Tensor) -> dict[frozenset, torch.Tensor]:
    """log p(. | x with the positions M masked) [L + 1, V] for every subset M, float64;
    the mask token's probability is 0, as in mdlm.position_nll."""
    table = {}
    with torch.no_grad():
        for masked in _subsets(len(x) - 1):
            noisy = x.clone()
            noisy[list(masked)] = decoder.mask_token
            logits = decoder(noisy[None])[0].double()[:, :decoder.mask_token]
            table[masked] = torch.log_softmax(logits, -1)
    return table


def _masked_nll(table: dict, x: torch.Tensor, masked: frozenset) -> float:
    return -sum(float(table[masked][i, x[i]]) for i in masked)


def _exact_continuous_nelbo(table: dict, x: torch.Tensor) -> float:
    """sum over masked sets M of (1/|M|) / C(L, |M|) x their NLL: t integrated out exactly."""
    length = len(x) - 1
    return sum(_masked_nll(table, x, m) / (len(m) * math.comb(length, len(m)))
               for m in _subsets(length) if m)


def _exact_discrete_nelbo(table: dict, x: torch.Tensor, steps: int) -> float:
    """MDLM's T-step NELBO, every expectation a sum: sum_s (alpha_{s-1} - alpha_s) /
    (1 - alpha_s) E_{z_s}[masked NLL], with (1/T) / (s/T) = 1/s and z_s masking each token
    with probability t = s/T."""
    length = len(x) - 1
    total = 0.0
    for s in range(1, steps + 1):
        t = s / steps
        total += sum(t ** len(m) * (1 - t) ** (length - len(m)) * _masked_nll(table, x, m)
                     for m in _subsets(length) if m) / s
    return total


def _exact_log_px(table: dict, x: torch.Tensor, steps: int) -> float:
    """log of the probability that the T-step ancestral sampler (mdlm.denoise_step) ends at
    x from x_0, by dynamic programming over the set of positions revealed (as x) so far."""
    everything = frozenset(range(1, len(x)))
    reach = {frozenset(): 1.0}
    for s in range(steps, 0, -1):
        reveal, after = 1 / s, {}
        for revealed, p in reach.items():
            masked = everything - revealed
            probs = {i: math.exp(float(table[masked][i, x[i]])) for i in masked}
            for now in _subsets(len(x) - 1):
                if not now <= masked:
                    continue
                q = math.prod(reveal * probs[i] for i in now) * (1 - reveal) ** len(masked - now)
                after[revealed | now] = after.get(revealed | now, 0.0) + p * q
        reach = after
    return math.log(reach[everything])


def _exact_any_order_log_px(table: dict, x: torch.Tensor) -> float:
    """log p(x) of the continuous-time sampler: tokens revealed one at a time in a uniformly
    random order (the limit of many steps), averaged over the orders."""
    everything = frozenset(range(1, len(x)))
    total = 0.0
    for order in itertools.permutations(sorted(everything)):
        log_p, masked = 0.0, everything
        for i in order:
            log_p += float(table[masked][i, x[i]])
            masked = masked - {i}
        total += math.exp(log_p)
    return math.log(total / math.factorial(len(everything)))


def _windows(count: int, seed: int, vocab: int = VOCAB, length: int = LENGTH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length + 1), generator=generator)


def test_discrete_time_nelbo_bounds_the_exact_likelihood_and_tends_to_the_continuous_one():
    decoder = _sharp_denoiser()
    for x in _windows(6, seed=1):
        table = _log_probs(decoder, x)
        continuous = _exact_continuous_nelbo(table, x)
        discrete = {steps: _exact_discrete_nelbo(table, x, steps) for steps in (1, 2, 4, 16, 256)}
        # One step reveals every token at once: the bound is then exact.
        assert discrete[1] == pytest.approx(-_exact_log_px(table, x, 1), rel=1e-9)
        for steps, nelbo in discrete.items():
            assert nelbo >= -_exact_log_px(table, x, steps) - 1e-9
        assert _exact_discrete_nelbo(table, x, 4096) == pytest.approx(continuous, rel=2e-3)
        assert continuous >= -_exact_any_order_log_px(table, x) - 1e-9
        assert continuous > -_exact_any_order_log_px(table, x) + 1e-3  # a bound, not equal


def test_bound_estimator_agrees_with_the_exact_nelbo():
    decoder = _sharp_denoiser()
    windows = _windows(4, seed=2)
    exact = torch.tensor([_exact_continuous_nelbo(_log_probs(decoder, x), x) for x in windows])
    draws = window_bounds(decoder, windows, 4096, torch.Generator().manual_seed(3))
    estimate, stderr = draws.mean(1), draws.std(1) / math.sqrt(draws.shape[1])
    assert torch.all(stderr < 0.02 * exact)
    assert torch.all((estimate - exact).abs() < 4 * stderr), (estimate, exact, stderr)
    summary = evaluate_bound(decoder, windows, samples=4096, batch_size=2, seed=3)
    per_token = float(exact.sum()) / windows[:, 1:].numel()
    assert summary["tokens"] == windows[:, 1:].numel()
    assert abs(summary["nll_per_token"] - per_token) < 4 * summary["bound_stderr_per_token"]
    assert summary["elbo_ppl"] == summary["iwae_ppl"] and summary["recon_ppl"] is None


def test_training_estimator_agrees_with_the_exact_nelbo():
    """The 1/t-weighted estimator of training, averaged over many low-discrepancy t."""
    decoder = _sharp_denoiser()
    for x in _windows(3, seed=4):
        exact = _exact_continuous_nelbo(_log_probs(decoder, x), x)
        rows = x.repeat(1 << 15, 1)
        scorable = scorable_positions(torch.ones(rows.shape[0], LENGTH))
        with torch.no_grad():
            estimate = float(continuous_nelbo(decoder, rows, scorable,
                                              torch.Generator().manual_seed(5)).double().mean())
        assert estimate == pytest.approx(exact, rel=0.02)


def test_the_first_token_is_never_masked_and_later_tokens_are_seen_both_ways():
    decoder = _sharp_denoiser(vocab=5, context=6)
    assert decoder.tok_embeddings.num_embeddings == 6 and decoder.mask_token == 5
    tokens = _windows(2, seed=6, vocab=5, length=6)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 5
    with torch.no_grad():
        assert not torch.allclose(decoder(tokens)[:, 1], decoder(changed)[:, 1])
    seen = []

    def spy(self, noisy):  # noqa: ANN001, ANN202 - records every input of the denoiser
        seen.append(noisy.clone())
        return Decoder.forward(self, noisy)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Decoder, "__call__", spy)
        draws = window_bounds(decoder, tokens, 16, torch.Generator().manual_seed(7))
    assert draws.shape == (2, 16) and seen
    assert all(torch.equal(batch[:, 0], tokens[:, 0].repeat(len(batch) // 2)) for batch in seen)


def test_next_token_scoring_and_decoding_refuse_an_mdlm():
    """A bidirectional decoder sees the token it would predict next: its next-token figures
    would be meaningless, so the LTM/AR paths refuse it."""
    ltm = LatentThoughtModel(_sharp_denoiser())
    windows = _windows(2, seed=10)
    with pytest.raises(UsageError, match="NELBO bound"):
        evaluate_windows(ltm, windows, InferenceConfig())
    with pytest.raises(UsageError, match="ancestral"):
        sample_tokens(ltm, windows[:, :1], 2, use_cache=False)


def test_trained_bound_never_falls_below_the_markov_chain_entropy():
    """Train on a Markov chain with a known transition matrix; on held-out chains the bound
    per token stays above their exact NLL (beyond Monte-Carlo error) and well below the
    uniform model's, so the test is not passed by a model that learned nothing."""
    vocab, length = 6, 8
    rng = np.random.default_rng(0)
    log_transitions = torch.log_softmax(torch.tensor(rng.normal(0, 2.0, (vocab, vocab))), -1)

    def chains(count: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        x = torch.zeros(count, length + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (count,), generator=generator)
        for t in range(1, length + 1):
            x[:, t] = torch.multinomial(log_transitions[x[:, t - 1]].exp(), 1,
                                        generator=generator)[:, 0]
        return x

    train, test = chains(4096, 1), chains(512, 2)
    decoder = Decoder(ModelConfig(vocab_size=vocab, context=length, d_model=32, n_layers=2,
                                  n_heads=2, latents_per_layer=0, window=None,
                                  bidirectional=True))
    config = TrainConfig(max_steps=300, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=20)
    trainer = MaskedDiffusionTrainer(LatentThoughtModel(decoder), config,
                                     torch.Generator().manual_seed(0))
    batches = torch.Generator().manual_seed(1)
    for _ in range(config.max_steps):
        rows = train[torch.randint(0, len(train), (config.batch_size,), generator=batches)]
        assert not trainer.step(rows, torch.ones(config.batch_size, length)).skipped
    summary = evaluate_bound(decoder, test, samples=64, batch_size=128, seed=0)
    exact = float(-log_transitions[test[:, :-1], test[:, 1:]].sum()) / test[:, 1:].numel()
    stderr = summary["bound_stderr_per_token"]
    assert summary["nll_per_token"] >= exact - 3 * stderr, (summary, exact)
    assert summary["nll_per_token"] < exact + 0.5 * (math.log(vocab) - exact), (summary, exact)


def test_sampling_reveals_everything_keeps_the_prompt_and_is_seeded():
    decoder = _sharp_denoiser(vocab=7, context=10)
    prompt = _windows(5, seed=8, vocab=7, length=2)
    draws = [sample_window(decoder, prompt, steps, torch.Generator().manual_seed(seed))
             for steps, seed in ((4, 0), (4, 0), (4, 1), (1, 0), (40, 0))]
    for window in draws:
        assert window.shape == (5, 11) and not (window == decoder.mask_token).any()
        assert torch.equal(window[:, :3], prompt) and window.max() < 7
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_revealed_positions_are_never_resampled():
    decoder = _sharp_denoiser(vocab=7, context=12)
    z = torch.full((8, 13), decoder.mask_token)
    z[:, 0] = 3
    generator = torch.Generator().manual_seed(9)
    steps = 6
    for i in range(steps, 0, -1):
        before = z
        z = denoise_step(decoder, z, i / steps, (i - 1) / steps, Sampling(), generator)
        revealed = before != decoder.mask_token
        assert torch.equal(z[revealed], before[revealed])
        assert (z != decoder.mask_token).sum() >= revealed.sum()
    assert not (z == decoder.mask_token).any()


def test_matched_mdlm_has_the_ltms_parameter_count_and_whole_window_flops():
    ltm = replace(preset("tiny").model, vocab_size=98)
    mdlm = mdlm_model_config(ltm, match_params=True)
    assert mdlm.bidirectional and mdlm.window is None and mdlm.latents_per_layer == 0
    assert abs(count_parameters(mdlm) - count_parameters(ltm)) <= 0.001 * count_parameters(ltm)
    causal = ModelConfig(**{**mdlm.__dict__, "bidirectional": False})
    keys_gained = mdlm.context + 1 - mean_keys_attended(mdlm.context, None)
    assert forward_flops_per_token(mdlm) - forward_flops_per_token(causal) == pytest.approx(
        4 * mdlm.d_model * mdlm.n_layers * keys_gained + 2 * mdlm.d_model)  # + the mask row
    assert training_flops_per_token(mdlm, 16) == pytest.approx(
        3 * forward_flops_per_token(mdlm) * (mdlm.context + 1) / mdlm.context)


RUN = ["--model", "mdlm", "--match-params", "--seq-len", "16", "--batch-size", "4",
       "--max-steps", "4", "--eval-every", "2", "--eval-windows", "4", "--checkpoint-every", "2",
       "--no-progress"]


def _config(*extra: str):  # noqa: ANN202 - a RunConfig
    args = load_script("run_svi").parser().parse_args(["--out", "unused", *RUN, *extra])
    return config_from_args(args)


def test_mdlm_configs_from_the_command_line_and_in_comparisons():
    config = _config()
    assert config.model_kind == "mdlm" and config.model.bidirectional
    assert config.model.window is None and config.model.latents_per_layer == 0
    runs = comparison_configs(_config_ltm(), with_mdlm=True)
    assert list(runs)[-1] == "mdlm" and runs["mdlm"].model == config.model
    assert "mdlm" not in comparison_configs(_config_ltm())  # other callers keep their variants


def _config_ltm():  # noqa: ANN202 - a RunConfig
    args = load_script("run_svi").parser().parse_args(["--out", "unused", "--seq-len", "16"])
    return config_from_args(args)


@pytest.mark.slow
def test_interrupted_mdlm_run_resumes_exactly(tmp_path, monkeypatch):
    straight = train_in_process(tmp_path / "straight", *RUN)
    stepped = MaskedDiffusionTrainer.step

    def step_then_stop(self, tokens, mask):  # noqa: ANN001, ANN202
        stats = stepped(self, tokens, mask)
        if self.step_count == 3:
            signal.raise_signal(signal.SIGTERM)
        return stats

    monkeypatch.setattr(MaskedDiffusionTrainer, "step", step_then_stop)
    with pytest.raises(Interrupted):
        train(_config(), tmp_path / "resumed", progress=False)
    monkeypatch.setattr(MaskedDiffusionTrainer, "step", stepped)
    train(_config(), tmp_path / "resumed", progress=False)

    def records(run):  # noqa: ANN001, ANN202
        return [{k: v for k, v in r.items() if k != "tokens_per_s"}
                for r in read_jsonl(run / "metrics.jsonl")]

    assert records(straight) == records(tmp_path / "resumed")
    assert [r["step"] for r in records(straight) if r["split"] == "valid"] == [2, 4]
    assert all(r["kl"] == 0 and r["bound_stderr_per_token"] > 0
               for r in records(straight) if r["split"] == "valid")
    weights = [load_checkpoint(run)["decoder"] for run in (straight, tmp_path / "resumed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_evaluate_and_generate_an_mdlm_checkpoint(tmp_path, capsys, monkeypatch):
    run = train_in_process(tmp_path / "run", *RUN)
    status, _ = run_in_process("evaluate.py", ["--checkpoint", str(run), "--split", "test",
                                               "--max-windows", "8", "--bound-samples", "8",
                                               "--json", str(tmp_path / "e.json"),
                                               "--no-progress"], capsys, monkeypatch)
    report = json.loads((tmp_path / "e.json").read_text())
    assert status == 0 and report["model_kind"] == "mdlm" and report["recon_ppl"] is None
    assert report["elbo_ppl"] == report["iwae_ppl"] > 1 and report["tokens"] == 8 * 16
    assert 0 < report["bound_ppl_rel_stderr"] and report["bound_samples"] == 8
    ltm, _, tokenizer = model_from_checkpoint(load_checkpoint(run))
    assert report["params"] == ltm.decoder.num_parameters()
    samples = []
    for name in ("a.json", "b.json"):
        status, _ = run_in_process("generate.py", ["--checkpoint", str(run), "--num-samples", "3",
                                                   "--max-new-tokens", "6", "--denoising-steps",
                                                   "5", "--seed", "4", "--json",
                                                   str(tmp_path / name)], capsys, monkeypatch)
        assert status == 0
        samples.append(json.loads((tmp_path / name).read_text()))
    assert samples[0]["token_ids"] == samples[1]["token_ids"]
    assert all(len(row) == 7 and max(row) < tokenizer.vocab_size
               for row in samples[0]["token_ids"])


@pytest.mark.slow
def test_generation_benchmark_has_an_mdlm_row(tmp_path, capsys, monkeypatch):
    small = ["--seq-len", "16", "--batch-size", "4", "--max-steps", "2", "--eval-windows", "4",
             "--inference-steps", "1", "--no-progress"]
    ltm = train_in_process(tmp_path / "ltm", *small)
    ar = train_in_process(tmp_path / "ar", *small, "--model", "ar")
    mdlm = train_in_process(tmp_path / "mdlm", *small, "--model", "mdlm")
    status, stderr = run_in_process("bench_generation.py", [
        "--ltm", str(ltm), "--ar", str(ar), "--mdlm", str(mdlm), "--scorer", str(ar),
        "--label", "g", "--results", str(tmp_path / "res"), "--num-samples", "3",
        "--prior-scales", "1", "--denoising-steps", "4"], capsys, monkeypatch)
    assert status == 0, stderr
    rows = json.loads((tmp_path / "res" / "g.json").read_text())["rows"]
    assert [r["source"] for r in rows] == ["test data", "ltm", "ar", "mdlm"]
    assert rows[-1]["tokens"] == rows[0]["tokens"] and rows[-1]["scorer_ppl"] > 1


@pytest.mark.parametrize("args, words", [
    (["--model", "mdlm", "--window", "8"], "drop --window"),
    (["--model", "ltm", "--match-params"], "ar or mdlm only"),
])
def test_bad_mdlm_flags_are_one_line(tmp_path, capsys, monkeypatch, args, words):
    status, stderr = run_in_process("run_svi.py", ["--out", str(tmp_path / "r"), *args], capsys,
                                    monkeypatch)
    assert status == 2 and len(stderr.strip().splitlines()) == 1 and words in stderr
    assert not (tmp_path / "r").exists()
