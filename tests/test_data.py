import re

import numpy as np
import pytest
import torch

from ltm_pyro.config import DataConfig
from ltm_pyro.data import (
    BatchSampler,
    builtin_corpus,
    describe_selection,
    read_splits,
    sample_windows,
    select_windows,
    text_corpus,
    to_windows,
)
from ltm_pyro.errors import UsageError
from ltm_pyro.synthetic import TopicStyleProcess
from ltm_pyro.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer, tokenizer_from_dict


def test_builtin_corpus_is_deterministic_and_has_known_factors():
    a, b = builtin_corpus(16, 64, 32), builtin_corpus(16, 64, 32)
    assert torch.equal(a.windows["train"], b.windows["train"])
    assert a.windows["train"].shape == (64, 17) and a.factors["valid"].shape == (32, 2)
    floor, unigram = a.references["entropy_floor_valid"], a.references["unigram_entropy_valid"]
    assert 0 < floor < unigram


def test_exact_likelihood_is_normalised():
    """Summing p(x_1 | x_0) over every next token gives 1 for each document's prefix."""
    process = TopicStyleProcess.default()
    prefix, _ = process.sample(3, 1, seed=0)
    v = process.vocab_size
    docs = np.concatenate([np.repeat(prefix, v, 0), np.tile(np.arange(v), 3)[:, None]], 1)
    total = np.exp(process.log_likelihood(docs)).reshape(3, v).sum(1)
    assert np.allclose(total, 1.0)


def test_windows_share_boundary_tokens():
    windows = to_windows(list(range(10)), 3)
    assert windows.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]


def test_batches_are_a_pure_function_of_seed_and_step():
    sampler = BatchSampler(50, 8, seed=1)
    assert torch.equal(sampler.indices(7), BatchSampler(50, 8, seed=1).indices(7))
    epoch = torch.cat([sampler.indices(i) for i in range(sampler.batches_per_epoch)])
    assert len(set(epoch.tolist())) == len(epoch)  # no repeats within an epoch


def test_tokenizers_round_trip_and_serialise():
    text = "the cat sat\non the mat\n"
    word = WordTokenizer.fit(text)
    assert word.decode(word.encode(text)).split() == text.split()
    assert word.encode("the dog") == [word.index["the"], word.unk_id, word.index["<eos>"]]
    char = CharTokenizer.fit(text)
    assert char.decode(char.encode(text)) == text
    bpe = BPETokenizer.fit(text * 20, vocab_size=300)
    assert bpe.decode(bpe.encode(text)) == text
    for tok in (word, char, bpe):
        again = tokenizer_from_dict(tok.to_dict())
        assert again.encode(text) == tok.encode(text)


def test_single_file_is_split_deterministically(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    splits = read_splits(path)
    assert splits["train"].count("\n") == 90 and splits["valid"].count("\n") == 5
    assert splits["test"].startswith("line 95")


def test_folder_holding_one_corpus_file_is_split_like_that_file(tmp_path):
    lines = "".join(f"line {i}\n" for i in range(100))
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "input.txt").write_text(lines)
    (folder / "README.txt").write_text("where the corpus comes from\n")
    alone = tmp_path / "alone.txt"
    alone.write_text(lines)
    assert read_splits(folder) == read_splits(alone)


def test_folder_of_unrelated_files_is_a_usage_error(tmp_path):
    (tmp_path / "notes.txt").write_text("a b c\n")
    (tmp_path / "more.txt").write_text("d e f\n")
    with pytest.raises(UsageError, match="train, valid, test"):
        text_corpus(tmp_path, DataConfig(), 4)


def test_folder_without_splits_is_a_usage_error(tmp_path):
    (tmp_path / "train.txt").write_text("a b c\n")
    with pytest.raises(UsageError, match="valid, test"):
        text_corpus(tmp_path, DataConfig(), 4)


def test_too_short_corpus_is_a_usage_error(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("".join(f"w{i}\n" for i in range(40)))
    with pytest.raises(UsageError, match="shorter than one window of 65 tokens"):
        text_corpus(path, DataConfig(), 64)


def test_unk_rate_counts_unknown_words_only():
    from ltm_pyro.tokenizers import unk_rate

    tokenizer = WordTokenizer.fit("a b c\n")
    ids = torch.tensor(tokenizer.encode("a x b y\n"))
    assert unk_rate(tokenizer, ids) == pytest.approx(2 / 5)  # a <unk> b <unk> <eos>


def test_word_tokenizer_counts_blank_lines_as_the_literature_does():
    from ltm_pyro.tokenizers import WordTokenizer, tokenizer_from_dict

    fitted = WordTokenizer.fit("a b\n\nc\n")
    assert fitted.decode(fitted.encode("a b\n\nc\n")).split("\n")[:3] == ["a b", "", "c"]
    assert len(fitted.encode("a b\n\nc\n")) == 6  # a b <eos> <eos> c <eos>
    old = tokenizer_from_dict({"kind": "word", "vocab": fitted.vocab})  # written before
    assert len(old.encode("a b\n\nc\n")) == 5
    assert tokenizer_from_dict(fitted.to_dict()).eos_on_blank_lines


@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
def test_text_bytes_counts_the_bytes_the_tokens_stand_for(kind):
    from ltm_pyro.tokenizers import fit_tokenizer

    text = "the cat sat\non the mat\nthé end\n"
    tokenizer = fit_tokenizer(kind, text * 20, 300)
    assert tokenizer.text_bytes(tokenizer.encode(text)) == len(text.encode())


def test_wikitext2_has_the_literatures_token_counts():
    """2,088,628 / 217,646 / 245,569 word tokens (Merity et al. 2016), <eos> per line."""
    from .conftest import shared_data

    folder = shared_data("wikitext-2")
    tokenizer = WordTokenizer.fit((folder / "train.txt").read_text(encoding="utf-8"))
    counts = {split: len(tokenizer.encode((folder / f"{split}.txt").read_text(encoding="utf-8")))
              for split in ("train", "valid", "test")}
    assert counts == {"train": 2_088_628, "valid": 217_646, "test": 245_569}


def test_sampled_windows_are_a_seeded_subset_in_corpus_order():
    windows = torch.arange(100).unsqueeze(1).repeat(1, 3)
    picked = sample_windows(windows, 10, seed=3)
    rows = picked[:, 0].tolist()
    assert len(set(rows)) == 10 and rows == sorted(rows)
    assert torch.equal(picked, sample_windows(windows, 10, seed=3))
    assert not torch.equal(picked, sample_windows(windows, 10, seed=4))
    assert rows != list(range(10))  # not the first windows
    assert torch.equal(sample_windows(windows, 100, seed=3), windows)


def test_window_selection_is_the_sample_when_given_else_the_first_and_says_which():
    windows = torch.arange(100).unsqueeze(1)
    assert torch.equal(select_windows(windows, 7, None, 0), windows[:7])
    assert torch.equal(select_windows(windows, None, None, 0), windows)
    assert torch.equal(select_windows(windows, 7, 5, 2), sample_windows(windows, 5, 2))
    assert describe_selection(7, None, 0) == "the first 7 windows"
    assert describe_selection(None, None, 0) == "all windows"
    assert describe_selection(None, 5, 2) == "a random subset of 5 windows (seed 2)"


# The built-in corpus is the same on every machine (synthetic.py): every committed result on
# it depends on that. This fingerprint of its words, and of documents and factors drawn from
# its process, changes when the process, its parameters, its words or its sampler change
# (or numpy's generator streams do): then every built-in result needs re-running.
BUILTIN_FINGERPRINT = "586e68ad8d0760bbf9564710d617d469e16f33e2f35293a459dc448b939bfd90"


def test_the_builtin_process_is_the_one_the_results_were_measured_on():
    import hashlib

    from ltm_pyro.synthetic import VOCAB_WORDS, pseudo_words

    tokens, factors = TopicStyleProcess.default().sample(64, 17, seed=5)
    digest = hashlib.sha256()
    digest.update(" ".join(pseudo_words(VOCAB_WORDS)).encode())
    digest.update(tokens.astype(np.int64).tobytes())
    digest.update(factors.astype(np.int64).tobytes())
    assert digest.hexdigest() == BUILTIN_FINGERPRINT, (
        "the built-in corpus changed: re-run the built-in results, then update the fingerprint")


def test_the_process_draws_every_factor_and_distinct_words():
    from ltm_pyro.synthetic import N_STYLES, N_TOPICS, pseudo_words

    _, factors = TopicStyleProcess.default().sample(2000, 2, seed=0)
    assert set(factors[:, 0]) == set(range(N_TOPICS)) and set(factors[:, 1]) == set(range(N_STYLES))
    words = pseudo_words(400)
    assert len(set(words)) == 400


@pytest.mark.parametrize("first_scored", [2, 3])
def test_the_exact_likelihood_conditions_on_the_prefix_it_is_told(first_scored):
    """log p(x_k.. | x_<k) = log p(x_1.. | x_0) - log p(x_1..x_{k-1} | x_0), by the chain rule."""
    process = TopicStyleProcess.default()
    tokens, _ = process.sample(5, 6, seed=1)
    whole = process.log_likelihood(tokens)
    prefix = process.log_likelihood(tokens[:, :first_scored])
    assert np.allclose(process.log_likelihood(tokens, first_scored), whole - prefix)


@pytest.mark.parametrize("content, says", [
    (None, "does not exist"), (b"  \n", "is empty"), (b"ab\x00cd", "looks binary"),
    (b"caf\xe9", "is not UTF-8 (byte 3)"),
])
def test_a_bad_corpus_file_is_refused_saying_what_is_wrong(tmp_path, content, says):
    from ltm_pyro.data import load_corpus

    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    expected = re.escape(f"{path} {says}") if content else "does not exist"
    with pytest.raises(UsageError, match=expected):
        load_corpus(DataConfig(path=str(path)), 4, None)


def test_a_folder_of_wikitext_splits_and_one_with_a_lone_file(tmp_path):
    """Catches: WikiText's .tokens and .raw files (or files without a suffix) not taken for
    splits, and a hidden file counted beside a folder's lone text file."""
    words = " ".join(f"w{i % 7}" for i in range(60)) + "\n"
    for suffix in (".tokens", ".raw", ""):
        folder = tmp_path / f"wiki{suffix or '-bare'}"
        folder.mkdir()
        for split in ("train", "valid", "test"):
            name = f"wiki.{split}{suffix}" if suffix else split
            (folder / name).write_text(split + " " + words)
        assert {s: t.split()[0] for s, t in read_splits(folder).items()} == {
            "train": "train", "valid": "valid", "test": "test"}, suffix
    lone = tmp_path / "shakespeare"
    lone.mkdir()
    (lone / "input.txt").write_text(words * 20)
    (lone / ".DS_Store").write_bytes(b"\x00")
    assert "".join(read_splits(lone).values()) == words * 20
    with pytest.raises(UsageError, match="name them like train.txt"):
        read_splits(_half_split_folder(tmp_path))


def _half_split_folder(root):
    folder = root / "half"
    folder.mkdir()
    (folder / "train.txt").write_text("a b c\n")
    (folder / "notes.txt").write_text("x\n")
    return folder


def test_one_file_is_cut_by_lines_without_losing_or_adding_text(tmp_path):
    lines = [f"line {i} of the file\n" for i in range(40)]
    path = tmp_path / "one.txt"
    path.write_text("".join(lines))
    splits = read_splits(path)
    assert splits["train"] + splits["valid"] + splits["test"] == "".join(lines)
    assert splits["train"] == "".join(lines[:36]) and splits["valid"] == "".join(lines[36:38])


def test_a_text_corpus_keeps_its_name_tokenizer_size_and_unigram_reference(tmp_path):
    """Catches: the BPE size asked for not reaching the tokenizer, a split of exactly one
    window refused, the corpus' name lost, and a unigram reference that is not the add-one
    unigram cross-entropy of valid's predicted tokens under train's counts."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    text = " ".join(f"word{i % 23} other{i % 5}" for i in range(400)) + "\n"
    for split, size in (("train", 1), ("valid", 1), ("test", 1)):
        (folder / f"{split}.txt").write_text(text * size)
    config = DataConfig(path=str(folder), tokenizer="bpe", bpe_vocab_size=266)
    corpus = text_corpus(folder, config, 8)
    assert corpus.name == "tiny" and corpus.tokenizer.vocab_size <= 266
    assert corpus.tokenizer.vocab_size != text_corpus(
        folder, DataConfig(path=str(folder), tokenizer="bpe", bpe_vocab_size=262), 8
    ).tokenizer.vocab_size
    short = tmp_path / "short"
    short.mkdir()
    for split in ("train", "valid", "test"):
        (short / f"{split}.txt").write_text("a b c d e f g h i\n")  # 9 words + newline: 1 window
    one = text_corpus(short, DataConfig(path=str(short), tokenizer="word"), 8)
    assert all(len(w) == 1 for w in one.windows.values())
    train, valid = corpus.windows["train"][:, 1:], corpus.windows["valid"][:, 1:]
    counts = torch.bincount(train.flatten(), minlength=corpus.tokenizer.vocab_size) + 1.0
    expected = -(counts / counts.sum()).log()[valid.flatten()].mean()
    assert corpus.references["unigram_entropy_valid"] == pytest.approx(float(expected))


def test_a_training_split_of_exactly_one_batch_is_enough():
    assert len(BatchSampler(8, 8, seed=0).indices(0)) == 8
    with pytest.raises(UsageError, match="7 windows, fewer than one batch of 8"):
        BatchSampler(7, 8, seed=0)


def test_the_builtin_splits_are_distinct_documents_with_their_own_references():
    """Catches: two splits drawn with one seed (the same documents), a unigram reference off
    by a position, and the corpus' name lost."""
    from ltm_pyro.data import BUILTIN_NAME, unigram_entropy

    corpus = builtin_corpus(16, 64, 32)
    rows = {split: {tuple(w.tolist()) for w in windows}
            for split, windows in corpus.windows.items()}
    assert not rows["train"] & rows["valid"] and not rows["valid"] & rows["test"]
    assert not rows["train"] & rows["test"]
    train, valid = corpus.windows["train"][:, 1:], corpus.windows["valid"][:, 1:]
    assert corpus.references["unigram_entropy_valid"] == unigram_entropy(
        train, valid, corpus.tokenizer.vocab_size)
    assert corpus.name == BUILTIN_NAME
    # each split draws its factors from its own stream: valid's topics are not train's first
    assert not np.array_equal(corpus.factors["train"][:32, 0], corpus.factors["valid"][:, 0])


def test_the_unigram_reference_smooths_over_the_whole_vocabulary():
    """Add-one counts over all 4 ids, two of them never seen in train: p(1) = 2 / 7."""
    from ltm_pyro.data import unigram_entropy

    value = unigram_entropy(torch.tensor([0, 0, 1]), torch.tensor([1]), vocab_size=4)
    assert value == pytest.approx(-np.log(2 / 7))


def test_a_text_folder_loads_with_a_given_tokenizer(tmp_path):
    """Catches: the settings, window length or given tokenizer dropped on the way from
    load_corpus to the corpus, and a missing file read directly not refused in one line."""
    from ltm_pyro.data import load_corpus, read_text

    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text(" ".join(f"w{i % 9}" for i in range(50)) + "\n")
    tokenizer = WordTokenizer.fit("w0 w1 w2 w3 w4 w5 w6 w7 w8\n")
    corpus = load_corpus(DataConfig(path=str(tmp_path)), 8, tokenizer)
    assert corpus.tokenizer is tokenizer and corpus.windows["train"].shape[1] == 9
    fitted = load_corpus(DataConfig(path=str(tmp_path), tokenizer="char"), 8, None)
    assert isinstance(fitted.tokenizer, CharTokenizer)
    with pytest.raises(UsageError, match="missing.txt does not exist"):
        read_text(tmp_path / "missing.txt")
