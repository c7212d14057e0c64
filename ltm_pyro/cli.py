"""Shared command-line plumbing: argument checks and one-line errors instead of tracebacks.

Imports only the standard library, ``config`` and ``errors`` at module level, so a command's
``--help`` answers without loading torch or Pyro (``tests/test_cli_help.py``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from .config import (
    PRESETS,
    RECIPES,
    TOKENIZERS,
    ModelConfig,
    ModelKind,
    RunConfig,
    apply_recipe,
    preset,
)
from .errors import UsageError
from .files import written_files


def _number(text: str, kind: type, accept: Callable[[float], bool], requirement: str):
    """Parse ``text`` as ``kind`` and check it, or raise argparse's one-line error."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {requirement}") from None
    if not math.isfinite(value) or not accept(value):
        raise argparse.ArgumentTypeError(f"{text} must be {requirement}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer of zero or more")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a finite number above zero")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "a finite number of zero or more")


def probability(text: str) -> float:
    return _number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def rate_below_one(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def finite_float(text: str) -> float:
    return _number(text, float, lambda v: True, "a finite number")


def positive_float_list(text: str) -> list[float]:
    """A comma-separated list of finite numbers above zero, e.g. "1e-3,3e-3"."""
    values = [positive_float(v.strip()) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} must list finite numbers above zero")
    return values


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers of 0 or more, e.g. "0,1,2,4"."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers"
                                         ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list integers of 0 or more")
    return values


def _has_default(value: object) -> bool:
    """A default worth showing: not None, not the False of a switch, not suppressed."""
    return value is not None and value is not False and value != argparse.SUPPRESS


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's usage examples as written and shows each flag's default
    (when it has one: a flag left unset means "the preset's value", which --preset shows)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _has_default(action.default) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (status 2), without the usage dump."""

    @classmethod
    def from_doc(cls, doc: str) -> OneLineParser:
        """A parser for a script: its docstring's first line is the description and the rest
        (the usage examples) the text after the flags in --help."""
        first, _, rest = doc.strip().partition("\n")
        return cls(description=first, epilog=rest.strip("\n") or None,
                   formatter_class=HelpFormatter)

    def add_argument(self, *args, **kwargs) -> argparse.Action:  # noqa: ANN002, ANN003
        """A flag without help text still shows its default in --help."""
        if kwargs.get("help") is None and _has_default(kwargs.get("default")):
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def settings(args: argparse.Namespace) -> dict:
    """The parsed flags as JSON-ready values, written beside results so a run can be redone."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def run_main(main: Callable[[], int | None]) -> None:
    """Run ``main``; a UsageError becomes one line on stderr and exit status 2.

    Scripts run without Pyro's argument checks, as training does (``TrainConfig.validate``):
    each check turns a tensor into a Python bool, a GPU stall at every inner step. Tests and
    notebooks keep Pyro's default (checks on).
    """
    try:
        if {"-h", "--help"} & set(sys.argv[1:]):
            status = main()  # argparse prints the help and exits: no Pyro (or torch) to load
        else:
            import pyro

            with pyro.validation_enabled(False):
                status = main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print_written_files()
    sys.exit(status or 0)


def print_written_files() -> None:
    """One stderr line per folder the script wrote into, naming its files."""
    by_folder: dict[Path, list[str]] = {}
    for path in written_files():
        by_folder.setdefault(path.parent, []).append(path.name)
    for folder, names in by_folder.items():
        print(f"wrote {folder}/: {', '.join(names)}", file=sys.stderr)


def add_scoring_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup,
                          prior: bool = True) -> None:
    """The Monte-Carlo sizes of ``bounds.evaluate_windows``, named and defaulted alike in every
    script that scores windows (``prior``: also the prior control's draws)."""
    p.add_argument("--iw-samples", type=positive_int, default=16,
                   help="importance draws K per window for iwae_ppl")
    p.add_argument("--elbo-samples", type=positive_int, default=4,
                   help="fresh draws S per window for elbo_ppl")
    if prior:
        p.add_argument("--prior-samples", type=non_negative_int, default=64,
                       help="draws from the prior for prior_iwae_ppl (0: skip it)")
    p.add_argument("--mi-samples", type=positive_int, default=4,
                   help="draws from each window's q for the mutual information")


def add_checkpoint_output_arguments(p: argparse.ArgumentParser) -> None:
    """The batch size, seed, device and output stem of a script that scores one checkpoint
    into OUT.json and OUT.png (ltm-sweep, ltm-prior-control)."""
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True, help="path stem for .json and .png")


def add_window_arguments(p: argparse.ArgumentParser, first_flag: str = "--max-windows",
                         first_default: int | None = None) -> None:
    """Which windows of a split to score: the first N, or a seeded random subset (a split's
    first windows are its first few documents, not a sample of it); see
    ``data.select_windows``."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(first_flag, type=positive_int, default=first_default,
                       help="score only the first N windows of each split")
    group.add_argument("--sample-windows", type=positive_int,
                       help="score a random subset of N windows of each split (seeded by "
                       "--sample-seed; the same windows for every model)")
    p.add_argument("--sample-seed", type=non_negative_int, default=0,
                   help="seed of --sample-windows' subset")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that define a training run (preset plus overrides), shared by the scripts,
    in groups so that ``--help`` reads by topic. Unset flags keep the preset's value."""
    _data_arguments(p.add_argument_group("data"))
    _model_arguments(p.add_argument_group("model (unset: the preset's)"))
    _inference_arguments(p.add_argument_group("fast loop: fitting q(z|x) (unset: the recipe's)"))
    _training_arguments(p.add_argument_group("slow loop and run (unset: the preset's)"))
    describe_preset_defaults(p)
    p.epilog = "\n".join([*([p.epilog, ""] if p.epilog else []), "presets:",
                          *(f"  {line}" for line in preset_lines()), "recipes:",
                          "  honest: the preset as it is (the default)",
                          "  released: the released code's inner loop (docs/recipes.md)"])


def preset_lines() -> list[str]:
    """One line a preset: its sizes and budget."""
    lines = []
    for name, config in PRESETS.items():
        m, t = config.model, config.train
        latents = f"{m.latents_per_layer} latents a layer of {_shown('latent_dim', m.latent_dim)}"
        lines.append(f"{name}: d {m.d_model}, {m.n_layers} layers, context {m.context}, "
                     f"window {_shown('window', m.window)}, {latents}; {t.max_steps} steps of "
                     f"{t.batch_size} windows")
    return lines


def _data_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--data", help="text file or folder with train/valid/test files "
                   "(default: the built-in topic-style corpus)")
    g.add_argument("--tokenizer", choices=TOKENIZERS, default="word",
                   help="how text becomes tokens")
    g.add_argument("--bpe-vocab-size", type=positive_int,
                   help="with --tokenizer bpe: vocabulary size learned from the train split")
    g.add_argument("--seq-len", type=positive_int, help="tokens per window (the context)")


def _model_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--model", choices=get_args(ModelKind), default="ltm",
                   help="the latent-thought model, the autoregressive baseline (no z), or the "
                   "masked-diffusion baseline (MDLM: bidirectional, no z)")
    g.add_argument("--match-params", action="store_true",
                   help="with --model ar or mdlm: widen the MLP to the LTM's parameter count")
    g.add_argument("--preset", choices=tuple(PRESETS), default="tiny",
                   help="model size and training budget (docs/design.md)")
    g.add_argument("--window", type=non_negative_int, help="sliding window; 0 = full causal")
    g.add_argument("--d-model", type=positive_int, help="model width")
    g.add_argument("--n-layers", type=positive_int, help="decoder blocks")
    g.add_argument("--n-heads", type=positive_int, help="attention heads per block")
    g.add_argument("--latents-per-layer", type=positive_int,
                   help="latent thought vectors (slots) each block cross-attends to")
    g.add_argument("--latent-dim", type=positive_int,
                   help="width of each latent vector")
    g.add_argument("--slot-roles", choices=("shared", "value", "key-value", "embedding"),
                   help="how cross-attention tells a layer's slots apart: shared projections "
                   "(as released), per-slot value or key and value projections, or a learned "
                   "per-slot embedding added to z")


def _inference_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--recipe", choices=tuple(RECIPES), default="honest",
                   help="a named bundle of inner-loop choices set on top of the preset; "
                   "'released' = the released code's inner loop (docs/recipes.md); "
                   "explicit flags below win over it")
    g.add_argument("--inference-steps", type=non_negative_int, help="fast steps T")
    g.add_argument("--fast-lr", type=positive_float,
                   help="peak fast lr; it decays to a tenth of it within the T steps")
    g.add_argument("--init-log-var", type=finite_float, help="guide's initial log-variance")
    g.add_argument("--init-log-var-jitter", type=non_negative_float,
                   help="add this times N(0, 1) to the initial log-variance (released: 0.1)")
    g.add_argument("--fast-schedule", choices=("cosine-to-min", "released"),
                   help="inner cosine reaching lr_min at the last step, or the released one "
                   "(progress s/T: it never reaches lr_min)")
    g.add_argument("--fast-weight-decay", type=non_negative_float,
                   help="inner AdamW weight decay on (mu, log-var) (released: 0.01)")
    g.add_argument("--inner-loss", choices=("per-token", "sum"),
                   help="inner loss per token, or summed over tokens and sequences (released)")
    g.add_argument("--noise", choices=("fixed", "fresh"),
                   help="one noise draw for all inner steps (released), or a new one each step")
    g.add_argument("--free-bits", type=non_negative_float,
                   help="training fits count each group's KL as at least this many nats "
                   "(free bits; evaluation always scores the full bound)")
    g.add_argument("--free-bits-group", choices=("slot", "layer"),
                   help="free bits per latent vector (slot) or per layer's vectors")
    g.add_argument("--init-loc-scale", type=non_negative_float,
                   help="start the guide's loc at this times fixed per-slot offsets (breaks "
                   "the symmetry between a layer's slots; default 0)")
    g.add_argument("--encoder-layers", type=non_negative_int,
                   help="semi-amortised inference: an encoder of this many bidirectional "
                   "blocks proposes q's start from x, the fast loop refines it (0: none)")
    g.add_argument("--encoder-lr", type=positive_float, help="the encoder's peak learning rate")
    g.add_argument("--encoder-loss", choices=("elbo", "fit"),
                   help="train the encoder on the ELBO at its proposal, or to match the "
                   "fitted q (KL(q_fitted || q_proposed))")
    g.add_argument("--kl-weight", type=positive_float,
                   help="weight of the KL in the fits' objective (1 = the ELBO)")


def _training_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--max-steps", type=positive_int, help="slow (decoder) steps")
    g.add_argument("--batch-size", type=positive_int, help="windows per slow step")
    g.add_argument("--slow-lr", type=positive_float,
                   help="peak slow lr; cosine-decays to a tenth of it")
    g.add_argument("--warmup-steps", type=non_negative_int,
                   help="slow steps of linear learning-rate warm-up")
    g.add_argument("--decoder-grads", choices=("final", "trajectory"),
                   help="decoder gradient from the final posterior only, or summed over the "
                   "inner trajectory (released)")
    g.add_argument("--kl-warmup-steps", type=non_negative_int,
                   help="ramp the KL weight from 0 over these steps (against posterior collapse;"
                   " validation always uses the full weight, so reported numbers stay bounds)")
    g.add_argument("--kl-cycles", type=positive_int,
                   help="cyclical annealing: restart the KL warm-up at the start of each of "
                   "this many equal cycles of --max-steps")
    g.add_argument("--word-dropout", type=rate_below_one,
                   help="in training only, zero each input word's embedding with this "
                   "probability (word dropout: the decoder must take those words from z; "
                   "evaluation scores the intact text)")
    g.add_argument("--eval-every", type=positive_int, help="validate every this many steps")
    g.add_argument("--eval-windows", type=positive_int, help="validation windows scored")
    g.add_argument("--eval-prior-control", type=non_negative_int, metavar="K",
                   help="at each validation also score iwae_ppl and prior_iwae_ppl with K "
                   "importance draws from q and from the prior, and their ratio "
                   "prior_control (> 0: the decoder uses z), 0: skip")
    g.add_argument("--checkpoint-every", type=positive_int,
                   help="write the checkpoint every this many steps")
    g.add_argument("--keep-best", action="store_true",
                   help="also keep the weights of the validation with the lowest -ELBO as "
                   "best.pt (early stopping; evaluate.py --checkpoint RUN/best.pt)")
    g.add_argument("--patience", type=non_negative_int, metavar="N",
                   help="stop once N validations in a row have not lowered the valid -ELBO "
                   "(early stopping; with --keep-best score best.pt), 0: never")
    g.add_argument("--max-bad-steps", type=positive_int,
                   help="stop after this many non-finite steps in a row")
    g.add_argument("--seed", type=non_negative_int, help="seeds data order, noise and weights")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder and token NLL (worth it on GPUs)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


# Each run flag that sets one config field as given: (argparse dest, section, field). The
# preset (then the recipe) gives the field when the flag is unset, and --help says so.
FLAG_FIELDS = (
    ("bpe_vocab_size", "data", "bpe_vocab_size"), ("seq_len", "model", "context"),
    ("d_model", "model", "d_model"), ("n_layers", "model", "n_layers"),
    ("n_heads", "model", "n_heads"), ("latents_per_layer", "model", "latents_per_layer"),
    ("latent_dim", "model", "latent_dim"), ("slot_roles", "model", "slot_roles"),
    ("window", "model", "window"),
    ("inference_steps", "inference", "steps"), ("fast_lr", "inference", "lr_max"),
    ("init_log_var", "inference", "init_log_var"), ("noise", "inference", "noise"),
    ("kl_weight", "inference", "kl_weight"),
    ("init_log_var_jitter", "inference", "init_log_var_jitter"),
    ("fast_schedule", "inference", "fast_schedule"),
    ("fast_weight_decay", "inference", "weight_decay"),
    ("inner_loss", "inference", "inner_loss"), ("free_bits", "inference", "free_bits"),
    ("free_bits_group", "inference", "free_bits_group"),
    ("init_loc_scale", "inference", "init_loc_scale"),
    ("encoder_layers", "inference", "encoder_layers"),
    ("encoder_lr", "inference", "encoder_lr"), ("encoder_loss", "inference", "encoder_loss"),
    ("max_steps", "train", "max_steps"), ("batch_size", "train", "batch_size"),
    ("slow_lr", "train", "lr"), ("warmup_steps", "train", "warmup_steps"),
    ("decoder_grads", "train", "decoder_grads"),
    ("kl_warmup_steps", "train", "kl_warmup_steps"), ("kl_cycles", "train", "kl_cycles"),
    ("word_dropout", "train", "word_dropout"), ("eval_every", "train", "eval_every"),
    ("eval_windows", "train", "eval_windows"),
    ("eval_prior_control", "train", "eval_prior_control"),
    ("checkpoint_every", "train", "checkpoint_every"), ("patience", "train", "patience"),
    ("max_bad_steps", "train", "max_bad_steps"), ("seed", "train", "seed"),
)


def _shown(field: str, value: object) -> str:
    if value is None:
        return {"latent_dim": "the model width", "window": "full context"}.get(field, "none")
    return f"{value:g}" if isinstance(value, float) else str(value)


def preset_defaults(section: str, field: str) -> str:
    """What an unset flag becomes: its value in each preset (presets that agree grouped),
    and the ``released`` recipe's where that recipe sets it."""
    groups: dict[str, list[str]] = {}
    for name, config in PRESETS.items():
        groups.setdefault(_shown(field, getattr(getattr(config, section), field)), []).append(
            name)
    if len(groups) == 1:
        text = f"default: {next(iter(groups))}"
    else:
        text = "from the preset: " + "; ".join(f"{', '.join(names)} {value}"
                                                for value, names in groups.items())
    released = RECIPES["released"].get(section, {})
    if field in released:
        text += f"; --recipe released: {_shown(field, released[field])}"
    return text


def describe_preset_defaults(p: argparse.ArgumentParser) -> None:
    """Append to each run flag's help what it is when unset (``preset_defaults``)."""
    fields = {dest: (section, field) for dest, section, field in FLAG_FIELDS}
    for action in p._actions:
        if action.dest in fields and action.default is None:
            action.help = f"{action.help or ''} ({preset_defaults(*fields[action.dest])})"


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The preset, then the recipe, with every run flag the user gave applied on top."""
    from .svi import check_kl_cycles

    changes: dict[str, dict] = {"model": {}, "inference": {}, "train": {},
                                "data": {"path": args.data, "tokenizer": args.tokenizer}}
    for dest, section, field in FLAG_FIELDS:
        value = getattr(args, dest)
        if value is not None:
            changes[section][field] = value
    if args.window is not None:
        changes["model"]["window"] = args.window or None
    if args.fast_lr is not None:
        changes["inference"]["lr_min"] = args.fast_lr / 10
    if args.slow_lr is not None:
        changes["train"]["min_lr"] = args.slow_lr / 10
    changes["train"].update(device=args.device, compile=args.compile)
    config = apply_recipe(preset(args.preset), args.recipe).updated(model_kind=args.model,
                                                                    **changes)
    check_kl_cycles(config.train)  # refused at parse time, before any data is read
    return config.updated(train={"keep_best": config.train.keep_best or args.keep_best},
                          model=_family_shape(args, config.model))


def _family_shape(args: argparse.Namespace, model: ModelConfig) -> ModelConfig:
    """The LTM's shape, or a baseline's made from it (``--model``, ``--match-params``)."""
    from .families import family_named

    family = family_named(args.model)
    if args.window and not family.windowed:
        raise UsageError(f"--model {args.model} attends to the whole window: drop --window")
    return family.shape(model, args.match_params)
