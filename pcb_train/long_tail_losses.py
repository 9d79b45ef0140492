"""Seesaw and EQLv2, the two long-tail losses PCB is combined with (docs/losses.md).

N sampled RoIs, K foreground classes; labels [N]: 0..K-1 positive, K background, -1 ignored.

    seesaw_ce(cls_logits [N, K], labels [N], cum_samples [K], p, q, eps, soft_target)   -> [N]
        CE on the Seesaw-adjusted class logits z_j + log(W[y, j]) (j != y), per positive
    eqlv2_targets(cm [K, K], labels [N], alpha_r)                                       -> [N, K+1]
        a_r M[:, y] + (1 - a_r) onehot(y) over the K classes, background column 0
    SampleCounts(K)      Seesaw's cumulative per-class sample counts [K+1] (background last)
    EQLv2GradStats(K)    EQLv2's accumulated |grad| of positives / negatives per class and the
                         gradient-balanced weights derived from them
    seesaw_test_logits / eqlv2_test_logits   raw head outputs -> [R, K+1] logits whose softmax is
                         the model's test-time scores (background last; docs/losses.md §4);
                         seesaw_scores / eqlv2_scores are those scores as the methods define them

Both stateful modules SUM-all-reduce their batch statistics over ranks (every rank joins), so all
ranks hold identical buffers; the buffers are float64 and part of the state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcb_analysis.errors import ApiMisuseError
from pcb_train.distributed import all_reduce_sum_

SEESAW_P = 0.8
SEESAW_Q = 2.0
SEESAW_EPS = 0.01
EQLV2_GAMMA = 12.0
EQLV2_MU = 0.8
EQLV2_ALPHA = 4.0
EQLV2_RATIO_EPS = 1e-10  # pos / (neg + eps), as the EQLv2 reference implementation


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_labels(labels: Tensor, n: int, lo: int, hi: int, where: str) -> Tensor:
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ApiMisuseError(f"{where}: labels must be [N] = [{n}], got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ApiMisuseError(f"{where}: labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() and bool(((labels < lo) | (labels > hi)).any()):
        raise ApiMisuseError(f"{where}: labels must be in {lo}..{hi}")
    return labels.long()


# ---------------------------------------------------------------------------------- Seesaw


def seesaw_weights(
    cls_logits: Tensor,
    labels: Tensor,
    cum_samples: Tensor,
    p: float = SEESAW_P,
    q: float = SEESAW_Q,
    eps: float = SEESAW_EPS,
) -> Tensor:
    """Seesaw weights W [N, K] of positives: W[n, j] = mitigation x compensation, 1 at j = y_n.

    mitigation = (c_j / c_y)^p where c_j < c_y (c = cum_samples clamped at 1), else 1;
    compensation = (s_j / max(s_y, eps))^q where that ratio is > 1, else 1, with s = softmax of
    the detached class logits. Both factors are 1 at the label column.
    """
    z = cls_logits.detach().to(_work_dtype(cls_logits))
    counts = cum_samples.to(device=z.device, dtype=z.dtype).clamp_min(1.0)
    ratio = counts.unsqueeze(0) / counts.index_select(0, labels).unsqueeze(1)  # [N, K] c_j / c_y
    w = torch.where(ratio < 1.0, ratio.pow(p), torch.ones_like(ratio))
    s = torch.softmax(z, dim=1)
    own = s.gather(1, labels.unsqueeze(1)).clamp_min(eps)  # [N, 1]
    score_ratio = s / own
    w = w * torch.where(score_ratio > 1.0, score_ratio.pow(q), torch.ones_like(score_ratio))
    return w.scatter(1, labels.unsqueeze(1), 1.0)


def seesaw_ce(
    cls_logits: Tensor,
    labels: Tensor,
    cum_samples: Tensor,
    p: float = SEESAW_P,
    q: float = SEESAW_Q,
    eps: float = SEESAW_EPS,
    soft_target: Tensor | None = None,
) -> Tensor:
    """Seesaw cross-entropy per positive -> [N] (docs/losses.md §2).

    cls_logits [N, K] class logits only (no objectness), labels [N] in 0..K-1, cum_samples [K].
    The logits are adjusted on the non-label classes, `z~_j = z_j + log W[n, j]` (`seesaw_weights`,
    from the HARD label), and the loss is `-log softmax(z~)_y`, or with `soft_target` [N, K]
    (rows summing to 1) `-sum_j t_j log softmax(z~)_j`. p = q = 0 is plain CE; a one-hot soft
    target is the hard-label loss. Computed in float32 at least; gradients flow to cls_logits.
    """
    if cls_logits.dim() != 2 or cls_logits.shape[1] < 1 or not cls_logits.is_floating_point():
        raise ApiMisuseError(f"seesaw_ce: cls_logits must be float [N, K], got {list(cls_logits.shape)}")
    n, k = cls_logits.shape
    labels = _check_labels(labels, n, 0, k - 1, "seesaw_ce")
    if cum_samples.shape != (k,):
        raise ApiMisuseError(f"seesaw_ce: cum_samples must be [K] = [{k}], got {list(cum_samples.shape)}")
    if p < 0 or q < 0 or eps <= 0:
        raise ApiMisuseError(f"seesaw_ce: need p >= 0, q >= 0, eps > 0 (got {p}, {q}, {eps})")
    z = cls_logits.to(_work_dtype(cls_logits))
    w = seesaw_weights(z, labels, cum_samples, p, q, eps)
    log_q = F.log_softmax(z + w.log(), dim=1)  # log W = 0 at the label column
    if soft_target is None:
        return -log_q.gather(1, labels.unsqueeze(1)).squeeze(1)
    if soft_target.shape != (n, k):
        raise ApiMisuseError(
            f"seesaw_ce: soft_target must be [N, K] = [{n}, {k}], got {list(soft_target.shape)}"
        )
    return -(soft_target.to(log_q.dtype) * log_q).sum(dim=1)


class SampleCounts(nn.Module):
    """Seesaw's cumulative sample counts: buffer `.counts` [K+1] float64 (background last).

    `update(labels)` adds this batch's count of every label 0..K (ignored -1 rows skipped),
    SUM-all-reduced over ranks when torch.distributed is initialised **[choice]**: the reference
    implementation counts per rank; summing keeps every rank's weights identical.
    """

    counts: Tensor

    def __init__(self, num_classes: int, *, sync: bool = True) -> None:
        super().__init__()
        if num_classes < 1:
            raise ApiMisuseError(f"SampleCounts: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.sync = bool(sync)
        self.register_buffer("counts", torch.zeros(self.num_classes + 1, dtype=torch.float64))

    @torch.no_grad()
    def update(self, labels: Tensor) -> None:
        k = self.num_classes
        labels = _check_labels(labels, labels.shape[0] if labels.dim() == 1 else -1, -1, k, "SampleCounts")
        batch = torch.bincount(labels[labels >= 0], minlength=k + 1).to(self.counts)
        if self.sync:
            all_reduce_sum_(batch)
        self.counts += batch


def seesaw_test_logits(raw: Tensor) -> Tensor:
    """Seesaw head outputs [R, K+2] (K classes, foreground, background) -> [R, K+1] logits.

    Column j < K is `log softmax(classes)_j + log P(fg)`, column K is `log P(bg)` with
    (P(fg), P(bg)) = softmax of the two objectness logits: a log-probability vector, so its
    softmax is exactly Seesaw's test-time scores softmax(classes) x P(fg) and P(bg), and the
    foreground-only softmax of it is softmax(classes)."""
    if raw.dim() != 2 or raw.shape[1] < 3:
        raise ApiMisuseError(f"seesaw_test_logits: raw must be [R, K+2], got {list(raw.shape)}")
    z = raw.to(_work_dtype(raw))
    cls = F.log_softmax(z[:, :-2], dim=1)
    obj = F.log_softmax(z[:, -2:], dim=1)
    return torch.cat([cls + obj[:, :1], obj[:, 1:]], dim=1)


def seesaw_scores(raw: Tensor) -> Tensor:
    """Seesaw's own test-time scores [R, K+1] from head outputs [R, K+2] (K classes, fg, bg):
    softmax(classes) x P(fg) for j < K and P(bg) in column K."""
    z = raw.to(_work_dtype(raw))
    obj = torch.softmax(z[:, -2:], dim=1)
    return torch.cat([torch.softmax(z[:, :-2], dim=1) * obj[:, :1], obj[:, 1:]], dim=1)


# ----------------------------------------------------------------------------------- EQLv2


def eqlv2_targets(
    cm: Tensor, labels: Tensor, alpha_r: float, *, dtype: torch.dtype | None = None
) -> Tensor:
    """EQLv2 + PCB targets -> [N, K+1] (docs/losses.md §3).

    Positive of class y: `t[:K] = a_r * M[:, y] + (1 - a_r) * onehot(y)` (column y of the
    UNNORMALISED matrix, `cm` [K, K] used detached), `t[K] = 0`. A background row (label K) gets
    EQLv2's plain target onehot(K). alpha_r = 0 gives exactly the one-hot targets. `dtype`: of the
    result (default: the matrix's, float32 for a half-precision matrix); the loss asks for its
    logits' dtype, so that no [N, K+1] tensor is built in float64 only to be cast.
    """
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ApiMisuseError(f"eqlv2_targets: cm must be [K, K], got {list(cm.shape)}")
    a = float(alpha_r)
    if not 0.0 <= a <= 1.0:
        raise ApiMisuseError(f"eqlv2_targets: alpha_r must be in [0, 1], got {alpha_r}")
    k = cm.shape[0]
    labels = _check_labels(labels, labels.shape[0] if labels.dim() == 1 else -1, 0, k, "eqlv2_targets")
    if dtype is None:
        dtype = cm.dtype if cm.is_floating_point() and cm.dtype != torch.float16 else torch.float32
    out = one_hot_rows(labels, k + 1, dtype)
    if a == 0.0:
        return out
    pos = (labels < k).nonzero().squeeze(1)
    y = labels.index_select(0, pos)
    # column y_p of M for each positive p; positives repeat a few classes, so the strided column
    # gather reads each distinct class once ([K, U]) and the rows are then copied per positive
    classes, which = torch.unique(y, return_inverse=True)
    cols = cm.detach().index_select(1, classes.to(cm.device)).t().to(device=out.device, dtype=dtype)
    cols = F.pad(cols * a, (0, 1))  # [U, K+1], background column 0
    cols[torch.arange(classes.shape[0], device=out.device), classes] += 1.0 - a
    return out.index_copy_(0, pos, cols.index_select(0, which))


def one_hot_rows(labels: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """[N, width] rows with a 1 at each label, directly in `dtype` (F.one_hot builds int64 first)."""
    out = torch.zeros(labels.shape[0], width, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels.long()[:, None], 1.0)


class EQLv2GradStats(nn.Module):
    """EQLv2's gradient statistics and weights: buffers `.pos_grad`, `.neg_grad` [K] and `.steps`.

    `weights(device, dtype)` -> (pos_w [K+1], neg_w [K+1]): before any `collect` all ones; then
    with r_j = pos_grad_j / (neg_grad_j + 1e-10): neg_w_j = sigmoid(gamma (r_j - mu)),
    pos_w_j = 1 + alpha (1 - neg_w_j), and 1 / 1 for the background column K.
    `collect(logits [N, K+1], target [N, K+1], weight [N, K+1])` (no gradient): with
    g = |dBCE/dz| = |target (sigmoid(z) - 1) + (1 - target) sigmoid(z)|, adds
    sum_n g t w and sum_n g (1 - t) w of the K class columns, SUM-all-reduced over ranks.
    Rows to ignore must be left out by the caller. Defaults gamma 12, mu 0.8, alpha 4.
    """

    pos_grad: Tensor
    neg_grad: Tensor
    steps: Tensor

    def __init__(
        self,
        num_classes: int,
        gamma: float = EQLV2_GAMMA,
        mu: float = EQLV2_MU,
        alpha: float = EQLV2_ALPHA,
        *,
        sync: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ApiMisuseError(f"EQLv2GradStats: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.gamma, self.mu, self.alpha = float(gamma), float(mu), float(alpha)
        self.sync = bool(sync)
        self.register_buffer("pos_grad", torch.zeros(self.num_classes, dtype=torch.float64))
        self.register_buffer("neg_grad", torch.zeros(self.num_classes, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, gamma={self.gamma}, mu={self.mu}, alpha={self.alpha}"

    @torch.no_grad()
    def weights(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        k1 = self.num_classes + 1
        if int(self.steps) == 0:
            ones = torch.ones(k1, device=device, dtype=dtype)
            return ones, ones.clone()
        ratio = self.pos_grad / (self.neg_grad + EQLV2_RATIO_EPS)
        neg_w = F.pad(torch.sigmoid(self.gamma * (ratio - self.mu)), (0, 1), value=1.0)
        pos_w = 1.0 + self.alpha * (1.0 - neg_w)
        return pos_w.to(device=device, dtype=dtype), neg_w.to(device=device, dtype=dtype)

    @torch.no_grad()
    def collect(self, logits: Tensor, target: Tensor, weight: Tensor) -> None:
        k = self.num_classes
        if logits.dim() != 2 or logits.shape[1] != k + 1 or target.shape != logits.shape:
            raise ApiMisuseError(
                f"EQLv2GradStats.collect: logits and target must be [N, {k + 1}], got "
                f"{list(logits.shape)} and {list(target.shape)}"
            )
        # element-wise in the logits' precision (float32 at least), sums in float64
        z = logits.detach()
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        t = target.detach().to(z.dtype)
        w = weight.detach().to(z.dtype)
        prob = torch.sigmoid(z)
        g = (t * (prob - 1.0) + (1.0 - t) * prob).abs() * w
        pos = (g * t).sum(dim=0, dtype=torch.float64)[:k]
        neg = (g * (1.0 - t)).sum(dim=0, dtype=torch.float64)[:k]
        both = torch.cat([pos, neg]).to(self.pos_grad.device)
        if self.sync:
            all_reduce_sum_(both)
        self.pos_grad += both[:k]
        self.neg_grad += both[k:]
        self.steps += 1


def eqlv2_scores(raw: Tensor) -> Tensor:
    """EQLv2's own test-time scores [R, K+1] from sigmoid head outputs [R, K+1] (background last):
    class j < K scores sigmoid(z_j) (1 - sigmoid(z_K)), column K = sigmoid(z_K). Not a distribution."""
    z = raw.to(_work_dtype(raw))
    s = torch.sigmoid(z)
    return torch.cat([s[:, :-1] * (1.0 - s[:, -1:]), s[:, -1:]], dim=1)


def eqlv2_test_logits(raw: Tensor) -> Tensor:
    """EQLv2 head outputs [R, K+1] (sigmoid, background last) -> [R, K+1] logits of pcbkit's layout.

    With s_j = sigmoid(z_j) (1 - sigmoid(z_K)) and S = sum_j s_j: column j < K is
    `log s_j - log max(1, S)`, column K `log(1 - min(1, S))` (floored at the float's smallest
    normal value, so it stays finite). Its softmax is s_j itself when S <= 1 and s_j / S when the
    class scores sum past 1 (a K+1 distribution cannot hold more) **[choice]**; the foreground-only
    softmax is sigmoid(z_j) / sum_k sigmoid(z_k) in every case. Computed in log space (finite for
    any finite z)."""
    if raw.dim() != 2 or raw.shape[1] < 2:
        raise ApiMisuseError(f"eqlv2_test_logits: raw must be [R, K+1], got {list(raw.shape)}")
    z = raw.to(_work_dtype(raw))
    log_s = F.logsigmoid(z[:, :-1]) + F.logsigmoid(-z[:, -1:])  # [R, K]
    log_total = torch.logsumexp(log_s, dim=1, keepdim=True)  # log S
    tiny = torch.finfo(z.dtype).tiny
    bg = torch.log((-torch.expm1(log_total.clamp_max(0.0))).clamp_min(tiny))
    return torch.cat([log_s - log_total.clamp_min(0.0), bg], dim=1)
