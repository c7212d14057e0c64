"""The data pipeline and sampling checked against their definitions (issue 43).

Each test computes the expected answer independently, on a case small enough that the answer
is known: the entropy floor by enumerating every sequence of a small topic-style process, the
batch order by what a permutation is, the tokenizers on texts whose ids are written out, the
sampler's first-token frequencies against softmax(logits / T), and a resume against draws from
each random stream taken before and after the round trip through a checkpoint file.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from ltm_pyro.checkpoint import load_checkpoint, save_checkpoint
from ltm_pyro.config import DataConfig, InferenceConfig, TrainConfig
from ltm_pyro.data import BatchSampler, builtin_corpus, text_corpus, to_windows
from ltm_pyro.decoder import Decoder
from ltm_pyro.generate import prior_latents, sample_tokens
from ltm_pyro.model import LatentThoughtModel
from ltm_pyro.svi import DualRateSVI
from ltm_pyro.synthetic import N_STYLES, N_TOPICS, TopicStyleProcess
from ltm_pyro.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    WordTokenizer,
    encode_prompt,
    tokenizer_from_dict,
)
from ltm_pyro.training_state import TrainingState

from .conftest import micro_config

# --- 1. the built-in corpus' entropy floor ---------------------------------------------------


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def _small_process(vocab: int = 3) -> TopicStyleProcess:
    """A topic-style process over ``vocab`` words (still 32 topics x 8 styles), with strong
    factors so that the factors matter to the entropy."""
    rng = np.random.default_rng(7)
    return TopicStyleProcess(bigram_logits=rng.normal(0.0, 2.0, (vocab, vocab)),
                             topic_logits=rng.normal(0.0, 2.0, (N_TOPICS, vocab)),
                             style_logits=rng.normal(0.0, 1.5, (N_STYLES, vocab)))


def _enumerated(process: TopicStyleProcess, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Every sequence of ``length`` tokens and its probability, straight from the generative
    story: a uniform (topic, style), the first word from softmax(topic + style), each next
    word from softmax(bigram[previous] + topic + style)."""
    v = process.vocab_size
    sequences = np.array(list(itertools.product(range(v), repeat=length)))
    prob = np.zeros(len(sequences))
    for k in range(N_TOPICS):
        for s in range(N_STYLES):
            bias = process.topic_logits[k] + process.style_logits[s]
            first = _softmax(bias)
            rows = np.stack([_softmax(process.bigram_logits[a] + bias) for a in range(v)])
            p = first[sequences[:, 0]]
            for t in range(1, length):
                p = p * rows[sequences[:, t - 1], sequences[:, t]]
            prob += p / (N_TOPICS * N_STYLES)
    return sequences, prob


def test_entropy_floor_is_the_exact_nll_and_the_true_conditional_entropy(monkeypatch):
    """Catches: the floor divided by the window length instead of the predicted tokens, a
    mis-indexed transition in the exact likelihood, and a sampler that draws documents from
    anything but the stated process (the floor would then sit off the true entropy)."""
    process, seq_len, n_docs = _small_process(), 3, 6000
    sequences, prob = _enumerated(process, seq_len + 1)
    assert prob.sum() == pytest.approx(1.0, abs=1e-12)
    v = process.vocab_size
    first = np.bincount(sequences[:, 0], weights=prob, minlength=v)  # p(x_0), by summing
    per_token = -np.log(prob / first[sequences[:, 0]]) / seq_len  # -log p(x_1.. | x_0) / L
    entropy = float((prob * per_token).sum())  # H(X_1..X_L | X_0) / L
    spread = math.sqrt(float((prob * (per_token - entropy) ** 2).sum()) / n_docs)

    monkeypatch.setattr(TopicStyleProcess, "default", classmethod(lambda cls: process))
    corpus = builtin_corpus(seq_len, 8, n_docs)
    for split in ("valid", "test"):
        docs = corpus.windows[split].numpy() - 2  # ids 0 and 1 are <unk> and <eos>
        assert docs.shape == (n_docs, seq_len + 1)
        row = (docs * v ** np.arange(seq_len, -1, -1)).sum(1)  # the doc's enumeration index
        floor = corpus.references[f"entropy_floor_{split}"]
        assert floor == pytest.approx(float(per_token[row].mean()), rel=1e-9)
        assert abs(floor - entropy) < 4 * spread, (split, floor, entropy, spread)
        # The documents themselves are drawn from the process: a chi-square over every
        # sequence (those expected fewer than 5 times pooled) within 6 sd of its mean.
        counts, expected = np.bincount(row, minlength=len(prob)), prob * n_docs
        rare = expected < 5
        observed = np.append(counts[~rare], counts[rare].sum())
        wanted = np.append(expected[~rare], expected[rare].sum())
        chi2, dof = float(((observed - wanted) ** 2 / wanted).sum()), len(observed) - 1
        assert chi2 < dof + 6 * math.sqrt(2 * dof), (split, chi2, dof)


def test_default_corpus_floor_is_the_exact_nll_of_its_own_windows():
    """Catches: the reported floor of the real corpus computed on other tokens than its
    windows (an id offset), or per window token instead of per predicted token."""
    process, seq_len = TopicStyleProcess.default(), 6
    corpus = builtin_corpus(seq_len, 4, 10)
    bias = torch.as_tensor(process.topic_logits[:, None] + process.style_logits[None])  # [K,S,V]
    log_first = torch.log_softmax(bias, -1)  # log p(x_0 | k, s)
    log_next = torch.log_softmax(torch.as_tensor(process.bigram_logits) + bias[:, :, None], -1)
    log_prior = -math.log(N_TOPICS * N_STYLES)
    for split in ("valid", "test"):
        docs = torch.as_tensor(corpus.windows[split].numpy() - 2)  # ids 0, 1: <unk>, <eos>
        first = log_first[:, :, docs[:, 0]] + log_prior  # log p(k, s, x_0): [K, S, N]
        joint = first + log_next[:, :, docs[:, :-1], docs[:, 1:]].sum(-1)  # log p(k, s, x)
        nll = -(torch.logsumexp(joint.flatten(0, 1), 0) - torch.logsumexp(first.flatten(0, 1), 0))
        expected = float(nll.sum()) / (len(docs) * seq_len)  # per predicted token
        assert corpus.references[f"entropy_floor_{split}"] == pytest.approx(expected, rel=1e-9)


# --- 2. windows, splits and the batch sampler -------------------------------------------------


@pytest.mark.parametrize("n_tokens,seq_len", [(13, 4), (16, 5), (12, 4), (5, 4), (4, 4),
                                              (30, 1)])
def test_windows_cover_every_predicted_token_once_and_drop_only_a_short_tail(n_tokens, seq_len):
    """Catches: windows without the shared boundary token (a token every seq_len never
    predicted), windows one token short, and a tail cut longer than a window."""
    ids = list(range(100, 100 + n_tokens))
    windows = to_windows(ids, seq_len)
    assert windows.dtype == torch.long and windows.shape[1] == seq_len + 1
    predicted = windows[:, 1:].flatten().tolist()
    # Every token after the first, in order, up to a dropped tail shorter than a window.
    assert predicted == ids[1:1 + len(predicted)]
    assert 0 <= (n_tokens - 1) - len(predicted) < seq_len
    for previous, window in zip(windows[:-1], windows[1:]):
        assert window[0] == previous[-1]  # each window's input starts where the last ended
    if len(windows):
        assert windows[0, 0] == ids[0]


def test_splits_come_from_their_own_files_and_the_vocabulary_from_train_alone(tmp_path):
    """Catches: a split read from another split's file, or the tokenizer fitted on all the
    text (a valid word unseen in train would then not be <unk>)."""
    texts = {"train": "a b c a b\nc a b c\nb c a\n",
             "valid": "c b a zebra\na c b\n",
             "test": "b b a c\nc c a b\n"}
    for split, text in texts.items():  # sorted names (test, train, valid) differ from SPLITS
        (tmp_path / f"ptb.{split}.txt").write_text(text)
    corpus = text_corpus(tmp_path, DataConfig(), seq_len=3)
    tokenizer = corpus.tokenizer
    assert set(tokenizer.vocab) == {"<unk>", "<eos>", "a", "b", "c"}
    for split, text in texts.items():
        words = [w for line in text.splitlines() for w in line.split() + ["<eos>"]]
        windows = corpus.windows[split]
        stream = [windows[0, 0].item()] + windows[:, 1:].flatten().tolist()
        decoded = [tokenizer.vocab[i] for i in stream]
        expected = [w if w in tokenizer.index else "<unk>" for w in words]
        assert decoded == expected[:len(decoded)]
        assert len(expected) - len(decoded) < 3  # the dropped tail is shorter than a window
    assert "<unk>" in [tokenizer.vocab[i] for i in corpus.windows["valid"].flatten().tolist()]


def test_batch_sampler_epochs_are_fresh_permutations_repeatable_by_seed():
    """Catches: the same order every epoch, the seed ignored, a window served twice or never
    in an epoch, and a partial batch."""
    sampler = BatchSampler(24, 4, seed=5)
    assert sampler.batches_per_epoch == 6
    epochs = []
    for epoch in range(3):
        batches = [sampler.indices(epoch * 6 + i) for i in range(6)]
        assert all(b.shape == (4,) for b in batches)
        order = torch.cat(batches).tolist()
        assert sorted(order) == list(range(24))  # every window exactly once
        epochs.append(order)
    assert len({tuple(order) for order in epochs}) == 3  # a fresh shuffle each epoch
    assert epochs[0] != list(range(24))
    steps = range(20)
    same = BatchSampler(24, 4, seed=5)
    assert all(torch.equal(sampler.indices(s), same.indices(s)) for s in reversed(steps))
    other = BatchSampler(24, 4, seed=6)
    assert not all(torch.equal(sampler.indices(s), other.indices(s)) for s in range(6))


def test_batch_sampler_drops_a_different_remainder_each_epoch():
    """Catches: a sampler that shuffles only the windows of whole batches, so the last few
    windows of the split are never trained on."""
    sampler = BatchSampler(26, 4, seed=1)
    assert sampler.batches_per_epoch == 6
    seen = set()
    for epoch in range(20):
        order = torch.cat([sampler.indices(epoch * 6 + i) for i in range(6)]).tolist()
        assert len(order) == len(set(order)) == 24 and all(0 <= i < 26 for i in order)
        seen.update(order)
    assert seen == set(range(26))


# --- 3. tokenizers ---------------------------------------------------------------------------

TEXT = "the cat sat\n\non the mat"  # a blank line, and no newline after the last line


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    train = "the cat sat\non the mat\nthe dog ran\n"
    return {"word": WordTokenizer.fit(train), "char": CharTokenizer.fit(train),
            "bpe": BPETokenizer.fit(train * 20, vocab_size=300)}


@pytest.mark.parametrize("final_newline", [False, True])
def test_word_tokenizer_keeps_the_last_line_with_one_eos_per_line(tokenizers, final_newline):
    """Catches: the last line lost when the text has no final newline, or an extra <eos>
    for the empty piece after a final newline."""
    tokenizer = tokenizers["word"]
    text = TEXT + "\n" * final_newline
    words = ["the", "cat", "sat", "<eos>", "<eos>", "on", "the", "mat", "<eos>"]
    assert tokenizer.encode(text) == [tokenizer.index[w] for w in words]


@pytest.mark.parametrize("final_newline", [False, True])
def test_word_tokenizer_decodes_what_it_encoded(tokenizers, final_newline):
    """Catches: decode dropping the words after the last <eos> (a prompt without a final
    newline decodes to less than it was), or blank lines lost in a round trip."""
    tokenizer = tokenizers["word"]
    text = TEXT + "\n" * final_newline
    assert tokenizer.decode(encode_prompt(tokenizer, text)) == text
    assert tokenizer.decode(tokenizer.encode(text)) == TEXT + "\n"  # <eos> ends every line


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("final_newline", [False, True])
def test_char_and_bpe_round_trip_every_character(tokenizers, kind, final_newline):
    """Catches: a character given the <unk> id (char), or a space added before the text or
    a byte mapping left undone on decode (BPE)."""
    tokenizer = tokenizers[kind]
    text = TEXT + "\n" * final_newline
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids[-1:]) == text[-len(tokenizer.decode(ids[-1:])):]
    if kind == "char":
        assert len(ids) == len(text) and 0 not in ids
        assert ids.count(tokenizer.index["\n"]) == text.count("\n")


def test_char_tokenizer_maps_unseen_characters_to_unk(tokenizers):
    """Catches: unseen characters dropped or mapped onto a real character."""
    tokenizer = tokenizers["char"]
    ids = tokenizer.encode("cat!")
    assert len(ids) == 4 and ids[-1] == 0 and tokenizer.decode(ids) == "cat\ufffd"


@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
def test_tokenizers_from_dict_give_identical_ids(tokenizers, kind):
    """Catches: a serialised tokenizer that loses its vocabulary order or its options (the
    word tokenizer's <eos> on blank lines), so a checkpoint scores other ids."""
    tokenizer = tokenizers[kind]
    again = tokenizer_from_dict(tokenizer.to_dict())
    for text in (TEXT, TEXT + "\n", "a zebra ate\n\n\nthe cat\n"):
        assert again.encode(text) == tokenizer.encode(text)
    assert again.vocab_size == tokenizer.vocab_size
    ids = tokenizer.encode(TEXT)
    assert again.decode(ids) == tokenizer.decode(ids)


# --- 4. sampling -----------------------------------------------------------------------------

DRAWS = 20_000


@pytest.fixture(scope="module")
def sharp_model() -> tuple[LatentThoughtModel, torch.Tensor, torch.Tensor]:
    """A tiny LTM with fixed, larger-than-init weights and one z, and its first-token logits
    after the prompt [0]."""
    torch.manual_seed(3)
    decoder = Decoder(micro_config(context=4, window=None))
    for p in decoder.parameters():
        p.data.mul_(2)
    ltm = LatentThoughtModel(decoder)
    z = prior_latents(ltm, 1, generator=torch.Generator().manual_seed(1))
    decoder.eval()
    with torch.no_grad():
        logits = decoder(torch.zeros(1, 1, dtype=torch.long), z)[0, -1].double()
    return ltm, z, logits


def _first_token_frequencies(ltm, z, **sampling) -> torch.Tensor:
    prompt = torch.zeros(DRAWS, 1, dtype=torch.long)
    draws = sample_tokens(ltm, prompt, 1, z.expand(DRAWS, *z.shape[1:]),
                          generator=torch.Generator().manual_seed(0), **sampling)[:, 1]
    return torch.bincount(draws, minlength=ltm.config.vocab_size).double() / DRAWS


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def _truncated(probs: torch.Tensor, keep: list[int]) -> torch.Tensor:
    kept = torch.zeros_like(probs)
    kept[keep] = probs[keep]
    return kept / kept.sum()


def test_sampling_applies_the_temperature_once(sharp_model):
    """Catches: the temperature applied twice (the logits divided before and inside the
    sampler), or not at all."""
    ltm, z, logits = sharp_model
    at = {t: torch.softmax(logits / t, -1) for t in (0.25, 0.5, 1.0)}
    assert _tv(at[0.5], at[0.25]) > 0.2 and _tv(at[0.5], at[1.0]) > 0.1  # the test has power
    empirical = _first_token_frequencies(ltm, z, temperature=0.5)
    assert _tv(empirical, at[0.5]) < 0.04
    assert _tv(empirical, at[0.25]) > 0.1 and _tv(empirical, at[1.0]) > 0.06


def test_top_k_samples_the_tempered_top_k_renormalised(sharp_model):
    """Catches: top-k keeping other tokens than the k most likely (e.g. the mask applied in
    sorted rather than vocabulary order), or their mass not renormalised."""
    ltm, z, logits = sharp_model
    probs = torch.softmax(logits / 0.5, -1)
    top = sorted(range(len(probs)), key=lambda i: -float(probs[i]))[:4]
    expected = _truncated(probs, top)
    empirical = _first_token_frequencies(ltm, z, temperature=0.5, top_k=4)
    assert set(torch.nonzero(empirical).flatten().tolist()) <= set(top)
    assert _tv(empirical, expected) < 0.03


def test_top_p_samples_the_tempered_nucleus_renormalised(sharp_model):
    """Catches: the nucleus cut in sorted order but applied in vocabulary order, the nucleus
    chosen on the untempered distribution, or the token that reaches top_p dropped."""
    ltm, z, logits = sharp_model
    top_p = 0.58
    probs = torch.softmax(logits / 0.5, -1)
    ranked = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    cumulative = np.cumsum([float(probs[i]) for i in ranked])
    size = int(np.searchsorted(cumulative, top_p)) + 1  # the fewest top tokens reaching top_p
    assert min(abs(cumulative - top_p)) > 0.01  # not at a boundary
    untempered = torch.softmax(logits, -1)
    ranked_1 = sorted(range(len(probs)), key=lambda i: -float(untempered[i]))
    size_1 = int(np.searchsorted(np.cumsum([float(untempered[i]) for i in ranked_1]), top_p)) + 1
    assert size_1 != size  # the nucleus of T=1 differs: the test tells the two apart
    expected = _truncated(probs, ranked[:size])
    empirical = _first_token_frequencies(ltm, z, temperature=0.5, top_p=top_p)
    assert set(torch.nonzero(empirical).flatten().tolist()) == set(ranked[:size])
    assert _tv(empirical, expected) < 0.03


# --- 5. resume restores every random stream --------------------------------------------------

STREAMS = {
    "python": lambda g: [random.random() for _ in range(3)],
    "python-cached-gauss": lambda g: random.gauss(0.0, 1.0),
    "numpy": lambda g: np.random.random(3).tolist(),
    "numpy-cached-gauss": lambda g: float(np.random.normal()),
    "torch": lambda g: torch.rand(3).tolist(),
    "inner-loop-generator": lambda g: torch.rand(3, generator=g).tolist(),
}


def _seeded_state(seed: int) -> TrainingState:
    """A fresh training state as a (re)started run builds it: every stream seeded."""
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    ltm = LatentThoughtModel(Decoder(micro_config()))
    svi = DualRateSVI(ltm, InferenceConfig(steps=1), TrainConfig(), generator)
    return TrainingState(svi, generator)


@pytest.mark.parametrize("stream", list(STREAMS))
def test_resume_restores_each_random_stream(tmp_path, stream):
    """Catches: a resume that leaves out any one random stream (Python's, its cached Gaussian,
    numpy's, its cached Gaussian, torch's, or the inner loop's generator), or saves or restores
    the inner loop's noise from another generator than the run's."""
    draw = STREAMS[stream]
    state = _seeded_state(1)
    for _ in range(5):  # move every stream on from its seed, leaving a Gaussian cached
        random.random(), np.random.random(), torch.rand(1), torch.rand(1, generator=state.generator)
    random.gauss(0.0, 1.0), np.random.normal()
    save_checkpoint(tmp_path / "c.pt", state.to_dict())
    expected = draw(state.generator)

    fresh = _seeded_state(2)  # a new process: everything seeded again, then restored
    resumed = TrainingState.from_dict(load_checkpoint(tmp_path / "c.pt"), fresh.trainer,
                                      fresh.generator)
    assert resumed.generator is fresh.trainer.generator
    assert draw(resumed.generator) == expected


def test_word_vocabulary_is_ordered_by_frequency_then_spelling():
    from ltm_pyro.tokenizers import WordTokenizer

    tokenizer = WordTokenizer.fit("z y z\nx z y w\n")
    assert tokenizer.vocab[2:] == ["z", "y", "w", "x"]  # z 3 times, y twice, then w, x by name


def test_a_word_tokenizer_skips_blank_lines_unless_told():
    """Tokenizers built directly (the built-in corpus') and old checkpoints skip blank lines;
    fitted ones count each as an <eos>, as WikiText-2's published token counts do."""
    from ltm_pyro.tokenizers import WordTokenizer

    vocab = ["<unk>", "<eos>", "a"]
    assert WordTokenizer(vocab).encode("a\n\na\n") == [2, 1, 2, 1]
    assert WordTokenizer(vocab, eos_on_blank_lines=True).encode("a\n\na\n") == [2, 1, 1, 2, 1]


def test_char_text_bytes_count_each_characters_utf8_bytes_and_one_per_unknown():
    """bits per byte divides by these: a two-byte first character, a three-byte last one and
    an unseen character (one byte, as <unk> stands for at least one)."""
    from ltm_pyro.tokenizers import CharTokenizer

    tokenizer = CharTokenizer(["é", "a", "€"])  # ids 1, 2, 3
    ids = tokenizer.encode("éa€x")
    assert ids == [1, 2, 3, 0]
    assert tokenizer.text_bytes(ids) == len("éa€".encode()) + 1


def test_bpe_learns_line_ends_as_the_corpus_has_them():
    """Catches: lines fed to the BPE trainer without their newlines, so a line end that
    follows a space (every line of WikiText ends ' \\n') never merges."""
    from ltm_pyro.tokenizers import BPETokenizer

    tokenizer = BPETokenizer.fit("the cat sat \n" * 200, vocab_size=300)
    assert len(tokenizer.encode(" \n")) == 1


def test_unknown_tokenizers_are_refused_naming_the_choices():
    from ltm_pyro.tokenizers import fit_tokenizer, tokenizer_from_dict

    with pytest.raises(ValueError, match="unknown tokenizer 'nope'; choose one of word, char, bpe"):
        fit_tokenizer("nope", "a b\n", 300)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'nope' in the checkpoint"):
        tokenizer_from_dict({"kind": "nope"})


def test_unk_rate_is_zero_without_an_unk_id_or_ids():
    from ltm_pyro.tokenizers import BPETokenizer, WordTokenizer, unk_rate

    bpe = BPETokenizer.fit("a b c\n" * 20, vocab_size=260)
    assert bpe.unk_id is None and unk_rate(bpe, torch.tensor([0, 1, 2])) == 0.0
    assert unk_rate(WordTokenizer.fit("a b\n"), torch.tensor([], dtype=torch.long)) == 0.0
    assert unk_rate(WordTokenizer.fit("a b\n"), torch.tensor([0])) == 1.0
