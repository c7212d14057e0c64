r"""Unconditional sample quality: LTM (prior z at several scales) against the AR and MDLM.

    python experiments/bench_generation.py --ltm runs/bench/ptb-d128/ltm-T16 \
        --ar runs/bench/ptb-d128/ar-window --scorer runs/bench/ptb-d128/ar-full --label ptb

Every model continues the same first tokens (of test windows) to the context length. Reports
the scorer's generative perplexity (a separately trained AR checkpoint), the samples' unigram
entropy and distinct-1/2/3, the same measures on the real test windows, and on the built-in
corpus the exact perplexity of the samples under the true generating process. An MDLM
(--mdlm) samples its whole window by ancestral sampling in --denoising-steps steps (default:
the context length) from the same first tokens. Writes LABEL.json and LABEL.md into --results.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from ltm_pyro.cli import (  # noqa: E402
    OneLineParser,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    run_main,
    settings,
)
from ltm_pyro.data import BUILTIN_NAME, load_corpus  # noqa: E402
from ltm_pyro.errors import UsageError  # noqa: E402
from ltm_pyro.families import FAMILIES, family_of  # noqa: E402
from ltm_pyro.generate import Sampling, prior_latents  # noqa: E402
from ltm_pyro.report import markdown_table, write_results  # noqa: E402
from ltm_pyro.sample_quality import distinct_n, scorer_nll_per_token, unigram_entropy  # noqa: E402
from ltm_pyro.synthetic import TopicStyleProcess  # noqa: E402

COLUMNS = ["source", "prior_scale", "samples", "tokens", "scorer_ppl", "true_ppl",
           "with_special_token", "unigram_entropy", "distinct_1", "distinct_2", "distinct_3"]


def scales(text: str) -> list[float]:
    return [positive_float(v) for v in text.split(",") if v.strip()]


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    p.add_argument("--ltm", type=Path, required=True, help="LTM run folder or checkpoint")
    p.add_argument("--ar", type=Path, help="AR baseline of matched size")
    p.add_argument("--mdlm", type=Path, help="MDLM baseline of matched size")
    p.add_argument("--denoising-steps", type=positive_int,
                   help="MDLM: ancestral sampling steps (default: the context length)")
    p.add_argument("--scorer", type=Path, required=True, help="separately trained AR checkpoint")
    p.add_argument("--label", required=True, help="name of this comparison (file names)")
    p.add_argument("--results", type=Path, default=Path("experiments/results/generation"))
    p.add_argument("--prior-scales", type=scales, default=[0.5, 1.0, 1.5])
    p.add_argument("--num-samples", type=positive_int, default=64)
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--top-p", type=probability,
                   help="sample from the smallest set of tokens holding this probability")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="cpu")
    return p


def load(path: Path, device: str):  # noqa: ANN201 - (model, config, tokenizer)
    return model_from_checkpoint(load_checkpoint(path, map_location=device), device)


def true_ppl(tokens: torch.Tensor) -> tuple[float | None, int]:
    """exp of the exact per-token NLL under the built-in corpus's process, over the samples
    without a special token (which that process never emits), and how many had one."""
    ids = tokens.numpy() - 2  # the built-in tokenizer puts <unk>, <eos> first
    clean = (ids >= 0).all(axis=1)
    ids = ids[clean]
    if len(ids) == 0:
        return None, int((~clean).sum())
    nll = -TopicStyleProcess.default().log_likelihood(ids).sum() / (ids.shape[0] *
                                                                      (ids.shape[1] - 1))
    return math.exp(nll), int((~clean).sum())


def measures(tokens: torch.Tensor, scorer, builtin: bool) -> dict:  # noqa: ANN001
    truth, unscorable = true_ppl(tokens) if builtin else (None, 0)
    return {"samples": len(tokens), "tokens": tokens[:, 1:].numel(),
            "scorer_ppl": math.exp(scorer_nll_per_token(scorer, tokens)),
            "true_ppl": truth, "with_special_token": unscorable,
            "unigram_entropy": unigram_entropy(tokens[:, 1:]),
            **{f"distinct_{n}": distinct_n(tokens[:, 1:], n) for n in (1, 2, 3)}}


def main() -> int:
    args = parser().parse_args()
    ltm, config, tokenizer = load(args.ltm, args.device)
    scorer, _, scorer_tokenizer = load(args.scorer, args.device)
    models = {"ltm": (ltm, config)}
    if args.ar is not None:
        ar, ar_config, ar_tokenizer = load(args.ar, args.device)
        models["ar"] = (ar, ar_config)
        if ar_tokenizer.to_dict() != tokenizer.to_dict():
            raise UsageError("--ar uses another vocabulary than --ltm; pass models trained on "
                             "the same corpus and tokenizer")
    if args.mdlm is not None:
        mdlm, mdlm_config, mdlm_tokenizer = load(args.mdlm, args.device)
        models["mdlm"] = (mdlm, mdlm_config)
        if (family_of(mdlm_config) is not FAMILIES["mdlm"]
                or mdlm_tokenizer.to_dict() != tokenizer.to_dict()
                or mdlm_config.model.context != config.model.context):
            raise UsageError("--mdlm must be an MDLM checkpoint with --ltm's context, corpus "
                             "and tokenizer")
    if not ltm.has_latents:
        raise UsageError(f"{args.ltm} is an AR model; pass the LTM as --ltm and the AR as --ar")
    if scorer.has_latents or scorer_tokenizer.to_dict() != tokenizer.to_dict():
        raise UsageError("--scorer must be an AR checkpoint on the same vocabulary (no latents)")
    corpus = load_corpus(config.data, config.model.context, tokenizer)
    builtin = corpus.name == BUILTIN_NAME
    generator = torch.Generator().manual_seed(args.seed)
    real = corpus.windows["test"][torch.randperm(len(corpus.windows["test"]),
                                                 generator=generator)[: args.num_samples]]
    real = real[:, : config.model.context]  # the same length as the samples
    first = real[:, :1].to(args.device)
    rows = [{"source": "test data", "prior_scale": None, **measures(real, scorer, builtin)}]
    new_tokens = config.model.context - 1
    sampling = Sampling(args.temperature, top_p=args.top_p)
    for name, (model, model_config) in models.items():
        for scale in args.prior_scales if model.has_latents else [None]:
            draws = torch.Generator(device=args.device).manual_seed(args.seed)
            z = prior_latents(model, len(first), scale, draws, args.device)
            new = family_of(model_config).continue_text(model, first, new_tokens, z, sampling,
                                                        draws, args.denoising_steps)
            samples = torch.cat([first, new], dim=1).cpu()
            rows.append({"source": name, "prior_scale": scale,
                         **measures(samples, scorer, builtin)})
            print(markdown_table(rows[-1:], COLUMNS), flush=True)
    table = markdown_table(rows, COLUMNS)
    write_results(args.results / f"{args.label}.json", args.label, args.device,
        {"corpus": corpus.name, "rows": rows, "settings": settings(args)},
        f"Unconditional samples of {new_tokens} tokens after the first token of test windows of "
        f"`{corpus.name}`; `scorer_ppl` by {args.scorer}; `true_ppl` is the exact perplexity "
        "under the generating process (built-in corpus only; over the samples without a "
        "special token, which that process never emits). Entropy in nats.\n\n"
        f"{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    run_main(main)
