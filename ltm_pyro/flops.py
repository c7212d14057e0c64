"""Training FLOPs counted honestly: every inner step of the fast loop included.

Matrix-multiply FLOPs only (elementwise work is a rounding error at these shapes):
- forward, per token: 2 x (every linear weight the token passes, LM head included)
  + attention scores and values, 4 x d x (keys attended) per layer, for self-attention
  (the sliding window bounds the keys) and cross-attention (the layer's latent vectors);
  per sequence, the latent keys/values projections, 4 x d x latent_dim x latents_per_layer.
- a backward pass that computes input *and* weight gradients costs 2 forwards; one that
  computes input gradients only (the fast loop, decoder frozen) costs 1 forward.
So an AR training step is 3 forwards; an LTM iteration is T x 2 + 3 forwards with
``decoder_grads="final"`` and (T + 1) x 3 with ``"trajectory"`` (the released loop).
With an encoder (semi-amortised inference, ``InferenceConfig.encoder_layers``) an iteration
adds the encoder's forward and backward (3 encoder forwards) and, for ``encoder_loss="elbo"``,
a decoder forward and input-gradient backward (2 forwards); a fit adds one encoder forward.
An MDLM step is 3 forwards of the whole window, context + 1 positions each seeing every key,
for its context predicted tokens.
"""

from __future__ import annotations

from .config import InferenceConfig, ModelConfig


def mean_keys_attended(context: int, window: int | None) -> float:
    """Average number of keys a causal query sees over positions 0..context-1."""
    span = context if window is None else min(window, context)
    return sum(min(i + 1, span) for i in range(context)) / context


def forward_flops_per_token(config: ModelConfig) -> float:
    d, hidden, layers = config.d_model, config.hidden_dim, config.n_layers
    per_layer = 2 * (4 * d * d) + 2 * (3 * d * hidden)  # self-attention projections + MLP
    keys = config.context + 1 if config.bidirectional else mean_keys_attended(config.context,
                                                                              config.window)
    per_layer += 4 * d * keys
    if config.latents_per_layer:
        per_layer += 2 * (2 * d * d)  # cross-attention query and output projections
        per_layer += 4 * d * config.latents_per_layer
        kv = 2 * (2 * d * config.z_dim * config.latents_per_layer)  # once per sequence
        per_layer += kv / config.context
    return layers * per_layer + 2 * d * (config.vocab_size + int(config.bidirectional))


def training_flops_per_token(config: ModelConfig, inference_steps: int,
                             decoder_grads: str = "final",
                             inference: InferenceConfig | None = None) -> float:
    """FLOPs per training token for one iteration (AR, MDLM: one step; LTM: T inner + slow, plus
    the encoder's step when ``inference`` asks for one)."""
    forward = forward_flops_per_token(config)
    if config.bidirectional:  # MDLM: context + 1 positions per context predicted tokens
        return 3 * forward * (config.context + 1) / config.context
    if not config.latents_per_layer:
        return 3 * forward
    if decoder_grads == "trajectory":
        flops = (inference_steps + 1) * 3 * forward
    else:
        flops = inference_steps * 2 * forward + 3 * forward
    if inference is not None and inference.encoder_layers:
        flops += 3 * encoder_flops_per_token(config, inference)
        flops += 2 * forward if inference.encoder_loss == "elbo" else 0.0
    return flops


def fit_flops_per_token(config: ModelConfig, inference_steps: int,
                        inference: InferenceConfig | None = None) -> float:
    """FLOPs per token of one evaluation fit: T inner steps (a forward and an input-gradient
    backward each) and the encoder's proposal, if any; scoring the bounds is extra."""
    if not config.latents_per_layer:
        return 0.0
    encoder = encoder_flops_per_token(config, inference) if inference is not None else 0.0
    return inference_steps * 2 * forward_flops_per_token(config) + encoder



def encoder_flops_per_token(model: ModelConfig, inference: InferenceConfig) -> float:
    """Forward matrix-multiply FLOPs of the encoder per token (bidirectional attention over
    the whole window; slot pooling spread over the window's tokens)."""
    if not inference.encoder_layers or not model.latents_per_layer:
        return 0.0
    d, keys, slots = model.d_model, model.context + 1, model.n_latents
    per_layer = 2 * (4 * d * d) + 2 * (8 * d * d) + 4 * d * keys  # qkv+out, MLP, scores
    # Slot pooling per window: key/value projections of every token, query and output
    # projections and the head per slot, scores and values; spread over the window's tokens.
    pooling = 2 * (2 * d * d) + (2 * (2 * d * d) + 2 * d * 2 * model.z_dim + 4 * d * keys
                                 ) * slots / keys
    return inference.encoder_layers * per_layer + pooling
