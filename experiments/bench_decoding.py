r"""Decoding speed: KV-cached against uncached sampling, as a ratio measured in one run.

    python experiments/bench_decoding.py --preset small --seq-len 1024 --window 256 \
        --new-tokens 512 --json experiments/results/generation/decoding-speed.json

Times greedy decoding of --new-tokens from a one-token prompt for the LTM (z from the prior)
and its AR baseline, cached and uncached, in interleaved repetitions; reports medians, tokens
per second, the speed-up, and whether both paths emitted identical tokens. Weights are the
preset's random initialisation (speed does not depend on training) unless --checkpoint is given.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from ltm_pyro.cli import (  # noqa: E402
    OneLineParser,
    non_negative_int,
    positive_int,
    run_main,
)
from ltm_pyro.config import PRESETS, preset  # noqa: E402
from ltm_pyro.decoder import Decoder  # noqa: E402
from ltm_pyro.errors import UsageError  # noqa: E402
from ltm_pyro.generate import prior_latents, sample_tokens  # noqa: E402
from ltm_pyro.model import LatentThoughtModel  # noqa: E402
from ltm_pyro.modes import resolve_device  # noqa: E402
from ltm_pyro.report import markdown_table, write_results  # noqa: E402

COLUMNS = ["model", "batch", "new_tokens", "cached_s", "uncached_s", "cached_tokens_per_s",
           "uncached_tokens_per_s", "speedup", "identical"]


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--preset", choices=tuple(PRESETS), default="small")
    p.add_argument("--checkpoint", type=Path, help="time a trained model instead of a preset")
    p.add_argument("--seq-len", type=positive_int, help="context (default: the preset's)")
    p.add_argument("--window", type=non_negative_int, help="sliding window; 0 = full causal")
    p.add_argument("--vocab-size", type=positive_int, default=8192)
    p.add_argument("--new-tokens", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--reps", type=positive_int, default=3, help="interleaved repetitions")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="write the table and settings here (+ .md)")
    return p


def models(args) -> dict[str, LatentThoughtModel]:  # noqa: ANN001
    device = resolve_device(args.device)
    if args.checkpoint is not None:
        ltm, config, _ = model_from_checkpoint(load_checkpoint(args.checkpoint, device), device)
        return {config.model_kind: ltm}
    config = replace(preset(args.preset).model, vocab_size=args.vocab_size)
    if args.seq_len is not None:
        config = replace(config, context=args.seq_len)
    if args.window is not None:
        config = replace(config, window=args.window or None)
    torch.manual_seed(args.seed)
    return {kind: LatentThoughtModel(Decoder(replace(config, latents_per_layer=latents))
                                     .to(device).eval())
            for kind, latents in (("ltm", config.latents_per_layer), ("ar", 0))}


def timed(sync, run) -> tuple[float, torch.Tensor]:  # noqa: ANN001
    sync()
    started = time.perf_counter()
    out = run()
    sync()
    return time.perf_counter() - started, out


def measure(ltm: LatentThoughtModel, args, device: torch.device) -> dict:  # noqa: ANN001
    if args.new_tokens > ltm.config.context:
        raise UsageError(f"--new-tokens {args.new_tokens} exceeds the context of "
                         f"{ltm.config.context}; raise --seq-len")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.randint(0, ltm.config.vocab_size, (args.batch_size, 1), generator=generator,
                           device=device)
    z = prior_latents(ltm, args.batch_size, generator=generator, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    for _ in range(args.reps):
        for cached in (True, False):
            seconds, outputs[cached] = timed(sync, lambda c=cached: sample_tokens(
                ltm, prompt, args.new_tokens, z, greedy=True, use_cache=c))
            times[cached].append(seconds)
    cached_s, uncached_s = statistics.median(times[True]), statistics.median(times[False])
    produced = args.batch_size * args.new_tokens
    return {"batch": args.batch_size, "new_tokens": args.new_tokens, "cached_s": cached_s,
            "uncached_s": uncached_s, "cached_tokens_per_s": produced / cached_s,
            "uncached_tokens_per_s": produced / uncached_s, "speedup": uncached_s / cached_s,
            "identical": bool(torch.equal(outputs[True], outputs[False]))}


def main() -> int:
    args = parser().parse_args()
    device = resolve_device(args.device)
    rows, built = [], models(args)
    for kind, ltm in built.items():
        rows.append({"model": kind, **measure(ltm, args, device)})
        print(markdown_table(rows[-1:], COLUMNS), flush=True)
    table = markdown_table(rows, COLUMNS)
    print(table)
    if args.json:
        config = next(iter(built.values())).config
        write_results(args.json, "Decoding speed", device,
                      {"model": vars(config), "rows": rows}, table)
    return 0


if __name__ == "__main__":
    run_main(main)
