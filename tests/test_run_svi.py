"""End-to-end: the command-line contract of experiments/run_svi.py (docs/design.md §4)."""

import json
import subprocess
import sys

import pytest
import torch

from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint
from ltm_pyro.model import LatentThoughtModel

from .conftest import REPO, load_script, shared_data

pytestmark = pytest.mark.slow
FAST = ["--max-steps", "4", "--eval-every", "2", "--eval-windows", "8", "--checkpoint-every",
        "2", "--batch-size", "4", "--inference-steps", "2", "--no-progress"]


def run_svi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "experiments" / "run_svi.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def _assert_contract_files(out):
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "training_curves.png"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["vocab_size"] > 0 and config["parameters"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "valid"}
    assert all({"step", "neg_elbo", "nll", "kl"} <= r.keys() for r in records)
    ltm, _, tokenizer = model_from_checkpoint(load_checkpoint(out))
    assert ltm.decoder.config.vocab_size == tokenizer.vocab_size
    return records


def test_builtin_corpus_run_writes_every_contract_file(tmp_path):
    out = tmp_path / "run"
    result = run_svi("--out", str(out), "--seq-len", "32", *FAST)
    assert result.returncode == 0, result.stderr
    records = _assert_contract_files(out)
    assert records[-1]["step"] == 4
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["split"] == "valid" and summary["kl"] > 0


def test_same_seed_same_metrics(tmp_path):
    outputs = []
    for name in ("a", "b"):
        result = run_svi("--out", str(tmp_path / name), "--seq-len", "32", "--seed", "7", *FAST)
        assert result.returncode == 0, result.stderr
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        outputs.append([{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                        for line in lines])
    assert outputs[0] == outputs[1]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["decoder"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["decoder"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_on_the_same_folder_resumes(tmp_path):
    out = tmp_path / "run"
    assert run_svi("--out", str(out), "--seq-len", "32", *FAST).returncode == 0
    extended = [a if a != "4" else "6" for a in FAST]
    result = run_svi("--out", str(out), "--seq-len", "32", *extended)
    assert result.returncode == 2 and "different config" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_svi("--out", str(out), "--seq-len", "32", *FAST)
    assert result.returncode == 0, result.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(4) == 2  # one train and one valid record


def test_tinyshakespeare_char(tmp_path):
    data = shared_data("tinyshakespeare")
    out = tmp_path / "shakespeare"
    result = run_svi("--out", str(out), "--data", str(data / "input.txt"),
                     "--tokenizer", "char", "--seq-len", "32", *FAST)
    assert result.returncode == 0, result.stderr
    _assert_contract_files(out)
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 66


def test_ptb_word(tmp_path):
    data = shared_data("ptb")
    out = tmp_path / "ptb"
    result = run_svi("--out", str(out), "--data", str(data), "--seq-len", "32", *FAST)
    assert result.returncode == 0, result.stderr
    _assert_contract_files(out)
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 10000


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/corpus"], "does not exist"),
    (["--preset", "huge"], "invalid choice"),
    (["--max-steps", "0"], "positive integer"),
    (["--fast-lr", "nan"], "finite number"),
    (["--device", "cuda"], "no CUDA GPU"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_svi("--out", str(tmp_path / "bad"), *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_compile_flag_reaches_the_model(tmp_path, monkeypatch):
    """``--compile`` compiles the model once before training (that compiled and eager give the
    same values and gradients is checked in test_decoder / test_model)."""
    compiled = []
    monkeypatch.setattr(LatentThoughtModel, "compile", lambda self: compiled.append(self))
    monkeypatch.setattr(sys, "argv", ["run_svi.py", "--out", str(tmp_path / "run"),
                                      "--seq-len", "16", "--compile", *FAST[:1], "1",
                                      *FAST[2:]])
    assert load_script("run_svi").main() == 0
    assert len(compiled) == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["compile"]
