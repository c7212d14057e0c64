"""Model families behind one interface (issue 41): the registry covers every model kind, each
family trains, validates, scores and samples through the same calls, and no code outside the
registry decides a family by comparing ``model_kind`` with a string."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import get_args

import pytest
import torch

from ltm_pyro.bounds import Bounds, ScoringConfig, evaluate_windows
from ltm_pyro.config import ModelKind, RunConfig, TrainConfig
from ltm_pyro.decoder import Decoder
from ltm_pyro.errors import UsageError
from ltm_pyro.families import FAMILIES, family_named, family_of
from ltm_pyro.generate import Sampling
from ltm_pyro.model import LatentThoughtModel

from .conftest import micro_config

REPO = Path(__file__).resolve().parent.parent
REGISTRY = REPO / "ltm_pyro" / "families.py"


def _mentions_model_kind(node: ast.AST) -> bool:
    """``x.model_kind``, ``model_kind``, ``x["model_kind"]`` or ``x.get("model_kind")``."""
    if isinstance(node, ast.Attribute):
        return node.attr == "model_kind"
    if isinstance(node, ast.Name):
        return node.id == "model_kind"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "model_kind"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr == "get" and any(
            isinstance(a, ast.Constant) and a.value == "model_kind" for a in node.args)
    return False


def kind_comparisons(source: str) -> list[int]:
    """Lines of ``source`` that compare a model kind with anything (``==``, ``!=``, ``in``)."""
    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Compare)
            and any(_mentions_model_kind(side) for side in (node.left, *node.comparators))]


def test_no_code_outside_the_registry_compares_a_model_kind():
    """Catches: a new branch on ``config.model_kind == "mdlm"`` (or ``!= "ltm"``, ``in (...)``)
    in the library or a script, instead of a method of the family."""
    paths = [*(REPO / "ltm_pyro").rglob("*.py"), *(REPO / "experiments").glob("*.py")]
    found = [f"{path.relative_to(REPO)}:{line}" for path in sorted(paths) if path != REGISTRY
             for line in kind_comparisons(path.read_text())]
    assert not found, "decide by the family (ltm_pyro/families.py): " + ", ".join(found)


def test_the_check_sees_each_form_of_comparison():
    for source in ('config.model_kind == "mdlm"', 'kind = "ar" != model_kind',
                   'results["model_kind"] in ("ar", "mdlm")', 'r.get("model_kind") != "ltm"'):
        assert kind_comparisons(source) == [1], source
    assert kind_comparisons('replace(config, model_kind="ar")\nfamily_of(config).latent') == []


def test_the_registry_names_every_model_kind_once():
    assert list(FAMILIES) == list(get_args(ModelKind))
    assert all(FAMILIES[name].name == name for name in FAMILIES)
    with pytest.raises(UsageError, match="unknown model kind 'gpt'; choose among ltm, ar, mdlm"):
        family_named("gpt")


def _run(kind: str) -> tuple[RunConfig, LatentThoughtModel]:
    family = FAMILIES[kind]
    model = family.shape(micro_config(), match_params=kind != "ltm")
    config = RunConfig(model_kind=kind, model=model,
                       train=TrainConfig(batch_size=4, eval_windows=6, eval_samples=1, lr=1e-3))
    torch.manual_seed(0)
    return config, LatentThoughtModel(Decoder(model))


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_each_family_trains_validates_scores_and_samples_through_one_interface(kind):
    """Catches: a family whose trainer does not move the decoder, whose validation record or
    score lacks the bounds the loop and the commands read, or whose sampler writes outside the
    vocabulary or the asked length."""
    config, ltm = _run(kind)
    family = family_of(config)
    context = config.model.context
    windows = torch.randint(0, 20, (6, context + 1), generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in ltm.decoder.parameters()]
    trainer = family.trainer(ltm, config, torch.Generator().manual_seed(0), shard=None)
    stats = trainer.step(windows[:4], torch.ones(4, context))
    assert math.isfinite(float(stats.elbo)) and not stats.skipped
    assert any(not torch.equal(a, b) for a, b in zip(before, ltm.decoder.parameters()))
    assert trainer.ltm is ltm and trainer.state_dict()

    record = family.validate(ltm, windows, config, torch.device("cpu"))
    assert {"neg_elbo", "nll", "kl", "elbo_ppl"} <= record.keys()
    assert math.isfinite(record["neg_elbo"])

    seen = []
    summary = family.score(ltm, windows, config.inference,
                           ScoringConfig(batch_size=4, bound_samples=4), "cpu",
                           progress=lambda n, figures: seen.append((n, sorted(figures))))
    assert [n for n, _ in seen] == [4, 6]
    assert 1 < summary["iwae_ppl"] < math.inf and 1 < summary["elbo_ppl"] < math.inf

    prompt = windows[:2, :3]
    z = torch.zeros(2, *ltm.latent_shape) if family.latent else None
    new = family.continue_text(ltm, prompt, 5, z, Sampling(), torch.Generator().manual_seed(0),
                               denoising_steps=4)
    assert new.shape == (2, 5)
    assert 0 <= int(new.min()) and int(new.max()) < 23  # the vocabulary, no mask token


def test_the_ar_family_scores_as_evaluate_windows_does_and_the_mdlm_stays_in_its_window():
    config, ltm = _run("ar")
    windows = torch.randint(0, 20, (6, config.model.context + 1))
    scoring = ScoringConfig(batch_size=4)
    assert family_of(config).score(ltm, windows, config.inference, scoring, "cpu") == (
        evaluate_windows(ltm, windows, config.inference, scoring))
    config, ltm = _run("mdlm")
    new = family_of(config).continue_text(ltm, windows[:1, :10], 50, None, Sampling(),
                                          torch.Generator().manual_seed(0))
    assert new.shape == (1, config.model.context + 1 - 10)


def test_score_passes_counts_the_fit_and_the_draws_of_each_family():
    ltm = RunConfig(model=micro_config())
    assert family_of(ltm).score_passes(ltm, ScoringConfig(steps=16, iw_samples=8)) == (
        pytest.approx(2 * 16 + 8))
    ar = RunConfig(model_kind="ar", model=micro_config(latents_per_layer=0))
    assert family_of(ar).score_passes(ar, ScoringConfig(steps=0, iw_samples=8)) == 1.0
    mdlm = RunConfig(model_kind="mdlm", model=micro_config(latents_per_layer=0))
    assert family_of(mdlm).score_passes(mdlm, ScoringConfig(bound_samples=64)) == 64.0


def test_the_shapes_of_the_baselines_and_the_flags_each_family_refuses():
    ltm = micro_config()
    assert FAMILIES["ltm"].shape(ltm, match_params=False) == ltm
    with pytest.raises(UsageError, match="--match-params applies to --model ar or mdlm"):
        FAMILIES["ltm"].shape(ltm, match_params=True)
    ar = FAMILIES["ar"].shape(ltm, match_params=False)
    assert ar.latents_per_layer == 0 and ar.window == ltm.window
    mdlm = FAMILIES["mdlm"].shape(ltm, match_params=True)
    assert mdlm.bidirectional and mdlm.window is None and not FAMILIES["mdlm"].windowed


def test_evaluate_windows_returns_exactly_the_keys_its_typed_result_declares():
    """Catches: a figure added to (or dropped from) the scores without its declaration in
    ``bounds.Bounds``, which documents every key the results files carry."""
    config, ltm = _run("ltm")
    windows = torch.randint(0, 20, (6, config.model.context + 1))
    plain = evaluate_windows(ltm, windows, config.inference, ScoringConfig(batch_size=4))
    assert plain.keys() == Bounds.__required_keys__
    full = evaluate_windows(ltm, windows, config.inference, ScoringConfig(
        batch_size=4, latent_stats=True, prior_samples=2, per_window=True))
    assert full.keys() == Bounds.__required_keys__ | Bounds.__optional_keys__
