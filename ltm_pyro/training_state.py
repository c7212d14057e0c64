"""What a resume restores, as one object: the decoder (and the encoder, semi-amortised
inference), the slow optimizer (and the encoder's) and its step count,
the RNG states, and the logging and divergence counters. ``to_dict`` gives the checkpoint's
training keys and ``from_dict`` restores them, so saving and restoring never list the keys
twice, and a resumed run continues bit-identically."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checkpoint import restore_rng_states, rng_states
from .families import Trainer
from .svi import StepStats


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


@dataclass
class TrainingState:
    """A run's progress: ``step`` slow steps done, and everything that moves with them."""

    trainer: Trainer  # the family's: dual-rate SVI, or the MDLM's
    generator: torch.Generator
    step: int = 0
    window: LogWindow = field(default_factory=LogWindow)
    bad_in_a_row: int = 0
    skipped_total: int = 0

    def record(self, stats: StepStats, seconds: float) -> None:
        """Count one finished slow step and its figures."""
        self.window.add(stats)
        self.window.seconds += seconds
        self.bad_in_a_row = self.bad_in_a_row + 1 if stats.skipped else 0
        self.skipped_total += int(stats.skipped)
        self.step += 1

    def to_dict(self) -> dict:
        """The checkpoint's training keys (tensors and plain data only)."""
        encoder = self.trainer.ltm.encoder
        return {"decoder": self.trainer.ltm.decoder.state_dict(),
                "svi": self.trainer.state_dict(),
                "step": self.step, "rng": rng_states(self.generator),
                "log_window": self.window.state(), "bad_in_a_row": self.bad_in_a_row,
                "skipped_total": self.skipped_total,
                **({"encoder": encoder.state_dict()} if encoder is not None else {})}

    @classmethod
    def from_dict(cls, payload: dict, trainer: Trainer,
                  generator: torch.Generator) -> TrainingState:
        """Restore ``trainer`` (decoder and optimizer) and the RNGs in place from a
        checkpoint (its state under the key ``svi``, as every checkpoint has it)."""
        trainer.ltm.decoder.load_state_dict(payload["decoder"])
        if trainer.ltm.encoder is not None:
            trainer.ltm.encoder.load_state_dict(payload["encoder"])
        trainer.load_state_dict(payload["svi"])
        restore_rng_states(payload["rng"], generator)
        return cls(trainer, generator, payload["step"], LogWindow(**payload["log_window"]),
                   payload["bad_in_a_row"], payload["skipped_total"])
