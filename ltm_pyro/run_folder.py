"""What makes a run folder self-contained: the fitted tokenizer as plain JSON beside the
checkpoint, and the corpus path written absolute, so a folder loads, scores and generates
from any working directory and after its training corpus has moved (docs/design.md, "The
run folder").

``tokenizer.json`` is versioned (``TOKENIZER_FORMAT``, ``TOKENIZER_VERSION``) and holds
only data: the vocabulary (word, char) or the ``tokenizers`` library's BPE model. Folders
written before it existed carry the same dict inside ``checkpoint.pt``, which is read then.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .config import RunConfig
from .errors import UsageError
from .files import write_json
from .tokenizers import Tokenizer, tokenizer_from_dict

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_FORMAT = "ltm-pyro-tokenizer"
TOKENIZER_VERSION = 1


def with_absolute_data_path(config: RunConfig) -> RunConfig:
    """``config`` with its corpus path resolved against the working directory (the built-in
    corpus, no path, stays as it is): what a run folder records."""
    if config.data.path is None:
        return config
    return replace(config, data=replace(config.data, path=str(Path(config.data.path).resolve())))


def write_tokenizer(folder: Path, tokenizer: Tokenizer) -> None:
    write_json(Path(folder) / TOKENIZER_NAME, {"format": TOKENIZER_FORMAT,
                                               "version": TOKENIZER_VERSION,
                                               "tokenizer": tokenizer.to_dict()})


def read_tokenizer(folder: Path, payload: dict) -> Tokenizer:
    """The folder's ``tokenizer.json``, or (a folder written before it) the checkpoint's copy."""
    path = Path(folder) / TOKENIZER_NAME
    if not path.is_file():
        return tokenizer_from_dict(payload["tokenizer"])
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path} is not valid JSON; delete it to use the checkpoint's copy of "
                         "the tokenizer") from None
    if not isinstance(raw, dict) or raw.get("format") != TOKENIZER_FORMAT:
        raise UsageError(f"{path} is not an ltm-pyro tokenizer file; delete it to use the "
                         "checkpoint's copy")
    if raw.get("version") != TOKENIZER_VERSION:
        raise UsageError(f"{path} has tokenizer format version {raw.get('version')}, this "
                         f"ltm-pyro reads version {TOKENIZER_VERSION}; use the matching release")
    return tokenizer_from_dict(raw["tokenizer"])


def corpus_gone(config: RunConfig) -> bool:
    """Whether the run's training corpus was a file or folder that is not there any more."""
    return config.data.path is not None and not Path(config.data.path).exists()


def corpus_path(config: RunConfig, data: str | Path | None = None) -> str | None:
    """The corpus to read: ``data`` when given, else the run's own, which must still exist."""
    if data is not None:
        return str(data)
    if corpus_gone(config):
        raise UsageError(f"the run's training corpus {config.data.path} is not there any more; "
                         "pass --data (data= in Python) with the text to use")
    return config.data.path


def start_token(tokenizer: Tokenizer) -> int:
    """A token to start text from when no prompt is given: the end-of-line token (a new
    sentence follows it) or the id of a newline; 0 when the vocabulary has neither."""
    if tokenizer.special_ids:
        return tokenizer.special_ids[0]
    newline = tokenizer.encode("\n")
    return newline[0] if newline else 0
