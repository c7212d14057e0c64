"""The exploration API: load a run, fit z to a text, score it, generate from it."""


import pytest
import torch

import ltm_pyro
from ltm_pyro.bounds import evaluate_windows
from ltm_pyro.errors import UsageError

from .conftest import train_in_process

# One worker runs this module under pytest-xdist, so its module-scoped trained run is built once.
pytestmark = pytest.mark.xdist_group("test_explore")

RUN = ["--seq-len", "16", "--batch-size", "4", "--inference-steps", "2", "--eval-every", "4",
       "--eval-windows", "4", "--checkpoint-every", "4", "--max-steps", "4", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return ltm_pyro.load_run(train_in_process(tmp_path_factory.mktemp("explore") / "run", *RUN))


def _text(run, index: int = 0) -> str:
    return run.tokenizer.decode(run.corpus.windows["valid"][index].tolist())


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
    window = run.corpus.windows["valid"][:1]
    summary = run.score(run.tokenizer.decode(window[0].tolist()), steps=2, iw_samples=4)
    expected = evaluate_windows(run.ltm, window, run.config.inference, steps=2, iw_samples=4,
                                elbo_samples=4)
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
