"""``python experiments/prior_control_curve.py``: the ``ltm-prior-control`` command
(``ltm_pyro/commands/prior_control.py``), kept as a script so it runs from a checkout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltm_pyro.commands.prior_control import main, parser, run_main  # noqa: E402, F401

if __name__ == "__main__":
    run_main(main)
