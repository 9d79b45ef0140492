"""The classification loss `pcbkit train` plugs into the RoI head: PCB and / or the iterative head.

`ClsLoss(step_logits, labels)` is `iterative_cls_loss` (docs/method.md §4.3-§4.4) over the
head's per-step logits [R, K+1] (background = column K) with the online confusion matrix [K, K]
when the PCB loss is on. The matrix lives in an `OnlineConfusion` held here, outside the model's
state dict and outside DistributedDataParallel (it all-reduces its own batch sums, so every rank
holds identical buffers). `started` is PCB's schedule condition, set by the trainer before each
forward (`Schedule.pcb_started(i)`). With `model.cls_loss` Seesaw / EQLv2 the loss family (held by
the RoI head, whose state dict keeps its statistics) is bound by `PCBRoIHeads.set_cls_loss`
(`bind_family`), and the matrix is built the family's way (`loss_families`, docs/losses.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pcb_train.config import ModelConfig
from pcb_train.iterative_head import LossFamily, StepClsLosses, iterative_cls_loss
from pcb_train.loss_families import make_confusion
from pcb_train.pcb_loss import OnlineConfusion


class ClsLoss:
    """`iterative_cls_loss` with the online matrix (PCB on) or without it (iterative head only).
    Not an nn.Module: the matrix stays out of the model's state dict and out of DDP."""

    def __init__(
        self, confusion: OnlineConfusion | None, alpha: float, step_weights: Sequence[float]
    ) -> None:
        self.confusion = confusion
        self.alpha = float(alpha)
        self.step_weights = tuple(float(w) for w in step_weights)
        self.started = False
        self.family: LossFamily | None = None

    def bind_family(self, family: LossFamily | None) -> None:
        """Use the RoI head's loss family (None: softmax cross-entropy / the PCB loss)."""
        self.family = family

    def __call__(self, step_logits: tuple[Tensor, ...], labels: Tensor) -> StepClsLosses:
        return iterative_cls_loss(
            step_logits,
            labels,
            self.step_weights,
            confusion=self.confusion,
            alpha=self.alpha,
            pcb_started=self.started,
            family=self.family,
        )


def build_cls_loss(model_cfg: ModelConfig, device: torch.device) -> ClsLoss | None:
    """PCB loss and/or iterative-head loss of a config (None: the backend's plain cross-entropy)."""
    if not (model_cfg.pcb_loss or model_cfg.iterative_head):
        return None
    weights = tuple(model_cfg.step_weights) if model_cfg.iterative_head else (1.0,)
    confusion = None
    if model_cfg.pcb_loss:
        # the family's matrix (EQLv2: sigmoid scores, rows not renormalised; docs/losses.md §3)
        confusion = make_confusion(model_cfg.cls_loss, model_cfg.num_classes, model_cfg.pcb_momentum)
        confusion = confusion.to(device)
    return ClsLoss(confusion, model_cfg.pcb_alpha, weights)


def confusion_summary(confusion: OnlineConfusion | None) -> dict[str, Any]:
    """`cm_classes_seen` and `cm_diag_mean` (mean diagonal over the classes seen) for the logs."""
    if confusion is None:
        return {}
    seen = confusion.counts > 0
    n = int(seen.sum())
    diag = float(confusion.matrix.diagonal()[seen].mean()) if n else None
    return {"cm_classes_seen": n, "cm_diag_mean": diag}
