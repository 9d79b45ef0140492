"""PCB training loss (docs/method.md §4.1-§4.3): online confusion matrix, fightback target, PCB loss.

N sampled RoIs, K foreground classes; logits [N, K+1] with background = column K; labels [N] with
0..K-1 a positive of that class, K background, -1 ignored (excluded from every sum and from N).
The confusion matrix `cm` [K, K] is row = ground-truth class, column = predicted class.

    fightback_targets(cm, labels)        [P, K+1]   t[j] = M[j, y] / sum_i M[i, y], t[K] = 0
    pcb_loss(logits, labels, cm, a)      scalar     [sum_Neg CE(z, K) + (1 - a) sum_P CE(z, y)
                                                     + a sum_P KL(t || softmax(z))] / N
    OnlineConfusion(K, momentum=0.99)    buffers .matrix [K, K], .counts [K] (float64)
    step_alpha(alpha, r, n_iter)         a_r = alpha * r / (n_iter - 1)
    seesaw_ce, eqlv2_targets, EQLv2GradStats   the Seesaw / EQLv2 pieces (`long_tail_losses`, re-exported)
    pcb_started / pcb_active             the start condition (threshold AND every class seen)

Order inside one classification-loss call (docs/method.md §4.2): `confusion.update(logits, labels)`
first, then `pcb_loss(logits, labels, confusion.matrix, a_r)`; `iterative_head.iterative_cls_loss`
does exactly that for every step.

The matrix math (foreground softmax, per-class sums, EMA) lives in ONE place,
`pcb_analysis.class_sums`, shared with the offline analysis; `OnlineConfusion` only holds the buffers,
all-reduces the batch sums and calls it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcb_analysis.class_sums import ACTIVATIONS, batch_sums, ema_update_
from pcb_analysis.errors import ApiMisuseError
from pcb_train.distributed import all_reduce_sum_
from pcb_train.long_tail_losses import (  # re-exported: the issue-14 contract names live here too
    EQLv2GradStats,
    SampleCounts,
    eqlv2_targets,
    seesaw_ce,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_MOMENTUM",
    "EQLv2GradStats",
    "OnlineConfusion",
    "SampleCounts",
    "cross_entropy_loss",
    "eqlv2_targets",
    "fightback_targets",
    "pcb_active",
    "pcb_loss",
    "pcb_started",
    "seesaw_ce",
    "step_alpha",
]

DEFAULT_ALPHA = 0.4
DEFAULT_MOMENTUM = 0.99
BUFFER_DTYPE = torch.float64


# ------------------------------------------------------------------------------------- checks


def _check_logits_labels(logits: Tensor, labels: Tensor, where: str) -> int:
    """Shape/dtype/range checks shared by the losses; returns K."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ApiMisuseError(f"{where}: logits must be [N, K+1] with K >= 1, got {list(logits.shape)}")
    if not logits.is_floating_point():
        raise ApiMisuseError(f"{where}: logits must be floating point, got {logits.dtype}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ApiMisuseError(f"{where}: labels must be [N] = [{logits.shape[0]}], got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ApiMisuseError(f"{where}: labels must be an integer tensor, got {labels.dtype}")
    k = logits.shape[1] - 1
    if labels.numel() and bool(((labels < -1) | (labels > k)).any()):
        raise ApiMisuseError(
            f"{where}: labels must be -1 (ignore), 0..{k - 1} (positive) or {k} (background)"
        )
    return k


def _check_cm(cm: Tensor, k: int, where: str) -> None:
    if cm.dim() != 2 or tuple(cm.shape) != (k, k):
        raise ApiMisuseError(f"{where}: cm must be [K, K] = [{k}, {k}], got {list(cm.shape)}")


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """Losses run in float32 at least (half/bfloat16 logits from AMP are upcast), float64 stays."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------ targets


def _column_targets(cm: Tensor, labels: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Fightback targets per distinct class: (targets [U, K], inverse [P]); row p's target is
    targets[inverse[p]].

    targets[u, j] = M[j, c_u] / sum_i M[i, c_u] for the U distinct labels c_u (sorted). Reads only
    those U columns (a detector's positives come from a few ground-truth objects, so U << P) and
    never normalises the full [K, K] matrix. A column that sums to 0 (no mass ever predicted as
    class c, e.g. a matrix still at zero) has no defined distribution: its target falls back to
    one-hot(c), i.e. plain CE for those positives. `cm` must be non-negative (probability mass).
    """
    classes, inverse = torch.unique(labels, return_inverse=True)  # [U], [P]
    cols = cm.detach().t().index_select(0, classes).to(dtype)  # [U, K], row u = column classes[u] of M
    col_sum = cols.sum(dim=1, keepdim=True)  # [U, 1]
    empty = col_sum <= 0
    cols = cols / torch.where(empty, torch.ones_like(col_sum), col_sum)
    # empty columns are all-zero rows here: adding 1 at the class makes them one-hot (no host sync)
    cols.scatter_add_(1, classes.unsqueeze(1), empty.to(dtype))
    return cols, inverse


def fightback_targets(cm: Tensor, labels: Tensor) -> Tensor:
    """Fightback targets of positives (docs/method.md §4.2): cm [K, K], labels [P] in 0..K-1 -> [P, K+1].

    `t[p, j] = cm[j, y_p] / sum_i cm[i, y_p]` for j < K (column y_p, column-normalised) and
    `t[p, K] = 0` (background). Each row sums to 1. If column y_p of `cm` sums to 0 the row is
    one-hot(y_p) instead (documented fallback: no correction, plain CE for that positive).
    Computed from `cm` detached, in cm's floating dtype (at least float32).
    """
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ApiMisuseError(f"fightback_targets: cm must be [K, K], got {list(cm.shape)}")
    k = cm.shape[0]
    if labels.dim() != 1:
        raise ApiMisuseError(f"fightback_targets: labels must be [P], got {list(labels.shape)}")
    if labels.numel() and bool(((labels < 0) | (labels >= k)).any()):
        raise ApiMisuseError(f"fightback_targets: labels must be positives in 0..{k - 1}")
    dtype = cm.dtype if cm.is_floating_point() and cm.dtype != torch.float16 else torch.float32
    targets, inverse = _column_targets(cm, labels.long(), dtype)
    return F.pad(targets, (0, 1)).index_select(0, inverse)  # background column K = 0


# --------------------------------------------------------------------------------------- loss


def cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Plain softmax cross-entropy over all K+1 logits, mean over the non-ignored rows (0 if none)."""
    z = logits.to(_compute_dtype(logits))
    total = F.cross_entropy(z, labels, ignore_index=-1, reduction="sum")
    return total / (labels >= 0).sum().clamp_min(1)


class _PCBLossFunction(torch.autograd.Function):
    """Fused PCB loss: forward from one log-softmax, backward `(q - target) / N` written directly.

    z [N, K+1] (float32/float64), labels [N], pos [P] (row indices of the positives), t [P, K+1]
    (fightback targets, background column 0, rows summing to 1), ent = sum t log t (a constant),
    a = alpha_r. The gradient row of a non-ignored RoI is `(q - w e_y - a t) / N` with `w = 1 - a`
    for positives and `w = 1` for negatives: what autograd gives through the unfused formula
    (tests), at the cost of about one `F.cross_entropy` (no dense [N, K+1] target, no autograd
    graph of indexing ops).
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, labels: Tensor, pos: Tensor, t: Tensor, ent: Tensor, a: float) -> Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):  # z is already float32/64
            return _PCBLossFunction._forward(ctx, z, labels, pos, t, ent, a)

    @staticmethod
    def _forward(
        ctx: Any, z: Tensor, labels: Tensor, pos: Tensor, t: Tensor, ent: Tensor, a: float
    ) -> Tensor:
        k = z.shape[1] - 1
        logq = F.log_softmax(z, dim=1)  # [N, K+1]
        valid = labels >= 0
        is_pos = valid & (labels < k)
        w = valid.to(z.dtype) - a * is_pos.to(z.dtype)  # hard-label weights: 1 neg, 1 - a pos, 0 ignored
        index = labels.clamp_min(0).unsqueeze(1)
        hard = -torch.dot(logq.gather(1, index).squeeze(1), w)
        cross = torch.vdot(t.reshape(-1), logq.index_select(0, pos).reshape(-1))  # sum_P t . log q
        n_valid = valid.sum().clamp_min(1).to(z.dtype)
        ctx.save_for_backward(z, index, w, valid, pos, t, n_valid)
        ctx.logq = logq  # an intermediate (not an input/output): the first backward turns it into q in place
        ctx.a = a
        return (hard + a * (ent.to(z.dtype) - cross)) / n_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        z, index, w, valid, pos, t, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        if ctx.logq is not None:  # q [N, K+1] in the forward's buffer: no new [N, K+1] allocation
            grad, ctx.logq = ctx.logq.exp_(), None
        else:  # a second backward through a retained graph: recompute
            grad = F.log_softmax(z, dim=1).exp_()  # bit-identical to the first pass
        grad.mul_((valid.to(grad.dtype) * scale).unsqueeze(1))
        grad.scatter_add_(1, index, (w * -scale).unsqueeze(1))
        grad.index_add_(0, pos, t * (-ctx.a * scale))
        return grad, None, None, None, None, None


def pcb_loss(logits: Tensor, labels: Tensor, cm: Tensor, alpha_r: float) -> Tensor:
    """PCB loss of one step (docs/method.md §4.3), divided by N (the non-ignored sampled RoIs).

    logits [N, K+1] (background last), labels [N] (0..K-1 positive, K background, -1 ignored),
    cm [K, K] the online matrix AFTER this batch's update (used detached), alpha_r in [0, 1]:

        L = [sum_Neg CE(z, K) + (1 - a) sum_P CE(z, y) + a sum_P KL(t || softmax(z))] / N

    with `t = fightback_targets(cm, y)` and the softmax over all K+1 logits. The KL is evaluated as
    `sum t log t - sum t log q` on the P positive rows only, with `sum t log t` computed once per
    distinct class, so no dense [N, K+1] target is built; its gradient w.r.t. z is `q - t`, the
    soft-target CE's (the fused backward writes it directly). alpha_r = 0 is exactly
    `F.cross_entropy` (mean); an identity `cm` makes t one-hot, so L = CE for any a. Half/bfloat16
    logits are computed in float32. Not twice differentiable.
    """
    k = _check_logits_labels(logits, labels, "pcb_loss")
    a = float(alpha_r)
    if not 0.0 <= a <= 1.0:
        raise ApiMisuseError(f"pcb_loss: alpha_r must be in [0, 1], got {alpha_r}")
    if a == 0.0:
        return cross_entropy_loss(logits, labels)
    _check_cm(cm, k, "pcb_loss")
    dt = _compute_dtype(logits)
    z = logits.to(dt)
    labels = labels.long()
    pos = ((labels >= 0) & (labels < k)).nonzero().squeeze(1)  # [P]
    targets, inverse = _column_targets(cm, labels.index_select(0, pos), dt)  # [U, K], [P]
    # sum over positives of sum_j t log t, per distinct class times its count
    counts = torch.bincount(inverse, minlength=len(targets)).to(dt)
    ent = torch.dot(torch.xlogy(targets, targets).sum(1), counts)
    t = F.pad(targets, (0, 1)).index_select(0, inverse)  # [P, K+1], background column 0
    return _PCBLossFunction.apply(z, labels, pos, t, ent, a)


# -------------------------------------------------------------------------------- step weights


def step_alpha(alpha: float, r: int, n_iter: int) -> float:
    """PCB weight of step r of an n_iter-step head: `alpha * r / (n_iter - 1)` (step 0 is plain CE).

    For n_iter = 1 (PCB without the iterative head, an ablation) the formula is undefined (0/0);
    pcbkit then uses `alpha` for the single step **[choice]**, so that ablation is not a no-op.
    """
    if n_iter < 1 or not 0 <= r < n_iter:
        raise ApiMisuseError(f"step_alpha: need 0 <= r < n_iter, got r={r}, n_iter={n_iter}")
    if n_iter == 1:
        return float(alpha)
    return float(alpha) * r / (n_iter - 1)


def pcb_started(
    *,
    epoch: float | None = None,
    start_epoch: float | None = None,
    iteration: int | None = None,
    start_iter: int | None = None,
) -> bool:
    """The schedule half of the start condition: `epoch >= start_epoch` or `iteration >= start_iter`.

    Give exactly one threshold (`start_epoch` with `epoch`, or `start_iter` with `iteration`); the
    caller defines the counters (pcbkit: 0-based iteration; epoch = iterations done / iterations
    per epoch, so fractions such as 2/3 of a schedule work).
    """
    if (start_epoch is None) == (start_iter is None):
        raise ApiMisuseError("pcb_started: give exactly one of start_epoch / start_iter")
    if start_epoch is not None:
        if epoch is None:
            raise ApiMisuseError("pcb_started: start_epoch given without epoch")
        return epoch >= start_epoch
    if iteration is None:
        raise ApiMisuseError("pcb_started: start_iter given without iteration")
    assert start_iter is not None
    return iteration >= start_iter


def pcb_active(
    ready: bool,
    *,
    epoch: float | None = None,
    start_epoch: float | None = None,
    iteration: int | None = None,
    start_iter: int | None = None,
) -> bool:
    """docs/method.md §4.3 start condition: threshold reached (`pcb_started`) AND every class seen
    (`ready`)."""
    started = pcb_started(epoch=epoch, start_epoch=start_epoch, iteration=iteration, start_iter=start_iter)
    return bool(ready) and started


# ---------------------------------------------------------------------------- online matrix


class OnlineConfusion(nn.Module):
    """The online confusion matrix of docs/method.md §4.1: buffers `.matrix` [K, K] and `.counts` [K].

    Both are float64 and zero at start, saved in the state_dict (so in checkpoints). float64
    because (a) `counts` must stay exact: float32 stops counting at 2^24 = 16.8M positives, and a
    2x LVIS schedule feeds ~90k iterations x 16 images x ~128 positives x 3 steps = ~550M; (b) the
    offline analysis accumulates in float64 through the same code, so online and offline agree to
    the last bit on the same batch. Cost: 8 B x K^2 = 11.6 MB at K = 1,203.

    `update(logits, labels)` (no gradient): per-class sums of the foreground softmax over this
    batch's positives via `pcb_analysis.class_sums.batch_sums`, SUM-all-reduced over ranks when
    torch.distributed is initialised (every rank joins, even with zero positives), then
    `pcb_analysis.class_sums.ema_update_` (only classes with n_b > 0; rows renormalised), `counts += n_b`.
    Options (docs/losses.md §3): `activation="sigmoid"` accumulates per-class sigmoids of the K
    foreground logits instead of their softmax, `normalize_rows=False` skips the row renormalisation;
    together they are the EQLv2 + PCB matrix. The defaults are the softmax matrix of §4.1.
    Every rank therefore ends with identical buffers. Device-agnostic: move the module with `.to()`.

    The batch sums go into scratch accumulators (non-persistent buffers, float64 S [K, K], int64
    n [K] and H [K, K], all zero between updates) through `batch_sums(out=...)`, and only the rows
    a batch touched are zeroed again: allocating and zeroing three K x K tensors per call would cost
    more than the math (the scratch is not in the state_dict).
    """

    matrix: Tensor
    counts: Tensor
    _sum_s: Tensor
    _sum_n: Tensor
    _sum_h: Tensor

    def __init__(
        self,
        num_classes: int,
        momentum: float = DEFAULT_MOMENTUM,
        *,
        activation: str = "softmax",
        normalize_rows: bool = True,
        sync: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ApiMisuseError(
                f"OnlineConfusion: activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        if num_classes < 1:
            raise ApiMisuseError(f"OnlineConfusion: num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= momentum < 1.0:
            raise ApiMisuseError(f"OnlineConfusion: momentum must be in [0, 1), got {momentum}")
        k = int(num_classes)
        self.num_classes = k
        self.momentum = float(momentum)
        self.sync = bool(sync)
        self.activation = activation
        self.normalize_rows = bool(normalize_rows)
        self.register_buffer("matrix", torch.zeros(k, k, dtype=BUFFER_DTYPE))
        self.register_buffer("counts", torch.zeros(k, dtype=BUFFER_DTYPE))
        self.register_buffer("_sum_s", torch.zeros(k, k, dtype=torch.float64), persistent=False)
        self.register_buffer("_sum_n", torch.zeros(k, dtype=torch.int64), persistent=False)
        self.register_buffer("_sum_h", torch.zeros(k, k, dtype=torch.int64), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, momentum={self.momentum}, activation={self.activation}, "
            f"normalize_rows={self.normalize_rows}, sync={self.sync}"
        )

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Fold one batch in: logits [N, K+1], labels [N]. Returns the (all-reduced) counts n_b [K]
        (float64)."""
        k = _check_logits_labels(logits, labels, "OnlineConfusion.update")
        if k != self.num_classes:
            raise ApiMisuseError(
                f"OnlineConfusion.update: logits have K={k}, the matrix has K={self.num_classes}"
            )
        if logits.device != self.matrix.device:
            raise ApiMisuseError(
                f"OnlineConfusion.update: logits on {logits.device}, the matrix on "
                f"{self.matrix.device} (move the module)"
            )
        s_b, n_b = self._sum_s, self._sum_n
        try:
            batch_sums(logits.detach(), labels, k, out=(s_b, n_b, self._sum_h), activation=self.activation)
            if self.sync:
                all_reduce_sum_(s_b)
                all_reduce_sum_(n_b)
            counts_b = n_b.to(self.counts.dtype)
            ema_update_(self.matrix, s_b, counts_b, self.momentum, normalize=self.normalize_rows)
            self.counts += counts_b
        finally:  # back to all-zero scratch, also after an error (rows with data all have n > 0)
            rows = (n_b > 0).nonzero().squeeze(1)
            s_b.index_fill_(0, rows, 0.0)
            self._sum_h.index_fill_(0, rows, 0)
            n_b.zero_()
        return counts_b

    @property
    def ready(self) -> bool:
        """True once every class has been seen at least once (`counts > 0` everywhere)."""
        return bool((self.counts > 0).all())
