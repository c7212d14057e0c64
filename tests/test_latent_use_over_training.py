"""experiments/latent_use_over_training.py: the prior control at every validation of one run,
reported against training tokens; a finished run is reported without training again."""

from __future__ import annotations

import json
import sys

import pytest

from ltm_pyro.errors import UsageError

from .conftest import load_script

SCRIPT = "latent_use_over_training.py"
MICRO = ["--seq-len", "16", "--d-model", "32", "--n-layers", "1", "--batch-size", "4",
         "--inference-steps", "2", "--max-steps", "4", "--eval-every", "2", "--eval-windows",
         "4", "--checkpoint-every", "2", "--no-progress"]


def _run(monkeypatch, tmp_path, *extra: str):  # noqa: ANN001, ANN202
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--label", "micro", "--runs", str(tmp_path / "runs"),
                                      "--results", str(tmp_path / "results"), *MICRO, *extra])
    module = load_script("latent_use_over_training")
    return module, module.main()


def test_rows_carry_the_prior_control_against_tokens_and_a_finished_run_is_not_retrained(
        monkeypatch, tmp_path):
    module, status = _run(monkeypatch, tmp_path, "--eval-prior-control", "3")
    assert status == 0
    results = tmp_path / "results"
    payload = json.loads((results / "micro.json").read_text())
    rows = payload["rows"]
    assert [(r["step"], r["tokens_seen"]) for r in rows] == [(2, 2 * 4 * 16), (4, 4 * 4 * 16)]
    for row in rows:
        assert row["prior_control"] == pytest.approx(row["prior_iwae_ppl"] / row["iwae_ppl"] - 1)
    assert payload["config"]["train"]["eval_prior_control"] == 3
    assert (results / "micro.png").stat().st_size > 0
    assert "prior_control" in (results / "micro.md").read_text()

    def no_training(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(module, "train", no_training)
    assert module.main() == 0
    assert json.loads((results / "micro.json").read_text())["rows"] == rows


def test_the_control_defaults_to_32_draws_and_needs_latents(monkeypatch, tmp_path):
    module = load_script("latent_use_over_training")
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--label", "x", *MICRO])
    config = module.controlled(module.config_from_args(module.parser().parse_args()))
    assert config.train.eval_prior_control == module.DEFAULT_DRAWS == 32
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--label", "x", "--model", "ar", *MICRO])
    with pytest.raises(UsageError, match="needs an LTM"):
        module.controlled(module.config_from_args(module.parser().parse_args()))
