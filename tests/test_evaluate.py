"""experiments/evaluate.py and the other scripts over a trained checkpoint."""

import json
import math
import random
import subprocess
import sys
from dataclasses import replace

import pytest

from ltm_pyro.bounds import ScoringConfig, evaluate_windows
from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint
from ltm_pyro.config import preset
from ltm_pyro.data import load_corpus, sample_windows
from ltm_pyro.decoder import count_parameters, matched_ar_config
from ltm_pyro.flops import forward_flops_per_token, training_flops_per_token

from .conftest import REPO

CONTRACT_KEYS = {"tokens", "nll_per_token", "kl_per_token", "elbo_ppl", "iwae_ppl", "recon_ppl",
                 "inference_steps", "iw_samples", "params"}


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "experiments" / name), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def _write_corpus(folder, words, seed):
    rng = random.Random(seed)
    folder.mkdir()
    for split, lines in (("train", 400), ("valid", 60), ("test", 60)):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(lines))
        (folder / f"{split}.txt").write_text(text + "\n")


def _scored(run, split, steps, iw_samples, elbo_samples, max_windows=None, sample=None,
            **scoring) -> dict:
    """The scripts' figures computed in-process from the library, as a script's user would
    (``sample``: the seeded random subset ``(n, seed)`` instead of the first windows)."""
    ltm, config, tokenizer = model_from_checkpoint(load_checkpoint(run))
    windows = load_corpus(config.data, config.model.context, tokenizer).windows[split]
    windows = sample_windows(windows, *sample) if sample else windows[:max_windows]
    return evaluate_windows(ltm, windows, config.inference,
                            ScoringConfig(steps=steps, elbo_samples=elbo_samples,
                                          iw_samples=iw_samples, seed=0, **scoring))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    _write_corpus(root / "corpus", ["alpha", "beta", "gamma", "delta", "eps", "zeta"], 0)
    out = root / "run"
    result = script("run_svi.py", "--out", str(out), "--data", str(root / "corpus"),
                    "--seq-len", "16", "--max-steps", "3", "--batch-size", "4",
                    "--inference-steps", "2", "--eval-windows", "4", "--no-progress")
    assert result.returncode == 0, result.stderr
    return root


@pytest.mark.slow
def test_evaluate_json_has_every_contract_key(trained, tmp_path):
    out = tmp_path / "eval.json"
    result = script("evaluate.py", "--checkpoint", str(trained / "run"), "--split", "test",
                    "--iw-samples", "4", "--inference-steps", "3", "--json", str(out),
                    "--no-progress")
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert CONTRACT_KEYS <= results.keys()
    assert results["inference_steps"] == 3 and results["iw_samples"] == 4
    assert results["elbo_ppl"] >= results["iwae_ppl"] * 0.98
    expected = _scored(trained / "run", "test", steps=3, iw_samples=4, elbo_samples=4)
    for key in ("tokens", "nll_per_token", "kl_per_token", "elbo_ppl", "iwae_ppl", "recon_ppl"):
        assert results[key] == pytest.approx(expected[key], rel=1e-6), key
    assert "iwae_ppl" in result.stdout  # the printed table
    # bits per byte: the same nats over the bytes of the scored text (each word and its space)
    nats = -expected["iwae_per_token"] * expected["tokens"]
    assert results["bits_per_byte"] == pytest.approx(nats / math.log(2) / results["text_bytes"])
    assert results["tokens"] < results["text_bytes"] < 20 * results["tokens"]


@pytest.mark.slow
def test_zero_shot_on_an_unseen_corpus(trained, tmp_path):
    _write_corpus(tmp_path / "other", ["alpha", "beta", "unseen", "words", "here"], 1)
    out = tmp_path / "zero.json"
    result = script("evaluate.py", "--checkpoint", str(trained / "run"), "--data",
                    str(tmp_path / "other"), "--iw-samples", "2", "--json", str(out),
                    "--no-progress")
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert results["zero_shot"] and results["tokens"] > 0
    # "unseen", "words", "here" are not in the training vocabulary: about 3 of 5 words
    assert 0.3 < results["unk_rate"] < 0.7
    assert "<unk>" in result.stderr and "not comparable" in result.stderr


@pytest.mark.slow
def test_in_domain_unk_is_reported_without_a_warning(tmp_path):
    """PTB ships with <unk> in its text: scored on its own corpus, every model shares it, so
    the rate is reported but nothing is said to be incomparable."""
    _write_corpus(tmp_path / "corpus", ["alpha", "beta", "<unk>", "gamma"], 3)
    run = tmp_path / "run"
    trained = script("run_svi.py", "--out", str(run), "--data", str(tmp_path / "corpus"),
                     "--seq-len", "16", "--max-steps", "2", "--batch-size", "4",
                     "--inference-steps", "1", "--eval-windows", "4", "--no-progress")
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "in-domain.json"
    result = script("evaluate.py", "--checkpoint", str(run), "--iw-samples", "2",
                    "--max-windows", "4", "--json", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert not results["zero_shot"] and 0.1 < results["unk_rate"] < 0.4  # about 1 word in 4
    assert "not comparable" not in result.stderr


@pytest.mark.slow
def test_corpus_without_known_tokens_is_refused(trained, tmp_path):
    _write_corpus(tmp_path / "foreign", ["xx", "yy", "zz"], 2)
    result = script("evaluate.py", "--checkpoint", str(trained / "run"), "--data",
                    str(tmp_path / "foreign"), "--no-progress")
    assert result.returncode == 2 and "vocabulary" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_inference_step_sweep_writes_json_and_png(trained, tmp_path):
    result = script("sweep_inference_steps.py", "--checkpoint", str(trained / "run"),
                    "--steps", "0,2", "--max-windows", "8", "--iw-samples", "2",
                    "--out", str(tmp_path / "sweep"))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [r["inference_steps"] for r in rows] == [0, 2]
    for row in rows:
        expected = _scored(trained / "run", "valid", steps=row["inference_steps"], iw_samples=2,
                           elbo_samples=4, max_windows=8)
        assert row["iwae_ppl"] == pytest.approx(expected["iwae_ppl"], rel=1e-6)
        assert row["recon_ppl"] == pytest.approx(expected["recon_ppl"], rel=1e-6)
        assert row["mutual_info_cap"] == pytest.approx(math.log(8))
        assert 0 <= row["mutual_info_per_window"] <= row["mutual_info_cap"] + 1e-9
    assert rows[0]["recon_ppl"] != pytest.approx(rows[1]["recon_ppl"], rel=1e-6)
    assert (tmp_path / "sweep.png").stat().st_size > 0


@pytest.mark.slow
def test_sweep_scores_a_sampled_subset_with_the_prior_control_once(trained, tmp_path):
    result = script("sweep_inference_steps.py", "--checkpoint", str(trained / "run"),
                    "--steps", "0,2", "--sample-windows", "8", "--sample-seed", "3",
                    "--iw-samples", "2", "--prior-samples", "4", "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "s.json").read_text())
    assert (saved["windows"], saved["sample_windows"], saved["sample_seed"]) == (8, 8, 3)
    assert saved["window_selection"] == "a random subset of 8 windows (seed 3)"
    first, second = saved["rows"]
    expected = _scored(trained / "run", "valid", steps=0, iw_samples=2, elbo_samples=4,
                       sample=(8, 3), prior_samples=4)
    assert first["iwae_ppl"] == pytest.approx(expected["iwae_ppl"], rel=1e-6)
    assert first["prior_iwae_ppl"] == pytest.approx(expected["prior_iwae_ppl"], rel=1e-6)
    assert "prior_iwae_ppl" not in second
    assert "random subset of 8 windows (seed 3)" in (tmp_path / "s.md").read_text()


@pytest.mark.slow
def test_prior_control_curve_writes_json_png_and_replots(trained, tmp_path):
    out = tmp_path / "curve"
    result = script("prior_control_curve.py", "--checkpoint", str(trained / "run"),
                    "--samples", "8,1,4", "--max-windows", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["samples"] for r in saved["rows"]] == [1, 4, 8]
    expected = _scored(trained / "run", "valid", steps=None, iw_samples=1, elbo_samples=1,
                       max_windows=8, prior_samples=4, latent_stats=True)
    assert saved["rows"][1]["prior_iwae_ppl"] == pytest.approx(expected["prior_iwae_ppl"],
                                                               rel=1e-6)
    assert saved["information"]["mutual_info_per_window"] == pytest.approx(
        expected["mutual_info_per_window"], rel=1e-6)
    assert saved["inference_steps"] == saved["trained_inference_steps"] == 2
    png = out.with_suffix(".png")
    png.unlink()
    assert script("replot.py", str(out.with_suffix(".json"))).returncode == 0
    assert png.stat().st_size > 0
    refused = script("prior_control_curve.py", "--checkpoint", str(trained / "run"),
                     "--samples", "0,4", "--out", str(tmp_path / "no"))
    assert refused.returncode == 2 and "at least 1 draw" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_evaluate_scores_the_sampled_subset_it_names(trained, tmp_path):
    out = tmp_path / "eval.json"
    result = script("evaluate.py", "--checkpoint", str(trained / "run"), "--sample-windows", "8",
                    "--sample-seed", "5", "--iw-samples", "2", "--prior-samples", "0",
                    "--json", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    expected = _scored(trained / "run", "valid", steps=None, iw_samples=2, elbo_samples=4,
                       sample=(8, 5))
    saved = json.loads(out.read_text())
    assert saved["iwae_ppl"] == pytest.approx(expected["iwae_ppl"], rel=1e-6)
    assert saved["window_selection"] == "a random subset of 8 windows (seed 5)"
    both = script("evaluate.py", "--checkpoint", str(trained / "run"), "--sample-windows", "8",
                  "--max-windows", "4", "--no-progress")
    assert both.returncode == 2 and "not allowed with" in both.stderr


@pytest.mark.parametrize("name", ["tiny", "small", "ltm-s"])
def test_matched_ar_is_within_two_percent(name):
    config = replace(preset(name).model, vocab_size=10000)
    ltm_params = count_parameters(config)
    ar = matched_ar_config(config)
    assert ar.latents_per_layer == 0
    assert abs(count_parameters(ar) - ltm_params) <= 0.02 * ltm_params


def test_flops_count_every_inner_step():
    config = replace(preset("small").model, vocab_size=1000)
    forward = forward_flops_per_token(config)
    assert training_flops_per_token(config, 16) == pytest.approx((16 * 2 + 3) * forward)
    assert training_flops_per_token(config, 16, "trajectory") == pytest.approx(17 * 3 * forward)
    ar = matched_ar_config(config)
    assert training_flops_per_token(ar, 16) == pytest.approx(3 * forward_flops_per_token(ar))


@pytest.mark.slow
def test_bench_quality_scores_every_requested_split(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "bench_quality.py"), "--max-steps", "3",
         "--eval-every", "3", "--eval-windows", "4", "--batch-size", "4", "--inference-steps",
         "2", "--seq-len", "32", "--test-windows", "4", "--splits", "valid,test",
         "--eval-inference-steps", "0,2", "--iw-samples", "2", "--elbo-samples", "1",
         "--no-ar", "--label", "micro", "--results", str(tmp_path / "results"),
         "--runs", str(tmp_path / "runs"), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "results" / "micro.json").read_text())
    assert [(r["split"], r["T_eval"]) for r in report["rows"]] == [
        ("valid", 0), ("valid", 2), ("test", 0), ("test", 2)]
    assert all(r["iwae_ppl"] <= r["elbo_ppl"] * 1.0001 for r in report["rows"])
    assert (tmp_path / "results" / "micro.png").is_file()


@pytest.mark.slow
def test_generate_continues_a_prompt_reproducibly(trained, tmp_path):
    outputs = []
    for name in ("a.json", "b.json"):
        result = script("generate.py", "--checkpoint", str(trained / "run"), "--prompt",
                        "alpha beta gamma", "--num-samples", "3", "--max-new-tokens", "5",
                        "--top-k", "4", "--top-p", "0.9", "--inference-steps", "3", "--seed",
                        "2", "--json", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        outputs.append(json.loads((tmp_path / name).read_text()))
    assert outputs[0]["samples"] == outputs[1]["samples"] and len(outputs[0]["samples"]) == 3
    assert all(len(row) == 3 + 5 for row in outputs[0]["token_ids"])
    assert outputs[0]["settings"]["top_k"] == 4 and outputs[0]["start"] == "prompt"


@pytest.mark.slow
def test_generate_without_prompt_and_with_an_unknown_one(trained):
    result = script("generate.py", "--checkpoint", str(trained / "run"), "--num-samples", "2",
                    "--max-new-tokens", "4", "--prior-scale", "0.5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- sample") == 2
    refused = script("generate.py", "--checkpoint", str(trained / "run"), "--prompt", "omega")
    assert refused.returncode == 2 and "vocabulary" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def _qa_file(path, questions):
    path.write_text("".join(json.dumps({"question": q, "answer": f"alpha beta\n#### {i}"}) + "\n"
                            for i, q in enumerate(questions)))
    return path


@pytest.mark.slow
def test_gsm8k_harness_draws_exemplars_from_train_only(trained, tmp_path):
    train = _qa_file(tmp_path / "train.jsonl", [f"alpha gamma {i}" for i in range(6)])
    test = _qa_file(tmp_path / "test.jsonl", [f"beta delta {i}" for i in range(3)])
    result = script("eval_gsm8k.py", "--checkpoint", str(trained / "run"), "--train-file",
                    str(train), "--test-file", str(test), "--shots", "2", "--max-new-tokens",
                    "4", "--inference-steps", "1", "--json", str(tmp_path / "g.json"),
                    "--no-progress")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["summary"]["total"] == 3 and 0 <= report["summary"]["accuracy"] <= 1
    train_questions = {f"alpha gamma {i}" for i in range(6)}
    assert all(len(r["exemplars"]) == 2 and set(r["exemplars"]) <= train_questions
               for r in report["items"])
    leaky = script("eval_gsm8k.py", "--checkpoint", str(trained / "run"), "--train-file",
                   str(train), "--test-file", str(train), "--no-progress")
    assert leaky.returncode == 2 and "also appear" in leaky.stderr


@pytest.mark.slow
def test_generation_benchmark_compares_ltm_ar_and_data(trained, tmp_path):
    ar = tmp_path / "ar"
    result = script("run_svi.py", "--out", str(ar), "--data", str(trained / "corpus"),
                    "--model", "ar", "--seq-len", "16", "--max-steps", "3", "--batch-size", "4",
                    "--eval-windows", "4", "--no-progress")
    assert result.returncode == 0, result.stderr
    result = script("bench_generation.py", "--ltm", str(trained / "run"), "--ar", str(ar),
                    "--scorer", str(ar), "--label", "g", "--results", str(tmp_path / "res"),
                    "--num-samples", "3", "--prior-scales", "0.5,1")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "res" / "g.json").read_text())["rows"]
    assert [(r["source"], r["prior_scale"]) for r in rows][1:] == [("ltm", 0.5), ("ltm", 1.0),
                                                                   ("ar", None)]
    assert all(r["scorer_ppl"] > 1 and 0 < r["distinct_1"] <= 1 for r in rows)
    refused = script("bench_generation.py", "--ltm", str(ar), "--scorer", str(ar), "--label", "x")
    assert refused.returncode == 2 and "AR model" in refused.stderr
