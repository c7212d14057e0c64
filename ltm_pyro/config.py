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
ModelKind = Literal["ltm", "ar", "mdlm"]
FastSchedule = Literal["cosine-to-min", "released"]
InnerLoss = Literal["per-token", "sum"]
FreeBitsGroup = Literal["slot", "layer"]
EncoderLoss = Literal["elbo", "fit"]
SlotRoles = Literal["shared", "value", "key-value", "embedding"]
TOKENIZERS = ("word", "char", "bpe")


@dataclass(frozen=True)
class ModelConfig:
    """Decoder shape. ``latents_per_layer = 0`` gives the autoregressive baseline;
    ``bidirectional`` (no latents, no window) the masked-diffusion baseline (``mdlm.py``).

    ``slot_roles`` says how cross-attention tells a layer's latent slots apart (issue 13,
    docs/latent-diagnostics.md, "Levers"): ``"shared"`` (as released) projects every slot
    with the same key and value weights, so only the latent RoPE positions differ;
    ``"value"`` gives each slot its own value projection; ``"key-value"`` its own key and
    value projections; ``"embedding"`` adds a learned per-slot vector to z before the shared
    projections. The extra weights count in ``count_parameters`` (``matched_ar_config`` gives
    them to the AR baseline as MLP width).
    """

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
    # MDLM: no causal mask, one extra embedding row (the mask token, id vocab_size) and
    # context + 1 positions, since it reads the whole window, its given first token included.
    bidirectional: bool = False
    slot_roles: SlotRoles = "shared"

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


@dataclass(frozen=True)
class InferenceConfig:
    """The fast loop that fits each batch's local posterior.

    The last four fields default to the honest recipe; ``RECIPES["released"]`` sets them as
    released (see ``RECIPES`` and docs/recipes.md):

    - ``fast_schedule``: ``"cosine-to-min"`` runs the cosine from lr_max at inner step 0 to
      lr_min at step T-1; ``"released"`` is lr_min + (lr_max - lr_min)(1 + cos(pi s/T))/2
      for s = 0..T-1, which never reaches lr_min.
    - ``weight_decay``: AdamW's decoupled weight decay on (loc, log-var); 0 or, as released,
      torch's default 0.01.
    - ``init_log_var_jitter``: log-var starts at init_log_var + jitter * N(0, 1) (0.1 released).
    - ``inner_loss``: ``"per-token"`` divides each inner loss by the batch's token count;
      ``"sum"`` sums over tokens and sequences as released. Adam ignores the scale (up to its
      eps); it matters for the decoder gradients accumulated in trajectory mode.

    Levers against posterior collapse (docs/latent-diagnostics.md, "Levers"); the defaults
    leave the objective and the start as they were:

    - ``free_bits``: in the *training* fit only, each group's KL (a slot's d coordinates, or
      a layer's slots, ``free_bits_group``) of each sequence counts as max(KL, free_bits)
      nats (Kingma et al. 2016, per sequence rather than per minibatch, so a sequence's fit
      does not depend on its batch). Evaluation fits and scores the full ELBO. The slow
      step's KL carries no decoder gradient (q is held fixed), so only the fit changes.
    - ``init_loc_scale``: loc starts at this times fixed per-slot offsets (one N(0, I) vector
      per slot from a fixed seed, the same for every sequence, in training and evaluation),
      instead of 0 for every slot: breaks the symmetry between a layer's slots.

    Semi-amortised inference (``ltm_pyro/amortised.py``; off by default):

    - ``encoder_layers`` > 0: an encoder of that many bidirectional blocks proposes the
      fit's start (loc, log_var) from x, in training and evaluation; the fit then refines it
      with ``steps`` inner steps (0: q is the proposal). 0: no encoder, the fixed start.
    - ``encoder_lr``: the encoder's peak AdamW learning rate (on the slow schedule's shape).
    - ``encoder_loss``: ``"elbo"`` trains it on the fit's objective at its own proposal,
      ``"fit"`` on KL(q_fitted || q_proposed) (distillation of the refined q).
    """

    steps: int = 16
    lr_max: float = 0.34
    lr_min: float = 0.034
    betas: tuple[float, float] = (0.9, 0.999)
    init_log_var: float = -5.0
    noise: NoiseMode = "fixed"
    kl_weight: float = 1.0
    fast_schedule: FastSchedule = "cosine-to-min"
    weight_decay: float = 0.0
    init_log_var_jitter: float = 0.0
    inner_loss: InnerLoss = "per-token"
    free_bits: float = 0.0
    free_bits_group: FreeBitsGroup = "slot"
    init_loc_scale: float = 0.0
    encoder_layers: int = 0
    encoder_lr: float = 1e-3
    encoder_loss: EncoderLoss = "elbo"


@dataclass(frozen=True)
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
    kl_cycles: int = 1  # > 1: the ramp restarts at each of this many equal cycles (cyclical)
    # Word dropout (Bowman et al. 2016): in training only, each input token's embedding is
    # zeroed with this probability (one draw per window and step, the same in the fit and the
    # slow step), so the decoder has to take what those words said from z. Evaluation never
    # drops words; every reported figure scores the intact text.
    word_dropout: float = 0.0
    eval_every: int = 50
    eval_windows: int = 64
    eval_samples: int = 1
    # > 0: each validation also scores iwae_ppl and prior_iwae_ppl with this many importance
    # draws from the fitted q and from the prior (the prior control, so a run shows whether
    # the decoder comes to use z as it trains; 2K more decoder passes per window).
    eval_prior_control: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_best: bool = False  # also keep the lowest-valid -ELBO weights (best.pt): early stopping
    # > 0: stop once this many validations in a row have not lowered the valid -ELBO (the run
    # then counts as finished before max_steps; with keep_best, best.pt holds the weights to
    # score). 0: train to max_steps.
    patience: int = 0
    max_bad_steps: int = 10  # non-finite steps in a row before the run stops
    validate: bool = False  # Pyro's argument checks in training: slow, and fatal on a NaN
    compile: bool = False  # torch.compile decoder and token NLL (fuses memory-bound work)
    seed: int = 0
    device: str = "cpu"


@dataclass(frozen=True)
class DataConfig:
    """Where windows come from: the built-in synthetic corpus (path None) or text files."""

    path: str | None = None
    tokenizer: Literal["word", "char", "bpe"] = "word"
    bpe_vocab_size: int = 2048
    synthetic_train_docs: int = 4096
    synthetic_eval_docs: int = 256


@dataclass(frozen=True)
class RunConfig:
    model_kind: ModelKind = "ltm"
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preset: str = "tiny"
    recipe: str = "honest"  # the named bundle applied on top of the preset (RECIPES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def updated(self, **changes: Any) -> RunConfig:
        """A copy with ``changes``: a section's fields as a dict (``train={"max_steps": 40}``)
        or a top-level field (``model_kind="ar"``). Configs are frozen, so the settings a run
        or a figure was made with never change under the code that holds them."""
        values = {name: dataclasses.replace(getattr(self, name), **change)
                  if isinstance(change, dict) else change for name, change in changes.items()}
        return dataclasses.replace(self, **values)

    def summary(self) -> str:
        """The settings that decide what a run's latents can do, in one line (notebooks print
        it first, so a figure is never read without the run it came from)."""
        m, q, t = self.model, self.inference, self.train
        if not m.latents_per_layer:
            latents = "no latents"
        else:
            start = f"log-var {q.init_log_var:g}, slot offsets {q.init_loc_scale:g}"
            start = (f"from a {q.encoder_layers}-block encoder's proposal ({q.encoder_loss} "
                     f"loss; {start} before it trains)" if q.encoder_layers else f"from {start}")
            latents = (f"z {m.n_layers} layers x {m.latents_per_layer} slots x {m.z_dim} dims, "
                       f"slot roles {m.slot_roles}; q fitted in T = {q.steps} steps ({q.noise} "
                       f"noise) {start}, free bits {q.free_bits:g}/{q.free_bits_group}")
        return (f"{self.model_kind} (preset {self.preset}, recipe {self.recipe}): d {m.d_model}, "
                f"{m.n_layers} layers, context {m.context}, window {m.window or 'full'}; "
                f"{latents}; {t.max_steps} steps of {t.batch_size} windows, lr {t.lr:g}, "
                f"KL warm-up {t.kl_warmup_steps}"
                f"{f' in each of {t.kl_cycles} cycles' if t.kl_cycles > 1 else ''}, "
                f"{f'word dropout {t.word_dropout:g}, ' if t.word_dropout else ''}"
                f"seed {t.seed}")

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
            recipe=raw.get("recipe", "honest"),
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


# The CPU presets fit the guide with fresh noise in a narrow latent (small: from log-variance -2):
# with the released fast-loop settings (fixed noise, log-variance -5, latent width = model
# width) the KL floor alone costs ~5 nats/token on the built-in corpus, so the valid ELBO is
# far above even the unigram entropy (experiments/results/topic-style/tiny_settings.md).
# The paper presets keep the released settings.
HONEST_CPU_GUIDE = dict(noise="fresh", init_log_var=-2.0)

# The best honest recipe of the latents study on the built-in corpus (issue 13;
# experiments/results/latents/window4-notes.md, window16-roles.md): per-slot key and value
# projections, so a layer's slots are not copies, and a fit that starts at the prior's
# variance with fixed per-slot offsets and trains with 1 free nat per slot. With the tiny
# preset's 16-token window (a quarter of the context, the paper's ratio) z then carries the
# documents' topic and style; with a 4-token window the LTM also beats its windowed AR.
LATENT_RECIPE_GUIDE = dict(noise="fresh", init_log_var=0.0, free_bits=1.0, init_loc_scale=0.5)

PRESETS: dict[str, RunConfig] = {
    # Seconds per hundred steps on a laptop CPU; the default run and most tests.
    "tiny": _preset(
        dict(context=64, d_model=64, n_layers=2, n_heads=4, latents_per_layer=4, window=16,
             latent_dim=8, slot_roles="key-value"),
        dict(max_steps=400, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=40,
             eval_every=100, checkpoint_every=200),
        LATENT_RECIPE_GUIDE,
    ),
    # The tiny preset before issue 13 made it the latent recipe: shared slot projections, the
    # fit from log-variance -2. Results committed before that change that say `--preset tiny`
    # (or no preset) used this (RESULTS.md); latents_study.py builds its variants on it.
    "tiny-v1": _preset(
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


# Named recipes: bundles of field values applied on top of a preset (explicit command-line
# flags are applied after them, so they win). Line numbers refer to the released code,
# github.com/mingluzhao/Latent-Thought-LM (optimizer.py, model.py, train_ltm.py, config.py).
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # The preset as it is: the fast cosine ends at lr_min, no weight decay on the guide, no
    # jitter, per-token inner losses (and, on the CPU presets, HONEST_CPU_GUIDE).
    "honest": {},
    # The released inner loop, every choice at once:
    "released": {
        # Latent width = model width: config.py l.50 (z_dim = dim), 8 vectors a layer l.49.
        "model": {"latent_dim": None},
        "inference": {
            # optimizer.py l.29-30: lr_max = fast_lr (0.34, config.py l.46), lr_min a tenth.
            "lr_max": 0.34, "lr_min": 0.034,
            # optimizer.py l.35-39: decay_ratio = s / num_steps for s = 0..T-1 (never lr_min).
            "fast_schedule": "released",
            # optimizer.py l.105: torch.optim.AdamW([mu, log_var], lr, betas, eps) leaves
            # weight_decay at torch's default, 0.01, on both mu and log-var; betas l.66.
            "weight_decay": 0.01, "betas": (0.9, 0.999),
            # optimizer.py l.91-92: mu = 0, log_var = randn * 0.1 - 5.
            "init_log_var": -5.0, "init_log_var_jitter": 0.1,
            # optimizer.py l.109: one noise draw e, reused at every inner step (l.119).
            "noise": "fixed",
            # model.py l.593-599: the inner loss (eval_mode=True, optimizer.py l.74) is
            # NLL + KL summed over tokens and sequences; the slow loss is the per-token
            # mean cross-entropy (model.py l.457, train_ltm.py l.378-386).
            "inner_loss": "sum",
        },
        # optimizer.py l.117-127: loss.backward() at every inner step also fills the
        # decoder's .grad, never zeroed before the slow step (train_ltm.py l.386-398).
        "train": {"decoder_grads": "trajectory"},
    },
}


def apply_recipe(config: RunConfig, name: str) -> RunConfig:
    """``config`` with recipe ``name``'s values and its name recorded."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return config.updated(**RECIPES[name], recipe=name)


def preset(name: str) -> RunConfig:
    """A fresh copy of a named preset (raises ValueError naming the choices)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].updated(preset=name)
