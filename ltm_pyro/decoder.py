"""The Transformer decoder of a latent-thought LM, faithful to the released architecture.

Each block is pre-norm (RMSNorm, no biases):
    h = x + SelfAttn(norm(x));  h = h + CrossAttn(norm(h), z_l);  out = h + SwiGLU(norm(h))
Self-attention is causal, optionally within a sliding window, so long-range information has
to travel through the latent vectors z_l of the block's own layer. Queries and keys get RoPE;
in cross-attention the latent keys sit at evenly spaced "latent positions". Input and output
embeddings are tied. With no latents the blocks skip cross-attention: the AR baseline.
With ``bidirectional`` the same blocks attend without a causal mask and the embedding table
has one more row, the mask token: the denoiser of the masked-diffusion baseline (``mdlm.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 as released; bf16 mean-squares lose too much precision.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_angles(head_dim: int, positions: Tensor, base: float) -> Tensor:
    """cos and sin of the rotary angles, [len(positions), head_dim // 2, 2] (a complex view)."""
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = torch.outer(positions.float(), freqs)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rope(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate interleaved pairs of the last axis of x [B, H, T, hd] by the given angles.

    Eagerly one complex multiply (as released): about 3x faster, forward and backward, than
    real cos/sin arithmetic, and RoPE runs in every inner step. Under torch.compile the real
    form is used instead, because the compiler fuses it and cannot generate complex code.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        cos, sin = rotation[..., 0], rotation[..., 1]
        real, imag = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs)
                                     * torch.view_as_complex(rotation))
    return rotated.flatten(-2).type_as(x)


class SlotLinear(nn.Module):
    """A bias-free linear map per slot: x [..., S, in] -> [..., S, out], weight [S, out, in]
    (slot s's weight laid out as an nn.Linear's, and initialised like one)."""

    def __init__(self, slots: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(slots, out_features, in_features))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("...si,soi->...so", x, self.weight)


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``kv_dim`` is None, else cross-attention.

    Cross-attention follows ``config.slot_roles``: slot-specific key and/or value projections
    (``SlotLinear``), or a learned per-slot embedding added to the latents before the shared
    ones (``slot_embedding``, [S, kv_dim]); with ``"shared"`` its weights are as released.
    """

    def __init__(self, config: ModelConfig, kv_dim: int | None = None) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        roles = config.slot_roles if kv_dim else "shared"
        slots = config.latents_per_layer
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = (SlotLinear(slots, kv_dim, d) if roles == "key-value"
                   else nn.Linear(kv_dim or d, d, bias=False))
        self.wv = (SlotLinear(slots, kv_dim, d) if roles in ("value", "key-value")
                   else nn.Linear(kv_dim or d, d, bias=False))
        self.wo = nn.Linear(d, d, bias=False)
        self.slot_embedding = (nn.Parameter(torch.empty(slots, kv_dim)) if roles == "embedding"
                               else None)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

    def keys_values(self, source: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """Rotated keys and values [B, H, S, hd]: what a KV cache stores."""
        if self.slot_embedding is not None:
            source = source + self.slot_embedding.to(source.dtype)
        return apply_rope(self._heads(self.wk(source)), k_rope), self._heads(self.wv(source))

    def attend(self, x: Tensor, q_rope: Tensor, keys: Tensor, values: Tensor,
               mask: Tensor | None, causal: bool) -> Tensor:
        q = apply_rope(self._heads(self.wq(x)), q_rope)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal)
        return self.wo(out.transpose(1, 2).flatten(-2))

    def forward(
        self,
        x: Tensor,
        source: Tensor,
        q_rope: Tensor,
        k_rope: Tensor,
        mask: Tensor | None,
        causal: bool,
    ) -> Tensor:
        return self.attend(x, q_rope, *self.keys_values(source, k_rope), mask, causal)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attention = Attention(config)
        self.has_latents = config.latents_per_layer > 0
        self.causal = not config.bidirectional
        if self.has_latents:
            self.cross_attention_norm = RMSNorm(config.d_model, config.norm_eps)
            self.cross_attention = Attention(config, kv_dim=config.z_dim)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.feed_forward = SwiGLU(config.d_model, config.hidden_dim)

    def forward(self, x: Tensor, z: Tensor | None, rope: dict, mask: Tensor | None,
                cache: LayerCache | None = None) -> Tensor:
        """One block; with ``cache`` the new tokens attend to the cached keys as well."""
        token_rope = rope["tokens"]
        normed = self.attention_norm(x)
        if cache is None:
            h = x + self.self_attention(normed, normed, token_rope, token_rope, mask,
                                        mask is None and self.causal)
        else:
            keys, values = cache.extend(*self.self_attention.keys_values(normed, token_rope))
            h = x + self.self_attention.attend(normed, token_rope, keys, values, mask, False)
        if self.has_latents:
            cross = self.cross_attention
            if cache is None:
                latent_kv = cross.keys_values(z, rope["latents"])
            else:
                if cache.latent_kv is None:  # z is fixed for a sequence: project it once
                    cache.latent_kv = cross.keys_values(z, rope["latents"])
                latent_kv = cache.latent_kv
            h = h + cross.attend(self.cross_attention_norm(h), token_rope, *latent_kv, None, False)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass
class LayerCache:
    """One block's cached self-attention keys/values (rotated) and projected latents."""

    keys: Tensor | None = None
    values: Tensor | None = None
    latent_kv: tuple[Tensor, Tensor] | None = None

    def extend(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2)
        self.keys, self.values = keys, values
        return keys, values


@dataclass
class DecodingCache:
    """Per-layer caches plus how many tokens they hold; keys older than the window are dropped."""

    layers: list[LayerCache]
    length: int = 0  # tokens seen so far (the next token's position)
    first: int = 0  # position of the oldest cached key

    def trim(self, window: int | None) -> None:
        """Keep the window - 1 newest keys: all the next token may see besides its own."""
        if window is None or self.length - self.first <= window - 1:
            return
        drop = self.length - (window - 1) - self.first
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]
        self.first += drop


class Decoder(nn.Module):
    """Token decoder conditioned on latent thought vectors z of shape [B, N_z, latent_dim]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer)")
        if config.d_model % config.n_heads or (config.d_model // config.n_heads) % 2:
            raise ValueError("d_model must split into an even head dimension per head")
        if config.bidirectional and (config.latents_per_layer or config.window is not None):
            raise ValueError("a bidirectional (MDLM) decoder has no latents and no window")
        if config.slot_roles not in ("shared", "value", "key-value", "embedding"):
            raise ValueError(f"unknown slot_roles {config.slot_roles!r}")
        self.config = config
        rows = config.vocab_size + int(config.bidirectional)  # the mask token's row
        self.tok_embeddings = nn.Embedding(rows, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.output = nn.Linear(config.d_model, rows, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied
        self._rope_cache: dict[torch.device, dict] = {}
        self.input_keep: Tensor | None = None  # set only by ``dropping_words``
        self._init_weights()

    @property
    def has_latents(self) -> bool:
        return self.config.latents_per_layer > 0

    @property
    def max_tokens(self) -> int:
        """Longest input: the context, and for MDLM the whole window (context + 1 tokens)."""
        return self.config.context + int(self.config.bidirectional)

    @property
    def mask_token(self) -> int:
        """MDLM's mask token: the id after the tokenizer's vocabulary."""
        if not self.config.bidirectional:
            raise ValueError("only a bidirectional (MDLM) decoder has a mask token")
        return self.config.vocab_size

    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding, SlotLinear)):
                is_residual_out = name.endswith(".wo") or name.endswith(".w2")
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual_out else 0.02)
            if isinstance(module, Attention) and module.slot_embedding is not None:
                # The prior's scale: each slot's embedding moves its keys and values as much
                # as a typical latent draw does.
                nn.init.normal_(module.slot_embedding, 0.0, 1.0)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _rope_tables(self, device: torch.device) -> dict:
        """Rotations for every token position and for the latents, computed once per device:
        recomputing them costs more than a cached decoding step's attention at small widths."""
        if device not in self._rope_cache:
            cfg = self.config
            head_dim = cfg.d_model // cfg.n_heads
            positions = torch.arange(self.max_tokens, device=device)
            tables = {"tokens": rope_angles(head_dim, positions, cfg.rope_base)}
            if self.has_latents:
                # Latent keys at evenly spaced positions over the context, as released.
                spacing = cfg.context / cfg.latents_per_layer
                positions = torch.arange(cfg.latents_per_layer, device=device) * spacing
                tables["latents"] = rope_angles(head_dim, positions, cfg.rope_base)
            self._rope_cache[device] = tables
        return self._rope_cache[device]

    def _rope(self, length: int, device: torch.device, start: int = 0) -> dict:
        tables = self._rope_tables(device)
        return {**tables, "tokens": tables["tokens"][start:start + length]}

    def _window_mask(self, length: int, device: torch.device) -> Tensor | None:
        window = self.config.window
        if window is None or window >= length:
            return None
        i = torch.arange(length, device=device)
        offset = i[:, None] - i[None, :]
        return (offset >= 0) & (offset < window)

    def new_cache(self) -> DecodingCache:
        """An empty KV cache for ``hidden_states(..., cache=)``: one per batch of sequences."""
        return DecodingCache([LayerCache() for _ in self.layers])

    def _cached_mask(self, cache: DecodingCache, length: int,
                     device: torch.device) -> Tensor | None:
        """Which cached or new keys each new query may see (causal, within the window);
        None when a single query may see them all, the usual decoding step."""
        window = self.config.window or self.config.context
        if length == 1 and cache.length + 1 - cache.first <= window:
            return None
        queries = torch.arange(cache.length, cache.length + length, device=device)
        keys = torch.arange(cache.first, cache.length + length, device=device)
        offset = queries[:, None] - keys[None, :]
        return (offset >= 0) & (offset < window)

    def hidden_states(self, tokens: Tensor, z: Tensor | None = None,
                      cache: DecodingCache | None = None) -> Tensor:
        """Final normalised hidden states [B, T, d] for input tokens [B, T].

        With ``cache`` the tokens continue the cached ones (positions go on from
        ``cache.length``) and the cache is extended: decoding computes each token once.
        """
        cfg = self.config
        length = tokens.shape[1]
        start = cache.length if cache is not None else 0
        if start + length > self.max_tokens:
            raise ValueError(f"sequence of {start + length} tokens exceeds the context of "
                             f"{self.max_tokens}")
        if cache is not None and cfg.bidirectional:
            raise ValueError("a bidirectional decoder has no KV cache: every step sees all")
        if self.has_latents:
            if z is None:
                raise ValueError("this decoder cross-attends to latents: pass z")
            z_layers = z.unflatten(1, (cfg.n_layers, cfg.latents_per_layer)).unbind(1)
        else:
            z_layers = [None] * cfg.n_layers
        rope = self._rope(length, tokens.device, start)
        if cache is None:
            mask = self._window_mask(length, tokens.device)
            layer_caches = [None] * cfg.n_layers
        else:
            mask = self._cached_mask(cache, length, tokens.device)
            layer_caches = cache.layers
        h = self.tok_embeddings(tokens)
        if self.input_keep is not None:
            if cache is not None or self.input_keep.shape != tokens.shape:
                raise ValueError(f"word dropout's keep mask {tuple(self.input_keep.shape)} "
                                 f"does not match the inputs {tuple(tokens.shape)}")
            h = h * self.input_keep.unsqueeze(-1).to(h.dtype)
        for block, z_l, layer_cache in zip(self.layers, z_layers, layer_caches):
            h = block(h, z_l.to(h.dtype) if z_l is not None else None, rope, mask, layer_cache)
        if cache is not None:
            cache.length += length
            cache.trim(cfg.window)
        return self.norm(h)

    def forward(self, tokens: Tensor, z: Tensor | None = None,
                cache: DecodingCache | None = None) -> Tensor:
        """Next-token logits [B, T, V]."""
        return self.output(self.hidden_states(tokens, z, cache))


@contextlib.contextmanager
def dropping_words(decoder: Decoder, keep: Tensor | None) -> Iterator[Decoder]:
    """Word dropout meanwhile: input positions where ``keep`` [B, T] is 0 enter the decoder
    as a zero embedding (Bowman et al. 2016), so what those words said has to come from z.
    Only the training step enters this; ``keep`` None leaves the decoder as it is."""
    decoder.input_keep = keep
    try:
        yield decoder
    finally:
        decoder.input_keep = None


def count_parameters(config: ModelConfig) -> int:
    """Parameters of a decoder of this shape, without allocating its weights."""
    with torch.device("meta"):
        return Decoder(config).num_parameters()


def matched_ar_config(config: ModelConfig) -> ModelConfig:
    """The AR baseline of an LTM shape: no latents, MLP widened to the same parameter count.

    The cross-attention an LTM has is given to the AR model as extra MLP width, so that a
    comparison is between models of equal size (within 0.1% for realistic shapes).
    """
    sized = replace(config, vocab_size=max(config.vocab_size, 1))  # embeddings cancel out
    target = count_parameters(sized)
    ar = replace(sized, latents_per_layer=0, mlp_hidden=config.hidden_dim)
    per_hidden_unit = 3 * config.d_model * config.n_layers
    extra = target - count_parameters(ar)
    return replace(ar, vocab_size=config.vocab_size,
                   mlp_hidden=config.hidden_dim + round(extra / per_hidden_unit))
