"""A training run in an output folder: data, model, dual-rate SVI, logs, checkpoints, plots.

Everything a run writes lives in its folder: ``config.json``, ``metrics.jsonl`` (one JSON
object per logged step, training and validation), ``checkpoint.pt`` and
``training_curves.png``. Calling ``train`` again on the same folder resumes from the
checkpoint, and the batches, noise and updates continue exactly as if never interrupted.
One training process per folder: it holds the folder's lock (``.lock``) while it trains. A
write that fails (full disk, I/O error) stops the run with one line; the last checkpoint
stays whole and the same command resumes from it.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyro
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
from .config import InferenceConfig, RunConfig
from .data import BatchSampler, load_corpus
from .decoder import Decoder, matched_ar_config
from .distributed import Shard, process_group, shard_from_environment
from .errors import UsageError
from .files import (
    FolderLocked,
    WriteFailed,
    append_jsonl,
    folder_lock,
    read_jsonl,
    rewrite_jsonl,
    write_json,
)
from .mdlm import MaskedDiffusionTrainer, mdlm_model_config, validation_record
from .model import LatentThoughtModel
from .svi import DualRateSVI, StepStats
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


def _claim_folder(out: Path) -> None:
    """Create the folder and check it can be written."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError:
        raise UsageError(f"--out {out} is not writable; pass a folder you can write to") from None


@contextmanager
def _training_lock(out: Path, shard: Shard) -> Iterator[None]:
    """Rank 0 creates ``out`` and holds its lock while training: one training run per folder.

    Readers (evaluate.py, generate.py) take no lock; atomic replaces keep their reads whole.
    """
    if not shard.is_main:
        yield
        return
    _claim_folder(out)
    with ExitStack() as held:
        try:
            held.enter_context(folder_lock(out))
        except FolderLocked as locked:
            raise UsageError(f"--out {out} is in use by another training run ({locked.holder});"
                             " wait for it to finish or stop it, or choose another --out"
                             ) from None
        except OSError as error:
            raise UsageError(f"could not lock --out {out}: {error.strerror or error}; choose a "
                             "folder on a local disk") from None
        yield


def _prepare_folder(out: Path, config: RunConfig, force: bool) -> dict | None:
    """Return the checkpoint in ``out`` to resume from, if any (under the folder's lock)."""
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


NO_INFERENCE = "ltm-no-inference"
LATENT_KEYS = ("kl_per_window", "mutual_info_per_window", "mutual_info_stderr",
               "mutual_info_cap", "active_units", "slot_correlation", "slot_effective_rank")


def prior_as_posterior(inference: InferenceConfig) -> InferenceConfig:
    """Inference settings whose fitted q is the prior exactly: no inner step, and q_0 = N(0, I)
    (loc 0 without slot offsets, log-var 0 without jitter). ``steps=0`` alone leaves q at the
    initial posterior, whose log-variance is ``init_log_var``, not the prior's 0."""
    return replace(inference, steps=0, init_log_var=0.0, init_log_var_jitter=0.0,
                   init_loc_scale=0.0)


def comparison_configs(base: RunConfig, inference_steps: list[int] | None = None,
                       with_ar: bool = True, with_no_inference: bool = False,
                       with_mdlm: bool = False) -> dict[str, RunConfig]:
    """The LTM (one per training T), its size-matched AR baselines, windowed and full,
    (``with_mdlm``) the size-matched masked-diffusion baseline ``mdlm``, and
    (``with_no_inference``) the LTM recipe trained with no inference, ``ltm-no-inference``:
    T = 0 and q = the prior exactly, so z is noise to the decoder.

    The released comparison gave its GPT the full context while the LTM saw only its window,
    which confounds what the latents add: both baselines are trained so either can be read.
    The ablation shares the LTM's architecture, data, tokens and slow loop: the LTM's gain
    over it is what fitting q brings (in training or at test time), and its own gain or loss
    against the ARs is the architecture and training noise, not latent use.
    """
    if base.model_kind != "ltm":
        raise UsageError("a comparison trains the LTM and its baselines: drop --model "
                         f"{base.model_kind}")
    found: dict[str, RunConfig] = {}
    for steps in inference_steps or [base.inference.steps]:
        found[f"ltm-T{steps}"] = replace(base, inference=replace(base.inference, steps=steps))
    if with_no_inference:
        found[NO_INFERENCE] = replace(base, inference=prior_as_posterior(base.inference))
    if with_ar:
        for name, window in (("ar-window", base.model.window), ("ar-full", None)):
            ar_model = matched_ar_config(replace(base.model, window=window))
            found[name] = replace(base, model_kind="ar", model=ar_model)
    if with_mdlm:
        found["mdlm"] = replace(base, model_kind="mdlm",
                                model=mdlm_model_config(base.model, match_params=True))
    return found


def kl_weight_at(step: int, config: RunConfig) -> float:
    """The KL weight of slow step ``step`` (0-based): a linear ramp over ``kl_warmup_steps``."""
    ramp = config.train.kl_warmup_steps
    return config.inference.kl_weight * (min(1.0, (step + 1) / ramp) if ramp else 1.0)


def _evaluate(ltm: LatentThoughtModel, windows: torch.Tensor, config: RunConfig,
              device: torch.device) -> dict:
    """Validation figures, with what the latents carry (``latent_use``; no prior control)."""
    if config.model_kind == "mdlm":
        return validation_record(ltm.decoder, windows[: config.train.eval_windows],
                                 config.train, device)
    ltm.kl_weight = config.inference.kl_weight  # the bound is scored at the full weight
    summary = evaluate_windows(
        ltm, windows[: config.train.eval_windows], config.inference,
        batch_size=config.train.batch_size, elbo_samples=config.train.eval_samples,
        iw_samples=1, seed=config.train.seed, device=device, latent_stats=True,
    )
    return {"neg_elbo": -summary["elbo_per_token"], "nll": summary["nll_per_token"],
            "kl": summary["kl_per_token"], "elbo_ppl": summary["elbo_ppl"],
            "recon_ppl": summary["recon_ppl"], **{k: summary[k] for k in LATENT_KEYS}}


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; carries the exit status."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name} after step {step}; "
                         "a checkpoint was written, rerun the same command to resume")
        self.exit_status = 128 + signum


class Diverged(UsageError):
    """Too many non-finite steps in a row."""


class StopRequests:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT stops now."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001 - signal API
        if self.signum is not None and signum == signal.SIGINT:
            os._exit(130)
        self.signum = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class LogWindow:
    """Running sums between two logged steps; checkpointed so a resume logs identically."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def add(self, stats: StepStats) -> None:
        for key, value in (("neg_elbo", -stats.elbo), ("nll", stats.nll), ("kl", stats.kl),
                           ("grad_norm", stats.grad_norm)):
            if not stats.skipped:
                self.sums[key] = self.sums.get(key, 0.0) + value.detach()
        self.steps += 1
        self.skipped += int(stats.skipped)

    def means(self) -> dict[str, float]:
        used = max(1, self.steps - self.skipped)
        return {k: float(v) / used for k, v in self.sums.items()}

    def state(self) -> dict:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "steps": self.steps,
                "skipped": self.skipped}


def train(config: RunConfig, out: Path, force: bool = False, progress: bool = True) -> dict:
    """Train (or resume) into ``out``; return the last validation record.

    Raises ``Interrupted`` after checkpointing when SIGINT/SIGTERM arrive, and ``Diverged``
    after ``max_bad_steps`` non-finite steps in a row. Under ``torchrun`` every rank trains
    its shard of each global batch (``batch_size`` windows per rank) and rank 0 alone
    evaluates and writes files.
    """
    shard = shard_from_environment()
    device = resolve_device(config.train.device)
    if shard.distributed and device.type == "cuda":
        device = torch.device("cuda", shard.local_rank)
        torch.cuda.set_device(device)
    out = Path(out)
    with process_group(shard, device), _training_lock(out, shard):
        return _train(config, out, force, progress, shard, device)


def _resume_point(out: Path, config: RunConfig, force: bool, shard: Shard) -> dict | None:
    """Rank 0 prepares the folder; the other ranks then read the same checkpoint, if any."""
    resume = _prepare_folder(out, config, force) if shard.is_main else None
    shard.barrier()
    if not shard.is_main and checkpoint_path(out).exists():
        resume = load_checkpoint(out)
    return resume


def _train(config: RunConfig, out: Path, force: bool, progress: bool, shard: Shard,
           device: torch.device) -> dict:
    resume = _resume_point(out, config, force, shard)
    tokenizer = tokenizer_from_dict(resume["tokenizer"]) if resume else None
    corpus = load_corpus(config.data, config.model.context, tokenizer)
    config.model.vocab_size = corpus.tokenizer.vocab_size
    generator = seed_everything(config.train.seed)
    decoder = Decoder(config.model).to(device)
    ltm = LatentThoughtModel(decoder, kl_weight=config.inference.kl_weight)
    if config.train.compile:
        ltm.compile()
    svi = MaskedDiffusionTrainer(decoder, config.train, generator, shard) if (
        config.model_kind == "mdlm") else DualRateSVI(ltm, config.inference, config.train,
                                                      generator, shard)
    sampler = BatchSampler(len(corpus.windows["train"]), config.train.batch_size * shard.world,
                           config.train.seed)
    start_step, window, bad_in_a_row, skipped_total = 0, LogWindow(), 0, 0
    records = []
    if resume:
        decoder.load_state_dict(resume["decoder"])
        svi.load_state_dict(resume["svi"])
        restore_rng_states(resume["rng"], generator)
        start_step = resume["step"]
        window = LogWindow(**resume["log_window"])
        bad_in_a_row, skipped_total = resume["bad_in_a_row"], resume["skipped_total"]
        if shard.is_main:
            records = [r for r in read_jsonl(out / METRICS_NAME) if r["step"] <= start_step]
            rewrite_jsonl(out / METRICS_NAME, records)
    elif shard.is_main:
        rewrite_jsonl(out / METRICS_NAME, [])  # a run killed before its first checkpoint
        write_json(out / CONFIG_NAME, {
            **config.to_dict(),
            "corpus": {"name": corpus.name, "references": corpus.references,
                       "windows": {k: len(v) for k, v in corpus.windows.items()}},
            "parameters": decoder.num_parameters(),
        })

    saved_step = start_step if resume else None

    def resumes() -> str:
        if saved_step is None:
            return "rerun the same command to start the run again"
        return f"rerun the same command to resume from the checkpoint of step {saved_step}"

    def checkpoint(step: int) -> None:
        nonlocal saved_step
        try:
            save_checkpoint(checkpoint_path(out), {
                "config": config.to_dict(), "tokenizer": corpus.tokenizer.to_dict(),
                "world_size": shard.world, "decoder": decoder.state_dict(),
                "svi": svi.state_dict(), "step": step,
                "rng": rng_states(generator), "corpus": corpus.name,
                "references": corpus.references, "log_window": window.state(),
                "bad_in_a_row": bad_in_a_row, "skipped_total": skipped_total,
            })
        except WriteFailed as failed:
            raise failed.then(resumes()) from None
        saved_step = step

    def log(record: dict) -> None:
        records.append(record)
        if shard.is_main:
            try:
                append_jsonl(out / METRICS_NAME, record)
            except WriteFailed as failed:
                raise failed.then(resumes()) from None

    train_cfg = config.train
    mask = torch.ones(train_cfg.batch_size, config.model.context, device=device)
    global_tokens = mask.numel() * shard.world
    bar = tqdm(range(start_step, train_cfg.max_steps), initial=start_step,
               total=train_cfg.max_steps, disable=not (progress and shard.is_main), desc="train",
               dynamic_ncols=True)
    last_valid = next((r for r in reversed(records) if r["split"] == "valid"), {})
    with StopRequests() as stop, pyro.validation_enabled(train_cfg.validate), \
            warnings.catch_warnings():
        # Non-finite steps are counted and skipped below; Pyro would warn at every inner step.
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        for step in bar:
            started = time.perf_counter()
            tokens = corpus.windows["train"][shard.slice(sampler.indices(step))].to(device)
            ltm.kl_weight = kl_weight_at(step, config)
            stats = svi.step(tokens, mask)
            window.add(stats)
            bad_in_a_row = bad_in_a_row + 1 if stats.skipped else 0
            skipped_total += int(stats.skipped)
            window.seconds += time.perf_counter() - started
            done = step + 1
            if done % train_cfg.log_every == 0 or done == train_cfg.max_steps:
                means = window.means()
                log({"split": "train", "step": done, **means, "fast_lr": stats.fast_lr,
                     "slow_lr": stats.slow_lr, "kl_weight": kl_weight_at(step, config),
                     "skipped_steps": skipped_total,
                     "tokens_per_s": window.steps * global_tokens / max(window.seconds, 1e-9),
                     "tokens_seen": done * global_tokens})
                if means:
                    bar.set_postfix(neg_elbo=f"{means['neg_elbo']:.3f}", nll=f"{means['nll']:.3f}",
                                    kl=f"{means['kl']:.3f}", fast_lr=f"{stats.fast_lr:.3g}",
                                    slow_lr=f"{stats.slow_lr:.2e}")
                window = LogWindow()
            if bad_in_a_row >= train_cfg.max_bad_steps:
                raise Diverged(
                    f"{bad_in_a_row} steps in a row had a non-finite loss or gradient; lower "
                    "--slow-lr or --fast-lr, or train in float32 (no bf16 autocast)")
            if (done % train_cfg.eval_every == 0 or done == train_cfg.max_steps) and (
                    shard.is_main):
                last_valid = {"split": "valid", "step": done,
                              **_evaluate(ltm, corpus.windows["valid"], config, device)}
                log(last_valid)
                bar.write(f"step {done}: valid -ELBO {last_valid['neg_elbo']:.4f} (NLL "
                          f"{last_valid['nll']:.4f} + KL {last_valid['kl']:.4f}) nats/token")
            stopping = shard.any(stop.signum is not None, device)  # all ranks stop together
            if (done % train_cfg.checkpoint_every == 0 or done == train_cfg.max_steps
                    or stopping) and shard.is_main:
                checkpoint(done)
            if stopping:
                bar.close()
                if shard.is_main:
                    save_figure(training_curves(records, corpus.references), out / CURVES_NAME)
                shard.barrier()  # no rank leaves while rank 0 is still writing
                raise Interrupted(stop.signum or signal.SIGTERM, done)
    bar.close()
    if shard.is_main:
        save_figure(training_curves(records, corpus.references), out / CURVES_NAME)
    return last_valid
