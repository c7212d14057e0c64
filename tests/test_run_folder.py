"""A run folder is self-contained (issue 39): it loads, scores, encodes and generates from any
working directory after its training corpus is gone, and each way it can fail says so in one
line."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

import ltm_pyro
from ltm_pyro.checkpoint import load_checkpoint
from ltm_pyro.errors import UsageError
from ltm_pyro.run_folder import TOKENIZER_NAME, read_tokenizer
from ltm_pyro.tokenizers import tokenizer_from_dict

from .conftest import load_script, train_in_process

LINE = "the cat sat on the mat and a dog ran past the old red barn by the river"
RUN = ["--seq-len", "8", "--batch-size", "4", "--inference-steps", "1", "--eval-every", "2",
       "--eval-windows", "2", "--checkpoint-every", "2", "--max-steps", "2", "--d-model", "16",
       "--no-progress"]


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory):
    """A run trained on a corpus given by a relative --data, whose corpus was then deleted."""
    root = tmp_path_factory.mktemp("folder")
    corpus = root / "work" / "text"
    corpus.mkdir(parents=True)
    for split, lines in (("train", 60), ("valid", 8), ("test", 8)):
        (corpus / f"{split}.txt").write_text("\n".join([LINE] * lines) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root / "work")
        train_in_process(root / "run", "--data", "text", *RUN)
    shutil.rmtree(corpus)
    return root / "run"


def test_the_folder_records_an_absolute_corpus_path_and_a_plain_tokenizer(moved_run):
    """Catches: the corpus path saved as typed (relative to a directory that is gone), and a
    tokenizer file that is missing, unversioned or not the one the model was trained with."""
    config = json.loads((moved_run / "config.json").read_text())
    assert config["data"]["path"].startswith("/") and config["data"]["path"].endswith("/text")
    raw = json.loads((moved_run / TOKENIZER_NAME).read_text())
    assert (raw["format"], raw["version"]) == ("ltm-pyro-tokenizer", 1)
    from_checkpoint = tokenizer_from_dict(load_checkpoint(moved_run)["tokenizer"])
    assert tokenizer_from_dict(raw["tokenizer"]).encode(LINE) == from_checkpoint.encode(LINE)


def test_a_moved_run_loads_scores_encodes_and_generates_anywhere(moved_run, tmp_path,
                                                                 monkeypatch):
    """Catches: load_run reading the training corpus (it is gone) or resolving the folder
    against the working directory."""
    monkeypatch.chdir(tmp_path)
    run = ltm_pyro.load_run(moved_run)
    assert run.score(LINE, iw_samples=2)["iwae_ppl"] > 1
    assert run.encode(LINE, steps=1).kl() >= 0
    assert isinstance(run.generate(max_new_tokens=3), str)
    assert repr(run).startswith("TrainedRun(") and "valid -ELBO" in repr(run)
    assert len(repr(run)) < 250
    with pytest.raises(UsageError, match="not there any more; pass --data"):
        run.splits()
    other = tmp_path / "other.txt"
    other.write_text("\n".join([LINE] * 30) + "\n")
    assert len(run.splits(data=other).windows["valid"]) > 0


def test_ltm_eval_on_a_moved_run_names_the_missing_corpus_or_scores_the_given_one(
        moved_run, tmp_path, monkeypatch, capsys):
    """Catches: '--data X does not exist' for a flag the user never passed, and --data not
    honoured when the training corpus is gone."""
    evaluate = load_script("evaluate")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--checkpoint", str(moved_run),
                                      "--no-progress", "--iw-samples", "2", "--prior-samples",
                                      "0"])
    with pytest.raises(UsageError, match="training corpus .* is not there any more"):
        evaluate.main()
    text = tmp_path / "mine.txt"
    text.write_text("\n".join([LINE] * 30) + "\n")
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--data", str(text)])
    assert evaluate.main() in (0, None)


def test_old_folders_without_a_tokenizer_file_load_and_bad_files_are_refused(moved_run,
                                                                            tmp_path):
    """Catches: folders written before tokenizer.json refusing to load, and a damaged or
    foreign tokenizer.json used silently or failing deep inside the tokenizer."""
    old = tmp_path / "old"
    shutil.copytree(moved_run, old)
    (old / TOKENIZER_NAME).unlink()
    assert ltm_pyro.load_run(old).tokenizer.encode(LINE)
    payload = load_checkpoint(old)
    for text, message in (("{", "not valid JSON"), ('{"format": "x"}', "not an ltm-pyro"),
                          ('{"format": "ltm-pyro-tokenizer", "version": 9}', "version 9")):
        (old / TOKENIZER_NAME).write_text(text)
        with pytest.raises(UsageError, match=message):
            read_tokenizer(old, payload)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine with no GPU")
def test_a_missing_gpu_is_not_called_a_corrupt_checkpoint(moved_run):
    """Catches: torch's 'no CUDA' RuntimeError reported as a corrupt or truncated file (which
    tells the user to retrain)."""
    with pytest.raises(UsageError, match="no CUDA GPU") as raised:
        ltm_pyro.load_run(moved_run, device="cuda")
    assert "corrupt" not in str(raised.value)


def test_ltm_generate_on_a_moved_run_starts_after_the_end_of_line_token(moved_run, tmp_path,
                                                                       monkeypatch, capsys):
    """Catches: ltm-generate without a prompt failing once the training corpus is gone (it
    read the first token of random validation windows from it)."""
    generate = load_script("generate")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["generate.py", "--checkpoint", str(moved_run),
                                      "--max-new-tokens", "20", "--num-samples", "2"])
    assert generate.main() in (0, None)
    out, err = capsys.readouterr()
    assert "not there any more" in err and out.count("--- sample") == 2
