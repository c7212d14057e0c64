"""A training run in an output folder: data, model, dual-rate SVI, logs, checkpoints, plots.

Everything a run writes lives in its folder: ``config.json``, ``metrics.jsonl`` (one JSON
object per logged step, training and validation), ``checkpoint.pt`` and
``training_curves.png``. Calling ``train`` again on the same folder resumes from the
checkpoint, and the batches, noise and updates continue exactly as if never interrupted.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .bounds import evaluate_windows
from .checkpoint import (
    checkpoint_path,
    load_checkpoint,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from .config import RunConfig
from .data import BatchSampler, load_corpus
from .decoder import Decoder
from .errors import UsageError
from .files import append_jsonl, read_jsonl, rewrite_jsonl, write_json
from .model import LatentThoughtModel
from .svi import DualRateSVI
from .tokenizers import tokenizer_from_dict
from .viz import save_figure, training_curves

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "training_curves.png"


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r}; use cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the generator the inner loop draws noise from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _comparable(config: dict) -> dict:
    """The parts of a config that must match to resume (vocab size comes from the data)."""
    model = {k: v for k, v in config["model"].items() if k != "vocab_size"}
    return {**config, "model": model}


def _prepare_folder(out: Path, config: RunConfig, force: bool) -> dict | None:
    """Create the folder; return the checkpoint to resume from, if any."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError:
        raise UsageError(f"--out {out} is not writable; pass a folder you can write to") from None
    if not checkpoint_path(out).exists():
        return None
    payload = load_checkpoint(out)
    if _comparable(payload["config"]) == _comparable(config.to_dict()):
        return payload
    if not force:
        raise UsageError(
            f"{out} holds a run with a different config; pass --force to start over there, "
            "or choose another --out"
        )
    checkpoint_path(out).unlink()
    (out / METRICS_NAME).unlink(missing_ok=True)
    return None


def _evaluate(ltm: LatentThoughtModel, windows: torch.Tensor, config: RunConfig,
              device: torch.device) -> dict:
    summary = evaluate_windows(
        ltm, windows[: config.train.eval_windows], config.inference,
        batch_size=config.train.batch_size, elbo_samples=config.train.eval_samples,
        iw_samples=1, seed=config.train.seed, device=device,
    )
    return {"neg_elbo": -summary["elbo_per_token"], "nll": summary["nll_per_token"],
            "kl": summary["kl_per_token"], "elbo_ppl": summary["elbo_ppl"],
            "recon_ppl": summary["recon_ppl"]}


def train(config: RunConfig, out: Path, force: bool = False, progress: bool = True) -> dict:
    """Train (or resume) into ``out``; return the last validation record."""
    out = Path(out)
    device = resolve_device(config.train.device)
    resume = _prepare_folder(out, config, force)
    tokenizer = tokenizer_from_dict(resume["tokenizer"]) if resume else None
    corpus = load_corpus(config.data, config.model.context, tokenizer)
    config.model.vocab_size = corpus.tokenizer.vocab_size
    generator = seed_everything(config.train.seed)
    decoder = Decoder(config.model).to(device)
    ltm = LatentThoughtModel(decoder, kl_weight=config.inference.kl_weight)
    svi = DualRateSVI(ltm, config.inference, config.train, generator)
    sampler = BatchSampler(len(corpus.windows["train"]), config.train.batch_size,
                           config.train.seed)
    start_step = 0
    records = []
    if resume:
        decoder.load_state_dict(resume["decoder"])
        svi.load_state_dict(resume["svi"])
        restore_rng_states(resume["rng"], generator)
        start_step = resume["step"]
        records = [r for r in read_jsonl(out / METRICS_NAME) if r["step"] <= start_step]
        rewrite_jsonl(out / METRICS_NAME, records)
    else:
        write_json(out / CONFIG_NAME, {
            **config.to_dict(),
            "corpus": {"name": corpus.name, "references": corpus.references,
                       "windows": {k: len(v) for k, v in corpus.windows.items()}},
            "parameters": decoder.num_parameters(),
        })

    def checkpoint(step: int) -> None:
        save_checkpoint(checkpoint_path(out), {
            "config": config.to_dict(), "tokenizer": corpus.tokenizer.to_dict(),
            "decoder": decoder.state_dict(), "svi": svi.state_dict(), "step": step,
            "rng": rng_states(generator), "corpus": corpus.name,
            "references": corpus.references,
        })

    def log(record: dict) -> None:
        records.append(record)
        append_jsonl(out / METRICS_NAME, record)

    train_cfg = config.train
    mask = torch.ones(train_cfg.batch_size, config.model.context, device=device)
    sums: dict[str, torch.Tensor] = {}
    window_start = time.perf_counter()
    bar = tqdm(range(start_step, train_cfg.max_steps), initial=start_step,
               total=train_cfg.max_steps, disable=not progress, desc="train", dynamic_ncols=True)
    last_valid = next((r for r in reversed(records) if r["split"] == "valid"), {})
    for step in bar:
        tokens = corpus.windows["train"][sampler.indices(step)].to(device)
        stats = svi.step(tokens, mask)
        for key, value in (("neg_elbo", -stats.elbo), ("nll", stats.nll), ("kl", stats.kl),
                           ("grad_norm", stats.grad_norm)):
            sums[key] = sums.get(key, 0.0) + value.detach()
        done = step + 1
        if done % train_cfg.log_every == 0 or done == train_cfg.max_steps:
            count = train_cfg.log_every if done % train_cfg.log_every == 0 else (
                done % train_cfg.log_every)
            means = {k: float(v) / count for k, v in sums.items()}
            elapsed = time.perf_counter() - window_start
            log({"split": "train", "step": done, **means, "fast_lr": stats.fast_lr,
                 "slow_lr": stats.slow_lr, "tokens_per_s": count * mask.numel() / elapsed,
                 "tokens_seen": done * mask.numel()})
            bar.set_postfix(elbo=f"{-means['neg_elbo']:.3f}", nll=f"{means['nll']:.3f}",
                            kl=f"{means['kl']:.3f}", fast_lr=f"{stats.fast_lr:.3g}",
                            slow_lr=f"{stats.slow_lr:.2e}")
            sums = {}
            window_start = time.perf_counter()
        if done % train_cfg.eval_every == 0 or done == train_cfg.max_steps:
            last_valid = {"split": "valid", "step": done,
                          **_evaluate(ltm, corpus.windows["valid"], config, device)}
            log(last_valid)
            bar.write(f"step {done}: valid -ELBO {last_valid['neg_elbo']:.4f} "
                      f"(NLL {last_valid['nll']:.4f} + KL {last_valid['kl']:.4f}) nats/token")
            window_start = time.perf_counter()
        if done % train_cfg.checkpoint_every == 0 or done == train_cfg.max_steps:
            checkpoint(done)
    bar.close()
    save_figure(training_curves(records, corpus.references), out / CURVES_NAME)
    return last_valid
