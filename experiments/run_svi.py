"""``python experiments/run_svi.py``: the ``ltm-train`` command (``ltm_pyro/commands/train.py``),
kept as a script so it runs from a checkout without installing and under ``torchrun``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltm_pyro.commands.train import main, parser, run_main  # noqa: E402, F401

if __name__ == "__main__":
    run_main(main)
