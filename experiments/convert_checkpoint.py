"""Convert a checkpoint of the old pickle format (version 1) to the current safe format.

    python experiments/convert_checkpoint.py --checkpoint runs/old --i-trust-this-file

Version 1 checkpoints pickled Python and numpy RNG states, so reading one means a full
unpickle, which runs any code pickled into the file. ltm-pyro refuses to do that on its own;
this script does it only when you pass --i-trust-this-file, for a checkpoint you wrote
yourself or got from someone you trust. It writes the current format (tensors and plain data,
read with weights_only=True) atomically, over the old file unless --out names another.
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltm_pyro.checkpoint import (  # noqa: E402
    FORMAT,
    PICKLE_VERSION,
    VERSION,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    upgrade_pickled_payload,
)
from ltm_pyro.cli import OneLineParser, run_main  # noqa: E402
from ltm_pyro.errors import UsageError  # noqa: E402


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="old checkpoint file, or a run folder holding checkpoint.pt")
    p.add_argument("--out", type=Path, help="write the converted checkpoint here "
                   "(default: replace the old file)")
    p.add_argument("--i-trust-this-file", action="store_true",
                   help="unpickle the old file, which runs any code in it: only for files "
                   "you trust")
    return p


def convert(source: Path, destination: Path | None = None) -> Path:
    """Unpickle the version-1 checkpoint ``source`` (runs code in it!) and write the new format."""
    path = checkpoint_path(source)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}; pass an old checkpoint file or run folder")
    destination = path if destination is None else checkpoint_path(destination)
    try:
        load_checkpoint(path)  # the safe reader first: a current file needs no unpickle
    except UsageError:
        pass
    else:
        raise UsageError(f"{path} is already in the current format (version {VERSION}); "
                         "nothing to convert")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError, AttributeError, ImportError):
        raise UsageError(f"checkpoint {path} is corrupt or truncated; nothing was written"
                         ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UsageError(f"{path} is not an ltm-pyro checkpoint; nothing was written")
    if payload.get("version") != PICKLE_VERSION:
        raise UsageError(f"{path} has format version {payload.get('version')}; this converter "
                         f"reads version {PICKLE_VERSION}")
    save_checkpoint(destination, upgrade_pickled_payload(payload))
    load_checkpoint(destination)  # the result loads with weights_only=True
    return destination


def main() -> int:
    args = parser().parse_args()
    if not args.i_trust_this_file:
        raise UsageError(
            f"converting unpickles {args.checkpoint}, which runs any code pickled into it; "
            "pass --i-trust-this-file only for a checkpoint you wrote or got from someone you "
            "trust")
    written = convert(args.checkpoint, args.out)
    print(f"converted {checkpoint_path(args.checkpoint)} (format version {PICKLE_VERSION}) to "
          f"{written} (format version {VERSION}, loads without unpickling code)")
    return 0


if __name__ == "__main__":
    run_main(main)
