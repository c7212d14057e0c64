"""The latent-thought LM as a Pyro program: model (prior + likelihood) and guide, side by side.

model:  z ~ N(0, I) of shape [N_z, latent_dim] per sequence;  x_t ~ p(x_t | x_<t, z)
guide:  z ~ N(loc, exp(log_var / 2)), with loc and log_var *local* parameters: plain tensors
        fitted afresh for every batch by the fast loop, never in Pyro's parameter store.

The decoder is a plain ``nn.Module`` (not a ``PyroModule``), so Pyro never registers or
un-freezes its weights; only the slow optimizer owns them. The observed tokens are a Pyro
site whose ``log_prob`` is a fused, masked cross-entropy: no normalised [B, T, V] logits are
materialised, which matters in the inner loop (docs/design.md §5).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import constraints
from torch import Tensor

from .decoder import Decoder
from .modes import autocast
from .objective import analytic_kl, log_density_ratio, negative_elbo, sequence_terms


def masked_token_nll(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence NLL [B] of targets [B, T] under logits [B, T, V], over positions mask 1.

    Always in float32 (bf16 log-softmax costs ~0.02 nats of accuracy). Eagerly that copies
    the [B, T, V] logits to float32; compiled (``LatentThoughtModel.compile``) the upcast is
    fused into the reduction, which matters on GPUs where the LM head and cross-entropy are
    half of a compiled inner step (docs/design.md §5).
    """
    nll = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none")
    return (nll.view(targets.shape) * mask).sum(-1)


class TokenSequence(dist.TorchDistribution):
    """Observed next tokens [B, T] given logits [B, T, V]; positions with mask 0 are ignored.

    Only ``log_prob`` is needed for inference; an unobserved x is ``SampledTokens``.
    """

    arg_constraints = {}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, logits: Tensor, mask: Tensor, validate_args: bool | None = None,
                 token_nll: Callable[[Tensor, Tensor, Tensor], Tensor] = masked_token_nll
                 ) -> None:
        self.logits = logits
        self.mask = mask
        self.token_nll = token_nll
        batch_shape, event_shape = logits.shape[:-2], logits.shape[-2:-1]
        super().__init__(batch_shape, event_shape, validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        return -self.token_nll(self.logits, value, self.mask)

    def expand(self, batch_shape, _instance=None):  # noqa: ANN001 - Pyro's signature
        if tuple(batch_shape) != tuple(self.batch_shape):
            raise NotImplementedError("TokenSequence cannot be broadcast to a new batch shape")
        return self


class SampledTokens(dist.TorchDistribution):
    """Next tokens [B, T] drawn from the model itself, continuing each sequence's first token
    given z: the likelihood when x is not observed, so ``pyro.infer.Predictive`` draws text.
    ``log_prob`` scores a value under the same decoder and z, teacher-forced."""

    arg_constraints = {}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, ltm: LatentThoughtModel, z: Tensor | None, first: Tensor, length: int,
                 validate_args: bool | None = None) -> None:
        self.ltm, self.z, self.first, self.length = ltm, z, first, length
        super().__init__(first.shape[:1], torch.Size([length]), validate_args=False)

    def sample(self, sample_shape: tuple = ()) -> Tensor:
        if tuple(sample_shape):
            raise NotImplementedError("SampledTokens draws one sequence per row of the batch")
        from .generate import sample_tokens  # generation builds on this module

        return sample_tokens(self.ltm, self.first, self.length, self.z)[:, 1:]

    def log_prob(self, value: Tensor) -> Tensor:
        inputs = torch.cat([self.first, value[:, :-1]], dim=1)
        mask = torch.ones(value.shape, device=value.device)
        return -self.ltm.token_nll(self.ltm.logits(inputs, self.z), value, mask)

    def expand(self, batch_shape, _instance=None):  # noqa: ANN001 - Pyro's signature
        if tuple(batch_shape) != tuple(self.batch_shape):
            raise NotImplementedError("SampledTokens cannot be broadcast to a new batch shape")
        return self


class NoisyNormal(dist.Normal):
    """A Normal whose reparameterised draw is ``loc + scale * noise`` for a given noise.

    Lets the fast loop reuse one noise draw at every inner step (as the released code does)
    or supply a fresh one, while Pyro still sees an ordinary reparameterised Gaussian site
    (analytic KL included).
    """

    def __init__(self, loc: Tensor, scale: Tensor, noise: Tensor) -> None:
        super().__init__(loc, scale, validate_args=False)
        self.noise = noise

    def rsample(self, sample_shape: tuple = ()) -> Tensor:
        if sample_shape:
            raise ValueError("NoisyNormal draws exactly one sample: its given noise")
        return self.loc + self.scale * self.noise

    def expand(self, batch_shape, _instance=None):  # noqa: ANN001 - torch's signature
        shape = torch.Size(batch_shape)
        return NoisyNormal(
            self.loc.expand(shape), self.scale.expand(shape), self.noise.expand(shape)
        )


@dataclass
class LocalPosterior:
    """Per-sequence Gaussian guide parameters, each [B, N_z, latent_dim].

    Stored as log-variance, as released: Adam moves a parameter by about its learning rate
    per step, so the parametrisation sets how far the fast loop can move the variances.
    """

    loc: Tensor
    log_var: Tensor

    @property
    def scale(self) -> Tensor:
        return torch.exp(0.5 * self.log_var)

    def detach(self) -> LocalPosterior:
        return LocalPosterior(self.loc.detach(), self.log_var.detach())

    def leaf(self) -> LocalPosterior:
        """A copy as new leaf tensors that require grad (the fast loop's parameters)."""
        return LocalPosterior(self.loc.detach().clone().requires_grad_(),
                              self.log_var.detach().clone().requires_grad_())

    @staticmethod
    def concatenate(parts: list[LocalPosterior]) -> LocalPosterior | None:
        """One posterior of all the parts' sequences, in order (None for no parts: a model
        without latents has none)."""
        if not parts:
            return None
        return LocalPosterior(torch.cat([q.loc for q in parts]),
                              torch.cat([q.log_var for q in parts]))


class LatentThoughtModel:
    """A decoder wrapped as a Pyro model with a local mean-field Gaussian guide.

    Holds no per-step state: the KL weight is an argument of model and guide (default 1, the
    true ELBO), applied to the latent site on both sides through ``poutine.scale`` as
    ``TraceMeanField_ELBO`` requires (Pyro's ``examples/dmm`` passes its annealing factor the
    same way). Forward passes run through ``network``: the decoder, or in a view made by
    ``through`` its DDP wrapper. ``encoder`` (optional, ``ltm_pyro/amortised.py``) proposes
    the fast loop's start from x (semi-amortised inference); None: the fixed start.
    """

    def __init__(self, decoder: Decoder, network: torch.nn.Module | None = None,
                 encoder: torch.nn.Module | None = None) -> None:
        self.decoder = decoder
        self.network = decoder if network is None else network
        self.encoder = encoder
        self.token_nll = masked_token_nll

    def compile(self) -> None:
        """``torch.compile`` the decoder (in place: parameter names and checkpoints stay as
        without it) and the token NLL, so the elementwise work of both is fused. Compile
        before making views with ``through``: they copy the compiled NLL."""
        self.decoder.compile()
        self.token_nll = torch.compile(masked_token_nll)

    def through(self, network: torch.nn.Module) -> LatentThoughtModel:
        """The same model with forward passes through ``network`` (e.g. the decoder's DDP
        wrapper, for the slow step under torchrun); this one is left as it is."""
        view = copy.copy(self)
        view.network = network
        return view

    @property
    def config(self):  # noqa: ANN201 - a ModelConfig
        return self.decoder.config

    @property
    def has_latents(self) -> bool:
        return self.decoder.has_latents

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.config.n_latents, self.config.z_dim)

    def logits(self, inputs: Tensor, z: Tensor | None) -> Tensor:
        with autocast(inputs.device):
            return self.network(inputs, z)

    def prior(self, batch: int, device: torch.device) -> dist.TorchDistribution:
        zeros = torch.zeros(batch, *self.latent_shape, device=device)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(2)

    def model(
        self,
        tokens: Tensor,
        mask: Tensor | None,
        local: LocalPosterior | None = None,
        noise: Tensor | None = None,
        kl_weight: float = 1.0,
    ) -> None:
        """p(x, z): tokens [B, T+1] (inputs and next-token targets), mask [B, T] over targets.

        ``mask=None`` leaves x unobserved: it is drawn from the model (``SampledTokens``),
        continuing each sequence's first token for T tokens, so ``pyro.infer.Predictive``
        draws text (the prior predictive; with the guide and a fitted ``local``, the
        posterior predictive). ``local`` and ``noise`` belong to the guide; Pyro hands both
        functions the same arguments, so the model accepts and ignores them.
        """
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        with pyro.plate("sequences", tokens.shape[0]):
            z = None
            if self.has_latents:
                with poutine.scale(scale=kl_weight):
                    z = pyro.sample("z", self.prior(tokens.shape[0], tokens.device))
            if mask is None:
                pyro.sample("x", SampledTokens(self, z, tokens[:, :1], targets.shape[1]))
                return
            logits = self.logits(inputs, z)
            pyro.sample("x", TokenSequence(logits, mask, token_nll=self.token_nll), obs=targets)

    def guide(
        self,
        tokens: Tensor,
        mask: Tensor | None,
        local: LocalPosterior | None = None,
        noise: Tensor | None = None,
        kl_weight: float = 1.0,
    ) -> None:
        """q(z | x) = N(local.loc, local.scale); ``noise`` (standard normal) fixes the draw."""
        if not self.has_latents:
            return
        if local is None:
            raise ValueError("the guide needs the local posterior parameters of this batch")
        with pyro.plate("sequences", tokens.shape[0]):
            if noise is None:
                q = dist.Normal(local.loc, local.scale)
            else:
                q = NoisyNormal(local.loc, local.scale, noise)
            with poutine.scale(scale=kl_weight):
                pyro.sample("z", q.to_event(2))

    def _traces(
        self, tokens: Tensor, mask: Tensor, local: LocalPosterior | None, noise: Tensor | None,
        kl_weight: float = 1.0,
    ) -> tuple[poutine.Trace, poutine.Trace]:
        """(model trace, guide trace) of one draw, in ``sequence_terms``' order."""
        guide_trace = poutine.trace(self.guide).get_trace(tokens, mask, local, noise, kl_weight)
        model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(
            tokens, mask, None, None, kl_weight
        )
        return model_trace, guide_trace

    def objective_terms(
        self, tokens: Tensor, mask: Tensor, local: LocalPosterior | None, noise: Tensor | None,
        kl_weight: float = 1.0,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The slow step's loss (``negative_elbo`` at ``kl_weight``, summed over sequences) and
        the per-sequence NLL and KL [B] it is made of, unweighted, from one draw's traces: the
        step differentiates the same objective as the fast loop and reports the plain terms."""
        traces = self._traces(tokens, mask, local, noise, kl_weight)
        # The token log-likelihood once (both walks read it from the trace), not once a walk.
        traces[0].compute_log_prob(site_filter=lambda _, site: site["is_observed"])
        log_lik, kl = sequence_terms(*traces, analytic_kl)
        return negative_elbo(*traces), -log_lik, kl

    def elbo_terms(
        self, tokens: Tensor, mask: Tensor, local: LocalPosterior | None, noise: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Per-sequence NLL (one guide draw) and analytic KL(q || p), each [B], unweighted.

        The same program and traces as ``TraceMeanField_ELBO``, kept per sequence so that
        training and evaluation can report NLL and KL separately.
        """
        log_lik, kl = sequence_terms(*self._traces(tokens, mask, local, noise), analytic_kl)
        return -log_lik, kl

    def log_weights(
        self, tokens: Tensor, mask: Tensor, local: LocalPosterior | None, noise: Tensor | None
    ) -> Tensor:
        """Per-sequence log importance weight log p(x, z) - log q(z) at the guide's draw."""
        log_lik, log_ratio = sequence_terms(*self._traces(tokens, mask, local, noise),
                                            log_density_ratio)
        return log_lik - log_ratio
