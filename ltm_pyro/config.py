"""Configuration dataclasses and named presets.

Every experiment writes the full config next to its results, so every field here is plain
JSON-serialisable data and the presets are the only place where sizes are chosen.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

NoiseMode = Literal["fixed", "fresh"]
DecoderGrads = Literal["final", "trajectory"]
ModelKind = Literal["ltm", "ar"]


@dataclass
class ModelConfig:
    """Decoder shape. ``latents_per_layer = 0`` gives the autoregressive baseline."""

    vocab_size: int = 0  # set from the tokenizer
    context: int = 64  # tokens per window (the decoder's maximum sequence length)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    latents_per_layer: int = 4
    latent_dim: int | None = None  # None: the model width, as released
    window: int | None = None  # causal sliding window; None: full causal context
    mlp_hidden: int | None = None  # None: llama rule, int(2 * 4d / 3) rounded up to 32
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def n_latents(self) -> int:
        return self.latents_per_layer * self.n_layers

    @property
    def z_dim(self) -> int:
        return self.latent_dim or self.d_model

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        multiple_of = 32
        hidden = int(2 * (4 * self.d_model) / 3)
        return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class InferenceConfig:
    """The fast loop that fits each batch's local posterior (defaults as released)."""

    steps: int = 16
    lr_max: float = 0.34
    lr_min: float = 0.034
    betas: tuple[float, float] = (0.9, 0.999)
    init_log_var: float = -5.0
    noise: NoiseMode = "fixed"
    kl_weight: float = 1.0


@dataclass
class TrainConfig:
    """The slow loop over the global decoder weights, and the run around it."""

    max_steps: int = 300
    batch_size: int = 16
    lr: float = 4e-4
    min_lr: float = 4e-5
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    decoder_grads: DecoderGrads = "final"
    kl_warmup_steps: int = 0  # KL weight ramps linearly from 0 over these slow steps
    eval_every: int = 50
    eval_windows: int = 64
    eval_samples: int = 1
    log_every: int = 10
    checkpoint_every: int = 100
    max_bad_steps: int = 10  # non-finite steps in a row before the run stops
    validate: bool = False  # Pyro's argument checks in training: slow, and fatal on a NaN
    compile: bool = False  # torch.compile decoder and token NLL (fuses memory-bound work)
    seed: int = 0
    device: str = "cpu"


@dataclass
class DataConfig:
    """Where windows come from: the built-in synthetic corpus (path None) or text files."""

    path: str | None = None
    tokenizer: Literal["word", "char", "bpe"] = "word"
    bpe_vocab_size: int = 2048
    synthetic_train_docs: int = 4096
    synthetic_eval_docs: int = 256


@dataclass
class RunConfig:
    model_kind: ModelKind = "ltm"
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preset: str = "tiny"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        def build(kind: type, values: dict[str, Any]) -> Any:
            values = dict(values)
            for name in ("betas",):
                if name in values and values[name] is not None:
                    values[name] = tuple(values[name])
            return kind(**values)

        return cls(
            model_kind=raw["model_kind"],
            model=build(ModelConfig, raw["model"]),
            inference=build(InferenceConfig, raw["inference"]),
            train=build(TrainConfig, raw["train"]),
            data=build(DataConfig, raw["data"]),
            preset=raw.get("preset", "custom"),
        )


def _preset(model: dict, train: dict, inference: dict | None = None) -> RunConfig:
    return RunConfig(
        model=ModelConfig(**model),
        train=TrainConfig(**train),
        inference=InferenceConfig(**(inference or {})),
    )


def _paper_preset(n_layers: int) -> RunConfig:
    return _preset(
        dict(context=1024, d_model=512, n_layers=n_layers, n_heads=8, latents_per_layer=8,
             window=256),
        dict(max_steps=100_000, batch_size=16, warmup_steps=1000, eval_every=1000,
             checkpoint_every=1000),
    )


# The CPU presets fit the guide with fresh noise from log-variance -2 in a narrow latent:
# with the released fast-loop settings (fixed noise, log-variance -5, latent width = model
# width) the KL floor alone costs ~5 nats/token on the built-in corpus, so the valid ELBO is
# far above even the unigram entropy (experiments/results/topic-style/tiny_settings.md).
# The paper presets keep the released settings.
HONEST_CPU_GUIDE = dict(noise="fresh", init_log_var=-2.0)

PRESETS: dict[str, RunConfig] = {
    # Seconds per hundred steps on a laptop CPU; the default run and most tests.
    "tiny": _preset(
        dict(context=64, d_model=64, n_layers=2, n_heads=4, latents_per_layer=4, window=16,
             latent_dim=8),
        dict(max_steps=400, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=40,
             eval_every=100, checkpoint_every=200),
        HONEST_CPU_GUIDE,
    ),
    # Minutes on a CPU: big enough that the decoder, not Pyro's bookkeeping, dominates.
    "small": _preset(
        dict(context=128, d_model=256, n_layers=4, n_heads=4, latents_per_layer=8, window=32,
             latent_dim=16),
        dict(max_steps=2000, batch_size=16, lr=1e-3, min_lr=1e-4, warmup_steps=100,
             eval_every=250, checkpoint_every=500),
        HONEST_CPU_GUIDE,
    ),
    # The paper's sizes (d 512, context 1024, sliding window 256, 8 latent vectors a layer).
    **{name: _paper_preset(layers) for name, layers in (("ltm-s", 3), ("ltm-m", 6), ("ltm-l", 12))},
}


def preset(name: str) -> RunConfig:
    """A fresh copy of a named preset (raises ValueError naming the choices)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = RunConfig.from_dict(PRESETS[name].to_dict())
    config.preset = name
    return config
