"""Kills, signals, non-finite steps and bad input, all from the command line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint
from ltm_pyro.config import InferenceConfig, TrainConfig, preset
from ltm_pyro.decoder import Decoder
from ltm_pyro.files import write_json
from ltm_pyro.model import LatentThoughtModel
from ltm_pyro.svi import DualRateSVI, kl_weight_at

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


@pytest.mark.parametrize("script,args,words", [
    ("run_svi.py", ["--data", "/nonexistent/corpus.txt"], "does not exist"),
    ("run_svi.py", ["--max-steps", "-3"], "positive integer"),
    ("evaluate.py", ["--checkpoint", "/nonexistent/run"], "no checkpoint"),
])
def test_bad_input_exits_non_zero_with_one_line_from_a_real_process(tmp_path, script, args,
                                                                   words):
    """The process-level contract (exit status, one line on stderr, no traceback); the whole
    catalogue of bad inputs runs in-process in test_bad_input.py."""
    if script == "run_svi.py":
        args = ["--out", str(tmp_path / "new"), *args]
    result = run(script, *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(lines) == 1 and words in lines[0], result.stderr


def test_kl_warmup_ramps_to_the_configured_weight():
    config = preset("tiny").updated(inference={"kl_weight": 0.5}, train={"kl_warmup_steps": 4})
    weights = [kl_weight_at(s, config.inference, config.train) for s in range(6)]
    assert weights == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    config = config.updated(train={"kl_warmup_steps": 0})
    assert kl_weight_at(0, config.inference, config.train) == 0.5


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    write_json(tmp_path / "r.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~mask
