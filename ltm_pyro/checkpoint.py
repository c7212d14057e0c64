"""Save, load and validate checkpoints.

A checkpoint holds everything needed to evaluate the model and to resume training exactly:
config, tokenizer, decoder weights, slow-optimizer state, step, and every RNG state. Files
are written to a temporary name in the same folder and renamed, so a crash never leaves a
half-written checkpoint and the previous one survives until the new one is complete.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig
from .decoder import Decoder
from .errors import UsageError
from .files import atomic_write
from .model import LatentThoughtModel
from .tokenizers import Tokenizer, tokenizer_from_dict

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "ltm-pyro-checkpoint"
VERSION = 1


def rng_states(generator: torch.Generator) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "noise": generator.get_state(),
    }


def restore_rng_states(states: dict, generator: torch.Generator) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    generator.set_state(states["noise"])


def save_checkpoint(path: Path, payload: dict) -> None:
    payload = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def checkpoint_path(location: Path) -> Path:
    location = Path(location)
    return location / CHECKPOINT_NAME if location.is_dir() else location


def load_checkpoint(location: Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict from a run folder or file, or a UsageError saying what is wrong."""
    path = checkpoint_path(location)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}; pass a run folder written by run_svi.py")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError, AttributeError, ImportError):
        raise UsageError(
            f"checkpoint {path} is corrupt or truncated; restore it or retrain with --force"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UsageError(f"{path} is not an ltm-pyro checkpoint; pass one written by run_svi.py")
    if payload.get("version") != VERSION:
        raise UsageError(f"checkpoint {path} has format version {payload.get('version')}, "
                         f"this ltm-pyro reads version {VERSION}; use the matching release")
    return payload


def model_from_checkpoint(
    payload: dict, device: str | torch.device = "cpu"
) -> tuple[LatentThoughtModel, RunConfig, Tokenizer]:
    """The trained model (in eval mode), its run config and its tokenizer."""
    config = RunConfig.from_dict(payload["config"])
    decoder = Decoder(config.model)
    decoder.load_state_dict(payload["decoder"])
    decoder.to(device).eval()
    ltm = LatentThoughtModel(decoder, kl_weight=config.inference.kl_weight)
    return ltm, config, tokenizer_from_dict(payload["tokenizer"])
