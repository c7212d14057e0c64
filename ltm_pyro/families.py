"""Model families behind one interface: the LTM, the autoregressive (AR) baseline and the
masked-diffusion baseline (MDLM).

Every run is a ``LatentThoughtModel`` around a ``Decoder``; what differs between families is
the decoder's shape, the trainer that takes the slow steps, how a split is scored and how text
is written. Runs, commands and scripts ask the run's family (``family_of(config)``) and never
compare ``model_kind`` with a string (``tests/test_families.py`` checks the package and the
scripts). A new family is one subclass here, registered in ``FAMILIES``, and its name in
``config.ModelKind``; docs/design.md §3 shows one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from .bounds import ScoringConfig, evaluate_windows
from .config import InferenceConfig, ModelConfig, RunConfig
from .decoder import matched_ar_config
from .distributed import Shard
from .errors import UsageError
from .flops import fit_flops_per_token, forward_flops_per_token
from .generate import Sampling, continue_tokens
from .mdlm import (
    MaskedDiffusionTrainer,
    evaluate_bound,
    mdlm_model_config,
    sample_window,
    validation_record,
)
from .model import LatentThoughtModel
from .svi import DualRateSVI, StepStats

# (windows scored so far, running per-token figures): what a progress bar shows while scoring.
Progress = Callable[[int, dict[str, float]], None]

# What a validation record says about the latents (``latent_use``), beside the bounds.
LATENT_KEYS = ("kl_per_window", "mutual_info_per_window", "mutual_info_stderr",
               "mutual_info_cap", "active_units", "active_units_total", "slot_correlation",
               "slot_effective_rank", "slot_linear_r2")


class Trainer(Protocol):
    """What the training loop needs of a family's trainer: one slow step on a batch, and
    its optimizer state for checkpoints."""

    ltm: LatentThoughtModel

    def step(self, tokens: Tensor, mask: Tensor) -> StepStats: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ModelFamily:
    """One kind of model: how it is shaped, trained, scored and sampled."""

    name: ClassVar[str]
    latent: ClassVar[bool] = False  # whether it has z to fit (the LTM)
    windowed: ClassVar[bool] = True  # whether its attention may be limited to a window
    score_metrics: ClassVar[tuple[str, ...]]  # what ltm-eval prints beside the bounds

    def shape(self, model: ModelConfig, match_params: bool) -> ModelConfig:
        """The family's decoder shape made from an LTM's (``match_params``: widened to its
        parameter count)."""
        raise NotImplementedError

    def trainer(self, ltm: LatentThoughtModel, config: RunConfig,
                generator: torch.Generator, shard: Shard) -> Trainer:
        raise NotImplementedError

    def validate(self, ltm: LatentThoughtModel, windows: Tensor, config: RunConfig,
                 device: torch.device) -> dict:
        """A validation record for metrics.jsonl: ``neg_elbo``, ``nll``, ``kl`` and more."""
        raise NotImplementedError

    def score(self, ltm: LatentThoughtModel, windows: Tensor, inference: InferenceConfig,
              scoring: ScoringConfig, device: torch.device | str,
              progress: Progress | None = None) -> dict:
        """A split's bounds (``elbo_ppl``, ``iwae_ppl``, ...) as ``scoring`` says."""
        raise NotImplementedError

    def score_passes(self, config: RunConfig, scoring: ScoringConfig) -> float:
        """Decoder forward passes per scored window that ``iwae_ppl`` costs."""
        raise NotImplementedError

    def continue_text(self, ltm: LatentThoughtModel, prompt: Tensor, new_tokens: int,
                      z: Tensor | None, sampling: Sampling, generator: torch.Generator,
                      denoising_steps: int | None = None) -> Tensor:
        """New token ids [B, new] after ``prompt`` [B, P] (z fixed, if the family has z)."""
        raise NotImplementedError


class LatentThought(ModelFamily):
    """The LTM: z fitted per sequence by the fast loop, the decoder by the slow step."""

    name = "ltm"
    latent = True
    score_metrics = ("windows", *LATENT_KEYS, "prior_samples", "iwae_ppl", "prior_iwae_ppl")

    def shape(self, model: ModelConfig, match_params: bool) -> ModelConfig:
        if match_params:
            raise UsageError("--match-params applies to --model ar or mdlm only")
        return model

    def trainer(self, ltm: LatentThoughtModel, config: RunConfig,
                generator: torch.Generator, shard: Shard) -> Trainer:
        return DualRateSVI(ltm, config.inference, config.train, generator, shard)

    def validate(self, ltm: LatentThoughtModel, windows: Tensor, config: RunConfig,
                 device: torch.device) -> dict:
        """Figures at the full KL weight with what the latents carry (``latent_use``) and,
        with ``eval_prior_control`` K > 0 and latents, the prior control: ``iwae_ppl`` and
        ``prior_iwae_ppl`` from K draws each, and ``prior_control`` = their ratio - 1."""
        cfg = config.train
        control = cfg.eval_prior_control if ltm.has_latents else 0
        summary = evaluate_windows(ltm, windows[: cfg.eval_windows], config.inference,
                                   ScoringConfig(batch_size=cfg.batch_size,
                                                 elbo_samples=cfg.eval_samples,
                                                 iw_samples=max(control, 1), seed=cfg.seed,
                                                 latent_stats=True, prior_samples=control),
                                   device=device)
        record = {"neg_elbo": -summary["elbo_per_token"], "nll": summary["nll_per_token"],
                  "kl": summary["kl_per_token"], "elbo_ppl": summary["elbo_ppl"],
                  "recon_ppl": summary["recon_ppl"], **{k: summary[k] for k in LATENT_KEYS}}
        if control:
            record.update(iwae_ppl=summary["iwae_ppl"], prior_iwae_ppl=summary["prior_iwae_ppl"],
                          prior_control=summary["prior_iwae_ppl"] / summary["iwae_ppl"] - 1)
        return record

    def score(self, ltm: LatentThoughtModel, windows: Tensor, inference: InferenceConfig,
              scoring: ScoringConfig, device: torch.device | str,
              progress: Progress | None = None) -> dict:
        def on_batch(totals) -> None:  # noqa: ANN001 - bounds.BoundTotals
            progress(totals.sequences, {"nll": totals.nll / totals.tokens,
                                        "kl": totals.kl / totals.tokens})

        return evaluate_windows(ltm, windows, inference, scoring, device=device,
                                on_batch=on_batch if progress else None)

    def score_passes(self, config: RunConfig, scoring: ScoringConfig) -> float:
        """The fit (T x 2: a forward and an input-gradient backward per inner step; the
        encoder's proposal, if any) and K importance draws; one pass without latents."""
        if not config.model.latents_per_layer:
            return 1.0
        steps = config.inference.steps if scoring.steps is None else scoring.steps
        fit = fit_flops_per_token(config.model, steps, config.inference)
        return round(fit / forward_flops_per_token(config.model) + scoring.iw_samples, 2)

    def continue_text(self, ltm: LatentThoughtModel, prompt: Tensor, new_tokens: int,
                      z: Tensor | None, sampling: Sampling, generator: torch.Generator,
                      denoising_steps: int | None = None) -> Tensor:
        """Past the context by a sliding window, z fixed (``generate.continue_tokens``)."""
        return continue_tokens(ltm, prompt, new_tokens, z, sampling, generator)[0]


class Autoregressive(LatentThought):
    """The AR baseline: the LTM's decoder without latents, so the fit and the KL vanish and
    its bounds are its exact likelihood."""

    name = "ar"
    latent = False

    def shape(self, model: ModelConfig, match_params: bool) -> ModelConfig:
        return matched_ar_config(model) if match_params else replace(model, latents_per_layer=0)


class MaskedDiffusion(ModelFamily):
    """The MDLM baseline: a bidirectional denoiser scored by its continuous-time NELBO bound
    over the same predicted tokens as the others (every token of a window but the first)."""

    name = "mdlm"
    windowed = False
    score_metrics = ("bound_samples", "bound_stderr_per_token", "bound_ppl_rel_stderr")

    def shape(self, model: ModelConfig, match_params: bool) -> ModelConfig:
        return mdlm_model_config(model, match_params)

    def trainer(self, ltm: LatentThoughtModel, config: RunConfig,
                generator: torch.Generator, shard: Shard) -> Trainer:
        return MaskedDiffusionTrainer(ltm, config.train, generator, shard)

    def validate(self, ltm: LatentThoughtModel, windows: Tensor, config: RunConfig,
                 device: torch.device) -> dict:
        return validation_record(ltm.decoder, windows[: config.train.eval_windows],
                                 config.train, device)

    def score(self, ltm: LatentThoughtModel, windows: Tensor, inference: InferenceConfig,
              scoring: ScoringConfig, device: torch.device | str,
              progress: Progress | None = None) -> dict:
        def on_batch(sequences: int, nelbo_per_token: float) -> None:
            progress(sequences, {"nelbo": nelbo_per_token})

        return evaluate_bound(ltm.decoder, windows, scoring.bound_samples, scoring.batch_size,
                              scoring.seed, device, on_batch=on_batch if progress else None)

    def score_passes(self, config: RunConfig, scoring: ScoringConfig) -> float:
        return float(scoring.bound_samples)

    def continue_text(self, ltm: LatentThoughtModel, prompt: Tensor, new_tokens: int,
                      z: Tensor | None, sampling: Sampling, generator: torch.Generator,
                      denoising_steps: int | None = None) -> Tensor:
        """Within one window only: it denoises the whole context at once."""
        context = ltm.decoder.config.context
        new_tokens = min(new_tokens, context + 1 - prompt.shape[1])
        window = sample_window(ltm.decoder, prompt, denoising_steps or context, generator,
                               sampling)
        return window[:, prompt.shape[1]:prompt.shape[1] + new_tokens]


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (LatentThought(), Autoregressive(),
                                                         MaskedDiffusion())}


def family_named(name: str) -> ModelFamily:
    """The registered family called ``name`` (one line naming the choices otherwise)."""
    if name not in FAMILIES:
        raise UsageError(f"unknown model kind {name!r}; choose among {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(config: RunConfig) -> ModelFamily:
    """The family of a run's config (``model_kind``)."""
    return family_named(config.model_kind)

