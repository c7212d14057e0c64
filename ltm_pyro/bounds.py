"""Honest evaluation: ELBO with fresh noise, IWAE, and the paper-style reconstruction NLL.

All three are computed per sequence from one fitted local posterior and aggregated as
exp(total nats / total predicted tokens) over a split, never as a mean of per-sequence
perplexities (docs/design.md §2):

- ``elbo_ppl``:  exp(-ELBO / tokens), ELBO with S fresh draws from q and analytic KL; a valid
  upper bound on the model's perplexity in expectation.
- ``iwae_ppl``:  exp(-log mean_k w_k / tokens), w = p(x|z)p(z)/q(z), K draws; tighter, valid.
  Log-weights are float64 and combined by log-sum-exp.
- ``recon_ppl``: exp(NLL / tokens) at the draw the posterior was fitted with, KL left out: the
  paper-style number, which can fall below the data's entropy. Not a bound.
For a model without latents all three equal its exact perplexity.

With ``latent_stats=True`` ``evaluate_windows`` also keeps every window's fitted (loc, log_var)
and reports what the latents carry (``latent_use``: KL and mutual information per window,
active units, slot correlation); with ``prior_samples=K`` it scores the same model with the
prior as proposal (``prior_iwae_ppl``). Both draw from their own generators, so the figures
above stay the same with or without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypedDict

import torch
from torch import Tensor

from .config import InferenceConfig
from .errors import UsageError
from .inference import fit_local_posterior
from .latent_use import latent_use_summary
from .model import LatentThoughtModel, LocalPosterior
from .modes import evaluating

# Offset of the seed of the prior control's generator from the evaluation seed: its draws
# never shift the bounds' own draws (the latent statistics' offset: latent_use).
PRIOR_SEED_OFFSET = 2**41


def _repeat(posterior: LocalPosterior | None, times: int) -> LocalPosterior | None:
    if posterior is None:
        return None
    return LocalPosterior(posterior.loc.repeat(times, 1, 1), posterior.log_var.repeat(times, 1, 1))


def _draws(posterior: LocalPosterior | None, count: int, generator: torch.Generator | None
           ) -> Tensor | None:
    if posterior is None:
        return None
    shape = (count * posterior.loc.shape[0], *posterior.loc.shape[1:])
    return torch.randn(shape, generator=generator, device=posterior.loc.device)


@torch.no_grad()
def expected_nll_and_kl(
    ltm: LatentThoughtModel, tokens: Tensor, mask: Tensor, posterior: LocalPosterior | None,
    samples: int, generator: torch.Generator | None = None, chunk: int = 8,
) -> tuple[Tensor, Tensor]:
    """E_q[-log p(x|z)] from ``samples`` fresh draws, and the analytic KL; each [B]."""
    batch = tokens.shape[0]
    if posterior is None:
        return ltm.elbo_terms(tokens, mask, None, None)
    total = torch.zeros(batch, dtype=torch.float64, device=tokens.device)
    kl = None
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        nll, kl_k = ltm.elbo_terms(tokens.repeat(k, 1), mask.repeat(k, 1),
                                   _repeat(posterior, k), _draws(posterior, k, generator))
        total += nll.double().view(k, batch).sum(0)
        kl = kl_k[:batch]
    return (total / samples).float(), kl


@torch.no_grad()
def log_importance_weights(
    ltm: LatentThoughtModel, tokens: Tensor, mask: Tensor, posterior: LocalPosterior | None,
    samples: int, generator: torch.Generator | None = None, chunk: int = 8,
) -> Tensor:
    """log p(x, z_k) - log q(z_k) for K draws z_k ~ q, shape [B, K], float64.

    The decoder runs on ``chunk`` draws at a time, so memory stays bounded for any K.
    """
    batch = tokens.shape[0]
    if posterior is None:
        return ltm.log_weights(tokens, mask, None, None).double()[:, None]
    pieces = []
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        log_w = ltm.log_weights(tokens.repeat(k, 1), mask.repeat(k, 1),
                                _repeat(posterior, k), _draws(posterior, k, generator))
        pieces.append(log_w.double().view(k, batch).T)
    return torch.cat(pieces, dim=1)


def log_mean_exp(log_weights: Tensor) -> Tensor:
    """log (1/K) sum_k exp(log_weights[..., k]): the IWAE bound from K log weights."""
    return torch.logsumexp(log_weights, dim=-1) - math.log(log_weights.shape[-1])


def iwae_log_likelihood(
    ltm: LatentThoughtModel, tokens: Tensor, mask: Tensor, posterior: LocalPosterior | None,
    samples: int, generator: torch.Generator | None = None, chunk: int = 8,
) -> Tensor:
    """log (1/K) sum_k p(x, z_k) / q(z_k), z_k ~ q, per sequence [B], in float64."""
    log_w = log_importance_weights(ltm, tokens, mask, posterior, samples, generator, chunk)
    return log_mean_exp(log_w)


@dataclass
class BoundTotals:
    """Running sums of nats over a split; ``summary()`` gives per-token figures and ppls."""

    tokens: float = 0.0
    nll: float = 0.0  # expected NLL under q (fresh draws)
    kl: float = 0.0
    iwae: float = 0.0  # -log p(x) estimate
    recon: float = 0.0  # NLL at the fitting draw, KL left out
    sequences: int = 0
    prior_iwae: float = 0.0  # -log p(x) estimate with the prior as proposal, if asked for
    extra: dict = field(default_factory=dict)
    windows: dict[str, list[float]] = field(
        default_factory=lambda: {"tokens": [], "neg_elbo": [], "neg_iwae": []})

    def add(self, mask: Tensor, nll: Tensor, kl: Tensor, neg_iwae: Tensor, recon: Tensor) -> None:
        self.tokens += float(mask.sum())
        self.nll += float(nll.double().sum())
        self.kl += float(kl.double().sum())
        self.iwae += float(neg_iwae.double().sum())
        self.recon += float(recon.double().sum())
        self.sequences += mask.shape[0]
        self.windows["tokens"] += mask.sum(-1).tolist()
        self.windows["neg_elbo"] += (nll.double() + kl.double()).tolist()
        self.windows["neg_iwae"] += neg_iwae.double().tolist()

    def add_prior(self, neg_log_px: Tensor) -> None:
        self.prior_iwae += float(neg_log_px.double().sum())
        self.windows.setdefault("neg_prior_iwae", []).extend(neg_log_px.double().tolist())

    def summary(self, prior_samples: int = 0) -> dict[str, float]:
        """Per-token figures and ppls; with ``prior_samples`` K > 0 the prior control's too."""
        per_token = {
            "nll_per_token": self.nll / self.tokens,
            "kl_per_token": self.kl / self.tokens,
            "elbo_per_token": -(self.nll + self.kl) / self.tokens,
            "iwae_per_token": -self.iwae / self.tokens,
            "recon_nll_per_token": self.recon / self.tokens,
        }
        summary = {
            "tokens": int(self.tokens),
            "sequences": self.sequences,
            **per_token,
            "elbo_ppl": math.exp(-per_token["elbo_per_token"]),
            "iwae_ppl": math.exp(-per_token["iwae_per_token"]),
            "recon_ppl": math.exp(per_token["recon_nll_per_token"]),
        }
        if prior_samples:
            prior = -self.prior_iwae / self.tokens
            summary.update(prior_iwae_per_token=prior, prior_iwae_ppl=math.exp(-prior),
                           prior_samples=prior_samples)
        return summary


def per_byte(summary: dict, text_bytes: int) -> dict:
    """The iwae bound in bits per UTF-8 byte of the scored text: comparable across
    tokenizers and vocabularies, where perplexity per token is not."""
    nats = math.log(summary["iwae_ppl"]) * summary["tokens"]
    return {"text_bytes": text_bytes, "bits_per_byte": nats / (math.log(2) * text_bytes)}


def combined_summary(parts: list[dict]) -> dict:
    """Summaries of disjoint sets of windows as one: per-token figures weighted by tokens,
    perplexities from the totals (what one call on all the windows would report)."""
    tokens = sum(p["tokens"] for p in parts)
    combined = {**parts[0], "tokens": tokens, "sequences": sum(p["sequences"] for p in parts)}
    for key in ("nll_per_token", "kl_per_token", "elbo_per_token", "iwae_per_token",
                "recon_nll_per_token"):
        combined[key] = sum(p[key] * p["tokens"] for p in parts) / tokens
    combined.update(elbo_ppl=math.exp(-combined["elbo_per_token"]),
                    iwae_ppl=math.exp(-combined["iwae_per_token"]),
                    recon_ppl=math.exp(combined["recon_nll_per_token"]))
    return combined


def prior_of(posterior: LocalPosterior | None) -> LocalPosterior | None:
    """N(0, I) in the shape of ``posterior``: the prior as importance proposal."""
    if posterior is None:
        return None
    return LocalPosterior(torch.zeros_like(posterior.loc), torch.zeros_like(posterior.log_var))


def _fitted(ltm: LatentThoughtModel, tokens: Tensor, mask: Tensor, inference: InferenceConfig,
            generator: torch.Generator, steps: int, fit_free_bits: bool = False
            ) -> tuple[LocalPosterior | None, Tensor | None]:
    """A batch's fitted posterior and the noise of its last inner step (None without latents)."""
    if not ltm.has_latents:
        return None, None
    fit = fit_local_posterior(ltm, tokens, mask, inference, generator, steps=steps,
                              training=fit_free_bits)
    return fit.posterior, fit.noise


def _refuse_bidirectional(ltm: LatentThoughtModel) -> None:
    """Next-token figures of a model that sees the next token would mean nothing."""
    if ltm.config.bidirectional:
        raise UsageError("an MDLM is scored by its NELBO bound (ltm_pyro.mdlm.evaluate_bound)")


class _Figures(TypedDict):
    """The figures ``evaluate_windows`` always returns (see ``Bounds``)."""

    tokens: int
    sequences: int
    nll_per_token: float
    kl_per_token: float
    elbo_per_token: float
    iwae_per_token: float
    recon_nll_per_token: float
    elbo_ppl: float
    iwae_ppl: float
    recon_ppl: float
    inference_steps: int
    elbo_samples: int
    iw_samples: int


class Bounds(_Figures, total=False):
    """What ``evaluate_windows`` returns: plain JSON-ready figures under the names every
    results file uses. Always: per token, the expected NLL and KL under q (``elbo = -(nll +
    kl)``), the IWAE estimate of log p(x) and the NLL at the fitting draw; their perplexities
    (``elbo_ppl`` and ``iwae_ppl`` are bounds, ``recon_ppl`` is not); the settings that made
    them. The keys below only when ``ScoringConfig`` asks for them."""

    # prior_samples K > 0: the IWAE with the prior as proposal.
    prior_samples: int
    prior_iwae_per_token: float
    prior_iwae_ppl: float
    # latent_stats: what z carries (``latent_use.latent_use_summary``).
    kl_per_window: float
    mutual_info_per_window: float
    mutual_info_stderr: float
    mutual_info_cap: float
    mutual_info_samples: int
    active_units: int
    active_units_total: int
    slot_correlation: float | None
    slot_effective_rank: float | None
    slot_linear_r2: float | None
    # per_window: each window's tokens, -ELBO and -IWAE (and the prior's -IWAE), in nats.
    per_window: dict[str, list[float]]


@dataclass(frozen=True)
class ScoringConfig:
    """How ``evaluate_windows`` scores a split, as one object every caller passes.

    ``steps``: T_eval, the inner steps of each batch's fit (None: the inference config's T);
    ``fit_free_bits``: fit with the training fits' objective (free bits) instead of the ELBO
    (the bounds stay valid: any q gives one); ``elbo_samples`` S fresh draws for the ELBO,
    ``iw_samples`` K draws for the IWAE bound, ``prior_samples`` K > 0 draws from the prior for
    ``prior_iwae_ppl`` (0: skip); ``latent_stats`` adds what z carries (``latent_use``, MI
    from ``mi_samples`` draws a window); ``per_window`` each window's figures (paired
    intervals); draws come from generators seeded with ``seed``. ``bound_samples``: an
    MDLM's masked-count draws per window for its bound (``families.MaskedDiffusion``).
    """

    steps: int | None = None
    batch_size: int = 16
    elbo_samples: int = 1
    iw_samples: int = 1
    seed: int = 0
    latent_stats: bool = False
    mi_samples: int = 4
    prior_samples: int = 0
    per_window: bool = False
    fit_free_bits: bool = False
    bound_samples: int = 64


def evaluate_windows(
    ltm: LatentThoughtModel,
    windows: Tensor,
    inference: InferenceConfig,
    scoring: ScoringConfig | None = None,
    device: torch.device | str = "cpu",
    on_batch=None,  # noqa: ANN001 - optional callable(BoundTotals), e.g. a progress bar
) -> Bounds:
    """Fit each batch's posterior with T_eval inner steps and total the three bounds, as
    ``scoring`` says (``ScoringConfig``; default: T_eval = T, one draw each).

    Same call, same figures: every draw comes from a generator seeded with ``scoring.seed``
    and the global RNG never moves. ``latent_stats`` adds ``latent_use_summary`` of the
    fitted posteriors; ``prior_samples`` K > 0 adds ``prior_iwae_ppl``; ``per_window`` each
    window's tokens, -ELBO and -IWAE (and, with ``prior_samples``, the prior's -IWAE)."""
    scoring = scoring or ScoringConfig()
    steps, batch_size, seed = scoring.steps, scoring.batch_size, scoring.seed
    elbo_samples, iw_samples, prior_samples = (scoring.elbo_samples, scoring.iw_samples,
                                               scoring.prior_samples)
    latent_stats, mi_samples, fit_free_bits = (scoring.latent_stats, scoring.mi_samples,
                                               scoring.fit_free_bits)
    _refuse_bidirectional(ltm)
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    prior_generator = torch.Generator(device=device).manual_seed(seed + PRIOR_SEED_OFFSET)
    posteriors: list[LocalPosterior] = []
    steps = inference.steps if steps is None else steps
    totals = BoundTotals()
    with evaluating(ltm.decoder):
        for start in range(0, len(windows), batch_size):
            tokens = windows[start:start + batch_size].to(device)
            mask = torch.ones(tokens.shape[0], tokens.shape[1] - 1, device=device)
            posterior, noise = _fitted(ltm, tokens, mask, inference, generator, steps,
                                       fit_free_bits)
            with torch.no_grad():
                recon, _ = ltm.elbo_terms(tokens, mask, posterior, noise)
            nll, kl = expected_nll_and_kl(ltm, tokens, mask, posterior, elbo_samples, generator)
            log_px = iwae_log_likelihood(ltm, tokens, mask, posterior, iw_samples, generator)
            totals.add(mask, nll, kl, -log_px, recon)
            if prior_samples:
                totals.add_prior(-iwae_log_likelihood(ltm, tokens, mask, prior_of(posterior),
                                                      prior_samples, prior_generator))
            if latent_stats and posterior is not None:
                posteriors.append(posterior)
            if on_batch is not None:
                on_batch(totals)
    summary = totals.summary(prior_samples)
    summary.update(inference_steps=steps if ltm.has_latents else 0,
                   elbo_samples=elbo_samples, iw_samples=iw_samples)
    if latent_stats:
        summary.update(latent_use_summary(LocalPosterior.concatenate(posteriors),
                                          ltm.config.n_layers, len(windows), mi_samples, seed))
    if scoring.per_window:
        summary["per_window"] = totals.windows
    return summary


@torch.no_grad()
def prior_mean_nll(ltm: LatentThoughtModel, windows: Tensor, batch_size: int = 16,
                   device: torch.device | str = "cpu") -> Tensor:
    """Each window's exact NLL in nats [N] with z held at the prior's mean, 0.

    With z fixed the decoder is a plain autoregressive model, so this is an exact likelihood,
    not a bound: beside an AR baseline it tells whether what an LTM gained in training
    survives without reading z at test time (issue 42's decomposition). A model without
    latents gives its own exact NLL."""
    _refuse_bidirectional(ltm)
    device = torch.device(device)
    nll = []
    with evaluating(ltm.decoder):
        for start in range(0, len(windows), batch_size):
            tokens = windows[start:start + batch_size].to(device)
            mask = torch.ones(tokens.shape[0], tokens.shape[1] - 1, device=device)
            z = torch.zeros(tokens.shape[0], *ltm.latent_shape, device=device) if (
                ltm.has_latents) else None
            nll.append(ltm.token_nll(ltm.logits(tokens[:, :-1], z), tokens[:, 1:], mask).double())
    return torch.cat(nll)
