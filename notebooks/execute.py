r"""Execute the notebooks in place at full size, so their committed outputs are what their code
gives (``make notebooks``):

    python notebooks/execute.py notebooks/*.ipynb

Each notebook runs top to bottom in a fresh kernel, from ``notebooks/``, one thread, with the
size variables unset (their defaults are the full sizes); a notebook that fails is left as it
was. Every executed code cell is stamped with the SHA-256 of its source
(``metadata.ltm_pyro.source_sha256``), so ``tests/test_notebooks_current.py`` fails when a
cell's source changes after its output was produced, or a cell was never run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

SIZE_VARIABLES = ("LTM_NB_TRAIN_STEPS", "LTM_NB_WINDOWS", "LTM_NB_IW_SAMPLES",
                  "LTM_NB_NUTS_SAMPLES", "LTM_NB_DOCS", "LTM_NB_INFERENCE_STEPS",
                  "LTM_NB_RUN_DIR")


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def execute(path: Path, timeout: int) -> float:
    """Run one notebook in place and stamp its code cells; returns the seconds it took."""
    notebook = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.metadata.setdefault("ltm_pyro", {})["source_sha256"] = source_hash(cell.source)
    nbformat.write(notebook, path)
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--timeout", type=int, default=7200, help="seconds a cell may take")
    args = p.parse_args()
    for name in SIZE_VARIABLES:
        os.environ.pop(name, None)
    os.environ["OMP_NUM_THREADS"] = "1"
    for path in args.notebooks:
        print(f"{path}: executed in {execute(path, args.timeout):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
