"""The scaling grid (``experiments/scaling.py``): grid points, budgets, Pareto frontiers.

A grid point is one model: a family (``ltm``; ``sa``, the LTM with semi-amortised inference:
an encoder proposes q's start and T steps refine it; or ``ar``: no latents), a width and a
depth, and for the latent families a latent count per layer, a latent width and the
inference steps T. A budget
fixes how long each point trains: ``tokens`` gives every model the same training tokens,
``flops`` the same training FLOPs counted by ``flops.training_flops_per_token`` (every inner
step included), so a model whose iteration costs more gets fewer steps. Budgets turn into
``max_steps``; everything else comes from the run flags (preset, recipe, overrides).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .comparisons import step_flops, tokens_per_step
from .config import RunConfig
from .errors import UsageError

FAMILIES = ("ltm", "sa", "ar")
LATENT_FAMILIES = ("ltm", "sa")
SA_ENCODER_LAYERS = 2  # the sa family's encoder depth unless the run flags set one
BUDGETS = ("tokens", "flops")


@dataclass(frozen=True)
class GridPoint:
    """One model of the grid. ``latent_dim`` None: latent width = model width (as released);
    the latent fields and ``steps`` are 0 / None for the AR family."""

    family: str
    d_model: int
    n_layers: int
    latents_per_layer: int = 0
    latent_dim: int | None = None
    steps: int = 0

    @property
    def name(self) -> str:
        """``ar-d64-L2``, ``ltm-d64-L2-k4-z8-T16`` or ``sa-d64-L2-k4-z8-T4`` (``zd``: latent
        width = model width)."""
        size = f"{self.family}-d{self.d_model}-L{self.n_layers}"
        if self.family == "ar":
            return size
        width = "d" if self.latent_dim is None else self.latent_dim
        return f"{size}-k{self.latents_per_layer}-z{width}-T{self.steps}"


def grid_points(families: Sequence[str], widths: Sequence[int], depths: Sequence[int],
                latents: Sequence[int], latent_dims: Sequence[int | None],
                steps: Sequence[int]) -> list[GridPoint]:
    """Every LTM (and semi-amortised LTM) of widths x depths x latents x latent_dims x
    steps, and one AR per width x depth (an AR has no latents and no inference steps), in
    that order, without repeats."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise UsageError(f"unknown family {', '.join(unknown) or '(none)'}; choose among "
                         f"{', '.join(FAMILIES)}")
    points: list[GridPoint] = []
    for family in FAMILIES:
        if family not in families:
            continue
        for d, layers in ((d, n) for d in widths for n in depths):
            if family == "ar":
                points.append(GridPoint("ar", d, layers))
                continue
            points += [GridPoint(family, d, layers, k, z, t)
                       for k in latents for z in latent_dims for t in steps]
    return list(dict.fromkeys(points))


def point_config(base: RunConfig, point: GridPoint) -> RunConfig:
    """The run flags' config with the point's shape and T (an AR: no latents, ``model_kind``
    ar). An ``ltm`` point fits q from its start alone (no encoder); an ``sa`` point has the run
    flags' encoder, or one of ``SA_ENCODER_LAYERS`` blocks. The heads stay the run flags';
    each width must split into them."""
    heads = base.model.n_heads
    if point.d_model % heads or (point.d_model // heads) % 2:
        raise UsageError(f"width {point.d_model} does not split into {heads} heads of an even "
                         "size; choose widths that do, or set --n-heads")
    model = replace(base.model, d_model=point.d_model, n_layers=point.n_layers,
                    latents_per_layer=point.latents_per_layer, latent_dim=point.latent_dim)
    inference = base.inference
    if point.family in LATENT_FAMILIES:
        encoder = (base.inference.encoder_layers or SA_ENCODER_LAYERS) if (
            point.family == "sa") else 0
        inference = replace(inference, steps=point.steps, encoder_layers=encoder)
    kind = "ar" if point.family == "ar" else "ltm"
    return replace(base, model_kind=kind, model=model, inference=inference,
                   train=replace(base.train))


def steps_for_budget(config: RunConfig, kind: str, amount: float) -> int:
    """Slow steps that spend ``amount`` training tokens or FLOPs (``kind``), rounded to the
    nearest step, so the spent budget is within half a step of ``amount``. A budget under
    half a step of this model is refused."""
    if kind not in BUDGETS:
        raise UsageError(f"unknown budget {kind!r}; choose among {', '.join(BUDGETS)}")
    per_step = tokens_per_step(config) if kind == "tokens" else step_flops(config)
    steps = round(amount / per_step)
    if steps < 1:
        unit = "FLOPs" if kind == "flops" else kind
        raise UsageError(f"a budget of {amount:.4g} {unit} is under half a training step of "
                         f"this model ({per_step:.4g} {unit} a step); raise it")
    return steps


def with_budget(config: RunConfig, kind: str, amount: float) -> RunConfig:
    """``config`` trained for ``amount`` tokens or FLOPs. Validation and checkpoints keep
    their own cadence; a warm-up longer than the run is cut to a tenth of it."""
    steps = steps_for_budget(config, kind, amount)
    warmup = config.train.warmup_steps if config.train.warmup_steps < steps else steps // 10
    return replace(config, train=replace(config.train, max_steps=steps, warmup_steps=warmup))


def spent(config: RunConfig, train_windows: int) -> dict:
    """What a run's budget bought: slow steps, tokens, epochs of the train split, FLOPs."""
    tokens = config.train.max_steps * tokens_per_step(config)
    return {"max_steps": config.train.max_steps, "tokens_seen": tokens,
            "epochs": config.train.max_steps * config.train.batch_size / train_windows,
            "train_flops": config.train.max_steps * step_flops(config),
            "flops_per_token": step_flops(config) / tokens_per_step(config)}


def pareto_frontier(costs: Sequence[float], values: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both (lower cost and lower value are
    better; a point that ties another on one and loses on the other is dominated), ordered by
    cost. Drawn through in order they are the best value reached at each cost."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], values[i]))
    frontier: list[int] = []
    for i in order:
        if not frontier or values[i] < values[frontier[-1]]:
            frontier.append(i)  # at a cost already kept, a value is never below it: sorted
    return frontier


def equal_flop_groups(flops: Sequence[float], tolerance: float = 0.15) -> list[list[int]]:
    """Indices of runs whose training FLOPs lie within ``tolerance`` (relative) of the
    smallest in their group, groups of two or more only, in increasing FLOPs."""
    order = sorted(range(len(flops)), key=lambda i: flops[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and flops[i] <= flops[groups[-1][0]] * (1 + tolerance):
            groups[-1].append(i)
        else:
            groups.append([i])
    return [g for g in groups if len(g) > 1]
