"""Train a latent-thought model (or the AR baseline) with dual-rate SVI.

    python experiments/run_svi.py --out runs/default                  # built-in corpus
    python experiments/run_svi.py --out runs/ptb --data ../shared/data/ptb --preset small

Writes config.json, metrics.jsonl, checkpoint.pt and training_curves.png into --out; running
the same command again on the same --out resumes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ltm_pyro.cli import (  # noqa: E402
    OneLineParser,
    finite_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_main,
)
from ltm_pyro.config import PRESETS, RunConfig, preset  # noqa: E402
from ltm_pyro.runner import train  # noqa: E402
from ltm_pyro.tokenizers import TOKENIZERS  # noqa: E402


def parser() -> OneLineParser:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/default"), help="run folder")
    p.add_argument("--data", help="text file or folder with train/valid/test files "
                   "(default: the built-in topic-style corpus)")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="word")
    p.add_argument("--bpe-vocab-size", type=positive_int)
    p.add_argument("--model", choices=("ltm", "ar"), default="ltm")
    p.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    p.add_argument("--max-steps", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--seq-len", type=positive_int, help="tokens per window (the context)")
    p.add_argument("--window", type=non_negative_int, help="sliding window; 0 = full causal")
    p.add_argument("--d-model", type=positive_int)
    p.add_argument("--n-layers", type=positive_int)
    p.add_argument("--n-heads", type=positive_int)
    p.add_argument("--latents-per-layer", type=positive_int)
    p.add_argument("--latent-dim", type=positive_int)
    p.add_argument("--inference-steps", type=non_negative_int, help="fast steps T")
    p.add_argument("--fast-lr", type=positive_float,
                   help="peak fast lr; it decays to a tenth of it within the T steps")
    p.add_argument("--init-log-var", type=finite_float, help="guide's initial log-variance")
    p.add_argument("--noise", choices=("fixed", "fresh"))
    p.add_argument("--kl-weight", type=positive_float)
    p.add_argument("--slow-lr", type=positive_float,
                   help="peak slow lr; cosine-decays to a tenth of it")
    p.add_argument("--warmup-steps", type=non_negative_int)
    p.add_argument("--decoder-grads", choices=("final", "trajectory"))
    p.add_argument("--eval-every", type=positive_int)
    p.add_argument("--eval-windows", type=positive_int)
    p.add_argument("--checkpoint-every", type=positive_int)
    p.add_argument("--seed", type=non_negative_int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--force", action="store_true", help="start over in an --out of another run")
    p.add_argument("--no-progress", action="store_true")
    return p


def build_config(args) -> RunConfig:  # noqa: ANN001 - argparse.Namespace
    """The preset with every flag the user gave applied on top."""
    config = preset(args.preset)
    config.model_kind = args.model
    model, inference, train_cfg, data = config.model, config.inference, config.train, config.data
    data.path = args.data
    data.tokenizer = args.tokenizer
    overrides = [
        (data, "bpe_vocab_size", args.bpe_vocab_size),
        (model, "context", args.seq_len),
        (model, "d_model", args.d_model),
        (model, "n_layers", args.n_layers),
        (model, "n_heads", args.n_heads),
        (model, "latents_per_layer", args.latents_per_layer),
        (model, "latent_dim", args.latent_dim),
        (inference, "steps", args.inference_steps),
        (inference, "init_log_var", args.init_log_var),
        (inference, "noise", args.noise),
        (inference, "kl_weight", args.kl_weight),
        (train_cfg, "max_steps", args.max_steps),
        (train_cfg, "batch_size", args.batch_size),
        (train_cfg, "warmup_steps", args.warmup_steps),
        (train_cfg, "decoder_grads", args.decoder_grads),
        (train_cfg, "eval_every", args.eval_every),
        (train_cfg, "eval_windows", args.eval_windows),
        (train_cfg, "checkpoint_every", args.checkpoint_every),
        (train_cfg, "seed", args.seed),
    ]
    for section, name, value in overrides:
        if value is not None:
            setattr(section, name, value)
    if args.window is not None:
        model.window = args.window or None
    if args.fast_lr is not None:
        inference.lr_max, inference.lr_min = args.fast_lr, args.fast_lr / 10
    if args.slow_lr is not None:
        train_cfg.lr, train_cfg.min_lr = args.slow_lr, args.slow_lr / 10
    train_cfg.device = args.device
    if args.model == "ar":
        model.latents_per_layer = 0
    return config


def main() -> int:
    args = parser().parse_args()
    config = build_config(args)
    final = train(config, args.out, force=args.force, progress=not args.no_progress)
    print(json.dumps({"out": str(args.out), **final}))
    return 0


if __name__ == "__main__":
    run_main(main)
