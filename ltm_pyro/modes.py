"""Where and how a module runs: the device, evaluation mode, and the precision of its
forward passes.

One place for these, so every caller (training, evaluation, generation, notebooks) checks a
device the same way and restores a module exactly as it found it, also when the work inside
raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import UsageError


def resolve_device(name: str) -> torch.device:
    """The device a ``--device`` names, or a one-line error when it is unknown or absent."""
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r}; use cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use cpu")
    return torch.device(name)


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode meanwhile; its previous mode is restored even on an error."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the released precision), full precision on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
