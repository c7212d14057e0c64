"""Corpora as fixed-length windows: the built-in synthetic corpus or text files.

A window holds ``seq_len + 1`` tokens: the decoder reads the first ``seq_len`` and predicts
the last ``seq_len``. Text is cut into consecutive windows that share one boundary token, so
every token after the first is predicted exactly once; the tail shorter than a window is
dropped (and the token count says so). Batches are a pure function of (seed, step), which makes
resuming exact without saving a data iterator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import DataConfig
from .errors import UsageError
from .synthetic import TopicStyleProcess, pseudo_words
from .tokenizers import Tokenizer, WordTokenizer, fit_tokenizer

SPLITS = ("train", "valid", "test")
BUILTIN_NAME = "topic-style"


@dataclass
class Corpus:
    """Windows per split, the tokenizer, and reference figures (nats per predicted token)."""

    name: str
    tokenizer: Tokenizer
    windows: dict[str, Tensor]
    references: dict[str, float] = field(default_factory=dict)
    factors: dict[str, np.ndarray] | None = None  # built-in corpus: [N, 2] (topic, style)


def unigram_entropy(train_ids: Tensor, eval_ids: Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of a train-fitted add-one unigram model on eval tokens."""
    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return float(-log_probs[eval_ids.flatten()].mean())


def builtin_corpus(seq_len: int, train_docs: int, eval_docs: int) -> Corpus:
    """The topic-style corpus (see ``synthetic.py``): one document per window."""
    process = TopicStyleProcess.default()
    tokenizer = WordTokenizer(["<unk>", "<eos>"] + pseudo_words(process.vocab_size))
    offset = 2  # ids 0 and 1 are the special tokens, never generated
    windows, factors, references = {}, {}, {}
    for split, n_docs, seed in (("train", train_docs, 1), ("valid", eval_docs, 2),
                                ("test", eval_docs, 3)):
        ids, split_factors = process.sample(n_docs, seq_len + 1, seed)
        windows[split] = torch.from_numpy(ids + offset)
        factors[split] = split_factors
        if split != "train":
            floor = -process.log_likelihood(ids).sum() / (n_docs * seq_len)
            references[f"entropy_floor_{split}"] = float(floor)
    references["unigram_entropy_valid"] = unigram_entropy(
        windows["train"][:, 1:], windows["valid"][:, 1:], tokenizer.vocab_size
    )
    return Corpus(BUILTIN_NAME, tokenizer, windows, references, factors)


def read_text(path: Path) -> str:
    """A corpus file's text, or a UsageError saying what is wrong with it."""
    if not path.is_file():
        raise UsageError(f"corpus file {path} does not exist; pass an existing file or folder")
    raw = path.read_bytes()
    if not raw.strip():
        raise UsageError(f"corpus file {path} is empty; pass a file with text in it")
    if b"\x00" in raw[:65536]:
        raise UsageError(f"corpus file {path} looks binary (NUL bytes); pass a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(
            f"corpus file {path} is not UTF-8 (byte {error.start}); convert it to UTF-8 first"
        ) from None


def split_files(folder: Path) -> dict[str, Path]:
    """train/valid/test files of a folder, matched by name (ptb.train.txt, train.txt, ...)."""
    found: dict[str, Path] = {}
    for split in SPLITS:
        names = [p for p in sorted(folder.iterdir()) if p.is_file() and split in p.name.lower()
                 and p.suffix.lower() in (".txt", ".tokens", ".raw", "")]
        if len(names) == 1:
            found[split] = names[0]
    missing = [s for s in SPLITS if s not in found]
    if missing:
        raise UsageError(
            f"folder {folder} lacks exactly one file each for {', '.join(missing)}; name them "
            "like train.txt / valid.txt / test.txt, or pass a single text file instead"
        )
    return found


def lone_corpus_file(folder: Path) -> Path | None:
    """The folder's only text file when it holds no split files (a README aside), else None:
    such a folder (e.g. tinyshakespeare/ with input.txt) is read as that one file."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")
             and not p.name.lower().startswith("readme")]
    named_like_splits = [p for p in files if any(s in p.name.lower() for s in SPLITS)]
    return files[0] if len(files) == 1 and not named_like_splits else None


def read_splits(path: Path) -> dict[str, str]:
    """The three splits' text: a folder's files, or one file (alone in its folder or given
    directly) cut 90/5/5 by lines."""
    if path.is_dir():
        lone = lone_corpus_file(path)
        if lone is None:
            return {split: read_text(file) for split, file in split_files(path).items()}
        path = lone
    text = read_text(path)
    lines = text.splitlines(keepends=True)
    n_train, n_valid = math.floor(0.9 * len(lines)), math.floor(0.05 * len(lines))
    return {
        "train": "".join(lines[:n_train]),
        "valid": "".join(lines[n_train:n_train + n_valid]),
        "test": "".join(lines[n_train + n_valid:]),
    }


def to_windows(ids: list[int], seq_len: int) -> Tensor:
    """Consecutive windows of seq_len + 1 tokens, each sharing its first token with the last."""
    n = max(0, (len(ids) - 1) // seq_len)
    if n == 0:
        return torch.empty(0, seq_len + 1, dtype=torch.long)
    stream = torch.tensor(ids[: n * seq_len + 1], dtype=torch.long)
    return stream.unfold(0, seq_len + 1, seq_len)


def sample_windows(windows: Tensor, n: int, seed: int) -> Tensor:
    """A seeded random subset of n windows, in corpus order: a split's first n windows are its
    first few documents, not a sample of the split."""
    if n >= len(windows):
        return windows
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(windows), generator=generator)[:n].sort().values
    return windows[picked]


def select_windows(windows: Tensor, first: int | None, sample: int | None, seed: int) -> Tensor:
    """The windows a script scores: a seeded random subset of ``sample`` windows when given,
    else the first ``first`` (all when None)."""
    if sample:
        return sample_windows(windows, sample, seed)
    return windows[:first]


def describe_selection(first: int | None, sample: int | None, seed: int) -> str:
    """Which windows ``select_windows`` picks, in words for a results page."""
    if sample:
        return f"a random subset of {sample} windows (seed {seed})"
    return f"the first {first} windows" if first else "all windows"


def text_corpus(path: Path, config: DataConfig, seq_len: int,
                tokenizer: Tokenizer | None = None) -> Corpus:
    """Windows of a text corpus; the tokenizer is fitted on train unless one is given."""
    texts = read_splits(path)
    if tokenizer is None:
        tokenizer = fit_tokenizer(config.tokenizer, texts["train"], config.bpe_vocab_size)
    windows = {}
    for split, text in texts.items():
        windows[split] = to_windows(tokenizer.encode(text), seq_len)
        if len(windows[split]) == 0:
            raise UsageError(
                f"the {split} split of {path} is shorter than one window of {seq_len + 1} "
                "tokens; use a smaller --seq-len or a longer corpus"
            )
    references = {"unigram_entropy_valid": unigram_entropy(
        windows["train"][:, 1:], windows["valid"][:, 1:], tokenizer.vocab_size)}
    return Corpus(path.name or str(path), tokenizer, windows, references)


def load_corpus(config: DataConfig, seq_len: int, tokenizer: Tokenizer | None = None) -> Corpus:
    if config.path is None:
        return builtin_corpus(seq_len, config.synthetic_train_docs, config.synthetic_eval_docs)
    path = Path(config.path)
    if not path.exists():
        raise UsageError(f"--data {path} does not exist; pass a text file or a folder of splits")
    return text_corpus(path, config, seq_len, tokenizer)


class BatchSampler:
    """Shuffled batches of window indices, a pure function of (seed, step).

    Each epoch is a fresh permutation seeded by (seed, epoch); the last partial batch of an
    epoch is dropped so every step sees ``batch_size`` windows.
    """

    def __init__(self, n_windows: int, batch_size: int, seed: int) -> None:
        if n_windows < batch_size:
            raise UsageError(
                f"the training split has {n_windows} windows, fewer than one batch of "
                f"{batch_size}; use a smaller --batch-size or --seq-len"
            )
        self.n_windows = n_windows
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = n_windows // batch_size

    def indices(self, step: int) -> Tensor:
        epoch, position = divmod(step, self.batches_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_windows, generator=generator)
        return order[position * self.batch_size:(position + 1) * self.batch_size]
