"""Word, character and byte-level BPE tokenizers, serialisable into a checkpoint.

Each tokenizer is fitted on the training split only and saved with the model, so evaluation
on any other corpus (zero-shot) uses exactly the training vocabulary.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Protocol

import torch

from .config import TOKENIZERS

UNK = "<unk>"
EOS = "<eos>"


class Tokenizer(Protocol):
    kind: str
    unk_id: int | None  # None: every input is representable (byte-level BPE)
    special_ids: tuple[int, ...]  # structural tokens such as <eos>, not content

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_dict(self) -> dict: ...

    def text_bytes(self, ids: list[int]) -> int: ...


class WordTokenizer:
    """Whitespace words with one ``<eos>`` per line; unseen words map to ``<unk>``.

    ``eos_on_blank_lines``: a blank line is an ``<eos>`` too, as the language-modelling
    literature counts WikiText-2 (Merity et al. 2016; PyTorch's word_language_model): 245,569
    test tokens. Fitted tokenizers do so; checkpoints written before the option existed keep
    skipping blank lines, so their figures stay as they were.
    """

    kind = "word"

    def __init__(self, vocab: list[str], eos_on_blank_lines: bool = False) -> None:
        self.eos_on_blank_lines = eos_on_blank_lines
        self.vocab = list(vocab)
        self.index = {word: i for i, word in enumerate(self.vocab)}
        self.unk_id = self.index[UNK]
        self.special_ids = (self.index[EOS],) if EOS in self.index else ()

    @classmethod
    def fit(cls, text: str) -> WordTokenizer:
        counts = Counter(word for line in text.splitlines() for word in line.split())
        ordered = sorted(counts, key=lambda w: (-counts[w], w))
        return cls([UNK, EOS] + [w for w in ordered if w not in (UNK, EOS)],
                   eos_on_blank_lines=True)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for line in text.splitlines():
            words = line.split()
            if not words:
                if self.eos_on_blank_lines:
                    ids.append(self.index[EOS])
                continue
            ids.extend(self.index.get(word, self.unk_id) for word in words)
            ids.append(self.index[EOS])
        return ids

    def decode(self, ids: list[int]) -> str:
        """Words joined by spaces, each ``<eos>`` a line end (so blank lines come back)."""
        text, line = [], []
        for word in (self.vocab[i] for i in ids):
            if word == EOS:
                text.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(word)
        return "".join(text) + " ".join(line)

    def text_bytes(self, ids: list[int]) -> int:
        """UTF-8 bytes of the text the ids stand for: each word and the space or line end
        after it (``<eos>`` adds nothing more)."""
        eos = self.index.get(EOS)
        return sum(0 if i == eos else len(self.vocab[i].encode()) + 1 for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab": self.vocab,
                "eos_on_blank_lines": self.eos_on_blank_lines}


class CharTokenizer:
    """One id per character seen in training; unseen characters map to ``<unk>`` (id 0)."""

    kind = "char"
    unk_id = 0
    special_ids = ()

    def __init__(self, chars: list[str]) -> None:
        self.chars = list(chars)
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, 0) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 1] if i > 0 else "\ufffd" for i in ids)

    def text_bytes(self, ids: list[int]) -> int:
        """UTF-8 bytes of the characters (an unseen one counted as one byte)."""
        return sum(len(self.chars[i - 1].encode()) if i > 0 else 1 for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class BPETokenizer:
    """Byte-level BPE from HuggingFace ``tokenizers``, trained locally (nothing downloaded)."""

    kind = "bpe"
    unk_id = None
    special_ids = ()

    def __init__(self, serialized: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.serialized = serialized
        self.hf = HFTokenizer.from_str(serialized)

    @classmethod
    def fit(cls, text: str, vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        return cls(hf.to_str())

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)

    def text_bytes(self, ids: list[int]) -> int:
        """Bytes of the text: a byte-level token's string has one character per byte."""
        return sum(len(self.hf.id_to_token(i)) for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "serialized": json.loads(self.serialized)}




def fit_tokenizer(kind: str, text: str, bpe_vocab_size: int) -> Tokenizer:
    if kind == "word":
        return WordTokenizer.fit(text)
    if kind == "char":
        return CharTokenizer.fit(text)
    if kind == "bpe":
        return BPETokenizer.fit(text, bpe_vocab_size)
    raise ValueError(f"unknown tokenizer {kind!r}; choose one of {', '.join(TOKENIZERS)}")


def tokenizer_from_dict(raw: dict) -> Tokenizer:
    kind = raw.get("kind")
    if kind == "word":
        return WordTokenizer(raw["vocab"], raw.get("eos_on_blank_lines", False))
    if kind == "char":
        return CharTokenizer(raw["chars"])
    if kind == "bpe":
        return BPETokenizer(json.dumps(raw["serialized"]))
    raise ValueError(f"unknown tokenizer kind {kind!r} in the checkpoint")


def known_token_count(tokenizer: Tokenizer, ids: torch.Tensor) -> int:
    """How many ids are real content: neither ``<unk>`` nor a structural token."""
    excluded = list(tokenizer.special_ids)
    if tokenizer.unk_id is not None:
        excluded.append(tokenizer.unk_id)
    if not excluded:
        return ids.numel()
    return int((~torch.isin(ids, torch.tensor(excluded))).sum())


UNK_WARNING = 0.05  # above this share of <unk> among scored tokens, the scorers warn


def unk_rate(tokenizer: Tokenizer, ids: torch.Tensor) -> float:
    """Share of ``ids`` that are ``<unk>``: scored unknowns make a perplexity easier than the
    text is (every unseen word becomes one frequent token), so zero-shot figures need it."""
    if tokenizer.unk_id is None or ids.numel() == 0:
        return 0.0
    return float((ids == tokenizer.unk_id).sum()) / ids.numel()


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of a prompt to be continued: the word tokenizer's end-of-line ``<eos>`` is kept only
    when the text itself ends with a newline, so "the cat" continues the line it starts."""
    ids = tokenizer.encode(text)
    if tokenizer.kind == "word" and ids and not text.endswith("\n") and \
            ids[-1] in tokenizer.special_ids:
        ids = ids[:-1]
    return ids
