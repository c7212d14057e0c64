r"""Sample continuations from a trained checkpoint (LTM, AR or MDLM baseline).

    ltm-generate --checkpoint runs/default --num-samples 4
    ltm-generate --checkpoint runs/ptb --prompt "the company said" \
        --inference-steps 16 --top-p 0.9 --json samples.json

With a prompt, an LTM first fits its local posterior to the prompt (--inference-steps, default
the training T) and continues from the posterior mean; without one, each sample starts from the
first token of a validation window and z is drawn from the prior, scaled by --prior-scale.
An MDLM checkpoint samples its whole window by ancestral sampling in --denoising-steps steps
(default: the context length), the prompt given, and prints the tokens after the prompt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..cli import (
    OneLineParser,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    run_main,
    settings,
)
from ..errors import UsageError

if TYPE_CHECKING:
    import torch


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder or checkpoint.pt")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="text to continue")
    source.add_argument("--prompt-file", type=Path, help="file whose text is the prompt")
    p.add_argument("--num-samples", type=positive_int, default=4)
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--top-k", type=positive_int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=probability,
                   help="sample from the smallest set of tokens holding this probability")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--inference-steps", type=non_negative_int,
                   help="steps fitting z to the prompt (default: the training T)")
    p.add_argument("--prior-scale", type=positive_float, default=1.0,
                   help="without a prompt: z ~ N(0, scale^2 I)")
    p.add_argument("--denoising-steps", type=positive_int,
                   help="MDLM: ancestral sampling steps (default: the context length)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="write the samples and their settings here")
    return p


def prompt_text(args) -> str | None:  # noqa: ANN001 - argparse.Namespace
    if args.prompt_file is None:
        return args.prompt
    if not args.prompt_file.is_file():
        raise UsageError(f"prompt file {args.prompt_file} does not exist; pass an existing file")
    return args.prompt_file.read_text(encoding="utf-8")


def unprompted_start(config, tokenizer, count: int, seed: int) -> tuple[torch.Tensor, str]:  # noqa: ANN001
    """Where samples without a prompt start, and how to say so: the first tokens of random
    validation windows while the training corpus is at hand, else the end-of-line token."""
    import torch

    from ..data import load_corpus
    from ..run_folder import corpus_gone, start_token

    if corpus_gone(config):
        print(f"note: the training corpus {config.data.path} is not there any more; samples "
              "start after the end-of-line token", file=sys.stderr)
        return torch.full((count, 1), start_token(tokenizer)), "end-of-line token"
    corpus = load_corpus(config.data, config.model.context, tokenizer)
    pick = torch.randperm(len(corpus.windows["valid"]),
                          generator=torch.Generator().manual_seed(seed))[:count]
    return corpus.windows["valid"][pick, :1], "first token of validation windows"


def main() -> int:
    args = parser().parse_args()  # before torch and the library load: --help needs neither
    import torch

    from ..checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint
    from ..families import family_of
    from ..files import write_json
    from ..generate import Sampling, posterior_latents, prior_latents
    from ..modes import resolve_device
    from ..run_folder import read_tokenizer
    from ..tokenizers import encode_prompt, known_token_count

    device = resolve_device(args.device)
    payload = load_checkpoint(args.checkpoint, map_location=device)
    ltm, config, _ = model_from_checkpoint(payload, device)
    tokenizer = read_tokenizer(checkpoint_path(args.checkpoint).parent, payload)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    text = prompt_text(args)
    if text is not None:
        ids = encode_prompt(tokenizer, text)
        if known_token_count(tokenizer, torch.tensor(ids)) == 0:
            raise UsageError("no token of the prompt is in the checkpoint's vocabulary; "
                             "write the prompt in the training corpus's language")
        ids = ids[-config.model.context:]  # keep the end of a long prompt
        prompt = torch.tensor([ids], device=device).repeat(args.num_samples, 1)
        z = posterior_latents(ltm, prompt, config.inference, args.inference_steps, generator)
        start = "prompt"
    else:
        prompt, start = unprompted_start(config, tokenizer, args.num_samples, args.seed)
        prompt = prompt.to(device)
        z = prior_latents(ltm, len(prompt), args.prior_scale, generator, device)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.greedy)
    new = family_of(config).continue_text(ltm, prompt, args.max_new_tokens, z, sampling,
                                          generator, args.denoising_steps)
    tokens, new_tokens = torch.cat([prompt, new], dim=1), new.shape[1]
    samples = [tokenizer.decode(row[prompt.shape[1]:].tolist()) for row in tokens.cpu()]
    for i, sample in enumerate(samples):
        head = tokenizer.decode(prompt[i].tolist()) if text is None else text
        print(f"--- sample {i} ---\n[{head.strip()}] {sample}")
    if args.json:
        write_json(args.json, {"settings": settings(args), "model_kind": config.model_kind,
                               "checkpoint_step": payload["step"], "start": start,
                               "new_tokens": new_tokens, "samples": samples,
                               "token_ids": tokens.cpu().tolist()})
    return 0


def entry() -> None:
    """The ``ltm-generate`` console script."""
    run_main(main)
