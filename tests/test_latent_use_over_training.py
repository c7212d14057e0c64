"""experiments/latent_use_over_training.py: the prior control at every validation of one run,
reported against training tokens; a finished run is reported without training again."""

from __future__ import annotations

import json
import sys

import pytest

from ltm_pyro.errors import UsageError
from ltm_pyro.files import read_jsonl
from ltm_pyro.runner import METRICS_NAME
from ltm_pyro.studies import latent_use_curve

from .conftest import load_script, train_in_process

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
    config = latent_use_curve.controlled(module.config_from_args(module.parser().parse_args()))
    assert config.train.eval_prior_control == latent_use_curve.DEFAULT_DRAWS == 32
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--label", "x", "--model", "ar", *MICRO])
    with pytest.raises(UsageError, match="needs an LTM"):
        latent_use_curve.controlled(module.config_from_args(module.parser().parse_args()))


def test_a_baseline_run_is_tabled_at_the_same_steps_and_a_mismatch_is_refused(
        monkeypatch, tmp_path):
    ar = tmp_path / "runs" / "ar"
    train_in_process(ar, "--model", "ar", "--match-params", *MICRO)
    _, status = _run(monkeypatch, tmp_path, "--baseline", str(ar))
    assert status == 0
    payload = json.loads((tmp_path / "results" / "micro.json").read_text())
    ar_valid = {r["step"]: r["elbo_ppl"] for r in read_jsonl(ar / METRICS_NAME)
                if r["split"] == "valid"}
    for row in payload["rows"]:
        assert row["baseline_elbo_ppl"] == ar_valid[row["step"]]
        assert row["iwae_vs_baseline"] == pytest.approx(
            row["iwae_ppl"] / row["baseline_elbo_ppl"] - 1)
    assert payload["baseline"] == str(ar)
    # a wrong --baseline fails before any training (the run's metrics do not move)
    before = (tmp_path / "runs" / "micro" / METRICS_NAME).read_text()
    with pytest.raises(UsageError, match="validated differently"):
        _run(monkeypatch, tmp_path, "--baseline", str(ar), "--eval-windows", "3", "--force")
    with pytest.raises(UsageError, match="not a finished run folder"):
        _run(monkeypatch, tmp_path, "--baseline", str(tmp_path / "nowhere"), "--max-steps", "6")
    assert (tmp_path / "runs" / "micro" / METRICS_NAME).read_text() == before


def test_report_only_reports_a_stopped_run_with_its_own_config(monkeypatch, tmp_path):
    with pytest.raises(UsageError, match="no run to report"):
        _run(monkeypatch, tmp_path, "--report-only")
    train_in_process(tmp_path / "runs" / "micro", *MICRO, "--max-steps", "2",
                     "--eval-prior-control", "2")
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--label", "micro", "--runs", str(tmp_path / "runs"),
                                      "--results", str(tmp_path / "results"), "--report-only",
                                      "--max-steps", "99"])
    module = load_script("latent_use_over_training")
    monkeypatch.setattr(module, "train", None)  # never called
    assert module.main() == 0
    payload = json.loads((tmp_path / "results" / "micro.json").read_text())
    assert payload["config"]["train"]["max_steps"] == 2 and payload["last_step"] == 2
    assert [r["step"] for r in payload["rows"]] == [2]
    assert "Stopped after" not in (tmp_path / "results" / "micro.md").read_text()
    # a run stopped part-way: its config asks for more steps than its metrics reached
    config_path = tmp_path / "runs" / "micro" / "config.json"
    stored = json.loads(config_path.read_text())
    stored["train"]["max_steps"] = 4
    config_path.write_text(json.dumps(stored))
    assert module.main() == 0
    assert "Stopped after step 2 of 4" in (tmp_path / "results" / "micro.md").read_text()
    # a run validated without the prior control has nothing to report: one line, not a KeyError
    train_in_process(tmp_path / "runs" / "plain", *MICRO, "--max-steps", "2")
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--label", "plain", "--runs", str(tmp_path / "runs"),
                                      "--results", str(tmp_path / "results"), "--report-only"])
    with pytest.raises(UsageError, match="without the prior control"):
        module.main()


def test_a_stopped_run_ends_with_one_line_and_its_exit_status(monkeypatch, tmp_path, capsys):
    module = load_script("latent_use_over_training")

    def stopped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise module.Interrupted(15, 3)

    monkeypatch.setattr(module, "train", stopped)
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--label", "micro", "--runs", str(tmp_path / "runs"),
                                      "--results", str(tmp_path / "results"), *MICRO])
    assert module.main() == 128 + 15
    assert "after step 3" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
