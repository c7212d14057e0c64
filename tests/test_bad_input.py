"""Every kind of bad input, run in-process through each script's ``main`` and ``run_main``:
one line on stderr, exit status 2, and nothing already written is touched. (The process-level
contract, a real exit status and no traceback, is checked in test_reliability.py.)"""

import random
import sys

import numpy as np
import pytest
import torch

from ltm_pyro.checkpoint import FORMAT, VERSION, load_checkpoint

from .conftest import load_script, train_in_process

# One worker runs this module under pytest-xdist, so its module-scoped trained run is built once.
pytestmark = pytest.mark.xdist_group("test_bad_input")

RUN = ["--seq-len", "32", "--batch-size", "4", "--inference-steps", "2", "--eval-every", "3",
       "--eval-windows", "4", "--checkpoint-every", "3", "--max-steps", "12", "--no-progress"]


def run_in_process(script: str, args: list[str], capsys, monkeypatch) -> tuple[int, str]:  # noqa: ANN001
    """Exit status and stderr of ``python experiments/SCRIPT ARGS``, without a new process.
    An exception that is not turned into one line propagates: the test then fails loudly."""
    module = load_script(script.removesuffix(".py"))
    monkeypatch.setattr(sys, "argv", [script, *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        module.run_main(module.main)
    return exited.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return train_in_process(tmp_path_factory.mktemp("finished") / "run", *RUN)


def _bad_inputs(root, finished):
    """(script, args, expected words in the error line) for every kind of bad input."""
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    (root / "short.txt").write_text("a few words only\n")
    (root / "nosplits").mkdir(exist_ok=True)
    (root / "nosplits" / "notes.txt").write_text("hello world\n" * 100)
    (root / "nosplits" / "more.txt").write_text("hello again\n" * 100)
    (root / "afile").write_text("x")
    truncated = root / "truncated.pt"
    truncated.write_bytes((finished / "checkpoint.pt").read_bytes()[:2000])
    foreign = root / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    malicious = root / "malicious.pt"  # unpickling it would create root / "marker"
    torch.save({"format": FORMAT, "version": VERSION, "x": _Touch(root / "marker")}, malicious)
    old = root / "old-format.pt"  # format 1 pickled the Python and numpy RNG states as such
    payload = {**load_checkpoint(finished), "version": 1}
    torch.save({**payload, "rng": {**payload["rng"], "python": random.getstate(),
                                   "numpy": np.random.get_state()}}, old)
    new = str(root / "new-run")
    return [
        ("run_svi.py", ["--out", new, "--data", str(root / "missing.txt")], "does not exist"),
        ("run_svi.py", ["--out", new, "--data", str(root / "empty.txt")], "empty"),
        ("run_svi.py", ["--out", new, "--data", str(root / "binary.txt")], "binary"),
        ("run_svi.py", ["--out", new, "--data", str(root / "latin1.txt")], "UTF-8"),
        ("run_svi.py", ["--out", new, "--data", str(root / "short.txt")], "shorter than one"),
        ("run_svi.py", ["--out", new, "--data", str(root / "nosplits")], "train"),
        ("run_svi.py", ["--out", new, "--tokenizer", "sentencepiece"], "invalid choice"),
        ("run_svi.py", ["--out", new, "--preset", "gpt5"], "invalid choice"),
        ("run_svi.py", ["--out", new, "--model", "rnn"], "invalid choice"),
        ("run_svi.py", ["--out", new, "--device", "tpu"], "unknown device"),
        ("run_svi.py", ["--out", new, "--max-steps", "-3"], "positive integer"),
        ("run_svi.py", ["--out", new, "--batch-size", "0"], "positive integer"),
        ("run_svi.py", ["--out", new, "--seq-len", "0"], "positive integer"),
        ("run_svi.py", ["--out", new, "--slow-lr", "0"], "above zero"),
        ("run_svi.py", ["--out", new, "--fast-lr", "inf"], "finite"),
        ("run_svi.py", ["--out", new, "--slow-lr", "nan"], "finite"),
        ("run_svi.py", ["--out", new, "--batch-size", "5000"], "fewer than one batch"),
        ("run_svi.py", ["--out", str(root / "afile")], "is a file"),
        ("run_svi.py", ["--out", str(root / "afile" / "sub")], "not writable"),
        ("run_svi.py", ["--out", str(finished), *RUN, "--tokenizer", "char"], "different config"),
        ("run_svi.py", ["--out", str(finished), *RUN, "--d-model", "48"], "different config"),
        ("evaluate.py", ["--checkpoint", str(truncated)], "corrupt or truncated"),
        ("evaluate.py", ["--checkpoint", str(foreign)], "not an ltm-pyro checkpoint"),
        ("evaluate.py", ["--checkpoint", str(root / "afile")], "corrupt or truncated"),
        ("evaluate.py", ["--checkpoint", str(root)], "no checkpoint"),
        ("evaluate.py", ["--checkpoint", str(malicious)], "refused to load"),
        ("generate.py", ["--checkpoint", str(old)], "old pickle format"),
    ]


class _Touch:
    """An object whose unpickling creates a file: a stand-in for a malicious checkpoint."""

    def __init__(self, path) -> None:  # noqa: ANN001
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_every_bad_input_is_one_line_and_damages_nothing(tmp_path, finished, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CUDA case below assumes no GPU")
    before = {p.name: p.read_bytes() for p in finished.iterdir()}  # .lock: empty when free
    cases = _bad_inputs(tmp_path, finished)
    cases.append(("run_svi.py", ["--out", str(tmp_path / "gpu"), "--device", "cuda"], "no CUDA"))
    failures = []
    for script, args, words in cases:
        status, stderr = run_in_process(script, args, capsys, monkeypatch)
        lines = stderr.strip().splitlines()
        if not (status == 2 and len(lines) == 1 and words in lines[0]):
            failures.append((script, args, status, stderr[-400:]))
    assert not failures, failures
    assert {p.name: p.read_bytes() for p in finished.iterdir()} == before
    assert not list(finished.glob(".*.tmp"))
    assert not (tmp_path / "marker").exists()


