"""A training run in an output folder: data, model, dual-rate SVI, logs, checkpoints, plots.

Everything a run writes lives in its folder: ``config.json``, ``metrics.jsonl`` (one JSON
object per logged step, training and validation), ``checkpoint.pt`` (with ``keep_best``
also ``best.pt``, the weights of the validation with the lowest -ELBO) and
``training_curves.png``. Calling ``train`` again on the same folder resumes from the
checkpoint, and the batches, noise and updates continue exactly as if never interrupted.
One training process per folder: it holds the folder's lock (``.lock``) while it trains. A
write that fails (full disk, I/O error) stops the run with one line; the last checkpoint
stays whole and the same command resumes from it.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from .amortised import build_encoder
from .checkpoint import BEST_NAME, checkpoint_path, load_checkpoint, save_checkpoint
from .config import RunConfig
from .data import BatchSampler, Corpus, load_corpus
from .decoder import Decoder
from .distributed import Shard, process_group, shard_from_environment
from .errors import UsageError
from .families import family_of
from .files import (
    FolderLocked,
    WriteFailed,
    append_jsonl,
    folder_lock,
    read_jsonl,
    rewrite_jsonl,
    write_json,
)
from .model import LatentThoughtModel
from .modes import resolve_device
from .run_folder import TOKENIZER_NAME, with_absolute_data_path, write_tokenizer
from .svi import StepStats
from .tokenizers import tokenizer_from_dict
from .training_state import LogWindow, TrainingState
from .viz import save_figure, training_curves

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "training_curves.png"


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the generator the inner loop draws noise from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# Fields a resumed run may change: how long it trains (a finished or stopped run is extended
# by raising max_steps; the slow cosine is then recomputed over the new length from the step
# reached, so the learning rate steps up to where a run planned that long would be) and when
# early stopping ends it. Everything else decides what the steps compute and must match.
EXTENDABLE = (("train", "max_steps"), ("train", "patience"))


def _comparable(config: dict) -> dict[str, object]:
    """The fields of a config that must match to resume, flattened to "section.field" (vocab
    size comes from the data). Fields added to the config since a checkpoint was written take
    their defaults; a corpus path written relative (before run folders recorded it absolute)
    is read from here."""
    config = with_absolute_data_path(RunConfig.from_dict(config)).to_dict()
    flat = {}
    for section, value in config.items():
        for key, item in (value.items() if isinstance(value, dict) else [("", value)]):
            if (section, key) not in EXTENDABLE and (section, key) != ("model", "vocab_size"):
                flat[f"{section}.{key}" if key else section] = item
    return flat


def config_differences(payload: dict, config: RunConfig) -> list[str]:
    """Each field that differs between a checkpoint's run and ``config``, with both values."""
    saved, asked = _comparable(payload["config"]), _comparable(config.to_dict())
    return [f"{key} is {saved.get(key)!r} in the folder, {asked.get(key)!r} now"
            for key in sorted(saved.keys() | asked.keys()) if saved.get(key) != asked.get(key)]


def _same_run(payload: dict, config: RunConfig) -> bool:
    """Whether a checkpoint was written by a run of ``config`` (so it may be resumed)."""
    return not config_differences(payload, config)


def validations_since_best(records: list[dict]) -> int:
    """How many validations came after the one with the lowest -ELBO (the first of equal
    ones; a non-finite figure is never the best): 0 right after a new best."""
    losses = [r["neg_elbo"] for r in records if r["split"] == "valid"]
    finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
    best = min(finite, key=losses.__getitem__, default=-1)
    return len(losses) - 1 - best


def plateaued(records: list[dict], patience: int) -> bool:
    """Whether early stopping ends the run: ``patience`` > 0 validations in a row have not
    lowered the valid -ELBO."""
    return patience > 0 and validations_since_best(records) >= patience


def finished_run(out: Path, config: RunConfig) -> bool:
    """Whether ``out`` already holds ``config`` trained to its last step (or stopped early on
    valid, ``patience``), so ``train`` would only reload it (benchmarks then report no
    training time for it)."""
    if not checkpoint_path(out).exists():
        return False
    payload = load_checkpoint(out)
    if not _same_run(payload, config):
        return False
    records = [r for r in read_jsonl(out / METRICS_NAME) if r["step"] <= payload["step"]]
    return payload["step"] >= config.train.max_steps or plateaued(records,
                                                                  config.train.patience)


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
    if _same_run(payload, config):
        return payload
    if not force:
        differences = config_differences(payload, config)
        raise UsageError(
            f"{out} holds a run with a different config ({'; '.join(differences[:3])}"
            f"{'; ...' if len(differences) > 3 else ''}); only --max-steps and --patience may "
            "change on resume: pass the folder's values, --force to start over there, or "
            "another --out")
    checkpoint_path(out).unlink()
    (out / METRICS_NAME).unlink(missing_ok=True)
    (out / BEST_NAME).unlink(missing_ok=True)
    return None


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


def _build_state(config: RunConfig, shard: Shard, device: torch.device,
                 resume: dict | None) -> TrainingState:
    """The seeded model and optimizers, restored from ``resume`` when there is one."""
    generator = seed_everything(config.train.seed)
    decoder = Decoder(config.model).to(device)
    encoder = build_encoder(config.model, config.inference)  # None unless asked for
    ltm = LatentThoughtModel(decoder, encoder=encoder.to(device) if (
        encoder is not None and decoder.has_latents) else None)
    if config.train.compile:
        ltm.compile()
    trainer = family_of(config).trainer(ltm, config, generator, shard)
    if resume:
        return TrainingState.from_dict(resume, trainer, generator)
    return TrainingState(trainer, generator)


def _due(done: int, every: int, config: RunConfig) -> bool:
    return done % every == 0 or done == config.train.max_steps


class TrainingRun:
    """One run's loop and its files: metrics, checkpoints and the curves, written by rank 0."""

    def __init__(self, config: RunConfig, out: Path, corpus: Corpus, state: TrainingState,
                 shard: Shard, device: torch.device, resumed: bool) -> None:
        self.config, self.out, self.corpus, self.state = config, out, corpus, state
        self.shard, self.device = shard, device
        self.sampler = BatchSampler(len(corpus.windows["train"]),
                                    config.train.batch_size * shard.world, config.train.seed)
        self.saved_step = state.step if resumed else None
        self.records: list[dict] = []
        if resumed and shard.is_main:
            self.records = [r for r in read_jsonl(out / METRICS_NAME) if r["step"] <= state.step]
            rewrite_jsonl(out / METRICS_NAME, self.records)
        elif shard.is_main:
            rewrite_jsonl(out / METRICS_NAME, [])  # a run killed before its first checkpoint
        if shard.is_main:  # also on resume: an extended run records its new length
            write_json(out / CONFIG_NAME, {
                **config.to_dict(),
                "corpus": {"name": corpus.name, "references": corpus.references,
                           "windows": {k: len(v) for k, v in corpus.windows.items()}},
                "parameters": state.trainer.ltm.decoder.num_parameters(),
            })
        self.last_valid = next((r for r in reversed(self.records) if r["split"] == "valid"), {})

    def _resumes(self) -> str:
        if self.saved_step is None:
            return "rerun the same command to start the run again"
        return f"rerun the same command to resume from the checkpoint of step {self.saved_step}"

    def checkpoint(self, path: Path | None = None) -> None:
        """The full state at this step, to ``checkpoint.pt`` (or ``path``: best.pt)."""
        try:
            save_checkpoint(path or checkpoint_path(self.out), {
                "config": self.config.to_dict(), "tokenizer": self.corpus.tokenizer.to_dict(),
                "world_size": self.shard.world, "corpus": self.corpus.name,
                "references": self.corpus.references, **self.state.to_dict()})
        except WriteFailed as failed:
            raise failed.then(self._resumes()) from None
        if path is None:
            self.saved_step = self.state.step

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.shard.is_main:
            try:
                append_jsonl(self.out / METRICS_NAME, record)
            except WriteFailed as failed:
                raise failed.then(self._resumes()) from None

    def log_training(self, stats: StepStats, global_tokens: int, bar: tqdm) -> None:
        """The window's means since the last log; the progress bar shows the same figures."""
        window, done = self.state.window, self.state.step
        means = window.means()
        self.log({"split": "train", "step": done, **means, "fast_lr": stats.fast_lr,
                  "slow_lr": stats.slow_lr, "kl_weight": stats.kl_weight,
                  "skipped_steps": self.state.skipped_total,
                  "tokens_per_s": window.steps * global_tokens / max(window.seconds, 1e-9),
                  "tokens_seen": done * global_tokens})
        if means:
            bar.set_postfix(neg_elbo=f"{means['neg_elbo']:.3f}", nll=f"{means['nll']:.3f}",
                            kl=f"{means['kl']:.3f}", fast_lr=f"{stats.fast_lr:.3g}",
                            slow_lr=f"{stats.slow_lr:.2e}")
        self.state.window = LogWindow()

    def validate(self, bar: tqdm) -> None:
        """Score the validation windows; with ``keep_best``, a new lowest -ELBO is saved as
        best.pt, so a long baseline run can be scored where it was best (early stopping)."""
        earlier = [r["neg_elbo"] for r in self.records if r["split"] == "valid"]
        self.last_valid = {"split": "valid", "step": self.state.step,
                           **family_of(self.config).validate(
                               self.state.trainer.ltm, self.corpus.windows["valid"],
                               self.config, self.device)}
        self.log(self.last_valid)
        if self.config.train.keep_best and self.last_valid["neg_elbo"] < min(
                earlier, default=float("inf")):
            self.checkpoint(self.out / BEST_NAME)
        v = self.last_valid
        control = (f"; prior as proposal {v['prior_control']:+.2%} against q"
                   if "prior_control" in v else "")
        bar.write(f"step {v['step']}: valid -ELBO {v['neg_elbo']:.4f} (NLL {v['nll']:.4f} + "
                  f"KL {v['kl']:.4f}) nats/token{control}")

    def converged(self) -> bool:
        """Early stopping (``patience``), decided by rank 0's records for every rank."""
        return self.shard.any(plateaued(self.records, self.config.train.patience), self.device)

    def early_stop_note(self) -> str:
        valid = [r for r in self.records if r["split"] == "valid"]
        best = valid[len(valid) - 1 - validations_since_best(self.records)]
        return (f"stopped early at step {self.state.step} of {self.config.train.max_steps}: "
                f"{self.config.train.patience} validations without a lower -ELBO than "
                f"{best['neg_elbo']:.4f} (step {best['step']})")

    def save_curves(self) -> None:
        if self.shard.is_main:
            title = f"{self.config.model_kind.upper()} training curves: {self.out.name}"
            save_figure(training_curves(self.records, self.corpus.references, title),
                        self.out / CURVES_NAME)

    def loop(self, progress: bool) -> dict:
        """Train to ``max_steps`` (or until early stopping); return the last validation record."""
        cfg, shard, state = self.config.train, self.shard, self.state
        mask = torch.ones(cfg.batch_size, self.config.model.context, device=self.device)
        global_tokens = mask.numel() * shard.world
        bar = tqdm(range(state.step, cfg.max_steps), initial=state.step, total=cfg.max_steps,
                   disable=not (progress and shard.is_main), desc="train", dynamic_ncols=True)
        with StopRequests() as stop:
            for step in bar:
                if step == self.saved_step and self.converged():  # resumed after stopping early
                    break
                started = time.perf_counter()
                indices = shard.slice(self.sampler.indices(step))
                batch = self.corpus.windows["train"][indices].to(self.device)
                stats = state.trainer.step(batch, mask)
                state.record(stats, time.perf_counter() - started)
                if _due(state.step, cfg.log_every, self.config):
                    self.log_training(stats, global_tokens, bar)
                if state.bad_in_a_row >= cfg.max_bad_steps:
                    raise Diverged(
                        f"{state.bad_in_a_row} steps in a row had a non-finite loss or gradient; "
                        "lower --slow-lr or --fast-lr, or train in float32 (no bf16 autocast)")
                validated = _due(state.step, cfg.eval_every, self.config)
                if validated and shard.is_main:
                    self.validate(bar)
                converged = validated and state.step < cfg.max_steps and self.converged()
                stopping = shard.any(stop.signum is not None, self.device)  # all ranks together
                if (_due(state.step, cfg.checkpoint_every, self.config) or stopping
                        or converged) and shard.is_main:
                    self.checkpoint()
                if converged:
                    bar.write(self.early_stop_note())
                    break
                if stopping:
                    bar.close()
                    self.save_curves()
                    shard.barrier()  # no rank leaves while rank 0 is still writing
                    raise Interrupted(stop.signum or signal.SIGTERM, state.step)
        bar.close()
        self.save_curves()
        return self.last_valid


def _train(config: RunConfig, out: Path, force: bool, progress: bool, shard: Shard,
           device: torch.device) -> dict:
    config = with_absolute_data_path(config)
    resume = _resume_point(out, config, force, shard)
    tokenizer = tokenizer_from_dict(resume["tokenizer"]) if resume else None
    corpus = load_corpus(config.data, config.model.context, tokenizer)
    config = config.updated(model={"vocab_size": corpus.tokenizer.vocab_size})
    if shard.is_main and not (out / TOKENIZER_NAME).exists():
        write_tokenizer(out, corpus.tokenizer)
    state = _build_state(config, shard, device, resume)
    run = TrainingRun(config, out, corpus, state, shard, device, resumed=resume is not None)
    with pyro.validation_enabled(config.train.validate), warnings.catch_warnings():
        # Non-finite steps are counted and skipped; Pyro would warn at every inner step.
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        return run.loop(progress)
