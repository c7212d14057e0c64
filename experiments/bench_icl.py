"""Few-shot in-context learning: LTM (posterior fitted to the context) against matched AR models.

    python experiments/bench_icl.py --seq-len 128 --max-steps 1000 --label icl-perm

Writes a hidden-permutation corpus (ltm_pyro/fewshot.py: every episode permutes the positions
of short symbol strings by a rule the model must infer from the examples), trains the LTM and
its size-matched AR baselines on it (same preset, token budget and seed), then scores k-shot
exact-match accuracy on held-out query strings with exemplars from the training items only.
The LTM answers greedily from z fitted to the prompt with each --eval-inference-steps (0 = the
prior mean). Writes LABEL.json, LABEL.md and LABEL.png into --results.

    python experiments/bench_icl.py --seq-len 96 --max-steps 1500 --latents 1,4,16 \
        --label icl-latents

--latents trains one LTM per latent count (vectors per layer; variants ltm-TT-LN) beside the
ARs matched to the run flags' LTM, and adds LABEL-latents.png: accuracy against latent size at
each k, at the largest T_eval, with the ARs' accuracy at the largest k (the scaling axis "few-
shot accuracy against latent size"; scaling.py's grid trains on another corpus).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from ltm_pyro.cli import (  # noqa: E402
    OneLineParser,
    add_run_arguments,
    config_from_args,
    int_list,
    positive_int,
    run_main,
)
from ltm_pyro.comparisons import comparison_configs  # noqa: E402
from ltm_pyro.config import RunConfig  # noqa: E402
from ltm_pyro.decoder import count_parameters  # noqa: E402
from ltm_pyro.errors import UsageError  # noqa: E402
from ltm_pyro.families import family_of  # noqa: E402
from ltm_pyro.fewshot import (  # noqa: E402
    PermutationTask,
    blind_guess_accuracy,
    exact_match,
    few_shot_items,
)
from ltm_pyro.generate import posterior_latents, sample_tokens  # noqa: E402
from ltm_pyro.model import LatentThoughtModel  # noqa: E402
from ltm_pyro.report import markdown_table, write_results  # noqa: E402
from ltm_pyro.runner import train  # noqa: E402
from ltm_pyro.studies.figures import accuracy_figure, latents_figure  # noqa: E402
from ltm_pyro.tokenizers import EOS, Tokenizer, encode_prompt  # noqa: E402
from ltm_pyro.viz import save_figure  # noqa: E402

COLUMNS = ["variant", "latents_per_layer", "params", "tokens_seen", "T_eval", "shots", "items",
           "accuracy"]


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    add_run_arguments(p)
    p.add_argument("--label", required=True, help="name of this comparison (file names)")
    p.add_argument("--results", type=Path, default=Path("experiments/results/icl"))
    p.add_argument("--runs", type=Path, default=Path("runs/icl"))
    p.add_argument("--alphabet", type=positive_int, default=6)
    p.add_argument("--length", type=positive_int, default=3, help="symbols per string")
    p.add_argument("--train-episodes", type=positive_int, default=20000)
    p.add_argument("--examples-per-episode", type=positive_int, default=8)
    p.add_argument("--shots", type=int_list, default=[0, 1, 2, 4, 8])
    p.add_argument("--items", type=positive_int, default=256, help="evaluation items per k")
    p.add_argument("--eval-inference-steps", type=int_list, default=[0, 16, 64])
    p.add_argument("--latents", type=int_list,
                   help="latent vectors per layer: one LTM each, e.g. 1,4,16 (default: the run "
                   "flags' single value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


@torch.no_grad()
def accuracy(ltm: LatentThoughtModel, tokenizer: Tokenizer, items, inference, steps: int,
             seed: int, device: torch.device) -> float:  # noqa: ANN001
    """Exact-match accuracy of greedy answers; every item of a k has the same prompt length."""
    start = [tokenizer.index[EOS]]  # episodes start a line, as in training
    prompts = torch.tensor([start + encode_prompt(tokenizer, item.prompt) for item in items],
                           device=device)
    answer_length = len(items[0].answer.split())
    generator = torch.Generator(device=device).manual_seed(seed)
    z = posterior_latents(ltm, prompts, inference, steps, generator)
    tokens = sample_tokens(ltm, prompts, answer_length, z, greedy=True)
    answers = [tokenizer.decode(row[prompts.shape[1]:].tolist()) for row in tokens.cpu()]
    return sum(exact_match(a, item.answer) for a, item in zip(answers, items)) / len(items)


def variants(base: RunConfig, latents: list[int] | None) -> dict[str, RunConfig]:
    """The LTM and its matched ARs, or with ``latents`` one LTM per latent count (named
    ltm-TT-LN) and the ARs matched to the run flags' LTM."""
    found = comparison_configs(base)
    if not latents:
        return found
    ltm_name = f"ltm-T{base.inference.steps}"
    ltms = {f"{ltm_name}-L{n}": replace(found[ltm_name], model=replace(
        base.model, latents_per_layer=n)) for n in latents}
    return {**ltms, **{name: c for name, c in found.items() if not family_of(c).latent}}


def main() -> int:
    args = parser().parse_args()
    if args.data is not None:
        raise UsageError("bench_icl writes its own corpus: drop --data")
    task = PermutationTask(args.alphabet, args.length, seed=args.seed or 0)
    base = config_from_args(args)
    corpus_dir = args.runs / args.label / "corpus"
    task.write_corpus(corpus_dir, args.train_episodes, max(200, args.train_episodes // 20),
                      args.examples_per_episode, seed=base.train.seed)
    base.data.path, base.data.tokenizer = str(corpus_dir), "word"
    longest = max(args.shots) * (2 * args.length + 2) + args.length + 2
    if longest > base.model.context:
        raise UsageError(f"a {max(args.shots)}-shot prompt has {longest} tokens, more than the "
                         f"context of {base.model.context}; raise --seq-len or lower --shots")
    rows, configs = [], {}
    for name, config in variants(base, args.latents).items():
        run_dir = args.runs / args.label / name
        train(config, run_dir, force=True, progress=not args.no_progress)
        ltm, trained, tokenizer = model_from_checkpoint(load_checkpoint(run_dir),
                                                        config.train.device)
        configs[name] = trained.to_dict()
        tokens_seen = config.train.max_steps * config.train.batch_size * config.model.context
        for steps in args.eval_inference_steps if ltm.has_latents else [0]:
            for shots in args.shots:
                items = few_shot_items(task, shots, args.items, seed=1000 + shots)
                rows.append({"variant": name, "latents_per_layer": (
                                 trained.model.latents_per_layer if ltm.has_latents else None),
                             "params": count_parameters(trained.model),
                             "tokens_seen": tokens_seen, "T_eval": steps, "shots": shots,
                             "items": len(items),
                             "accuracy": accuracy(ltm, tokenizer, items, trained.inference,
                                                  steps, config.train.seed,
                                                  ltm.decoder.tok_embeddings.weight.device)})
                print(markdown_table(rows[-1:], COLUMNS), flush=True)
    chance = blind_guess_accuracy(task)
    table = markdown_table(rows, COLUMNS)
    write_results(args.results / f"{args.label}.json", args.label, base.train.device, {
        "blind_guess_accuracy": chance,
        "task": {"alphabet": task.alphabet, "length": task.length, "rules": len(task.rules),
                 "train_items": len(task.train_items), "eval_items": len(task.eval_items)},
        "rows": rows, "configs": configs,
    },
        f"Hidden-permutation task: strings of {task.length} symbols from {task.alphabet}, "
        f"{len(task.rules)} rules; answering with one fixed rule scores {chance:.3f} (chance); "
        "queries are held-out "
        "strings, exemplars training strings. Greedy answers, exact match.\n\n"
        f"{table}\n")
    save_figure(accuracy_figure(rows, chance), args.results / f"{args.label}.png")
    if args.latents:
        save_figure(latents_figure(rows, chance), args.results / f"{args.label}-latents.png")
    print(table)
    return 0


if __name__ == "__main__":
    run_main(main)
