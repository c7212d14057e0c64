"""Kills, signals, non-finite steps and bad input, all from the command line."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ltm_pyro.checkpoint import FORMAT, VERSION, load_checkpoint, model_from_checkpoint
from ltm_pyro.config import InferenceConfig, TrainConfig, preset
from ltm_pyro.decoder import Decoder
from ltm_pyro.files import write_json
from ltm_pyro.model import LatentThoughtModel
from ltm_pyro.runner import kl_weight_at
from ltm_pyro.svi import DualRateSVI

from .conftest import REPO, micro_config

pytestmark = pytest.mark.slow
SCRIPTS = REPO / "experiments"
RUN = ["--seq-len", "32", "--batch-size", "4", "--inference-steps", "2", "--eval-every", "3",
       "--eval-windows", "4", "--checkpoint-every", "3", "--max-steps", "12", "--no-progress"]


def command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(SCRIPTS / script), *args]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(script, *args), capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def _metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _start_and_wait_for_checkpoint(out, *extra):
    process = subprocess.Popen(command("run_svi.py", "--out", str(out), *RUN, *extra),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.time() + 240
    while not (out / "checkpoint.pt").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    return process


def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    assert run("run_svi.py", "--out", str(reference), *RUN).returncode == 0
    killed = tmp_path / "killed"
    process = _start_and_wait_for_checkpoint(killed)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_checkpoint(killed)["step"] < 12
    result = run("run_svi.py", "--out", str(killed), *RUN)
    assert result.returncode == 0, result.stderr
    assert _metrics(killed) == _metrics(reference)
    a = load_checkpoint(reference)["decoder"]
    b = load_checkpoint(killed)["decoder"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_step_and_leaves_a_loadable_checkpoint(tmp_path, signum, status):
    out = tmp_path / "run"
    process = _start_and_wait_for_checkpoint(out, "--max-steps", "400")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr.decode()
    payload = load_checkpoint(out)
    model_from_checkpoint(payload)
    assert 3 <= payload["step"] < 400


def test_nan_guard_skips_the_update():
    ltm = LatentThoughtModel(Decoder(micro_config()))
    svi = DualRateSVI(ltm, InferenceConfig(steps=2, lr_max=1e30, lr_min=1e29), TrainConfig())
    before = {k: v.clone() for k, v in ltm.decoder.state_dict().items()}
    with pytest.warns(UserWarning):
        stats = svi.step(torch.randint(0, 23, (3, 13)), torch.ones(3, 12))
    assert stats.skipped
    assert all(torch.equal(v, before[k]) for k, v in ltm.decoder.state_dict().items())


def test_nan_guard_stops_the_run_with_one_line(tmp_path):
    out = tmp_path / "run"
    result = run("run_svi.py", "--out", str(out), *RUN, "--fast-lr", "1e30", "--max-bad-steps", "3")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "3 steps in a row had a non-finite loss" in result.stderr


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run("run_svi.py", "--out", str(out), *RUN).returncode == 0
    return out


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


def test_every_bad_input_is_one_line_and_damages_nothing(tmp_path, finished):
    if torch.cuda.is_available():
        pytest.skip("the CUDA case below assumes no GPU")
    before = {p.name: p.read_bytes() for p in finished.iterdir()}  # .lock: empty when free
    cases = _bad_inputs(tmp_path, finished)
    cases.append(("run_svi.py", ["--out", str(tmp_path / "gpu"), "--device", "cuda"], "no CUDA"))
    failures = []
    for script, args, words in cases:
        result = run(script, *args)
        lines = result.stderr.strip().splitlines()
        ok = (result.returncode != 0 and "Traceback" not in result.stderr and len(lines) == 1
              and words in lines[0])
        if not ok:
            failures.append((script, args, result.returncode, result.stderr[-400:]))
    assert not failures, failures
    assert {p.name: p.read_bytes() for p in finished.iterdir()} == before
    assert not list(finished.glob(".*.tmp"))
    assert not (tmp_path / "marker").exists()


def test_kl_warmup_ramps_to_the_configured_weight():
    config = preset("tiny")
    config.inference.kl_weight, config.train.kl_warmup_steps = 0.5, 4
    assert [kl_weight_at(s, config) for s in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    config.train.kl_warmup_steps = 0
    assert kl_weight_at(0, config) == 0.5


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    write_json(tmp_path / "r.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~mask
