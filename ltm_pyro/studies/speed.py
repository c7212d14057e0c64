"""What experiments/bench_speed.py measures: the inner step through the Pyro program against the
same mathematics in plain PyTorch, the slow step, the iteration and the matched AR's step, timed
in interleaved rounds so that each ratio compares operations that shared a round's load.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import pyro
import torch
from torch import Tensor

from ..config import RunConfig
from ..flops import forward_flops_per_token, training_flops_per_token
from ..inference import frozen, initial_posterior
from ..model import LatentThoughtModel, LocalPosterior
from ..objective import SyncFreeMeanFieldELBO
from ..svi import DualRateSVI, slow_optimizer

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, per GPU


def plain_inner_loss(ltm: LatentThoughtModel, tokens: Tensor, mask: Tensor,
                     local: LocalPosterior, noise: Tensor, kl_weight: float = 1.0) -> Tensor:
    """The inner step's loss without Pyro: masked NLL (the model's own token NLL, compiled
    when the model is) at z = loc + scale * noise plus the analytic KL to N(0, I), per token.
    The reference Pyro's overhead is measured against."""
    z = local.loc + local.scale * noise
    logits = ltm.logits(tokens[:, :-1], z)
    nll = ltm.token_nll(logits, tokens[:, 1:], mask)
    kl = 0.5 * (local.log_var.exp() + local.loc.pow(2) - 1 - local.log_var)
    return (nll.sum() + kl_weight * kl.sum()) / mask.sum()


def pyro_inner_loss(ltm: LatentThoughtModel, tokens: Tensor, mask: Tensor,
                    local: LocalPosterior, noise: Tensor, kl_weight: float = 1.0) -> Tensor:
    """The inner step's loss exactly as ``fit_local_posterior`` computes it."""
    elbo = SyncFreeMeanFieldELBO(max_plate_nesting=1)
    loss = elbo.differentiable_loss(ltm.model, ltm.guide, tokens, mask, local, noise, kl_weight)
    return loss / mask.sum()


def operations(config: RunConfig, ltm: LatentThoughtModel, ar: LatentThoughtModel,
               device: torch.device) -> dict[str, Callable[[], None]]:
    """Closures for each timed operation; each ends with a host sync on CUDA."""
    batch, length = config.train.batch_size, config.model.context
    generator = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, config.model.vocab_size, (batch, length + 1), device=device,
                           generator=generator)
    mask = torch.ones(batch, length, device=device)
    start = initial_posterior(ltm, batch, device, config.inference)
    local = LocalPosterior(start.loc.requires_grad_(), start.log_var.requires_grad_())
    noise = torch.randn(start.loc.shape, generator=generator, device=device)
    local_opt = torch.optim.AdamW([local.loc, local.log_var], lr=0.1, weight_decay=0.0)
    svi = DualRateSVI(ltm, config.inference, config.train, generator)
    ar_svi = DualRateSVI(ar, config.inference, config.train, generator)
    slow_opt = slow_optimizer(ltm.decoder, config.train)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def inner(loss_fn: Callable) -> Callable[[], None]:
        def run() -> None:
            with frozen(ltm.decoder):
                loss = loss_fn(ltm, tokens, mask, local, noise)
                local.loc.grad, local.log_var.grad = torch.autograd.grad(
                    loss, [local.loc, local.log_var])
                local_opt.step()
            sync()
        return run

    def slow() -> None:
        slow_opt.zero_grad(set_to_none=True)
        loss, _, _ = ltm.objective_terms(tokens, mask, local.detach(), noise)
        (loss / mask.sum()).backward()
        torch.nn.utils.clip_grad_norm_(ltm.decoder.parameters(), 1.0)
        slow_opt.step()
        sync()

    def iteration() -> None:
        svi.step(tokens, mask)
        sync()

    def ar_step() -> None:
        ar_svi.step(tokens, mask)
        sync()

    return {"inner_pyro": inner(pyro_inner_loss), "inner_plain": inner(plain_inner_loss),
            "slow": slow, "iteration": iteration, "ar_step": ar_step}


def timed_rounds(ops: dict[str, Callable[[], None]], reps: int, warmup: int
                 ) -> dict[str, list[float]]:
    """Seconds of every operation in each of ``reps`` rounds after ``warmup`` untimed ones;
    odd rounds run in reverse order, so no operation always follows the same one."""
    times: dict[str, list[float]] = {name: [] for name in ops}
    for round_index in range(warmup + reps):
        order = list(ops) if round_index % 2 == 0 else list(reversed(ops))
        for name in order:
            started = time.perf_counter()
            ops[name]()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - started)
    return times


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of each round's ratio (ratios of one round share its load)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(name: str, config: RunConfig, ltm: LatentThoughtModel, ar: LatentThoughtModel,
            device: torch.device, reps: int, warmup: int) -> dict:
    """One preset's row: every ratio, throughput, peak memory (and on CUDA the FLOP rate and
    model FLOPs utilisation counting every inner step), with each round's seconds."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with pyro.validation_enabled(config.train.validate):  # as training runs
        rounds = timed_rounds(operations(config, ltm, ar, device), reps, warmup)
    steps = config.inference.steps
    rounds["ideal_iteration"] = [steps * inner + slow
                                 for inner, slow in zip(rounds["inner_pyro"], rounds["slow"])]
    t = {name: statistics.median(values) for name, values in rounds.items()}
    tokens = config.train.batch_size * config.model.context
    row = {"preset": name, "params": ltm.decoder.num_parameters(),
           "batch": config.train.batch_size, "seq_len": config.model.context, "T": steps,
           "pyro_vs_plain_inner": median_ratio(rounds["inner_pyro"], rounds["inner_plain"]),
           "inner_vs_ar_step": median_ratio(rounds["inner_pyro"], rounds["ar_step"]),
           "iteration_vs_ar_step": median_ratio(rounds["iteration"], rounds["ar_step"]),
           "ideal_iteration_vs_ar_step": median_ratio(rounds["ideal_iteration"],
                                                      rounds["ar_step"]),
           "iteration_vs_ideal": median_ratio(rounds["iteration"], rounds["ideal_iteration"]),
           "tokens_per_s": tokens / t["iteration"], "ar_tokens_per_s": tokens / t["ar_step"],
           "peak_memory_gib": peak_memory_gib(device),
           "seconds": t, "rounds": rounds}
    if device.type == "cuda":
        flops = tokens * training_flops_per_token(config.model, steps)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items()
                     if k in torch.cuda.get_device_name(device)), None)
        row["tflops_per_s"] = flops / t["iteration"] / 1e12
        row["mfu"] = flops / t["iteration"] / peak if peak else None
        row["forward_flops_per_token"] = forward_flops_per_token(config.model)
    return row


