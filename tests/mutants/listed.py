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
LU, LUD = "ltm_pyro/latent_use.py", "tests/test_latent_use_definitions.py::"


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
           "fit_local_posterior(ltm, tokens, mask, inference, generator, steps=steps,",
           "fit_local_posterior(ltm, tokens, mask, inference, generator,",
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
    # Issue 43: definitions of the latent-use estimators (tests/test_latent_use_definitions.py).
    Mutant('MI mixture without its 1/N', LU,
           'torch.logsumexp(log_q, dim=1) - math.log(n))',
           'torch.logsumexp(log_q, dim=1))',
           LUD + 'test_mi_of_a_multivariate_gaussian_channel_is_its_closed_form'),
    Mutant('MI mixture without its 1/N (identical q)', LU,
           'torch.logsumexp(log_q, dim=1) - math.log(n))',
           'torch.logsumexp(log_q, dim=1))',
           LUD + 'test_mi_of_identical_posteriors_is_zero'),
    Mutant('MI mixture divided by the number of draws', LU,
           'torch.logsumexp(log_q, dim=1) - math.log(n))',
           'torch.logsumexp(log_q, dim=1) - math.log(draws.shape[0]))',
           LUD + 'test_mi_of_a_multivariate_gaussian_channel_is_its_closed_form'),
    Mutant('MI prior in place of the aggregate posterior', LU,
           'log_mixture.append(torch.logsumexp(log_q, dim=1) - math.log(n))',
           'log_mixture.append(-0.5 * ((z**2).sum(-1) + log_2pi))',
           LUD + 'test_mi_of_a_multivariate_gaussian_channel_is_its_closed_form'),
    Mutant('MI prior in place of the aggregate (identical q)', LU,
           'log_mixture.append(torch.logsumexp(log_q, dim=1) - math.log(n))',
           'log_mixture.append(-0.5 * ((z**2).sum(-1) + log_2pi))',
           LUD + 'test_mi_of_identical_posteriors_is_zero'),
    Mutant('MI own log-density without its log-variance', LU,
           'own = -0.5 * ((noise**2).sum(-1) + log_var.sum(-1) + log_2pi)',
           'own = -0.5 * ((noise**2).sum(-1) + log_2pi)',
           LUD + 'test_mi_of_a_multivariate_gaussian_channel_is_its_closed_form'),
    Mutant('MI own log-density without its log-variance (identical q)', LU,
           'own = -0.5 * ((noise**2).sum(-1) + log_var.sum(-1) + log_2pi)',
           'own = -0.5 * ((noise**2).sum(-1) + log_2pi)',
           LUD + 'test_mi_of_identical_posteriors_is_zero'),
    Mutant('MI draws scaled by the variance', LU,
           'torch.exp(0.5 * log_var) * noise',
           'torch.exp(log_var) * noise',
           LUD + 'test_mi_of_a_multivariate_gaussian_channel_is_its_closed_form'),
    Mutant('MI cap log of the draws', LU,
           'math.log(n), n)',
           'math.log(n * samples), n)',
           LUD + 'test_mi_of_a_multivariate_gaussian_channel_is_its_closed_form'),
    Mutant('MI components share one variance', LU,
           'log_var = posterior.log_var.flatten(1).double()',
           'log_var = posterior.log_var.flatten(1).double().mean(0).expand(n, -1)',
           LUD + 'test_mi_of_a_few_1d_posteriors_matches_quadrature'),
    Mutant('MI precision taken as the variance', LU,
           'precision = torch.exp(-log_var)',
           'precision = torch.exp(log_var)',
           LUD + 'test_mi_of_a_few_1d_posteriors_matches_quadrature'),
    Mutant('MI mixture constant without its log-variance', LU,
           'constant = (loc**2 * precision + log_var).sum(-1) + log_2pi',
           'constant = (loc**2 * precision).sum(-1) + log_2pi',
           LUD + 'test_mi_of_a_few_1d_posteriors_matches_quadrature'),
    Mutant('MI mixture constant without its log-variance (identical q)', LU,
           'constant = (loc**2 * precision + log_var).sum(-1) + log_2pi',
           'constant = (loc**2 * precision).sum(-1) + log_2pi',
           LUD + 'test_mi_of_identical_posteriors_is_zero'),
    Mutant('MI stderr divided by N', LU,
           'stderr = float(per_window.std() / math.sqrt(n))',
           'stderr = float(per_window.std() / n)',
           LUD + 'test_mi_stderr_is_the_spread_of_the_estimate_over_fresh_windows'),
    Mutant('MI stderr without the 1/sqrt(N)', LU,
           'stderr = float(per_window.std() / math.sqrt(n))',
           'stderr = float(per_window.std())',
           LUD + 'test_mi_stderr_is_the_spread_of_the_estimate_over_fresh_windows'),
    Mutant('active units by standard deviation', LU,
           'return loc.var(dim=0) > threshold',
           'return loc.std(dim=0) > threshold',
           LUD + 'test_active_units_are_the_coordinates_whose_mean_varies_above_the_threshold'),
    Mutant('active units by mean square', LU,
           'return loc.var(dim=0) > threshold',
           'return (loc**2).mean(0) > threshold',
           LUD + 'test_active_units_are_the_coordinates_whose_mean_varies_above_the_threshold'),
    Mutant('slot correlation signed', LU,
           '[pairs[0], pairs[1]].abs().mean()',
           '[pairs[0], pairs[1]].mean()',
           LUD + 'test_slot_correlation_and_rank_of_a_planted_mixture'),
    Mutant('slot correlation counts the diagonal', LU,
           'unit.shape[0], offset=1)',
           'unit.shape[0], offset=0)',
           LUD + 'test_slot_correlation_and_rank_of_a_planted_mixture'),
    Mutant('slot similarity not centred', LU,
           'per_layer.unbind(1):\n        rows = (layer - layer.mean(0))',
           'per_layer.unbind(1):\n        rows = (layer - 0)',
           LUD + 'test_slot_correlation_and_rank_of_a_planted_mixture'),
    Mutant('effective rank from squared singular values', LU,
           'p = singular / singular.sum()',
           'p = singular**2 / (singular**2).sum()',
           LUD + 'test_slot_correlation_and_rank_of_a_planted_mixture'),
    Mutant('slot matrices not centred', LU,
           '.unbind(1):  # [N, S, d]\n        rows = (layer - layer.mean(0))',
           '.unbind(1):  # [N, S, d]\n        rows = (layer - 0)',
           LUD + 'test_slot_correlation_and_rank_of_a_planted_mixture'),
    Mutant('slot similarity groups slots across layers', LU,
           'per_layer = loc.double().unflatten(1, (n_layers, -1))',
           'per_layer = loc.double().unflatten(1, (-1, n_layers)).transpose(1, 2)',
           LUD + 'test_slot_statistics_of_two_layers_average_over_layers'),
    Mutant('slot similarity of the first layer only', LU,
           'return _mean(correlations), _mean(ranks)',
           'return _mean(correlations[:1]), _mean(ranks[:1])',
           LUD + 'test_slot_statistics_of_two_layers_average_over_layers'),
    Mutant('still slot kept unless exactly still', LU,
           'moving = norms > _STILL * math.sqrt(rows.shape[1])',
           'moving = norms > 0',
           LUD + 'test_slots_that_never_move_are_masked'),
    Mutant('slot matrices keep still slots', LU,
           'still = norms <= _STILL * math.sqrt(rows.shape[1])',
           'still = norms <= 0',
           LUD + 'test_slots_that_never_move_are_masked'),
    Mutant('slot matrices NaN on rows only', LU,
           'matrix[:, still] = math.nan',
           'matrix[:, still] = matrix[:, still]',
           LUD + 'test_slots_that_never_move_are_masked'),
    Mutant('slot_linear_r2 without intercept', LU,
           'design = torch.cat([layer, torch.ones(*layer.shape[:2], 1, dtype=layer.dtype)], 2)',
           'design = layer',
           LUD + 'test_slot_linear_r2_of_affine_copies_is_one'),
    Mutant('slot_linear_r2 fitted on all windows', LU,
           'lstsq(design[:half, s], target[:half],',
           'lstsq(design[:, s], target,',
           LUD + 'test_slot_linear_r2_of_pure_noise_is_scored_on_held_out_windows'),
    Mutant('slot_linear_r2 scored on its fitting windows', LU,
           'residual = ((design[half:, s] @ coef - target[half:]) ** 2).sum()',
           'residual = ((design[:half, s] @ coef - target[:half]) ** 2).sum()',
           LUD + 'test_slot_linear_r2_of_pure_noise_is_scored_on_held_out_windows'),
    Mutant('slot_linear_r2 not clamped', LU,
           'scores.append(max(0.0, float(1 - residual / total)))',
           'scores.append(float(1 - residual / total))',
           LUD + 'test_slot_linear_r2_of_pure_noise_is_scored_on_held_out_windows'),
    Mutant('slot_linear_r2 unordered pairs', LU,
           'if s == t:',
           'if s >= t:',
           LUD + 'test_slot_linear_r2_pools_dims_and_averages_ordered_pairs'),
    Mutant('slot_linear_r2 total about the global mean', LU,
           'total = ((target[half:] - target[half:].mean(0)) ** 2).sum()',
           'total = ((target[half:] - target[half:].mean()) ** 2).sum()',
           LUD + 'test_slot_linear_r2_pools_dims_and_averages_ordered_pairs'),
    Mutant("slot_linear_r2 on MKL's default gelsy (not bitwise repeatable)", LU,
           ',\n                                          driver="gelsd")',
           ')',
           LUD + 'test_slot_linear_r2_is_bitwise_reproducible'),
    Mutant('probe scored on its fitting rows', 'experiments/latents_study.py',
           'return float(model.score(test_x, test_y))',
           'return float(model.score(train_x, train_y))',
           LUD + 'test_probe_scores_held_out_rows_only'),
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
