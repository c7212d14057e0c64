"""Save, load and validate checkpoints.

A checkpoint holds everything needed to evaluate the model and to resume training exactly:
config, tokenizer, decoder weights, slow-optimizer state, step, and every RNG state. It holds
tensors and plain data only (dicts, lists, strings, numbers; the tokenizer as JSON text, the
RNG states as tensors and integers) and is read with ``torch.load(weights_only=True)``, so
opening a checkpoint someone shared never runs code pickled into it: anything else is refused
in one line before a byte of it is executed. Files are written to a temporary name in the same
folder and renamed, so a crash or a full disk never leaves a half-written checkpoint and the
previous one survives until the new one is complete.

Format version 1 pickled Python and numpy RNG states and needed ``weights_only=False``; such
files are refused with a pointer to ``experiments/convert_checkpoint.py``, which the user runs
knowingly on a file they trust.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from .amortised import build_encoder
from .config import RunConfig
from .decoder import Decoder
from .errors import UsageError
from .files import atomic_write
from .model import LatentThoughtModel
from .modes import resolve_device
from .tokenizers import Tokenizer, tokenizer_from_dict

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"  # the validation step with the lowest -ELBO (TrainConfig.keep_best)
FORMAT = "ltm-pyro-checkpoint"
VERSION = 2
PICKLE_VERSION = 1  # the last format that needed a full unpickle (weights_only=False)
CONVERTER = "experiments/convert_checkpoint.py"


def _python_rng_state(state: tuple) -> dict:
    """``random.getstate()`` as tensors and plain data."""
    version, keys, gauss = state
    return {"version": int(version), "keys": torch.tensor(list(keys), dtype=torch.int64),
            "gauss": None if gauss is None else float(gauss)}


def _numpy_rng_state(state: tuple) -> dict:
    """``np.random.get_state()`` as tensors and plain data."""
    kind, keys, pos, has_gauss, cached_gaussian = state
    return {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian)}


def rng_states(generator: torch.Generator) -> dict:
    """Every RNG state as tensors and integers (loadable with ``weights_only=True``)."""
    return {
        "python": _python_rng_state(random.getstate()),
        "numpy": _numpy_rng_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "noise": generator.get_state(),
    }


def restore_rng_states(states: dict, generator: torch.Generator) -> None:
    python, numpy = states["python"], states["numpy"]
    random.setstate((python["version"], tuple(python["keys"].tolist()), python["gauss"]))
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    generator.set_state(states["noise"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` (tokenizer as a dict) atomically; an OSError becomes WriteFailed."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    if isinstance(payload.get("tokenizer"), dict):
        payload["tokenizer"] = json.dumps(payload["tokenizer"])

    def write(tmp: Path) -> None:
        # Through a Python file object, so a full disk surfaces as OSError(ENOSPC) rather than
        # the opaque RuntimeError of torch's own file writer.
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)

    atomic_write(path, write)


def checkpoint_path(location: Path) -> Path:
    location = Path(location)
    return location / CHECKPOINT_NAME if location.is_dir() else location


def load_checkpoint(location: Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict from a run folder or file, or a UsageError saying what is wrong.

    Reads with ``weights_only=True``: a file holding anything but tensors and plain data is
    refused without executing it.
    """
    path = checkpoint_path(location)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}; pass a run folder written by run_svi.py")
    map_location = resolve_device(str(map_location))  # a missing GPU is not a corrupt file
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise _refusal(path) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError,
            ImportError, KeyError, TypeError, IndexError, MemoryError):
        raise _corrupt(path) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UsageError(f"{path} is not an ltm-pyro checkpoint; pass one written by run_svi.py")
    if payload.get("version") == PICKLE_VERSION:
        raise _legacy(path)
    if payload.get("version") != VERSION:
        raise UsageError(f"checkpoint {path} has format version {payload.get('version')}, "
                         f"this ltm-pyro reads version {VERSION}; use the matching release")
    if isinstance(payload.get("tokenizer"), str):
        try:
            payload["tokenizer"] = json.loads(payload["tokenizer"])
        except json.JSONDecodeError:
            raise _corrupt(path) from None
    return payload


def upgrade_pickled_payload(payload: dict) -> dict:
    """A format-1 payload (already unpickled, by the converter) as a current-format payload.

    Only the RNG states change: Python's was a tuple and numpy's a tuple with an ndarray.
    """
    if payload.get("format") != FORMAT or payload.get("version") != PICKLE_VERSION:
        raise UsageError(f"not an ltm-pyro checkpoint of format version {PICKLE_VERSION}")
    upgraded = {k: v for k, v in payload.items() if k not in ("format", "version")}
    rng = payload["rng"]
    upgraded["rng"] = {**rng, "python": _python_rng_state(rng["python"]),
                       "numpy": _numpy_rng_state(rng["numpy"])}
    return upgraded


def _corrupt(path: Path) -> UsageError:
    return UsageError(f"checkpoint {path} is corrupt or truncated; restore it or retrain "
                      "with --force")


def _legacy(path: Path) -> UsageError:
    return UsageError(
        f"checkpoint {path} is in the old pickle format (version {PICKLE_VERSION}), which can "
        f"run code when loaded, so it is refused; if you trust where it came from, convert it "
        f"with: python {CONVERTER} --checkpoint {path} --i-trust-this-file")


def _refusal(path: Path) -> UsageError:
    """Why weights_only refused ``path``, read from its pickle opcodes without running them."""
    found = _pickle_header(path)
    if found is None:
        return _corrupt(path)
    version, imports = found
    if version == PICKLE_VERSION:
        return _legacy(path)
    foreign = [name for name in imports
               if not name.startswith("torch") and name != "collections.OrderedDict"]
    what = f" ({foreign[0]})" if foreign else ""
    return UsageError(
        f"refused to load {path}: it holds Python objects beyond tensors and plain data"
        f"{what}, which could run code, so nothing in it was run; load only checkpoints written "
        "by run_svi.py")


def _pickle_header(path: Path) -> tuple[int | None, list[str]] | None:
    """(format version if the file says it is an ltm-pyro checkpoint, imported names).

    ``pickletools.genops`` only decodes opcodes; nothing is imported or called.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names:
                return None
            data = archive.read(names[0])
        ops = list(pickletools.genops(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, RuntimeError):
        return None
    imports, strings, values = [], [], []
    for opcode, arg, _ in ops:
        if opcode.name in ("GLOBAL", "INST"):
            imports.append(str(arg).replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            imports.append(f"{strings[-2]}.{strings[-1]}")
        if isinstance(arg, str) and ("UNICODE" in opcode.name or "STRING" in opcode.name):
            strings.append(arg)
        if isinstance(arg, (str, int)) and not opcode.name.endswith(("PUT", "GET")) and (
                opcode.name not in ("PROTO", "FRAME", "GLOBAL", "INST")):
            values.append(arg)
    version = None
    head = values[:4]
    if head[:3] == ["format", FORMAT, "version"] and len(head) == 4 and isinstance(head[3], int):
        version = head[3]
    return version, imports


def model_from_checkpoint(
    payload: dict, device: str | torch.device = "cpu"
) -> tuple[LatentThoughtModel, RunConfig, Tokenizer]:
    """The trained model (in eval mode), its run config and its tokenizer."""
    config = RunConfig.from_dict(payload["config"])
    decoder = Decoder(config.model)
    decoder.load_state_dict(payload["decoder"])
    decoder.to(device).eval()
    encoder = build_encoder(config.model, config.inference)
    if encoder is not None:
        encoder.load_state_dict(payload["encoder"])
        encoder.to(device).eval()
    ltm = LatentThoughtModel(decoder, encoder=encoder)
    return ltm, config, tokenizer_from_dict(payload["tokenizer"])
