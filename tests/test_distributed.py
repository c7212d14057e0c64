"""torchrun data parallelism on CPU (gloo): 2 ranks reproduce the single-process step."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint

from .conftest import REPO

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("decoder_grads,noise", [("final", "fresh"), ("trajectory", "fixed")])
def test_two_ranks_give_the_single_process_gradient(tmp_path, decoder_grads, noise):
    worker = str(REPO / "tests" / "ddp_gradient_worker.py")
    _run([sys.executable, worker, str(tmp_path / "single.pt"), decoder_grads, noise])
    _run([*TORCHRUN, worker, str(tmp_path / "ddp.pt"), decoder_grads, noise])
    single, ddp = (torch.load(tmp_path / f"{name}.pt") for name in ("single", "ddp"))
    assert single["grads"].keys() == ddp["grads"].keys()
    for name, grad in single["grads"].items():
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    torch.testing.assert_close(ddp["nll"], single["nll"], rtol=1e-5, atol=1e-7)


def test_torchrun_training_writes_one_loadable_run(tmp_path):
    out = tmp_path / "run"
    _run([*TORCHRUN, str(REPO / "experiments" / "run_svi.py"), "--out", str(out), "--seq-len",
          "32", "--max-steps", "3", "--batch-size", "4", "--inference-steps", "2",
          "--eval-every", "3", "--eval-windows", "8", "--no-progress"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "valid"] == [3]
    assert records[0]["tokens_seen"] == 3 * 2 * 4 * 32  # both ranks' windows counted
    payload = load_checkpoint(out)
    assert payload["world_size"] == 2 and payload["step"] == 3
    model_from_checkpoint(payload)
