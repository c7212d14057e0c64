"""What experiments/latents_study.py computes: each variant of the latent-lever study trained,
scored at several T_eval (bounds, what z carries, linear probes of the built-in corpus'
topic and style from posterior means, slot matrices) and gathered into one report with its
figures (the script's docstring says what each variant and flag is).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from ..bounds import ScoringConfig, evaluate_windows
from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..comparisons import prior_as_posterior, validation_curve
from ..config import InferenceConfig, RunConfig
from ..data import load_corpus
from ..files import write_json
from ..flops import fit_flops_per_token, forward_flops_per_token, training_flops_per_token
from ..inference import fit_local_posterior
from ..latent_use import slot_correlation_matrices, slot_linear_r2
from ..modes import evaluating
from ..report import markdown_table, write_results
from ..runner import train
from ..viz import save_figure
from .figures import CURVE_KEYS, bounds_mi_figure, slots_figure, training_figure

COLUMNS = ["variant", "eval_start", "split", "T_eval", "train_passes", "fit_passes",
           "iwae_ppl", "elbo_ppl", "recon_ppl",
           "prior_iwae_ppl", "kl_per_window", "mutual_info_per_window", "mutual_info_stderr",
           "active_units", "slot_correlation", "slot_effective_rank", "slot_linear_r2",
           "probe_topic_half", "probe_style_half", "probe_topic_train", "probe_style_train"]


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


def study_variant(config: RunConfig, base_inference: InferenceConfig, name: str,
                  flags: list[str], args: argparse.Namespace) -> dict:
    """Train the variant ``name`` (``config``: the study's run flags plus its ``flags``) and
    score it; ``base_inference`` is the study's own (the no-inference ablation is fitted with
    it at evaluation)."""
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
                    figures, extra["slot_matrices"][split] = latent_structure(
                        ltm, trained, corpus, split, inference, steps, args, extra)
                    row.update(figures)
                rows.append(row)
                print(markdown_table([row], COLUMNS), flush=True)
    result = {"variant": name, "flags": flags, "rows": rows,
              "slot_matrices": extra["slot_matrices"], "config": trained.to_dict(),
              "references": corpus.references}
    write_json(run_dir / "study.json", result)
    return result


def latent_structure(ltm, trained: RunConfig, corpus, split: str,  # noqa: ANN001
                     inference: InferenceConfig, steps: int, args: argparse.Namespace,
                     extra: dict) -> tuple[dict, list]:
    """What the posterior means of a split's windows hold: the slots' linear R^2, linear
    probes of the built-in corpus' topic and style (fitted on half the split, and with
    --probe-train-windows on train windows, also slot by slot), and the slot matrices (a
    still slot's cells None: its correlation would be a direction of rounding noise). The
    train windows' means are fitted once per variant, kept in ``extra``."""
    batch, seed = trained.train.batch_size, trained.train.seed
    loc = posterior_means(ltm, corpus.windows[split], inference, steps, batch, seed)
    x = loc.flatten(1).numpy()
    # The probes' fits, not evaluate_windows' (whose summary also has it): the committed rows
    # were computed this way.
    figures = {"slot_linear_r2": slot_linear_r2(loc, trained.model.n_layers)}
    factors, half = corpus.factors[split], len(x) // 2
    for factor, column in (("topic", 0), ("style", 1)):
        y = factors[:, column]
        figures[f"probe_{factor}_half"] = probe(x[:half], y[:half], x[half:], y[half:])
    if args.probe_train_windows:
        if "train_x" not in extra:
            tw = corpus.windows["train"][: args.probe_train_windows]
            extra["train_x"] = posterior_means(ltm, tw, inference, steps, batch,
                                               seed).flatten(1).numpy()
        tx = extra["train_x"]
        tf = corpus.factors["train"][: len(tx)]
        slots = ltm.latent_shape[0]
        slot_x, slot_tx = x.reshape(len(x), slots, -1), tx.reshape(len(tx), slots, -1)
        for factor, column in (("topic", 0), ("style", 1)):
            figures[f"probe_{factor}_train"] = probe(tx, tf[:, column], x, factors[:, column])
            # Each slot alone: does every slot carry the factor, or one?
            figures[f"probe_{factor}_per_slot"] = [
                probe(slot_tx[:, i], tf[:, column], slot_x[:, i], factors[:, column])
                for i in range(slots)]
    matrices = slot_correlation_matrices(loc, trained.model.n_layers).tolist()
    return figures, [[[None if math.isnan(v) else v for v in cells] for cells in layer]
                     for layer in matrices]


def report(args: argparse.Namespace, variants: list[str]) -> None:
    """Gather the finished variants under --runs/LABEL (in the order of ``variants``) into
    LABEL.json, LABEL.md and the three figures in --results."""
    results = []
    for folder in sorted((args.runs / args.label).iterdir()):
        if (folder / "study.json").exists():
            results.append(json.loads((folder / "study.json").read_text()))
    order = {name: i for i, name in enumerate(variants)}
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
