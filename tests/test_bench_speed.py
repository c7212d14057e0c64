"""bench_speed.py (ltm_pyro.studies.speed): its plain-PyTorch reference computes what the Pyro
program computes, and the benchmark runs end to end at CI size (no timing is asserted: timings
belong in benchmarks)."""

import json
import subprocess
import sys

import pyro
import pytest
import torch

from ltm_pyro.decoder import Decoder
from ltm_pyro.model import LatentThoughtModel, LocalPosterior
from ltm_pyro.studies.speed import plain_inner_loss, pyro_inner_loss

from .conftest import REPO, micro_config


@pytest.mark.parametrize("validate", [False, True])
def test_plain_reference_matches_the_pyro_inner_loss_and_gradients(batch, validate):
    tokens, mask = batch
    ltm = LatentThoughtModel(Decoder(micro_config()))
    shape = (tokens.shape[0], *ltm.latent_shape)
    loc = (0.5 * torch.randn(shape)).requires_grad_()
    log_var = (torch.randn(shape) - 1).requires_grad_()
    noise = torch.randn(shape)
    results = []
    with pyro.validation_enabled(validate):
        for loss_fn in (pyro_inner_loss, plain_inner_loss):
            loss = loss_fn(ltm, tokens, mask, LocalPosterior(loc, log_var), noise, 0.7)
            results.append((loss, *torch.autograd.grad(loss, [loc, log_var])))
    for from_pyro, plain in zip(*results):
        torch.testing.assert_close(plain, from_pyro, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_speed_benchmark_runs_at_ci_size(tmp_path):
    out = tmp_path / "speed.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "bench_speed.py"), "--preset", "tiny",
         "--reps", "1", "--warmup", "0", "--batch-size", "2", "--seq-len", "16",
         "--inference-steps", "2", "--vocab-size", "50", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())["rows"][0]
    for key in ("pyro_vs_plain_inner", "inner_vs_ar_step", "iteration_vs_ar_step",
                "ideal_iteration_vs_ar_step", "tokens_per_s", "peak_memory_gib"):
        assert row[key] > 0, key
    assert out.with_suffix(".md").is_file()
