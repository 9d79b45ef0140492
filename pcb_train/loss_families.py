"""The classification-loss families of the R-CNN head, each with and without PCB (docs/losses.md).

    ce      [N, K+1] softmax logits (background last): `pcb_loss.pcb_loss` / cross-entropy
    seesaw  [N, K+2] (K classes, foreground, background): Seesaw CE on the positives' class logits
            + 2-way objectness CE on every sampled RoI, both / N; PCB mixes the fightback target
            into the Seesaw CE: (1 - a_r) SeesawCE(y) + a_r SeesawCE(t)
    eqlv2   [N, K+1] sigmoid logits (background last): BCE with EQLv2's gradient-balanced weights / N;
            PCB replaces the positives' targets by `long_tail_losses.eqlv2_targets`

A family object `loss(logits, labels, cm, alpha_r) -> scalar` holds its statistics (nn.Module
buffers: Seesaw's sample counts, EQLv2's gradient sums), says which [N, K+1] logits feed the
online matrix (`matrix_logits`) and how that matrix is built (`make_confusion`), and maps raw
outputs to pcbkit's test-time [R, K+1] layout (`test_logits`). `build_family("ce", K)` is None:
the cross-entropy path stays the one in `pcb_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcb_analysis.errors import ApiMisuseError
from pcb_train.long_tail_losses import (
    SEESAW_EPS,
    SEESAW_P,
    SEESAW_Q,
    EQLv2GradStats,
    SampleCounts,
    eqlv2_targets,
    eqlv2_test_logits,
    one_hot_rows,
    seesaw_ce,
    seesaw_test_logits,
)
from pcb_train.pcb_loss import OnlineConfusion, fightback_targets

CLS_LOSSES = ("ce", "seesaw", "eqlv2")


def num_cls_outputs(cls_loss: str, num_classes: int) -> int:
    """Width of the classifier: K + 2 for Seesaw, K + 1 otherwise."""
    if cls_loss not in CLS_LOSSES:
        raise ApiMisuseError(f"num_cls_outputs: cls_loss must be one of {CLS_LOSSES}, got {cls_loss!r}")
    return num_classes + (2 if cls_loss == "seesaw" else 1)


def make_confusion(cls_loss: str, num_classes: int, momentum: float) -> OnlineConfusion:
    """The online matrix PCB uses with this family: softmax of the K class logits with renormalised
    rows (ce, seesaw), or sigmoid scores without renormalisation (eqlv2)."""
    if cls_loss not in CLS_LOSSES:
        raise ApiMisuseError(f"make_confusion: cls_loss must be one of {CLS_LOSSES}, got {cls_loss!r}")
    if cls_loss == "eqlv2":
        return OnlineConfusion(num_classes, momentum, activation="sigmoid", normalize_rows=False)
    return OnlineConfusion(num_classes, momentum)


def _split(labels: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    valid = labels >= 0
    pos = (valid & (labels < k)).nonzero().squeeze(1)
    return valid, pos, valid.sum().clamp_min(1)


class SeesawLoss(nn.Module):
    """Seesaw (+ PCB) loss of one step on logits [N, K+2]; buffer `counts.counts` [K+1]."""

    name = "seesaw"

    def __init__(
        self, num_classes: int, p: float = SEESAW_P, q: float = SEESAW_Q, eps: float = SEESAW_EPS
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.p, self.q, self.eps = float(p), float(q), float(eps)
        self.counts = SampleCounts(self.num_classes)

    def matrix_logits(self, logits: Tensor) -> Tensor:
        """[N, K+1]: the K class logits (+ the foreground logit, which the matrix's softmax over
        the first K columns ignores)."""
        return logits[:, : self.num_classes + 1]

    def make_confusion(self, momentum: float) -> OnlineConfusion:
        return make_confusion(self.name, self.num_classes, momentum)

    def test_logits(self, logits: Tensor) -> Tensor:
        return seesaw_test_logits(logits)

    def forward(
        self, logits: Tensor, labels: Tensor, cm: Tensor | None = None, alpha_r: float = 0.0
    ) -> Tensor:
        k = self.num_classes
        if logits.dim() != 2 or logits.shape[1] != k + 2:
            raise ApiMisuseError(
                f"SeesawLoss: logits must be [N, K+2] = [N, {k + 2}], got {list(logits.shape)}"
            )
        labels = labels.long()
        self.counts.update(labels)  # before the loss, as the reference implementation
        valid, pos, n = _split(labels, k)
        z = logits.float() if logits.dtype != torch.float64 else logits
        y = labels.index_select(0, pos)
        soft = None
        a = float(alpha_r)
        if a != 0.0:
            if cm is None:
                raise ApiMisuseError("SeesawLoss: alpha_r > 0 needs the confusion matrix")
            t = fightback_targets(cm, y)[:, :k].to(z.dtype)
            soft = a * t + (1.0 - a) * one_hot_rows(y, k, z.dtype)
        cls = seesaw_ce(
            z.index_select(0, pos)[:, :k], y, self.counts.counts[:k], self.p, self.q, self.eps, soft
        )
        obj_labels = (labels == k).long()  # 0 foreground, 1 background
        obj = F.cross_entropy(z[valid][:, k:], obj_labels[valid], reduction="sum")
        return (cls.sum() + obj) / n


class EQLv2Loss(nn.Module):
    """EQLv2 (+ PCB) loss of one step on sigmoid logits [N, K+1]; buffers in `stats`."""

    name = "eqlv2"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.stats = EQLv2GradStats(self.num_classes)

    def matrix_logits(self, logits: Tensor) -> Tensor:
        return logits

    def make_confusion(self, momentum: float) -> OnlineConfusion:
        return make_confusion(self.name, self.num_classes, momentum)

    def test_logits(self, logits: Tensor) -> Tensor:
        return eqlv2_test_logits(logits)

    def forward(
        self, logits: Tensor, labels: Tensor, cm: Tensor | None = None, alpha_r: float = 0.0
    ) -> Tensor:
        """sum over non-ignored rows of BCE(z, t) x (pos_w t + neg_w (1 - t)) / N, then the gradient
        statistics collected with the same t and weights: t is one-hot(label) or, with PCB, the
        positives' `eqlv2_targets` (as the official EQLv2 + PCB code, which weights and collects with
        the soft target)."""
        k = self.num_classes
        if logits.dim() != 2 or logits.shape[1] != k + 1:
            raise ApiMisuseError(
                f"EQLv2Loss: logits must be [N, K+1] = [N, {k + 1}], got {list(logits.shape)}"
            )
        labels = labels.long()
        valid, _, n = _split(labels, k)
        z = logits.float() if logits.dtype != torch.float64 else logits
        lab = labels
        if not bool(valid.all()):  # a boolean-mask copy of [N, K+1] (and its backward) only if needed
            z, lab = z[valid], labels[valid]
        a = float(alpha_r)
        if a != 0.0:
            if cm is None:
                raise ApiMisuseError("EQLv2Loss: alpha_r > 0 needs the confusion matrix")
            target = eqlv2_targets(cm, lab, a, dtype=z.dtype)
        else:
            target = one_hot_rows(lab, k + 1, z.dtype)
        pos_w, neg_w = self.stats.weights(z.device, z.dtype)
        weight = pos_w * target + neg_w * (1.0 - target)
        loss = (F.binary_cross_entropy_with_logits(z, target, reduction="none") * weight).sum() / n
        self.stats.collect(z, target, weight)
        return loss


FamilyLoss = SeesawLoss | EQLv2Loss


def build_family(cls_loss: str, num_classes: int) -> FamilyLoss | None:
    """The loss module of `model.cls_loss` (None for "ce": `pcb_loss` handles it)."""
    if cls_loss == "ce":
        return None
    if cls_loss == "seesaw":
        return SeesawLoss(num_classes)
    if cls_loss == "eqlv2":
        return EQLv2Loss(num_classes)
    raise ApiMisuseError(f"build_family: cls_loss must be one of {CLS_LOSSES}, got {cls_loss!r}")
