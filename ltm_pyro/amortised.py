"""Semi-amortised inference (Kim et al. 2018, SA-VAE): an encoder proposes q(z|x)'s starting
point, and the fast loop refines it with (fewer) inner steps.

The encoder is small: its own token and position embeddings, ``encoder_layers`` pre-norm
bidirectional self-attention blocks over the whole window, then one learned query per latent
slot that attends over the token states (so each slot has its own role from the start), and a
linear head giving (loc, log_var) [B, N_z, d_z]. The head is zero-initialised and its output is
added to the fast loop's usual start (``inference.initial_posterior`` without jitter: loc 0 or
the fixed per-slot offsets, log-var ``init_log_var``), so an untrained encoder proposes exactly
the start the loop uses without one.

How it is trained (``InferenceConfig.encoder_loss``; one AdamW step per slow step, its own
learning rate ``encoder_lr`` on the slow schedule's shape, at the decoder weights of that
slow step, decoder frozen):

- ``"elbo"`` (default): the training objective of the fit (free bits and KL weight included)
  at the encoder's own proposal, one reparameterised draw: the amortised VAE loss. It costs a
  decoder forward and an input-gradient backward per iteration. This is SA-VAE's
  "VAE + SVI" arm, i.e. SA-VAE with the gradient through the refinement stopped.
- ``"fit"``: distillation, KL(q_fitted || q_proposed) per window with the fitted q held fixed:
  the encoder learns to propose where the refinement ends (no decoder pass at all).

SA-VAE proper backpropagates the ELBO at the refined q through the T inner steps into the
encoder (second-order terms through the decoder, memory growing with T, and through Adam's
normalisation, which is why SA-VAE refines with plain SGD). It is not implemented here.

The decoder's slow step is unchanged in meaning: it is still the negative ELBO at a draw from
the fitted q, held fixed; the encoder only moves q's starting point. Evaluation is therefore
still an honest bound: the fitted q is a function of x alone, and the bounds are scored with
fresh draws from it (``bounds.evaluate_windows``); at T_eval 0 q is the proposal itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import InferenceConfig, ModelConfig
from .inference import slot_offsets
from .model import LocalPosterior

LOG_VAR_RANGE = (-12.0, 6.0)  # the proposal's log-variance is clamped to this range


class EncoderBlock(nn.Module):
    """Pre-norm bidirectional self-attention and a GELU MLP, padded positions masked out."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h: Tensor, keep: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep[:, None, None])
        h = h + self.out(attended.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.norm2(h))


class Encoder(nn.Module):
    """x -> (loc, log_var) of q(z|x), [B, N_z, d_z] each (see the module docstring)."""

    def __init__(self, model: ModelConfig, inference: InferenceConfig) -> None:
        super().__init__()
        d, heads = model.d_model, model.n_heads
        self.embed = nn.Embedding(model.vocab_size, d)
        self.position = nn.Parameter(torch.randn(model.context + 1, d) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(d, heads)
                                    for _ in range(inference.encoder_layers))
        self.queries = nn.Parameter(torch.randn(model.n_latents, d) * 0.02)
        self.pool = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2 * model.z_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        start = torch.zeros(model.n_latents, model.z_dim)
        if inference.init_loc_scale:
            start = inference.init_loc_scale * slot_offsets(start.shape)
        self.register_buffer("start_loc", start, persistent=False)
        self.start_log_var = inference.init_log_var

    def forward(self, tokens: Tensor, mask: Tensor) -> LocalPosterior:
        """tokens [B, T+1] (the window), mask [B, T] over the predicted tokens: the first token
        is always seen, token t+1 when mask[:, t] is 1."""
        keep = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1) > 0
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h, keep)
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        pooled, _ = self.pool(queries, h, h, key_padding_mask=~keep, need_weights=False)
        loc, log_var = self.head(self.norm(pooled)).chunk(2, dim=-1)
        log_var = (self.start_log_var + log_var).clamp(*LOG_VAR_RANGE)
        return LocalPosterior(self.start_loc + loc, log_var)


def build_encoder(model: ModelConfig, inference: InferenceConfig) -> Encoder | None:
    """The encoder ``inference.encoder_layers`` asks for (None when 0 or without latents)."""
    if not inference.encoder_layers or not model.latents_per_layer:
        return None
    return Encoder(model, inference)


def count_encoder_parameters(model: ModelConfig, inference: InferenceConfig) -> int:
    """Parameters of the encoder ``build_encoder`` makes (0 without one): a semi-amortised
    LTM's size is its decoder's plus these. Built on the CPU (its fixed slot offsets are drawn
    there), then dropped."""
    encoder = build_encoder(model, inference)
    return 0 if encoder is None else sum(p.numel() for p in encoder.parameters())


def gaussian_kl(q: LocalPosterior, p: LocalPosterior) -> Tensor:
    """KL(q || p) between diagonal Gaussians, summed over a window's latents: [B]."""
    ratio = torch.exp(q.log_var - p.log_var)
    mahalanobis = (q.loc - p.loc) ** 2 * torch.exp(-p.log_var)
    return 0.5 * (ratio + mahalanobis - 1.0 - (q.log_var - p.log_var)).sum((-2, -1))
