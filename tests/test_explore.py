"""The exploration API: load a run, fit z to a text, score it, generate from it."""


import math

import pytest
import torch

import ltm_pyro
import ltm_pyro.run_folder
from ltm_pyro.bounds import ScoringConfig, evaluate_windows
from ltm_pyro.errors import UsageError

from .conftest import train_in_process

RUN = ["--seq-len", "16", "--batch-size", "4", "--inference-steps", "2", "--eval-every", "4",
       "--eval-windows", "4", "--checkpoint-every", "4", "--max-steps", "4", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return ltm_pyro.load_run(train_in_process(tmp_path_factory.mktemp("explore") / "run", *RUN))


def _text(run, index: int = 0) -> str:
    return run.tokenizer.decode(run.splits().windows["valid"][index].tolist())


def test_encode_fits_the_posterior_evaluation_would_fit(run):
    text = _text(run)
    posterior = run.encode(text, steps=3, seed=1)
    tokens = posterior.tokens
    assert tokens.shape[1] <= run.config.model.context + 1
    direct = ltm_pyro.fit_local_posterior(
        run.ltm, tokens, torch.ones(1, tokens.shape[1] - 1), run.config.inference,
        torch.Generator().manual_seed(1), steps=3)
    torch.testing.assert_close(posterior.mean, direct.posterior.loc)
    assert posterior.kl() > 0
    assert not torch.equal(run.encode(_text(run, 1), steps=3).mean, posterior.mean)


def test_score_is_the_evaluator_on_the_texts_windows(run):
    window = run.splits().windows["valid"][:1]
    summary = run.score(run.tokenizer.decode(window[0].tolist()), steps=2, iw_samples=4)
    expected = evaluate_windows(run.ltm, window, run.config.inference,
                                ScoringConfig(steps=2, iw_samples=4, elbo_samples=4))
    for key in ("elbo_ppl", "iwae_ppl", "recon_ppl"):
        assert summary[key] == pytest.approx(expected[key], rel=1e-6)


def test_generate_is_seeded_and_uses_the_latent(run):
    posterior = run.encode(_text(run), steps=2)
    a = run.generate(posterior, max_new_tokens=8, seed=3)
    assert a == run.generate(posterior, max_new_tokens=8, seed=3)
    assert len(a.split()) >= 1
    assert isinstance(run.generate(run.prior(seed=2), max_new_tokens=4), str)
    assert isinstance(run.generate(prompt=_text(run)[:20], max_new_tokens=4), str)


def test_text_outside_the_vocabulary_is_one_clear_error(run):
    with pytest.raises(UsageError, match="vocabulary"):
        run.encode("qqqq zzzz")


def test_score_covers_every_token_of_a_long_text_and_refuses_a_single_token(run):
    """Catches: a long text scored on its first window only (issue 39: 'silently scored on
    its first 64 or 128 tokens'), the tail after the last full window dropped, and a one-word
    text crashing inside Pyro with NaN instead of one line."""
    from ltm_pyro.bounds import combined_summary
    from ltm_pyro.data import to_windows
    from ltm_pyro.tokenizers import encode_prompt

    context = run.config.model.context
    valid = run.splits().windows["valid"]
    text = run.tokenizer.decode(torch.cat([valid[0], valid[1, 1:], valid[2, 1:6]]).tolist())
    ids = encode_prompt(run.tokenizer, text)
    assert len(ids) > 2 * context + 1  # two full windows and a tail
    summary = run.score(text, steps=1, iw_samples=2, elbo_samples=1)
    assert summary["tokens"] == len(ids) - 1 and summary["sequences"] == 3
    windows = to_windows(ids, context)
    scoring = ScoringConfig(steps=1, iw_samples=2, elbo_samples=1)
    parts = [evaluate_windows(run.ltm, w, run.config.inference, scoring)
             for w in (windows, torch.tensor([ids[len(windows) * context:]]))]
    assert summary["iwae_ppl"] == pytest.approx(combined_summary(parts)["iwae_ppl"], rel=1e-9)
    nats = math.log(summary["iwae_ppl"]) * summary["tokens"]
    assert summary["bits_per_byte"] == pytest.approx(
        nats / math.log(2) / run.tokenizer.text_bytes(ids[1:]))
    word = run.tokenizer.decode(valid[0, 1:2].tolist()).strip()
    with pytest.raises(UsageError, match="at least two"):
        run.score(word)


def test_score_reports_and_warns_about_unknown_words(run):
    """Catches: unknown words scored as <unk> with no unk_rate returned and no warning (a
    text with half its words unknown looks far easier than it is)."""
    known = run.tokenizer.decode(run.splits().windows["valid"][0, 1:9].tolist()).split()
    text = " ".join(w for pair in zip(known, ["qqqq"] * len(known)) for w in pair)
    with pytest.warns(UserWarning, match="<unk>"):
        summary = run.score(text, steps=1, iw_samples=2, elbo_samples=1)
    assert 0.3 < summary["unk_rate"] < 0.7
    assert run.score(" ".join(known), steps=1, iw_samples=2, elbo_samples=1)["unk_rate"] == 0


def test_encode_of_a_list_fits_each_text_as_alone_and_the_posterior_is_data(run):
    """Catches: a batch fit in which padding or the other texts change a text's posterior,
    texts reordered, and a posterior object without std, draws, KL or an ArviZ export."""
    valid = run.splits().windows["valid"]
    texts = [run.tokenizer.decode(valid[i, : 6 + 3 * i].tolist()) for i in range(3)]
    batch = run.encode(texts, steps=2, seed=0, batch_size=2)
    assert len(batch) == 3 and batch.mean.shape[0] == 3
    for i, text in enumerate(texts):
        alone = run.encode(text, steps=2, seed=0)
        # Equal up to the fresh noise, which is drawn per batch row (2e-4 here); a padding
        # fitted as text (no mask) moves the means by 3e-3.
        torch.testing.assert_close(batch.mean[i], alone.mean[0], rtol=0, atol=1e-3)
    assert torch.all(batch.std > 0) and batch.std.shape == batch.mean.shape
    draws = batch.sample(500, seed=1)
    assert draws.shape == (500, *batch.mean.shape)
    torch.testing.assert_close(draws.std(0), batch.std, rtol=0.15, atol=1e-3)
    assert batch.kl_per_slot().shape == batch.mean.shape[:2]
    torch.testing.assert_close(batch.kl_per_text(), batch.kl_per_slot().sum(-1))
    assert set(batch.numpy()) == {"mean", "std"}
    z = batch.to_inference_data(draws=10).posterior["z"]
    n_layers = run.config.model.n_layers
    assert dict(z.sizes) == {"chain": 1, "draw": 10, "text": 3, "layer": n_layers,
                             "slot": batch.mean.shape[1] // n_layers,
                             "dim": batch.mean.shape[2]}
    assert "3 texts" in repr(batch) and len(repr(batch)) < 120
    with pytest.raises(UsageError, match="text 1 has 1 token"):
        run.encode([texts[0], texts[0].split()[0]])


def test_generate_returns_what_was_asked_past_the_context_with_ids_and_log_probs(run):
    """Catches: generation cut at the context (issue 39: 1000 asked, 64 given), a prompt
    longer than the context giving one token, a negative length giving '' silently, and
    log-probabilities that are not the decoder's for the tokens drawn."""
    context = run.config.model.context
    long = run.generate(run.prior(seed=1), max_new_tokens=1000, details=True, seed=2)
    assert long.ids.shape == (1, 1000) and long.log_probs.shape == long.ids.shape
    assert torch.all(long.log_probs <= 0) and torch.all(torch.isfinite(long.log_probs))
    prompt = run.tokenizer.decode(run.splits().windows["valid"][:3].flatten().tolist())
    assert len(run.generate(prompt=prompt, max_new_tokens=7, details=True).ids[0]) == 7
    assert len(run.tokenizer.encode(prompt)) > context + 1  # a prompt longer than the context
    with pytest.raises(UsageError, match="max_new_tokens must be 0 or more"):
        run.generate(max_new_tokens=-5)
    assert run.generate(max_new_tokens=0) == ""

    z = run.prior(seed=3)
    short = run.generate(z, max_new_tokens=6, num_samples=3, details=True, seed=4)
    assert len(short.texts) == 3 and short.ids.shape == (3, 6)
    start = torch.full((3, 1), ltm_pyro.run_folder.start_token(run.tokenizer))
    tokens = torch.cat([start, short.ids], 1)
    logits = run.ltm.logits(tokens[:, :-1], z.expand(3, -1, -1))
    want = torch.log_softmax(logits, -1).gather(-1, short.ids[..., None])[..., 0]
    torch.testing.assert_close(short.log_probs, want, rtol=1e-5, atol=1e-5)
    greedy = run.generate(z, max_new_tokens=6, greedy=True, details=True)
    assert torch.allclose(greedy.log_probs, torch.log_softmax(
        run.ltm.logits(torch.cat([start[:1], greedy.ids], 1)[:, :-1], z), -1).max(-1).values,
        atol=1e-5)
    assert isinstance(run.generate(z, max_new_tokens=3, num_samples=2), list)


def test_the_inputs_quoted_in_issue_39(run):
    """Catches a return of each failure the issue quotes: "rako" crashing inside Pyro with
    NaN, unknown words scored silently, and a list of texts not encodable."""
    with pytest.raises(UsageError, match="at least two"):
        run.score("rako")
    scores = run.score("rako vuba tibi", seed=3, steps=1, iw_samples=4, elbo_samples=2)
    assert math.isfinite(scores["iwae_ppl"]) and scores["tokens"] == 2  # after the first word
    with pytest.warns(UserWarning, match="<unk>"):
        mixed = run.score("rako qqqq vuba zzzz", steps=1, iw_samples=4, elbo_samples=2)
    assert mixed["unk_rate"] == pytest.approx(2 / 3)  # of the three predicted words
    assert len(run.encode(["rako vuba tibi", "vuba tibi rako"], steps=1)) == 2
