"""What experiments/bench_icl.py computes: the LTM and its matched ARs trained on a corpus of
few-shot episodes (fewshot.PermutationTask) and scored by exact-match accuracy against
the number of shots, T_eval and (with --latents) the latent count (the script's docstring
says what each flag does).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..comparisons import comparison_configs
from ..config import RunConfig
from ..decoder import count_parameters
from ..families import family_of
from ..fewshot import PermutationTask, blind_guess_accuracy, exact_match, few_shot_items
from ..generate import posterior_latents, sample_tokens
from ..model import LatentThoughtModel
from ..report import markdown_table, write_results
from ..runner import train
from ..tokenizers import EOS, Tokenizer, encode_prompt
from ..viz import save_figure
from .figures import accuracy_figure, latents_figure

COLUMNS = ["variant", "latents_per_layer", "params", "tokens_seen", "T_eval", "shots", "items",
           "accuracy"]


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


def score_variants(base: RunConfig, task: PermutationTask, args: argparse.Namespace
                   ) -> tuple[list[dict], dict[str, dict]]:
    """Train each variant (``variants``) into --runs/LABEL/VARIANT and score its few-shot
    accuracy at each --shots and T_eval: the rows and each trained run's config."""
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
    return rows, configs


def write_report(args: argparse.Namespace, base: RunConfig, task: PermutationTask,
                 rows: list[dict], configs: dict[str, dict]) -> str:
    """LABEL.json, LABEL.md and the figures in --results; returns the table."""
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
    return table
