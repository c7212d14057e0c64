"""``python experiments/evaluate.py``: the ``ltm-eval`` command (``ltm_pyro/commands/evaluate.py``),
kept as a script so it runs from a checkout without installing."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltm_pyro.commands.evaluate import main, parser, run_main  # noqa: E402, F401

if __name__ == "__main__":
    run_main(main)
