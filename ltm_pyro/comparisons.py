"""The runs a fair comparison trains: the LTM, its size-matched AR baselines, the
size-matched masked-diffusion baseline, and the LTM recipe trained with no inference. Shared
by ``bench_quality`` and ``bench_icl``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .config import InferenceConfig, RunConfig
from .errors import UsageError
from .families import FAMILIES, family_of
from .files import read_jsonl
from .flops import training_flops_per_token

NO_INFERENCE = "ltm-no-inference"


def prior_as_posterior(inference: InferenceConfig) -> InferenceConfig:
    """Inference settings whose fitted q is the prior exactly: no inner step, and q_0 = N(0, I)
    (loc 0 without slot offsets, log-var 0 without jitter). ``steps=0`` alone leaves q at the
    initial posterior, whose log-variance is ``init_log_var``, not the prior's 0."""
    return replace(inference, steps=0, init_log_var=0.0, init_log_var_jitter=0.0,
                   init_loc_scale=0.0)


def comparison_configs(base: RunConfig, inference_steps: list[int] | None = None,
                       with_ar: bool = True, with_no_inference: bool = False,
                       with_mdlm: bool = False) -> dict[str, RunConfig]:
    """The LTM (one per training T), its size-matched AR baselines, windowed and full,
    (``with_mdlm``) the size-matched masked-diffusion baseline ``mdlm``, and
    (``with_no_inference``) the LTM recipe trained with no inference, ``ltm-no-inference``:
    T = 0 and q = the prior exactly, so z is noise to the decoder.

    The released comparison gave its GPT the full context while the LTM saw only its window,
    which confounds what the latents add: both baselines are trained so either can be read.
    The ablation shares the LTM's architecture, data, tokens and slow loop: the LTM's gain
    over it is what fitting q brings (in training or at test time), and its own gain or loss
    against the ARs is the architecture and training noise, not latent use.
    """
    if not family_of(base).latent:
        raise UsageError("a comparison trains the LTM and its baselines: drop --model "
                         f"{base.model_kind}")
    found: dict[str, RunConfig] = {}
    for steps in inference_steps or [base.inference.steps]:
        found[f"ltm-T{steps}"] = replace(base, inference=replace(base.inference, steps=steps))
    if with_no_inference:
        found[NO_INFERENCE] = replace(base, inference=prior_as_posterior(base.inference))
    if with_ar:
        ar = FAMILIES["ar"]
        for name, window in (("ar-window", base.model.window), ("ar-full", None)):
            found[name] = replace(base, model_kind=ar.name, model=ar.shape(
                replace(base.model, window=window), match_params=True))
    if with_mdlm:
        # MDLM masks its inputs itself: word dropout is the causal decoders' lever only.
        mdlm = FAMILIES["mdlm"]
        found["mdlm"] = replace(base, model_kind=mdlm.name,
                                model=mdlm.shape(base.model, match_params=True),
                                train=replace(base.train, word_dropout=0.0))
    return found


def with_slow_schedule(config: RunConfig, lr: float, warmup_steps: int) -> RunConfig:
    """``config`` with peak slow learning rate ``lr`` (cosine-decaying to a tenth of it, as
    ``--slow-lr`` sets it) and ``warmup_steps`` of linear warm-up: one point of a tuning grid."""
    return replace(config, train=replace(config.train, lr=lr, min_lr=lr / 10,
                                         warmup_steps=warmup_steps))


def run_flops_per_token(config: RunConfig) -> float:
    """Training FLOPs per token of ``config``'s run, every inner step counted (``flops``);
    the model's ``vocab_size`` must be set."""
    return training_flops_per_token(config.model, config.inference.steps,
                                    config.train.decoder_grads, config.inference)


def tokens_per_step(config: RunConfig) -> int:
    """Training tokens of one slow step (a batch of windows)."""
    return config.train.batch_size * config.model.context


def step_flops(config: RunConfig) -> float:
    """Training FLOPs of one slow step (AR: one step; LTM: T inner steps and the slow one).
    The model's ``vocab_size`` must be set (the LM head counts)."""
    if not config.model.vocab_size:
        raise ValueError("set model.vocab_size (from the corpus) before counting FLOPs")
    return run_flops_per_token(config) * tokens_per_step(config)


def equal_flop_steps(reference: RunConfig, baseline: RunConfig) -> int:
    """The whole number of slow steps (at least 1) that brings ``baseline``'s training FLOPs
    nearest ``reference``'s whole run (``max_steps`` iterations, every inner step counted):
    within half a baseline step of the reference's budget."""
    return max(1, round(reference.train.max_steps * step_flops(reference) / step_flops(baseline)))


def validation_curve(run_dir: Path, config: RunConfig, keys: tuple[str, ...] = ("neg_elbo",)
                     ) -> list[dict]:
    """A run's validations: step, training tokens and training FLOPs (every inner step
    counted) so far, and the records' ``keys`` (by default the valid -ELBO; AR: exact NLL;
    None where a record lacks one). ``config`` is the trained run's, its ``vocab_size`` set.
    A run with no metrics yet has no curve."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [{"step": r["step"], "tokens": r["step"] * tokens_per_step(config),
             "flops": r["step"] * step_flops(config), **{key: r.get(key) for key in keys}}
            for r in read_jsonl(metrics) if r["split"] == "valid"]
