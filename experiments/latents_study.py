r"""Levers against posterior collapse on the built-in corpus, at a fixed budget (issue 13).

    python experiments/latents_study.py --label window4 --window 4 \
        --variants ar-window,ar-full,ltm,ltm-fb --eval-steps 4,16,64
    python experiments/latents_study.py --label window4 --window 4 --report

The variants are built on ``--preset tiny-v1`` unless told otherwise: the tiny preset as it
was when the study began (a 16-token window, shared slot projections, the fit from log-variance
-2), so that the committed commands reproduce their rows whatever ``tiny`` becomes.

Each variant is the run flags given here plus its own flags (``VARIANTS``), trained into
--runs/LABEL/NAME with the same tokens and seed (a finished run with the same config is
reused). Each is scored on valid and test (all windows: 256 each by default, so the MI cap
log N = 5.5 nats is not binding below it) at every --eval-steps, with what the latents carry
(KL, mutual information, active units, slot correlation; docs/latent-diagnostics.md) and,
at the variant's training T, the prior-proposal control. Two extra views at the training T:

- ``eval_start="prior"``: the same model fitted from q_0 = the prior's log-variance 0 instead
  of the training start (a fit that never starts with a KL above the prior's);
- a linear probe (sklearn LogisticRegression) of the true topic and style from the posterior
  means: fitted on the first half of the split, scored on the other half, as in
  notebooks/02_latent_structure.ipynb; and fitted on --probe-train-windows windows of the
  train split, scored on the whole split.

Per-variant figures are kept in the run folder (study.json, so variants may be trained by
separate invocations); --report gathers them into experiments/results/latents/LABEL.{json,md}
and LABEL.png (iwae_ppl and MI against T_eval), LABEL-slots.png (slot-correlation
heatmaps of each layer's posterior means) and LABEL-training.png (validation -ELBO, and the
MI and KL per window, against training tokens, from each run's metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from ltm_pyro.bounds import ScoringConfig, evaluate_windows  # noqa: E402
from ltm_pyro.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from ltm_pyro.cli import (  # noqa: E402
    OneLineParser,
    add_run_arguments,
    add_scoring_arguments,
    config_from_args,
    int_list,
    non_negative_int,
    run_main,
)
from ltm_pyro.comparisons import prior_as_posterior, validation_curve  # noqa: E402
from ltm_pyro.config import RunConfig  # noqa: E402
from ltm_pyro.data import load_corpus  # noqa: E402
from ltm_pyro.files import write_json  # noqa: E402
from ltm_pyro.flops import (  # noqa: E402
    fit_flops_per_token,
    forward_flops_per_token,
    training_flops_per_token,
)
from ltm_pyro.inference import fit_local_posterior  # noqa: E402
from ltm_pyro.latent_use import slot_correlation_matrices, slot_linear_r2  # noqa: E402
from ltm_pyro.modes import evaluating  # noqa: E402
from ltm_pyro.report import markdown_table, write_results  # noqa: E402
from ltm_pyro.runner import train  # noqa: E402
from ltm_pyro.studies.figures import (  # noqa: E402
    CURVE_KEYS,
    bounds_mi_figure,
    slots_figure,
    training_figure,
)
from ltm_pyro.viz import save_figure  # noqa: E402

# Each variant: flags added to the study's own run flags (same tokens, seed and data).
VARIANTS: dict[str, list[str]] = {
    "ar-window": ["--model", "ar", "--match-params"],
    "ar-full": ["--model", "ar", "--match-params", "--window", "0"],
    "ltm": [],
    "ltm-no-inference": ["--inference-steps", "0", "--init-log-var", "0"],
    "ltm-klwarm": ["--kl-warmup-steps", "200"],
    "ltm-fb": ["--free-bits", "1"],
    "ltm-fb2": ["--free-bits", "2"],
    "ltm-fb-sym": ["--free-bits", "1", "--init-loc-scale", "0.5"],
    "ltm-sym": ["--init-loc-scale", "0.5"],
    "ltm-fb-layer": ["--free-bits", "2", "--free-bits-group", "layer"],
    "ltm-fb-klwarm": ["--free-bits", "1", "--kl-warmup-steps", "200"],
    "ltm-fb-fixed": ["--free-bits", "1", "--noise", "fixed"],
    # The fit starts at the prior (KL 0), so the free-bits floor binds from the first step.
    "ltm-prior-fb": ["--init-log-var", "0", "--free-bits", "1"],
    "ltm-prior-fb-sym": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale", "0.5"],
    # The same three levers with a KL warm-up over half of the 400 steps, or offsets of scale 1.
    "ltm-prior-fb-sym-klwarm": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                                "0.5", "--kl-warmup-steps", "200"],
    "ltm-prior-fb-sym1": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale", "1.0"],
    # Semi-amortised inference (ltm_pyro/amortised.py): the three levers, an encoder of 2
    # blocks proposing the fit's start, refined with T inner steps (16, 4 or 2); "-fit": the
    # encoder trained to match the fitted q instead of on the ELBO at its proposal.
    # "-T4": the three levers at T = 4 without an encoder (the control at equal T).
    "ltm-prior-fb-sym-T4": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                            "0.5", "--inference-steps", "4"],
    "ltm-prior-fb-sym-enc": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                             "0.5", "--encoder-layers", "2"],
    "ltm-prior-fb-sym-enc-T4": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                                "0.5", "--encoder-layers", "2", "--inference-steps", "4"],
    "ltm-prior-fb-sym-enc-T2": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                                "0.5", "--encoder-layers", "2", "--inference-steps", "2"],
    "ltm-prior-fb-sym-encfit-T4": ["--init-log-var", "0", "--free-bits", "1",
                                   "--init-loc-scale", "0.5", "--encoder-layers", "2",
                                   "--encoder-loss", "fit", "--inference-steps", "4"],
    # Per-slot roles in the decoder's cross-attention (ModelConfig.slot_roles), with and
    # without the three levers' offsets.
    "ltm-prior-fb-sym-value": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                               "0.5", "--slot-roles", "value"],
    "ltm-prior-fb-sym-kv": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                            "0.5", "--slot-roles", "key-value"],
    "ltm-prior-fb-sym-embed": ["--init-log-var", "0", "--free-bits", "1", "--init-loc-scale",
                               "0.5", "--slot-roles", "embedding"],
    "ltm-prior-fb-sym-kv-klwarm": ["--init-log-var", "0", "--free-bits", "1",
                                   "--init-loc-scale", "0.5", "--slot-roles", "key-value",
                                   "--kl-warmup-steps", "200"],
    # Cyclical KL annealing (Fu et al. 2019): 4 cycles of 100 steps, each ramping over half.
    "ltm-prior-fb-sym-kv-cyc4": ["--init-log-var", "0", "--free-bits", "1",
                                 "--init-loc-scale", "0.5", "--slot-roles", "key-value",
                                 "--kl-warmup-steps", "50", "--kl-cycles", "4"],
    # Word dropout (Bowman et al. 2016): a quarter of the input words hidden in training, so
    # the decoder has to take them from z; the matched AR trains with the same rate.
    "ltm-prior-fb-sym-kv-wd25": ["--init-log-var", "0", "--free-bits", "1",
                                 "--init-loc-scale", "0.5", "--slot-roles", "key-value",
                                 "--word-dropout", "0.25"],
    "ar-window-kv-wd25": ["--model", "ar", "--match-params", "--slot-roles", "key-value",
                          "--word-dropout", "0.25"],
    # The windowed AR matched to a slot-role LTM's parameter count (a wider MLP).
    "ar-window-value": ["--model", "ar", "--match-params", "--slot-roles", "value"],
    "ar-window-kv": ["--model", "ar", "--match-params", "--slot-roles", "key-value"],
    "ltm-prior-fb-value": ["--init-log-var", "0", "--free-bits", "1", "--slot-roles", "value"],
    "ltm-prior-fb-kv": ["--init-log-var", "0", "--free-bits", "1", "--slot-roles", "key-value"],
    "ltm-prior-fb-embed": ["--init-log-var", "0", "--free-bits", "1", "--slot-roles",
                           "embedding"],
}

COLUMNS = ["variant", "eval_start", "split", "T_eval", "train_passes", "fit_passes",
           "iwae_ppl", "elbo_ppl", "recon_ppl",
           "prior_iwae_ppl", "kl_per_window", "mutual_info_per_window", "mutual_info_stderr",
           "active_units", "slot_correlation", "slot_effective_rank", "slot_linear_r2",
           "probe_topic_half", "probe_style_half", "probe_topic_train", "probe_style_train"]


def parser() -> OneLineParser:
    p = OneLineParser.from_doc(__doc__)
    add_run_arguments(p)
    p.add_argument("--label", required=True, help="name of this study (file names)")
    p.add_argument("--variants", default="", help=f"comma-separated, among {', '.join(VARIANTS)}")
    p.add_argument("--runs", type=Path, default=Path("runs/latents"))
    p.add_argument("--results", type=Path, default=Path("experiments/results/latents"))
    p.add_argument("--eval-steps", type=int_list, help="T_eval values (default: training T)")
    add_scoring_arguments(p)
    p.add_argument("--probe-train-windows", type=non_negative_int, default=1024)
    p.add_argument("--report", action="store_true", help="gather the variants into results")
    p.set_defaults(preset="tiny-v1")
    return p


def variant_config(argv_base: list[str], name: str):  # noqa: ANN201 - a RunConfig
    """The study's run flags plus the variant's (the variant's win)."""
    args = parser().parse_args([*argv_base, *VARIANTS[name], "--label", "x"])
    return config_from_args(args)


def posterior_means(ltm, windows: torch.Tensor, inference, steps: int, batch_size: int,
                    seed: int) -> torch.Tensor:  # noqa: ANN001
    """Fitted loc [N, N_z, d] of every window: fitted as evaluation fits (eval mode, same
    seed), but with no bound draws between batches, so from the second batch on the fits'
    draws are not those of ``evaluate_windows``."""
    generator = torch.Generator().manual_seed(seed)
    locs = []
    with evaluating(ltm.decoder):
        for start in range(0, len(windows), batch_size):
            tokens = windows[start:start + batch_size]
            mask = torch.ones(tokens.shape[0], tokens.shape[1] - 1)
            locs.append(fit_local_posterior(ltm, tokens, mask, inference, generator,
                                            steps=steps).posterior.loc)
    return torch.cat(locs)


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
          test_y: np.ndarray) -> float:
    model = LogisticRegression(max_iter=3000).fit(train_x, train_y)
    return float(model.score(test_x, test_y))


def costs(trained, steps: int) -> dict:  # noqa: ANN001 - a RunConfig
    """Decoder-forward equivalents (FLOPs / one decoder forward, ``ltm_pyro/flops.py``, the
    encoder included): per training iteration, and per scored window for the fit at T_eval
    ``steps`` (scoring the bounds' draws is extra and the same for every variant)."""
    forward = forward_flops_per_token(trained.model)
    train = training_flops_per_token(trained.model, trained.inference.steps,
                                     trained.train.decoder_grads, trained.inference)
    fit = fit_flops_per_token(trained.model, steps, trained.inference)
    return {"train_passes": round(train / forward, 2), "fit_passes": round(fit / forward, 2)}


def study_variant(argv_base: list[str], name: str, args: argparse.Namespace) -> dict:
    config = variant_config(argv_base, name)
    run_dir = args.runs / args.label / name
    started = time.perf_counter()
    train(config, run_dir, force=True, progress=False)
    wall = time.perf_counter() - started
    ltm, trained, tokenizer = model_from_checkpoint(load_checkpoint(run_dir), "cpu")
    corpus = load_corpus(trained.data, trained.model.context, tokenizer)
    seed, batch = trained.train.seed, trained.train.batch_size
    has_latents = ltm.has_latents
    # The no-inference ablation is fitted like the LTM at evaluation (from the LTM's start)
    # except at T_eval 0, where q is the prior exactly.
    base_inference = config_from_args(parser().parse_args([*argv_base, "--label", "x"])).inference
    train_steps = base_inference.steps if name == "ltm-no-inference" else trained.inference.steps
    eval_steps = sorted({*(args.eval_steps or []), train_steps}) if has_latents else [0]
    if name == "ltm-no-inference":
        eval_steps = sorted({0, *eval_steps})
    rows, extra = [], {"slot_matrices": {}}
    for split in ("valid", "test"):
        windows = corpus.windows[split]
        for steps in eval_steps:
            starts = [("trained", trained.inference)]
            if name == "ltm-no-inference":
                starts = [("trained", prior_as_posterior(base_inference) if steps == 0
                           else base_inference)]
            already_prior = (trained.inference.init_log_var == 0.0
                             and not trained.inference.init_log_var_jitter)
            if (has_latents and steps == train_steps and name != "ltm-no-inference"
                    and not already_prior and ltm.encoder is None):
                starts.append(("prior", replace(trained.inference, init_log_var=0.0,
                                                init_log_var_jitter=0.0)))
            for start_name, inference in starts:
                prior = args.prior_samples if steps == train_steps else 0
                summary = evaluate_windows(ltm, windows, inference, ScoringConfig(
                    steps=steps, batch_size=batch, elbo_samples=args.elbo_samples,
                    iw_samples=args.iw_samples, seed=seed, latent_stats=True,
                    mi_samples=args.mi_samples, prior_samples=prior))
                row = {"variant": name, "eval_start": start_name, "split": split,
                       "T_eval": steps, "train_wall_s": round(wall, 1),
                       **costs(trained, steps),
                       "tokens_seen": trained.train.max_steps * batch * trained.model.context,
                       **summary}
                if has_latents and steps == train_steps and start_name == "trained":
                    loc = posterior_means(ltm, windows, inference, steps, batch, seed)
                    x = loc.flatten(1).numpy()
                    # The probes' fits, not evaluate_windows' (whose summary also has it):
                    # the committed rows were computed this way.
                    row["slot_linear_r2"] = slot_linear_r2(loc, trained.model.n_layers)
                    factors = corpus.factors[split]
                    half = len(x) // 2
                    for factor, column in (("topic", 0), ("style", 1)):
                        y = factors[:, column]
                        row[f"probe_{factor}_half"] = probe(x[:half], y[:half], x[half:], y[half:])
                    if args.probe_train_windows:
                        if "train_x" not in extra:
                            tw = corpus.windows["train"][: args.probe_train_windows]
                            extra["train_x"] = posterior_means(ltm, tw, inference, steps, batch,
                                                               seed).flatten(1).numpy()
                        tx = extra["train_x"]
                        tf = corpus.factors["train"][: len(tx)]
                        for factor, column in (("topic", 0), ("style", 1)):
                            row[f"probe_{factor}_train"] = probe(tx, tf[:, column], x,
                                                                 factors[:, column])
                            # Each slot alone: does every slot carry the factor, or one?
                            slot_x, slot_tx = x.reshape(len(x), ltm.latent_shape[0], -1), \
                                tx.reshape(len(tx), ltm.latent_shape[0], -1)
                            row[f"probe_{factor}_per_slot"] = [
                                probe(slot_tx[:, i], tf[:, column], slot_x[:, i],
                                      factors[:, column]) for i in range(slot_x.shape[1])]
                    # Still slots (no movement across windows) are None: their correlation
                    # would be a direction of rounding noise (``latent_use``).
                    matrices = slot_correlation_matrices(loc, trained.model.n_layers).tolist()
                    extra["slot_matrices"][split] = [
                        [[None if math.isnan(v) else v for v in row] for row in layer]
                        for layer in matrices]
                rows.append(row)
                print(markdown_table([row], COLUMNS), flush=True)
    result = {"variant": name, "flags": VARIANTS[name], "rows": rows,
              "slot_matrices": extra["slot_matrices"], "config": trained.to_dict(),
              "references": corpus.references}
    write_json(run_dir / "study.json", result)
    return result


def report(argv_base: list[str], args: argparse.Namespace) -> None:
    results = []
    for folder in sorted((args.runs / args.label).iterdir()):
        if (folder / "study.json").exists():
            results.append(json.loads((folder / "study.json").read_text()))
    order = {name: i for i, name in enumerate(VARIANTS)}
    results.sort(key=lambda r: order.get(r["variant"], 99))
    rows = [r for res in results for r in res["rows"]]
    rows.sort(key=lambda r: (r["split"] != "valid", order.get(r["variant"], 99), r["T_eval"],
                             r["eval_start"]))
    notes_path = args.results / f"{args.label}-notes.md"
    notes = notes_path.read_text() if notes_path.exists() else ""
    flags = "\n".join(f"- `{r['variant']}`: `{' '.join(r['flags']) or '(none)'}`" for r in results)
    references = results[0]["references"] if results else {}
    curves = {r["variant"]: validation_curve(args.runs / args.label / r["variant"],
                                             RunConfig.from_dict(r["config"]), CURVE_KEYS)
              for r in results}
    write_results(args.results / f"{args.label}.json", f"Latent levers: {args.label}", "cpu",
                  {"rows": rows, "variants": {r["variant"]: r["flags"] for r in results},
                   "slot_matrices": {r["variant"]: r["slot_matrices"] for r in results},
                   "configs": {r["variant"]: r["config"] for r in results},
                   "curves": curves, "references": references},
                  f"Variants (each adds these flags to the command's; same tokens and seed):\n\n"
                  f"{flags}\n\nAll windows of each split (N = 256: MI cap log N = 5.55 nats). "
                  "Perplexities per predicted token; `iwae_ppl`/`elbo_ppl` are valid bounds; "
                  "`recon_ppl` is not. `eval_start` prior: the fit starts at log-variance 0. "
                  "Probes: topic (32 classes, chance ~0.03) and style (8) from posterior means; "
                  "`_half` fitted on the first half of the split, `_train` on train windows. "
                  "`train_passes`: FLOPs per training iteration in decoder forwards; "
                  "`fit_passes`: FLOPs of a window's fit at T_eval in decoder forwards "
                  "(encoder included)."
                  f"\n\n{markdown_table(rows, COLUMNS)}\n\nReferences (nats/token): "
                  f"{references}\n\n{notes}")
    save_figure(bounds_mi_figure(results), args.results / f"{args.label}.png")
    save_figure(slots_figure(results), args.results / f"{args.label}-slots.png")
    save_figure(training_figure(curves), args.results / f"{args.label}-training.png")


def main() -> int:
    argv = sys.argv[1:]
    args = parser().parse_args(argv)
    # The run flags alone (without the study's own options), for each variant's config.
    study_only = {"--label": 1, "--variants": 1, "--runs": 1, "--results": 1,
                  "--eval-steps": 1, "--iw-samples": 1, "--elbo-samples": 1,
                  "--prior-samples": 1, "--mi-samples": 1, "--probe-train-windows": 1,
                  "--report": 0}
    argv_base, skip = [], 0
    for item in argv:
        if skip:
            skip -= 1
            continue
        key = item.split("=")[0]
        if key in study_only:
            skip = 0 if "=" in item else study_only[key]
            continue
        argv_base.append(item)
    if args.report:
        report(argv_base, args)
        return 0
    for name in [v for v in args.variants.split(",") if v]:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose among {', '.join(VARIANTS)}")
        study_variant(argv_base, name, args)
    return 0


if __name__ == "__main__":
    run_main(main)
