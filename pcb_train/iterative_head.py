"""Iterative RoI box head of PCB (docs/method.md §4.4), independent of any detection framework.

R RoIs, K foreground classes, C feature channels (256), S x S RoI grid (7 x 7).

    features        [R, C, S, S]   RoI-aligned features (the input of the box head)
    box_head        [R, C, S, S] -> [R, D]          e.g. two FC layers of 1024 (flattens itself)
    predictor       [R, D] -> (logits [R, K+1], deltas [R, 4K] or [R, 4])

ONE weight-shared box head + predictor runs `n_iter` times over the SAME RoIs. Between two steps
the features are modulated

    F <- F * g + c,    g = MLP_loc(deltas) viewed [R, 1, S, S]   (spatial, broadcast over C)
                       c = MLP_cls(logits) viewed [R, C, 1, 1]   (channel, broadcast over S x S)

with MLP = Linear(in, 512) -> ReLU -> Linear(512, out); no gate, no detach, so gradients flow
through every step back to the first step's features. The last step needs no modulation, so only
`n_iter - 1` are computed (the official code also modulates after the last step and discards it).

The head itself does not care where the background column is (the MLPs are learned linear maps);
the losses do: `iterative_cls_loss` takes logits with background LAST (column K), labels in
0..K-1 for positives, K for background, -1 ignored. Losses: classification of every step weighted by
`step_weights` ([0.2, 0.2, 0.6]), PCB weight `a_r = step_alpha(alpha, r, n_iter)` (step 0 plain CE);
the box regression loss is framework-specific (box coder, class-specific deltas) and is left to the
caller, computed from the LAST step's deltas only (`IterativeHeadOutput.deltas`). At test time all
steps run and the last step's logits and deltas are the prediction (`.logits`, `.deltas`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from pcb_analysis.errors import ApiMisuseError
from pcb_train.pcb_loss import OnlineConfusion, cross_entropy_loss, pcb_loss, step_alpha

logger = logging.getLogger(__name__)

DEFAULT_STEP_WEIGHTS: tuple[float, ...] = (0.2, 0.2, 0.6)
MLP_HIDDEN = 512


class IterativeHeadOutput(NamedTuple):
    """Per-step outputs of `IterativeRoIHead`: `step_logits[r]` [R, K+1], `step_deltas[r]` [R, 4K|4]."""

    step_logits: tuple[Tensor, ...]
    step_deltas: tuple[Tensor, ...]

    @property
    def logits(self) -> Tensor:
        """The last step's class logits [R, K+1]: the prediction at test time."""
        return self.step_logits[-1]

    @property
    def deltas(self) -> Tensor:
        """The last step's box deltas [R, 4K|4]: the prediction at test time and the box-loss input."""
        return self.step_deltas[-1]


MODULATION_INITS: tuple[str, ...] = ("default", "identity")


def modulation_mlp(
    in_features: int, out_features: int, hidden: int = MLP_HIDDEN, *, out_bias: float | None = None
) -> nn.Sequential:
    """Linear(in, hidden) -> ReLU -> Linear(hidden, out).

    `out_bias=None`: PyTorch's default initialisation of both layers (as the official code).
    `out_bias=b`: the last layer starts with zero weights and every bias equal to `b`, so the MLP
    starts as the constant `b` (its first layer keeps the default initialisation, so gradients reach
    it as soon as the last layer moves).
    """
    mlp = nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features)
    )
    if out_bias is not None:
        last = mlp[2]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, float(out_bias))
    return mlp


def _predictor_width(predictor: nn.Module, attr: str, given: int | None, what: str) -> int:
    if given is not None:
        if given <= 0:
            raise ApiMisuseError(f"IterativeRoIHead: {what} must be positive, got {given}")
        return int(given)
    layer = getattr(predictor, attr, None)
    width = getattr(layer, "out_features", None)
    if not isinstance(width, int):
        raise ApiMisuseError(
            f"IterativeRoIHead: cannot infer {what} from predictor {type(predictor).__name__} "
            f"(no `{attr}` Linear layer); pass it explicitly"
        )
    return width


class IterativeRoIHead(nn.Module):
    """`n_iter` weight-shared passes of `box_head` + `predictor` with `F * g + c` modulation between them.

    Args:
        box_head: [R, C, S, S] -> [R, D] (flattens its input itself, like torchvision's TwoMLPHead).
        predictor: [R, D] -> (logits [R, K+1], deltas [R, 4K] or [R, 4]) (torchvision's
            FastRCNNPredictor, detectron2's FastRCNNOutputLayers, or any module with that contract).
        n_iter: number of passes (>= 1; 1 is exactly the plain head, without the MLPs).
        step_weights: classification-loss weight of each step (length n_iter).
        feat_channels: C, the channel count of the RoI features (output width of MLP_cls).
        roi_size: S, the RoI grid side (MLP_loc outputs S * S values).
        num_logits: K + 1, the input width of MLP_cls; inferred from `predictor.cls_score.out_features`.
        box_dim: 4K or 4, the input width of MLP_loc; inferred from `predictor.bbox_pred.out_features`.
        hidden: hidden width of both MLPs (512).
        modulation_init: "default" (PyTorch's default initialisation of the MLPs, as the official
            code: g and c start as small random values, so the first modulation scales the
            features down to a fraction of their size) or "identity" (the MLPs' last layers start
            at zero weights, MLP_loc's bias at 1 and MLP_cls's at 0: g = 1, c = 0, so every step
            starts as an exact copy of step 0 and the modulation is learned from there; a pcbkit
            option for short schedules and heads trained from scratch, not in the paper).
    """

    def __init__(
        self,
        box_head: nn.Module,
        predictor: nn.Module,
        n_iter: int = 3,
        step_weights: Sequence[float] = DEFAULT_STEP_WEIGHTS,
        feat_channels: int = 256,
        roi_size: int = 7,
        *,
        num_logits: int | None = None,
        box_dim: int | None = None,
        hidden: int = MLP_HIDDEN,
        modulation_init: str = "default",
    ) -> None:
        super().__init__()
        if modulation_init not in MODULATION_INITS:
            raise ApiMisuseError(
                f"IterativeRoIHead: modulation_init must be one of {MODULATION_INITS}, "
                f"got {modulation_init!r}"
            )
        if n_iter < 1:
            raise ApiMisuseError(f"IterativeRoIHead: n_iter must be >= 1, got {n_iter}")
        weights = tuple(float(w) for w in step_weights)
        if len(weights) != n_iter:
            raise ApiMisuseError(
                f"IterativeRoIHead: {len(weights)} step_weights for n_iter={n_iter}: {weights}"
            )
        if feat_channels <= 0 or roi_size <= 0:
            raise ApiMisuseError(f"IterativeRoIHead: bad feat_channels={feat_channels} / roi_size={roi_size}")
        self.box_head = box_head
        self.predictor = predictor
        self.n_iter = int(n_iter)
        self.step_weights = weights
        self.feat_channels = int(feat_channels)
        self.roi_size = int(roi_size)
        self.modulation_init = modulation_init
        self.mlp_cls: nn.Module | None = None
        self.mlp_loc: nn.Module | None = None
        if self.n_iter > 1:  # with one step the MLPs would be unused parameters (DDP rejects those)
            k1 = _predictor_width(predictor, "cls_score", num_logits, "num_logits (K+1)")
            bd = _predictor_width(predictor, "bbox_pred", box_dim, "box_dim (4K or 4)")
            identity = modulation_init == "identity"
            self.mlp_cls = modulation_mlp(k1, self.feat_channels, hidden, out_bias=0.0 if identity else None)
            self.mlp_loc = modulation_mlp(
                bd, self.roi_size * self.roi_size, hidden, out_bias=1.0 if identity else None
            )

    def modulate(self, features: Tensor, logits: Tensor, deltas: Tensor) -> Tensor:
        """`F * g + c` for features [R, C, S, S], logits [R, K+1], deltas [R, 4K|4] -> [R, C, S, S]."""
        assert self.mlp_cls is not None and self.mlp_loc is not None
        s = self.roi_size
        g = self.mlp_loc(deltas).view(-1, 1, s, s)
        c = self.mlp_cls(logits).view(-1, self.feat_channels, 1, 1)
        return torch.addcmul(c, features, g)  # one fused kernel: c + F * g, broadcast

    def forward(self, features: Tensor) -> IterativeHeadOutput:
        """features [R, C, S, S] -> per-step logits and deltas (tuples of length n_iter)."""
        c, s = self.feat_channels, self.roi_size
        if features.dim() != 4 or tuple(features.shape[1:]) != (c, s, s):
            raise ApiMisuseError(
                f"IterativeRoIHead: features must be [R, {c}, {s}, {s}], got {list(features.shape)}"
            )
        step_logits: list[Tensor] = []
        step_deltas: list[Tensor] = []
        f = features
        for r in range(self.n_iter):
            logits, deltas = self.predictor(self.box_head(f))
            step_logits.append(logits)
            step_deltas.append(deltas)
            if r + 1 < self.n_iter:
                f = self.modulate(f, logits, deltas)
        return IterativeHeadOutput(tuple(step_logits), tuple(step_deltas))


def combine_step_losses(step_losses: Sequence[Tensor], step_weights: Sequence[float]) -> Tensor:
    """sum_r step_weights[r] * step_losses[r] (scalar tensors; lengths must agree)."""
    if len(step_losses) != len(step_weights) or not step_losses:
        raise ApiMisuseError(
            f"combine_step_losses: {len(step_losses)} losses for {len(step_weights)} weights"
        )
    total = step_losses[0] * float(step_weights[0])
    for loss, w in zip(step_losses[1:], step_weights[1:], strict=True):
        total = total + loss * float(w)
    return total


class LossFamily(Protocol):
    """A non-softmax loss family (`pcb_train.loss_families`): raw logits -> matrix input and loss."""

    def matrix_logits(self, logits: Tensor) -> Tensor: ...

    def __call__(self, logits: Tensor, labels: Tensor, cm: Tensor | None, alpha_r: float) -> Tensor: ...


class StepClsLosses(NamedTuple):
    """Result of `iterative_cls_loss`: the weighted total, each step's unweighted loss and its a_r."""

    total: Tensor
    per_step: tuple[Tensor, ...]
    alphas: tuple[float, ...]


def iterative_cls_loss(
    step_logits: Sequence[Tensor],
    labels: Tensor,
    step_weights: Sequence[float],
    *,
    confusion: OnlineConfusion | None = None,
    alpha: float = 0.0,
    pcb_started: bool = False,
    family: LossFamily | None = None,
) -> StepClsLosses:
    """Classification loss of an iterative head: sum_r w_r * L_r (docs/method.md §4.3, §4.4).

    step_logits[r] [N, K+1] (background last), labels [N] (0..K-1 positive, K background, -1 ignored).
    With `confusion` given, every step first updates the online matrix with its own logits
    (docs/method.md §4.1: every call of the classification loss, also before PCB is active, also step 0),
    then `L_r = pcb_loss(logits_r, labels, confusion.matrix, a_r)` with `a_r = step_alpha(alpha, r,
    n_iter)` when `pcb_started` (the epoch/iteration threshold, see `pcb_loss.pcb_started`) and
    `confusion.ready` (checked after this step's update, as the official code does); otherwise
    `a_r = 0`, plain cross-entropy. Without `confusion` every step is plain cross-entropy.
    Works for a plain head too (one step: `a_0 = alpha`, see `step_alpha`). With a `family`
    (Seesaw / EQLv2, docs/losses.md) the matrix is updated from `family.matrix_logits(logits_r)`
    and `L_r = family(logits_r, labels, cm, a_r)` (cm None when a_r = 0: the family's base loss).
    """
    n = len(step_logits)
    if n == 0 or len(step_weights) != n:
        raise ApiMisuseError(f"iterative_cls_loss: {n} steps for {len(step_weights)} step weights")
    per_step: list[Tensor] = []
    alphas: list[float] = []
    for r, logits in enumerate(step_logits):
        a_r = 0.0
        if confusion is not None:
            confusion.update(logits if family is None else family.matrix_logits(logits), labels)
            if pcb_started and alpha != 0.0 and confusion.ready:
                a_r = step_alpha(alpha, r, n)
        if family is not None:
            cm = confusion.matrix if a_r != 0.0 and confusion is not None else None
            loss = family(logits, labels, cm, a_r)
        elif a_r != 0.0:
            assert confusion is not None
            loss = pcb_loss(logits, labels, confusion.matrix, a_r)
        else:
            loss = cross_entropy_loss(logits, labels)
        per_step.append(loss)
        alphas.append(a_r)
    return StepClsLosses(combine_step_losses(per_step, step_weights), tuple(per_step), tuple(alphas))


# The ROI heads that own an IterativeRoIHead also own its box head and predictor under their
# framework's usual names; checkpoints keep one copy, under those usual names (so a plain-head
# checkpoint and an iterative-head checkpoint share keys for the shared weights).
SHARED_KEYS = (("iterative_head.box_head.", "box_head."), ("iterative_head.predictor.", "box_predictor."))


def _drop_shared_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    for shared, _ in SHARED_KEYS:
        for key in [k for k in state_dict if k.startswith(prefix + shared)]:
            del state_dict[key]


def _fill_shared_keys(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    for shared, owner in SHARED_KEYS:
        for key in [k for k in state_dict if k.startswith(prefix + owner)]:
            state_dict.setdefault(prefix + shared + key[len(prefix + owner) :], state_dict[key])


def share_checkpoint_keys(roi_heads: nn.Module) -> None:
    """Save the shared box head / predictor once (under `box_head.` / `box_predictor.`) and fill
    the `iterative_head.*` copies back in when loading."""
    roi_heads.register_state_dict_post_hook(_drop_shared_keys)
    roi_heads.register_load_state_dict_pre_hook(_fill_shared_keys)
