"""Break the core on purpose, one change at a time, and check that its named test fails.

    .venv/bin/python tests/mutants/listed.py            # every change; exit 1 if one survives
    .venv/bin/python tests/mutants/listed.py --only clip

Each change below is one the suite once let through (issue 20), or one a test was written for
since. Every change is applied to a copy of the repository (never to this checkout) and the
named test is run there; the change "is caught" when that test fails. A change whose text is no
longer in the code is reported as stale, so a refactor cannot silently retire a check.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORE = "tests/test_core_behaviour.py::"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    test: str


MUTANTS = [
    Mutant("final mode accumulates the trajectory's decoder gradients", "ltm_pyro/svi.py",
           'accumulate_decoder_grads=self.train.decoder_grads == "trajectory"',
           "accumulate_decoder_grads=True",
           CORE + "test_final_mode_slow_gradient_is_the_final_posteriors_alone[fixed]"),
    Mutant("fresh-noise slow step reuses the last inner draw", "ltm_pyro/svi.py",
           "noise = self.shard.randn(noise.shape, self.generator, noise.device)",
           "noise = noise",
           CORE + "test_final_mode_slow_gradient_is_the_final_posteriors_alone[fresh]"),
    Mutant("evaluation ignores T_eval", "ltm_pyro/bounds.py",
           "fit_local_posterior(ltm, tokens, mask, inference, generator, steps=steps)",
           "fit_local_posterior(ltm, tokens, mask, inference, generator)",
           CORE + "test_evaluation_matches_the_bounds_written_out[fresh]"),
    Mutant("expected NLL loses the last chunk's remainder", "ltm_pyro/bounds.py",
           "        k = min(chunk, samples - start)\n        nll, kl_k",
           "        k = chunk\n        nll, kl_k",
           CORE + "test_evaluation_matches_the_bounds_written_out[fresh]"),
    Mutant("recon at a fresh draw instead of the fitting draw", "ltm_pyro/bounds.py",
           "recon, _ = ltm.elbo_terms(tokens, mask, posterior, noise)",
           "recon, _ = ltm.elbo_terms(tokens, mask, posterior, "
           "None if noise is None else torch.randn_like(noise))",
           CORE + "test_evaluation_matches_the_bounds_written_out[fixed]"),
    Mutant("the ELBO loses its KL", "ltm_pyro/bounds.py",
           '"elbo_per_token": -(self.nll + self.kl) / self.tokens',
           '"elbo_per_token": -self.nll / self.tokens',
           CORE + "test_evaluation_matches_the_bounds_written_out[fixed]"),
    Mutant("importance weights at the fitting noise", "ltm_pyro/bounds.py",
           "log_px = iwae_log_likelihood(ltm, tokens, mask, posterior, iw_samples, generator)",
           "log_px = ltm.log_weights(tokens, mask, posterior, noise).double()",
           CORE + "test_evaluation_matches_the_bounds_written_out[fixed]"),
    Mutant("the ELBO loses its KL (entropy floor)", "ltm_pyro/bounds.py",
           '"elbo_per_token": -(self.nll + self.kl) / self.tokens',
           '"elbo_per_token": -self.nll / self.tokens',
           "tests/test_bounds.py::test_valid_bounds_never_beat_the_exact_likelihood"),
    Mutant("importance weights at the fitting noise (entropy floor)", "ltm_pyro/bounds.py",
           "log_px = iwae_log_likelihood(ltm, tokens, mask, posterior, iw_samples, generator)",
           "log_px = ltm.log_weights(tokens, mask, posterior, noise).double()",
           "tests/test_bounds.py::test_valid_bounds_never_beat_the_exact_likelihood"),
    Mutant("KL warm-up not applied in the training loop", "ltm_pyro/svi.py",
           "kl_weight = kl_weight_at(self.step_count, self.inference, self.train)",
           "kl_weight = self.inference.kl_weight",
           CORE + "test_kl_warmup_weights_the_training_loss_and_never_the_validation"),
    # "Validation at the warm-up weight" (a model left at the last training step's weight)
    # cannot be written since the KL weight became an argument: the model holds no step state.
    Mutant("the training objective ignores the KL weight", "ltm_pyro/objective.py",
           "sequence_terms(model_trace, guide_trace, self.latent_term, scaled=True)",
           "sequence_terms(model_trace, guide_trace, self.latent_term, scaled=False)",
           "tests/test_inference_svi.py::test_sync_free_elbo_matches_pyro_without_validation"),
    Mutant("weight decay on norm gains", "ltm_pyro/svi.py",
           '[p for p in params if p.dim() < 2], "weight_decay": 0.0',
           '[p for p in params if p.dim() < 2], "weight_decay": config.weight_decay',
           CORE + "test_slow_optimizer_decays_matrices_only"),
    Mutant("gradient clipping disabled", "ltm_pyro/svi.py",
           "clip_grad_norm_(decoder.parameters(), self.train.grad_clip)",
           'clip_grad_norm_(decoder.parameters(), float("inf"))',
           CORE + "test_slow_step_clips_the_gradient_norm"),
    Mutant("latents routed to the layers in reverse order", "ltm_pyro/decoder.py",
           "z.unflatten(1, (cfg.n_layers, cfg.latents_per_layer)).unbind(1)",
           "z.unflatten(1, (cfg.n_layers, cfg.latents_per_layer)).unbind(1)[::-1]",
           CORE + "test_each_layer_reads_its_own_slots_of_z[0]"),
    Mutant("resume forgets the RNG states", "ltm_pyro/training_state.py",
           'restore_rng_states(payload["rng"], generator)',
           "pass",
           CORE + "test_an_interrupted_run_resumes_to_the_uninterrupted_result"),
    Mutant("inner loop not frozen in final mode", "ltm_pyro/inference.py",
           "contextlib.nullcontext() if accumulate_decoder_grads else frozen(ltm.decoder)",
           "contextlib.nullcontext()",
           "tests/test_inference_svi.py::"
           "test_final_mode_freezes_the_decoder_during_the_inner_steps[False]"),
]


def run_one(mutant: Mutant, copy: Path) -> str:
    """'caught', 'SURVIVED' or 'stale' (the text to change is gone from the code)."""
    target = copy / mutant.path
    original = target.read_text()
    if mutant.old not in original:
        return "stale"
    target.write_text(original.replace(mutant.old, mutant.new, 1))
    try:
        env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", mutant.test],
            cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    finally:
        target.write_text(original)
    return "caught" if result.returncode == 1 else (
        "SURVIVED" if result.returncode == 0 else f"error {result.returncode}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="run the changes whose name contains this text")
    args = p.parse_args()
    chosen = [m for m in MUTANTS if not args.only or args.only in m.name]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "__pycache__", "*.egg-info", ".whl"))
        outcomes = [(m, run_one(m, copy)) for m in chosen]
    width = max(len(m.name) for m in chosen)
    for mutant, outcome in outcomes:
        print(f"{mutant.name:<{width}}  {outcome:<8}  {mutant.test}")
    caught = sum(outcome == "caught" for _, outcome in outcomes)
    print(f"caught {caught} of {len(outcomes)}")
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
