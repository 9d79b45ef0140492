"""The training schedule: iterations, learning-rate factor per iteration, and PCB's start.

Iterations are 0-based. An epoch is a sampler's nominal epoch length / global batch size (a float:
repeat-factor sampling changes it). `lr_steps` are the iteration indices from which one more factor
`gamma` applies; linear warm-up from `warmup_factor` over `warmup_iters`. PCB's start (docs/method.md
§4.3) is computed by ONE function, `pcb_start_iteration`, used by the trainer and by the detectron2
plug-in: the official start_epoch 17 of a 24-epoch run is 1-based and means "after 16 completed
epochs", i.e. iteration 16 x iters_per_epoch, the first learning-rate drop, the fraction 2/3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pcb_analysis.errors import ApiMisuseError
from pcb_train.config import ModelConfig, SolverConfig
from pcb_train.pcb_loss import pcb_started

DEFAULT_PCB_START_FRACTION = 2.0 / 3.0
"""PCB's start as a fraction of training: 16 of 24 epochs (the official start_epoch = 17, 1-based)."""

PCB_START_UNITS = ("epoch", "fraction", "iteration")


def pcb_start_iteration(
    unit: str, value: float, *, max_iter: int | None = None, iters_per_epoch: float | None = None
) -> int | None:
    """The first 0-based iteration at which PCB may be active; None when it needs an unknown length.

    unit 'epoch': `value` is a 1-based epoch number (MMDetection's start_epoch), so PCB starts after
    value - 1 completed epochs: ceil((value - 1) x iters_per_epoch). 'fraction': round(value x
    max_iter). 'iteration': round(value)."""
    if unit == "iteration":
        return int(round(value))
    if unit == "fraction":
        return None if max_iter is None else int(round(value * max_iter))
    if unit == "epoch":
        if iters_per_epoch is None:
            return None
        return int(math.ceil(max(value - 1.0, 0.0) * iters_per_epoch - 1e-9))
    raise ApiMisuseError(f"pcb_start_iteration: unknown unit {unit!r}; expected one of {PCB_START_UNITS}")


@dataclass(frozen=True)
class Schedule:
    """Iteration-level schedule: total iterations, learning-rate factor and PCB start per step i.

    iters_per_epoch: nominal epoch length / global batch (float); lr_steps: iteration indices from
    which one more factor `gamma` applies; pcb_start_iter: first iteration index whose loss may use
    PCB (None when the PCB loss is off).
    """

    max_iter: int
    iters_per_epoch: float
    lr_steps: tuple[int, ...]
    gamma: float
    warmup_iters: int
    warmup_factor: float
    pcb_start_iter: int | None

    def lr_factor(self, i: int) -> float:
        """Multiplier of the peak learning rate at iteration index i (0-based)."""
        factor = 1.0
        if i < self.warmup_iters:
            a = i / self.warmup_iters
            factor = self.warmup_factor * (1.0 - a) + a
        decays = sum(1 for s in self.lr_steps if i >= s)
        return factor * self.gamma**decays

    def epoch(self, i: int) -> float:
        """Completed (nominal) epochs before iteration index i."""
        return i / self.iters_per_epoch

    def pcb_started(self, i: int) -> bool:
        """The schedule half of PCB's start condition for iteration index i."""
        if self.pcb_start_iter is None:
            return False
        return pcb_started(iteration=i, start_iter=self.pcb_start_iter)


def make_schedule(solver: SolverConfig, model: ModelConfig, nominal_epoch_length: float) -> Schedule:
    """The `Schedule` of a config for a sampler whose epochs hold `nominal_epoch_length` entries."""
    ipe = nominal_epoch_length / solver.ims_per_batch
    if solver.max_iter is not None:
        max_iter = int(solver.max_iter)
        steps = tuple(int(round(s)) for s in solver.lr_steps)
    else:
        max_iter = max(1, int(round(solver.epochs * ipe)))
        steps = tuple(int(round(s * ipe)) for s in solver.lr_steps)
    start: int | None = None
    if model.pcb_loss:
        start = pcb_start_iteration(
            model.pcb_start_unit, model.pcb_start, max_iter=max_iter, iters_per_epoch=ipe
        )
    return Schedule(
        max_iter=max_iter,
        iters_per_epoch=ipe,
        lr_steps=steps,
        gamma=solver.gamma,
        warmup_iters=solver.warmup_iters,
        warmup_factor=solver.warmup_factor,
        pcb_start_iter=start,
    )
