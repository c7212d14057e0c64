r"""Speed of the hot path: the inner step, the slow step and the iteration, as ratios in one run.

    python experiments/bench_speed.py --json experiments/results/speed/cpu.json
    python experiments/bench_speed.py --preset ltm-s --device cuda --compile \
        --json experiments/results/speed/h200.json

For each preset (default tiny and small) the measured operations run in interleaved rounds
(every other round in reverse order) and each ratio is the median over rounds of that round's
ratio, so load that drifts between rounds on a shared machine cancels out:
- pyro_vs_plain_inner: one inner step through the Pyro program over the same mathematics written
  directly in PyTorch (``ltm_pyro.studies.speed.plain_inner_loss``; tests check both agree);
- inner_vs_ar_step: one inner step over one training step of the size-matched AR baseline;
- iteration_vs_ar_step beside the ideal (T x inner + slow) / AR, and iteration_vs_ideal;
- tokens per second, peak memory (RSS on CPU, max_memory_allocated on CUDA), and on CUDA the
  achieved FLOP/s and model FLOPs utilisation counting every inner step.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ltm_pyro.cli import OneLineParser, non_negative_int, positive_int, run_main  # noqa: E402
from ltm_pyro.config import PRESETS, RunConfig, preset  # noqa: E402
from ltm_pyro.decoder import Decoder, matched_ar_config  # noqa: E402
from ltm_pyro.model import LatentThoughtModel  # noqa: E402
from ltm_pyro.modes import resolve_device  # noqa: E402
from ltm_pyro.report import markdown_table, write_results  # noqa: E402
from ltm_pyro.studies.speed import measure  # noqa: E402

COLUMNS = ["preset", "params", "batch", "seq_len", "T", "pyro_vs_plain_inner",
           "inner_vs_ar_step", "iteration_vs_ar_step", "ideal_iteration_vs_ar_step",
           "iteration_vs_ideal", "tokens_per_s", "ar_tokens_per_s", "peak_memory_gib"]


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--preset", choices=tuple(PRESETS), action="append",
                   help="repeat for several (default: tiny and small)")
    p.add_argument("--batch-size", type=positive_int, help="default: the preset's")
    p.add_argument("--seq-len", type=positive_int, help="default: the preset's context")
    p.add_argument("--inference-steps", type=positive_int, default=16)
    p.add_argument("--vocab-size", type=positive_int,
                   help="default: 10,000 (PTB words); 50,258 for the paper presets")
    p.add_argument("--reps", type=positive_int, default=5, help="interleaved repetitions")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed first rounds")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoders")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--json", type=Path, help="write results here (and a .md beside it)")
    return p


def build(name: str, args) -> tuple[RunConfig, LatentThoughtModel, LatentThoughtModel]:  # noqa: ANN001
    config = preset(name)
    config = config.updated(
        model={"vocab_size": args.vocab_size or (50258 if name.startswith("ltm-") else 10000),
               "context": args.seq_len or config.model.context},
        train={"batch_size": args.batch_size or config.train.batch_size},
        inference={"steps": args.inference_steps})
    model = config.model
    device = resolve_device(args.device)
    ltm = LatentThoughtModel(Decoder(model).to(device))
    ar = LatentThoughtModel(Decoder(matched_ar_config(model)).to(device))
    if args.compile:
        ltm.compile()
        ar.compile()
    return config, ltm, ar


def main() -> int:
    args = parser().parse_args()
    rows = []
    for name in args.preset or ["tiny", "small"]:
        torch.manual_seed(args.seed)
        config, ltm, ar = build(name, args)
        rows.append(measure(name, config, ltm, ar, resolve_device(args.device), args.reps,
                            args.warmup))
        print(markdown_table(rows[-1:], COLUMNS), flush=True)
    table = markdown_table(rows, COLUMNS)
    print(table)
    if args.json:
        write_results(args.json, "Speed", resolve_device(args.device), {"rows": rows}, table)
    return 0


if __name__ == "__main__":
    run_main(main)
