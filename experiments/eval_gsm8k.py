r"""Few-shot GSM8K-style evaluation of a checkpoint from local JSONL files (nothing downloaded).

    python experiments/eval_gsm8k.py --checkpoint runs/big --train-file gsm8k/train.jsonl \
        --test-file gsm8k/test.jsonl --shots 8 --inference-steps 16 --json gsm8k.json

Each test question gets --shots worked exemplars drawn from --train-file only, in the
"Question: ... / Answer: ..." format; an LTM fits its local posterior to that prompt with
--inference-steps (default: the training T) and answers greedily. The final number of the
answer (after "####" if present, else the last one) is scored by exact match.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from ltm_pyro.cli import (  # noqa: E402
    OneLineParser,
    non_negative_int,
    positive_int,
    run_main,
    settings,
)
from ltm_pyro.errors import UsageError  # noqa: E402
from ltm_pyro.fewshot import (  # noqa: E402
    draw_exemplars,
    overlapping_questions,
    qa_prompt,
    read_qa_jsonl,
    score_predictions,
)
from ltm_pyro.files import write_json  # noqa: E402
from ltm_pyro.generate import posterior_latents, sample_tokens  # noqa: E402
from ltm_pyro.modes import resolve_device  # noqa: E402
from ltm_pyro.report import markdown_table  # noqa: E402
from ltm_pyro.tokenizers import encode_prompt  # noqa: E402


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder or checkpoint.pt")
    p.add_argument("--train-file", type=Path, required=True, help="exemplars come from here only")
    p.add_argument("--test-file", type=Path, required=True, help="questions to answer")
    p.add_argument("--shots", type=non_negative_int, default=8)
    p.add_argument("--inference-steps", type=non_negative_int, help="default: training T")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--max-items", type=positive_int, help="score only the first N questions")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="write every prompt, answer and the score here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def main() -> int:
    args = parser().parse_args()
    train, test = read_qa_jsonl(args.train_file), read_qa_jsonl(args.test_file)
    test = test[: args.max_items]
    leaked = overlapping_questions(train, test)
    if leaked:
        raise UsageError(f"{len(leaked)} test questions also appear in {args.train_file}; "
                         "remove them so no exemplar can give an answer away")
    device = resolve_device(args.device)
    payload = load_checkpoint(args.checkpoint, map_location=device)
    ltm, config, tokenizer = model_from_checkpoint(payload, device)
    context = config.model.context
    if args.max_new_tokens >= context:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt "
                         f"in the context of {context}; lower it")
    keep = context + 1 - args.max_new_tokens
    generator = torch.Generator(device=device).manual_seed(args.seed)
    generations, records, truncated = [], [], 0
    for index, example in enumerate(tqdm(test, disable=args.no_progress, desc="gsm8k")):
        exemplars = draw_exemplars(train, args.shots, seed=args.seed * 1_000_003 + index)
        ids = encode_prompt(tokenizer, qa_prompt(exemplars, example.question))
        truncated += len(ids) > keep
        prompt = torch.tensor([ids[-keep:]], device=device)
        z = posterior_latents(ltm, prompt, config.inference, args.inference_steps, generator)
        tokens = sample_tokens(ltm, prompt, args.max_new_tokens, z, greedy=True)
        generation = tokenizer.decode(tokens[0, prompt.shape[1]:].tolist())
        generations.append(generation)
        records.append({"question": example.question, "gold": example.final,
                        "exemplars": [e.question for e in exemplars],
                        "prompt_tokens": len(ids), "generation": generation})
    score = score_predictions(test, generations)
    summary = {**score, "shots": args.shots, "inference_steps": (
        config.inference.steps if args.inference_steps is None else args.inference_steps)
        if ltm.has_latents else 0, "truncated_prompts": truncated, "model_kind":
        config.model_kind, "checkpoint_step": payload["step"]}
    print(markdown_table([summary], ["shots", "inference_steps", "correct", "total", "accuracy",
                                     "truncated_prompts"]))
    if truncated:
        print(f"note: {truncated} prompts were longer than the context and kept only their "
              f"last {keep} tokens; use fewer --shots or a longer-context model", file=sys.stderr)
    if args.json:
        write_json(args.json, {"settings": settings(args), "summary": summary, "items": records})
    return 0


if __name__ == "__main__":
    run_main(main)
